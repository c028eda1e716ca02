"""The vLLM paths on a GPU, in one command: a GRPO step with TRL's vLLM engine colocated and the probe callbacks, and a
generative evaluation through lm-eval's ``vllm`` model.

Usage::

    python benchmarks/vllm_check.py --device cuda --json vllm_check.json    # one GPU with vllm installed, ~3 min
    python benchmarks/vllm_check.py --device cpu --tiny                     # the same code with the HF fallbacks

With ``--device cuda`` the model is a randomly initialised Qwen2.5-0.5B shape (no download) saved with the tiny
tokenizer; GRPO runs ``posttrain_probe.recipes.grpo`` under ``accelerate launch`` with ``use_vllm true,
vllm_mode colocate`` for ``--steps`` optimizer steps, then checks that the probe callbacks read the trained model,
not the vLLM copy: the activations stored at the last step equal an HF forward of the snapshot of that step on the
same tokens; the evaluation runs ``probe_math`` through
:func:`posttrain_probe.eval.runner.lm_eval` with ``model=vllm`` and checks that vllm ran and scored every document.
With ``--tiny`` (CPU) both run with ``use_vllm false`` and ``model=probe-hf``: what a machine without vLLM does.

Prints one table (check, status, seconds, detail) and, with ``--json``, writes it. Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_QWEN2 = dict(hidden_size=64, num_layers=4, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def save_model(out: Path, tiny: bool, dtype: str) -> Path:
    """A random-weight Qwen2 (the 0.5B shape, or tiny) with the tiny tokenizer, saved to ``out`` -> ``out``."""
    import torch

    from posttrain_probe.testing import tiny_config, tiny_tokenizer

    if tiny:
        shape = dict(TINY_QWEN2)
    else:  # the Qwen2.5-0.5B shape of the blocking benchmark (0.49 B parameters), tied embeddings as the real one
        from blocking_overhead import PRESETS  # benchmarks/ is on sys.path when this file runs as a script

        shape = {k: v for k, v in PRESETS["qwen2.5-0.5b"].items() if k != "arch"} | {"tie_word_embeddings": True}
    config = tiny_config("qwen2", hidden_size=shape.pop("hidden_size"), num_layers=shape.pop("num_layers"), **shape)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def grpo_step(model_dir: Path, out: Path, *, vllm: bool, cpu: bool, steps: int) -> dict:
    """GRPO through the recipe under ``accelerate launch`` (1 process) -> the probe's checks."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", *(["--cpu"] if cpu else []),
        "-m", "posttrain_probe.recipes.grpo", "--config", str(REPO / "recipes" / "configs" / "tiny" / "grpo.yaml"),
        "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--max_steps", str(steps),
        "--probe_snapshot_steps", str(steps), "--use_cpu", str(cpu).lower(), "--bf16", str(not cpu).lower(),
        "--use_vllm", str(vllm).lower(), "--vllm_mode", "colocate", "--vllm_gpu_memory_utilization", "0.3",
        "--rewards", "accuracy", "answer_distance",
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        return {"status": "fail", "seconds": seconds, "detail": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return {"seconds": seconds, **check_probe(out / "probe", steps)}


def check_probe(probe: Path, step: int) -> dict:
    """The probe callbacks' output of a run, checked against the trained model: the activations stored at ``step``
    equal a plain HF forward of the snapshot taken at ``step`` on the same tokens (so they come from the trained
    weights, whatever generated the rollouts), to bf16 rounding."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain_probe.activations import ActivationStore

    info = json.loads((probe / "probe.json").read_text()) if (probe / "probe.json").is_file() else None
    snapshot = probe / "snapshots" / f"step-{step:06d}"
    if info is None or not snapshot.is_dir():
        return {"status": "fail", "detail": f"no probe.json or no snapshot {snapshot}"}
    layer = int(info["layers"][0])
    store = ActivationStore(probe / "activations" / f"step-{step:06d}" / f"layer{layer}")
    shards = [store.load_shard(i) for i in range(store.n_shards)]
    acts, tokens, docs, positions = (
        torch.cat([s[k] for s in shards]) for k in ("acts", "token_ids", "doc_ids", "positions")
    )
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    # The store leaves out each document's first token (BOS or the chat template's opening token): try the
    # tokenizer's special tokens there and keep the best match.
    firsts = sorted(set(AutoTokenizer.from_pretrained(snapshot).all_special_ids))
    worst, checked = 0.0, 0
    with torch.no_grad():
        for doc in docs.unique():
            rows = (docs == doc).nonzero(as_tuple=True)[0]
            rows = rows[positions[rows].argsort()]
            pos = positions[rows].long()
            if int(pos[0]) != 1 or not torch.equal(pos, torch.arange(1, len(pos) + 1)):
                continue  # not a contiguous document (the check needs every token after the first)
            ids = torch.stack([torch.cat([torch.tensor([first]), tokens[rows].long()]) for first in firsts])
            hidden = model(ids, output_hidden_states=True).hidden_states[layer][:, 1:]  # [candidates, n, d]
            stored = acts[rows].float()[None]
            error = ((hidden - stored).norm(dim=-1) / hidden.norm(dim=-1).clamp_min(1e-6)).amax(dim=1)
            worst = max(worst, float(error.min()))
            checked += 1
    ok = checked > 0 and worst < 2e-2
    initial = load_file(str(next(Path(info["base_model"]).glob("*.safetensors"))))
    trained = load_file(str(next(snapshot.glob("*.safetensors"))))
    moved = sum(not torch.equal(initial[k], trained[k]) for k in initial if k in trained)
    detail = (
        f"{checked} probe documents at step {step}: stored vs snapshot forward, max relative error {worst:.1e}; "
        f"{moved}/{len(initial)} weight tensors changed by training"
    )
    return {"status": "pass" if ok else "fail", "detail": detail}


def generative_eval(model_dir: Path, out: Path, *, vllm: bool, device: str, limit: int) -> dict:
    """``probe_math`` (generate_until) through lm_eval with model vllm (GPU) or probe-hf -> checks."""
    from posttrain_probe.eval.lm_eval_config import LmEvalConfig
    from posttrain_probe.eval.runner import lm_eval

    config = LmEvalConfig(
        model_args=f"pretrained={model_dir}",
        model="vllm" if vllm else "probe-hf",
        vllm_args="gpu_memory_utilization=0.3,max_model_len=2048" if vllm else "",
        tasks=["probe_math"],
        limit=limit,
        device=device,
        out=out,
    )
    started = time.perf_counter()
    result = lm_eval(config)
    seconds = time.perf_counter() - started
    metric = result.results["probe_math"].get("exact_match,boxed")
    records = [json.loads(line) for line in Path(result.sample_files["probe_math"]).read_text().splitlines()]
    ok = result.model == config.model and metric is not None and len(records) == limit
    detail = (
        f"model {result.model}, exact_match {metric}, {len(records)} documents scored, {limit / seconds:.1f} docs/s"
    )
    return {"status": "pass" if ok else "fail", "seconds": seconds, "detail": detail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (vLLM paths) or cpu (the HF fallbacks)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the 0.5B shape")
    parser.add_argument("--steps", type=int, default=2, help="GRPO optimizer steps")
    parser.add_argument("--limit", type=int, default=16, help="documents of probe_math to evaluate")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    import tempfile

    vllm = args.device.startswith("cuda")
    work = args.work or Path(tempfile.mkdtemp(prefix="vllm-check-"))
    model_dir = save_model(work / "model", args.tiny, "bfloat16" if vllm else "float32")
    results = {
        "grpo_vllm_colocate" if vllm else "grpo_hf_generate": grpo_step(
            model_dir, work / "grpo", vllm=vllm, cpu=not vllm, steps=args.steps
        ),
        "lm_eval_vllm" if vllm else "lm_eval_probe_hf": generative_eval(
            model_dir, work / "eval", vllm=vllm, device=args.device, limit=args.limit
        ),
    }
    print("| check | status | seconds | detail |\n|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['status']} | {row.get('seconds', 0):.1f} | {row['detail']} |")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "tiny": args.tiny, "results": results}, indent=2))
    return 0 if all(row["status"] == "pass" for row in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
