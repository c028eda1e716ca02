"""The probe callbacks under multi-process training: DDP (torchrun, gloo) and DeepSpeed ZeRO-3 on CPU.

One training script (SFTTrainer, tiny Qwen3, fixed data and seed, both callbacks, float32 store)
runs (a) in one process with batch 4, (b) in two processes with batch 2 each (DDP), (c) in two
processes with batch 2 each under DeepSpeed ZeRO-3. The global batch and the data order are the
same, so (b) and (c) must reproduce (a): the same snapshots, and activation stores written per
rank, merged by rank 0, holding the same tokens with the same values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _distributed import ZERO3, free_port
from safetensors.torch import load_file

from posttrain_probe.activations.store import ActivationStore

SCHEDULE = [1, 2, 4, 5, 6]  # fraction 0.2 of max_steps 6
LAYERS = [1, 2]
N_DOCS = 10  # 5 probe batches of 2: rank 0 captures 3, rank 1 captures 2 and one padding round

SCRIPT = r'''
import json, os, sys, time
import torch
torch.set_num_threads(1)
from posttrain_probe.synthetic import arithmetic_dataset
from posttrain_probe.testing import tiny_model, tiny_tokenizer

out, per_device, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# Built before any DeepSpeed config exists (no zero.Init): the same initial weights in every run.
model = tiny_model("qwen3", seed=0)

from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
from posttrain_probe.callbacks import ProbeArguments, add_probe_callbacks

deepspeed = ZERO3_CONFIG if mode == "zero3" else None
config = SFTConfig(
    output_dir=out, max_steps=6, per_device_train_batch_size=per_device, learning_rate=1e-3, logging_steps=1,
    report_to=[], save_strategy="no", use_cpu=True, max_length=64, seed=0, disable_tqdm=True, bf16=False,
    gradient_checkpointing=False, dataloader_num_workers=0, deepspeed=deepspeed,
)
trainer = SFTTrainer(model=model, args=config, train_dataset=arithmetic_dataset(48, seed=0).select_columns(["messages"]),
                     processing_class=tiny_tokenizer())


class StaggerRanks(TrainerCallback):
    """Ranks > 0 reach the probe callbacks' on_train_begin later than rank 0, as a slower rank would."""

    def on_train_begin(self, args, state, control, **kwargs):
        if trainer.accelerator.process_index > 0:
            time.sleep(float(os.environ.get("PROBE_TEST_STAGGER", "2")))


trainer.add_callback(StaggerRanks())
add_probe_callbacks(trainer, ProbeArguments(probe_n_docs=10, probe_seq_len=48, probe_batch_size=2, probe_layers=[1, 2], probe_dtype="float32"))
trainer.train()
if trainer.accelerator.is_main_process:
    history = trainer.state.log_history
    result = {
        "losses": [e["loss"] for e in history if "loss" in e],
        "drift": {str(e["step"]): e["probe/drift/layer2"] for e in history if "probe/drift/layer2" in e},
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
    }
    with open(os.path.join(out, "result.json"), "w") as handle:
        json.dump(result, handle)
