"""Overhead of the probe callbacks as a fraction of training wall time (SFTTrainer, same process).

    python benchmarks/callback_overhead.py                       # tiny Qwen3 on CPU
    python benchmarks/callback_overhead.py --model Qwen/Qwen2.5-0.5B --device cuda --steps 200 --seq-len 1024
    python benchmarks/callback_overhead.py --monitor             # + the feature monitor (docs/monitor.md)

Runs the same SFT training twice, without and with ``add_probe_callbacks`` (default schedule:
snapshots every 1/5 of the run, activations of a 64-document probe set at step 0 and at every
snapshot), and reports: wall time of both runs, the time the callbacks report for activation
streaming and for snapshots, and those as fractions of the wall time of the run they were in. Target:
activation streaming <= 2% of training time at the default schedule; snapshots are reported
separately (their cost is disk bandwidth). With ``--monitor`` the probed run also has the feature monitor
(``MonitorArguments`` defaults: every 50 steps, on the same probe set) with a two-model crosscoder of
``--monitor-features`` latents at the middle layer (random weights: the cost does not depend on them), and
its time (``monitor/seconds``) is reported the same way; target: <= 2%. A benchmark, not a test: nothing is
asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def monitor_crosscoder(model, n_features: int, out_dir: str) -> str:
    """A random base/sft crosscoder at ``model``'s middle layer (the base slot fingerprinted as ``model``), saved
    under ``out_dir``; its directory."""
    from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig
    from posttrain_probe.model_identity import model_fingerprint

    config = CrosscoderConfig(
        model_names=["base", "sft"],
        d_model=model.config.hidden_size,
        n_features=n_features,
        layer=model.config.num_hidden_layers // 2,
    )
    config.model_fingerprints = [model_fingerprint(model), None]
    crosscoder = Crosscoder(config)
    crosscoder.reset_parameters()
    path = f"{out_dir}/monitor-crosscoder"
    crosscoder.save_pretrained(path)
    return path


def run(args, with_probe: bool, out_dir: str) -> tuple[float, dict[str, float]]:
    import torch
    from trl import SFTConfig, SFTTrainer

    from posttrain_probe.callbacks import MonitorArguments, ProbeArguments, add_probe_callbacks
    from posttrain_probe.synthetic import arithmetic_dataset
    from posttrain_probe.testing import tiny_model, tiny_tokenizer

    if args.model.startswith("tiny:"):
        model, tokenizer = (
            tiny_model(args.model.split(":", 1)[1], hidden_size=args.hidden_size, num_layers=args.layers),
            tiny_tokenizer(),
        )
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = arithmetic_dataset(args.steps * args.batch_size, seed=1).select_columns(["messages"])
    config = SFTConfig(
        output_dir=out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=args.device == "cpu",
        max_length=args.seq_len,
        bf16=args.device == "cuda",
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    if with_probe:
        probe = ProbeArguments(probe_seq_len=args.probe_seq_len, probe_n_docs=args.probe_docs)
        monitor = None
        if args.monitor:
            monitor = MonitorArguments(monitor_crosscoder=monitor_crosscoder(model, args.monitor_features, out_dir))
        add_probe_callbacks(trainer, probe, monitor=monitor)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    costs = {"activations": 0.0, "snapshots": 0.0} | ({"monitor": 0.0} if args.monitor else {})
    for record in trainer.state.log_history:
        costs["activations"] += record.get("probe/activation_seconds", 0.0)
        costs["snapshots"] += record.get("probe/snapshot_seconds", 0.0)
        if args.monitor:
            costs["monitor"] += record.get("monitor/seconds", 0.0)
    return wall, costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="tiny:qwen3", help="tiny:<arch> (posttrain_probe.testing) or a HF model path/name"
    )
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--probe-docs", type=int, default=64)
    parser.add_argument("--probe-seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--monitor", action="store_true", help="add the feature monitor to the probed run")
    parser.add_argument("--monitor-features", type=int, default=4096, help="latents of the monitor's crosscoder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as base_dir, tempfile.TemporaryDirectory() as probe_dir:
        base_wall, _ = run(args, False, base_dir)
        probe_wall, costs = run(args, True, probe_dir)
    print(
        f"callback overhead: model={args.model} steps={args.steps} batch={args.batch_size}x{args.seq_len} probe={args.probe_docs}x{args.probe_seq_len} device={args.device}"
    )
    print(f"training without callbacks: {base_wall:8.2f} s")
    print(f"training with callbacks:    {probe_wall:8.2f} s  (x{probe_wall / base_wall:.3f})")
    # Fractions of the run that had the callbacks (same process, same load), which is less noisy
    # than the difference of two wall times on a shared machine.
    for name, seconds in costs.items():
        print(f"  {name:<12} {seconds:8.2f} s = {100 * seconds / probe_wall:5.2f}% of that run's wall time")
    share = 100 * costs["activations"] / probe_wall
    print(
        f"target: activation streaming <= 2% of training time at the default schedule: {'met' if share <= 2 else 'NOT met'} ({share:.2f}%)"
    )
    if args.monitor:
        share = 100 * costs["monitor"] / probe_wall
        print(
            f"target: feature monitor <= 2% of training time at its defaults: {'met' if share <= 2 else 'NOT met'} ({share:.2f}%)"
        )


if __name__ == "__main__":
    main()
