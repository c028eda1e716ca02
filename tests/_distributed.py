"""Launching a test script on several CPU processes (gloo) with torch.distributed.run, and what such scripts share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ZERO3 = {
    "zero_optimization": {
        "stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
        "offload_param": {"device": "none"}, "offload_optimizer": {"device": "none"},
    },
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
}  # fmt: skip
"""DeepSpeed ZeRO-3 for a test script's ``SFTConfig(deepspeed=...)`` (a script embeds it as ``repr(ZERO3)``)."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_process_env() -> dict[str, str]:
    """The environment variables torchrun gives the one process of a one-process group (a free port)."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script args`` under ``python -m torch.distributed.run`` with ``nproc`` processes in the
    script's folder; returns the finished process (stdout/stderr captured as text)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # torch.distributed.run sets them for the workers
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=script.parent)


EXIT_ABORT = "terminate called without an active exception"
"""What a gloo worker prints when its threads outlive interpreter teardown (pytorch issue #190489)."""


def finished_before_exit_abort(proc: subprocess.CompletedProcess, out_dir: Path, nproc: int) -> bool:
    """True when a torchrun ``proc`` failed only by a worker aborting after its script's work: every rank wrote its
    marker ``out_dir/exit-rank{r}`` after training and stderr holds gloo's teardown abort (:data:`EXIT_ABORT`).
    Rare on this 2-core machine even though the scripts end their process group; the results are complete."""
    return (
        proc.returncode != 0
        and EXIT_ABORT in proc.stderr
        and all((out_dir / f"exit-rank{rank}").exists() for rank in range(nproc))
    )


def save_site_crosscoder(path: Path, layer: int) -> Path:
    """A random 2-model (base, sft) crosscoder of 128 features at ``layer`` of the tiny Qwen3 (seed 0), its input
    scales from that model's activations, saved to ``path``; returns ``path``."""
    import torch

    from posttrain_probe.crosscoder.config import CrosscoderConfig
    from posttrain_probe.crosscoder.model import Crosscoder
    from posttrain_probe.testing import tiny_model, tiny_tokenizer

    model = tiny_model("qwen3", seed=0)
    enc = tiny_tokenizer()(
        ["What is 3 + 4 * 2? First multiply.", "Compute 12 * 3 - 5."], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer][enc.attention_mask.bool()]
    cc = Crosscoder(CrosscoderConfig(model_names=["base", "sft"], d_model=64, n_features=128, layer=layer))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(2, 64, 128, generator=gen) / 8)
        cc.W_dec.copy_(torch.randn(128, 2, 64, generator=gen) * 0.3)
        cc.b_enc.copy_(torch.randn(128, generator=gen) * 0.3)
    cc.set_scales_from([torch.stack([hidden, hidden], dim=1)])
    cc.save_pretrained(path)
    return path