print("DONE", trainer.accelerator.process_index)
from posttrain_probe.process_group import end_process_group
del trainer  # its DDP wrapper holds the group: freed before the group is destroyed
end_process_group()  # gloo's threads could abort the exit otherwise (process_group.py)
'''.replace("ZERO3_CONFIG", repr(ZERO3))


def _launch(tmp: Path, name: str, processes: int, mode: str) -> dict:
    script = tmp / "train.py"
    script.write_text(SCRIPT)
    out = tmp / name
    per_device = str(4 // processes)  # global batch 4 in every run
    if processes == 1:
        command = [sys.executable, str(script), str(out), per_device, mode]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(script),
            str(out),
            per_device,
            mode,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=tmp)
    log = result.stdout[-4000:] + result.stderr[-6000:]
    assert result.returncode == 0, f"{name} failed:\n{log}"
    assert (out / "result.json").exists(), log
    return {"out": out, "run": out / "probe", "result": json.loads((out / "result.json").read_text())}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("dist"), "single", 1, "single")


def _snapshot(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "snapshots" / f"step-{step:06d}" / "model.safetensors")


def _sorted_tokens(path: Path) -> tuple[ActivationStore, dict[str, torch.Tensor]]:
    store = ActivationStore(path)
    assert store.verify_all() == []
    shards = [store.load_shard(i) for i in range(store.n_shards)]
    data = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
    order = torch.argsort(data["doc_ids"] * 10_000 + data["positions"].long())
    return store, {key: value[order] for key, value in data.items()}


def _check_against_single(single: dict, other: dict, *, weight_atol: float, act_atol: float, act_rtol: float) -> None:
    assert single["result"]["world_size"] == 1 and other["result"]["world_size"] == 2
    # training: the same losses (up to reduction order)
    assert len(other["result"]["losses"]) == 6
    torch.testing.assert_close(
        torch.tensor(other["result"]["losses"]), torch.tensor(single["result"]["losses"]), rtol=1e-5, atol=1e-5
    )

    one, two = (
        json.loads((single["run"] / "probe.json").read_text()),
        json.loads((other["run"] / "probe.json").read_text()),
    )
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["probe_fingerprint"] == one["probe_fingerprint"] and two["schedule"] == one["schedule"] == SCHEDULE
    assert [e["step"] for e in two["snapshots"]] == SCHEDULE
    assert [e["step"] for e in two["activations"]] == [0, *SCHEDULE]

    for step in SCHEDULE:
        want, got = _snapshot(single["run"], step), _snapshot(other["run"], step)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == torch.float32
            torch.testing.assert_close(
                got[key], want[key], rtol=0, atol=weight_atol, msg=lambda m, k=key, s=step: f"snapshot {s} {k}: {m}"
            )

    for step in [0, *SCHEDULE]:
        for layer in LAYERS:
            path = other["run"] / "activations" / f"step-{step:06d}" / f"layer{layer}"
            names = sorted(p.name for p in path.iterdir())
            assert names == [
                "manifest.json",
                "manifest.rank000.json",
                "manifest.rank001.json",
                "shard-r000-00000.safetensors",
                "shard-r001-00000.safetensors",
            ], names
            store, got = _sorted_tokens(path)
            assert store.complete and store.manifest.world_size == 2
            assert [s["rank"] for s in store.manifest.shards] == [0, 1]
            # rank 0 captured probe batches 0, 2, 4 (documents 0, 1, 4, 5, 8, 9), rank 1 batches 1, 3
            rank1 = load_file(path / "shard-r001-00000.safetensors")
            assert sorted(set(rank1["doc_ids"].tolist())) == [2, 3, 6, 7]
            _, want = _sorted_tokens(single["run"] / "activations" / f"step-{step:06d}" / f"layer{layer}")
            for key in ("token_ids", "doc_ids", "positions"):
                assert torch.equal(got[key], want[key]), (step, layer, key)
            if step == 0:  # the same base weights and the same padded batches: the same bits
                assert torch.equal(got["acts"], want["acts"])
            else:
                torch.testing.assert_close(got["acts"], want["acts"], rtol=act_rtol, atol=act_atol)

    drift_one, drift_two = single["result"]["drift"], other["result"]["drift"]
    assert sorted(map(int, drift_two)) == SCHEDULE
    for step in drift_one:
        assert drift_two[step] == pytest.approx(drift_one[step], rel=1e-3)


@pytest.mark.slow
def test_single_process_reference(single):
    data = json.loads((single["run"] / "probe.json").read_text())
    assert [e["step"] for e in data["snapshots"]] == SCHEDULE
    path = single["run"] / "activations" / "step-000000" / "layer1"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    assert single["result"]["losses"][-1] < single["result"]["losses"][0]


@pytest.mark.slow
def test_ddp_two_processes_match_one(single, tmp_path):
    ddp = _launch(tmp_path, "ddp", 2, "ddp")
    assert ddp["result"]["distributed_type"] == "DistributedType.MULTI_CPU"
    # DDP: the same optimizer math on gradients all-reduced over 2 ranks, i.e. float32 noise from
    # another summation order, amplified where Adam's first step divides by |g| ~ eps (seen:
    # weights within 6.2e-6, activations within 1e-6).
    _check_against_single(single, ddp, weight_atol=2e-5, act_atol=1e-5, act_rtol=1e-5)


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_match_one(single, tmp_path):
    zero3 = _launch(tmp_path, "zero3", 2, "zero3")
    assert zero3["result"]["distributed_type"] == "DistributedType.DEEPSPEED"
    # ZeRO-3 reduce-scatters flattened fp32 gradient partitions, computes the clipping norm over
    # its flat buffers and steps Adam on each rank's partition: the same math in yet another
    # summation order, and the snapshot is gathered from the partitions (16-bit gather of fp32
    # weights = the fp32 weights). Seen: weights within 6.2e-6 of the single process (as DDP),
    # activations within 1e-6; the tolerance leaves room for DeepSpeed's bucket layout.
    _check_against_single(single, zero3, weight_atol=5e-5, act_atol=1e-4, act_rtol=1e-4)
