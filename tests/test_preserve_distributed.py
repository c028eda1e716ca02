"""Feature preservation and the feature monitor under DeepSpeed ZeRO-3 (2 processes, CPU, gloo) against one process.

The paper study's preserving arm (recipes/configs/qwen3-4b-base/study.yaml) trains under ZeRO-3 with the monitor on.
One script (SFTTrainer with :class:`FeaturePreservingMixin`, the monitor callback, tiny Qwen3, fixed data and seed)
runs (a) in one process with batch 4 and (b) in two processes with batch 2 each under ZeRO-3: the trained model's
parameters and the frozen base (TRL's ``prepare_deepspeed``) partitioned, gradients reduce-scattered. The global batch
and the data order are the same, so (b) must reproduce (a): the SFT loss, the preservation term, the monitor's
figures at every logged step and the final weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from _distributed import ZERO3, save_site_crosscoder, torchrun
from safetensors.torch import load_file

LAYER, STEPS = 2, 6
FEATURES = ",".join(str(i) for i in range(0, 128, 3))

SCRIPT = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
from posttrain_probe.synthetic import arithmetic_dataset
from posttrain_probe.testing import tiny_model, tiny_tokenizer

out, per_device, mode, cc_dir, features = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
# Built before any DeepSpeed config exists (no zero.Init): the same initial weights in every run.
model, base = tiny_model("qwen3", seed=0), tiny_model("qwen3", seed=0)

from trl import SFTConfig, SFTTrainer
from posttrain_probe.callbacks import PreserveArguments, build_preserver
from posttrain_probe.callbacks.feature_monitor import MonitorArguments, monitor_callback
from posttrain_probe.callbacks.preserve import FeaturePreservingMixin
from posttrain_probe.process_group import end_process_group

deepspeed = ZERO3_CONFIG if mode == "zero3" else None
config = SFTConfig(
    output_dir=out, max_steps=STEPS, per_device_train_batch_size=per_device, learning_rate=3e-3, logging_steps=1,
    report_to=[], save_strategy="no", use_cpu=True, max_length=64, seed=0, disable_tqdm=True, bf16=False,
    gradient_checkpointing=False, dataloader_num_workers=0, deepspeed=deepspeed,
)


class Trainer(FeaturePreservingMixin, SFTTrainer):
    pass


preserver = build_preserver(PreserveArguments(preserve_crosscoder=cc_dir, preserve_features=features, preserve_coefficient=5.0))
trainer = Trainer(model=model, preserver=preserver, base_model=base, args=config,
                  train_dataset=arithmetic_dataset(48, seed=0).select_columns(["messages"]), processing_class=tiny_tokenizer())
trainer.add_callback(monitor_callback(trainer, MonitorArguments(monitor_crosscoder=cc_dir, monitor_every=2)))
trainer.train()
trainer.save_model(os.path.join(out, "final"))
if trainer.accelerator.is_main_process:
    history = [e for e in trainer.state.log_history if "loss" in e]
    result = {"loss": [e["loss"] for e in history], "preserve": [e["preserve"] for e in history],
              "world_size": trainer.accelerator.num_processes, "distributed_type": str(trainer.accelerator.distributed_type)}
    with open(os.path.join(out, "result.json"), "w") as handle:
        json.dump(result, handle)
print("DONE", trainer.accelerator.process_index)
del trainer  # its DDP wrapper holds the group: freed before the group is destroyed
end_process_group()  # gloo's threads could abort the exit otherwise (process_group.py)
""".replace("STEPS", str(STEPS)).replace("ZERO3_CONFIG", repr(ZERO3))


def _launch(tmp, cc_dir, name: str, processes: int, mode: str) -> dict:
    script = tmp / "train_preserve.py"
    script.write_text(SCRIPT)
    out = tmp / name
    args = (str(out), str(4 // processes), mode, str(cc_dir), FEATURES)  # global batch 4 in every run
    result = torchrun(script, *args, nproc=processes, timeout=500)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}{result.stderr[-6000:]}"
    monitor = [json.loads(line) for line in (out / "probe" / "monitor.jsonl").read_text().splitlines()]
    return {
        "result": json.loads((out / "result.json").read_text()),
        "monitor": monitor,
        "weights": load_file(out / "final" / "model.safetensors"),
    }


@pytest.fixture(scope="module")
def crosscoder_dir(tmp_path_factory):
    """A random 2-model crosscoder at LAYER of the tiny Qwen3 (scales from its activations), on disk."""
    return save_site_crosscoder(tmp_path_factory.mktemp("preserve_cc") / "cc", LAYER)


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_match_one(tmp_path, crosscoder_dir):
    single = _launch(tmp_path, crosscoder_dir, "single", 1, "single")
    zero3 = _launch(tmp_path, crosscoder_dir, "zero3", 2, "zero3")
    assert single["result"]["world_size"] == 1 and zero3["result"]["world_size"] == 2
    assert zero3["result"]["distributed_type"] == "DistributedType.DEEPSPEED"
    for key in ("loss", "preserve"):
        want, got = single["result"][key], zero3["result"][key]
        assert len(want) == STEPS
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5, msg=key)
    assert single["result"]["preserve"][0] == 0.0 and max(single["result"]["preserve"]) > 1e-4  # the term acts

    steps = [entry["step"] for entry in single["monitor"]]
    assert steps == [entry["step"] for entry in zero3["monitor"]] and steps[0] == 0 and steps[-1] == STEPS
    close = {"rel": 1e-4, "abs": 1e-6, "nan_ok": True}
    for want, got in zip(single["monitor"], zero3["monitor"]):
        assert got["n_tokens"] == want["n_tokens"] > 0
        assert got["category_change"].keys() == want["category_change"].keys() and want["category_change"]
        for name, value in want["category_change"].items():
            assert got["category_change"][name] == pytest.approx(value, **close), name
        for field in ("mean_change", "suppressed_fraction", "fvu"):
            assert got[field] == pytest.approx(want[field], **close), field
    assert single["monitor"][-1]["mean_change"] > 0  # the features moved: the monitor saw training

    assert zero3["weights"].keys() == single["weights"].keys()
    for key, want in single["weights"].items():
        # ZeRO-3: the same math in another summation order (test_blocking_distributed: the same tolerance)
        torch.testing.assert_close(zero3["weights"][key], want, rtol=0, atol=5e-5, msg=lambda m, k=key: f"{k}: {m}")
