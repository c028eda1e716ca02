"""Train a crosscoder from paired activation stores or live forwards, on one or many devices.

    posttrain-probe crosscoder train --acts runs/acts --layer 18 --out runs/cc
    accelerate launch -m posttrain_probe.crosscoder.train --config recipes/configs/tiny/crosscoder.yaml

Paper schedules by default (SPEC sec. 3): Adam(0.9, 0.999), lr 1e-4 constant then linear decay to
0 over the last 20% of steps, λ = 2 warmed up linearly over the first 5%, grad-norm clip 1.0,
batch 1024 tokens. Data parallel with accelerate: ``batch_size`` is the global batch; with store
sources every rank reads the same shuffled stream and trains on its slice of each global batch,
so the run means the same as a single-process one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder
from posttrain_probe.crosscoder.state import load_optimizer_tensors, load_training_state, restore_rng, save_training_state
from posttrain_probe.errors import ProbeError

STATE_DIR = "trainer_state"
METRICS = "metrics.jsonl"
TRAINING_CONFIG = "training_config.json"
_RUN_FILES = ("config.json", "model.safetensors", "README.md", TRAINING_CONFIG, METRICS, STATE_DIR)


@dataclass
class CrosscoderTrainingConfig:
    """Optimisation settings of a crosscoder run (Python API, CLI and YAML)."""

    n_tokens: int | None = field(default=None, metadata={"help": "Training tokens in all (default: one pass over the store; required for live sources)."})
    batch_size: int = field(default=1024, metadata={"help": "Global batch in tokens (split over data-parallel ranks)."})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate (constant, then linear decay)."})
    lr_decay_fraction: float = field(default=0.2, metadata={"help": "Final fraction of steps over which lr decays linearly to 0."})
    l1_coefficient: float = field(default=2.0, metadata={"help": "λ of the decoder-norm-weighted L1 penalty (relu crosscoders)."})
    l1_warmup_fraction: float = field(default=0.05, metadata={"help": "Initial fraction of steps over which λ rises linearly from 0."})
    beta1: float = field(default=0.9, metadata={"help": "Adam beta1."})
    beta2: float = field(default=0.999, metadata={"help": "Adam beta2."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0: off)."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and data order."})
    scale_tokens: int = field(default=100_000, metadata={"help": "Tokens used to estimate the normalisation scales s_m."})
    dead_after_tokens: int = field(default=10_000_000, metadata={"help": "A feature is dead after this many tokens without firing (or the whole run, if shorter)."})
    aux_k: int = field(default=512, metadata={"help": "BatchTopK: dead features used by the AuxK loss per token."})
    aux_coefficient: float = field(default=1 / 32, metadata={"help": "BatchTopK: weight of the AuxK loss."})
    threshold_decay: float = field(default=0.99, metadata={"help": "BatchTopK: EMA decay of the inference threshold."})
    buffer_tokens: int | None = field(default=None, metadata={"help": "Tokens held for shuffling (default: the source's)."})
    log_every: int = field(default=25, metadata={"help": "Steps between metric logs (the only host-device syncs)."})
    checkpoint_every: int = field(default=1000, metadata={"help": "Steps between resumable checkpoints (rounded to a multiple of log_every)."})
    max_steps_per_run: int | None = field(default=None, metadata={"help": "Stop with a checkpoint after this many steps in this invocation (time-limited jobs); resume later."})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp16 or no. Master weights stay fp32."})
    report_to: list[str] = field(default_factory=list, metadata={"help": "Extra trackers via accelerate: wandb, tensorboard."})

    def __post_init__(self) -> None:
        for name in ("batch_size", "log_every", "checkpoint_every", "scale_tokens"):
            if getattr(self, name) < 1:
                raise ProbeError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_decay_fraction", "l1_warmup_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ProbeError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.n_tokens is not None and self.n_tokens < self.batch_size:
            raise ProbeError(f"n_tokens ({self.n_tokens}) must be at least one batch ({self.batch_size})")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise ProbeError(f"mixed_precision {self.mixed_precision!r}: expected auto, bf16, fp16 or no")


def lr_factor(step: int, total: int, decay_fraction: float) -> float:
    """Learning-rate multiplier: 1, then linear to 0 over the last ``decay_fraction`` of ``total`` steps."""
    decay_start = total * (1 - decay_fraction)
    if step < decay_start or decay_fraction == 0:
        return 1.0
    return max(0.0, (total - step) / (total - decay_start))


def l1_factor(step: int, total: int, warmup_fraction: float) -> float:
    """λ multiplier: linear from 0 to 1 over the first ``warmup_fraction`` of ``total`` steps."""
    warmup = total * warmup_fraction
    return 1.0 if warmup == 0 else min(1.0, step / warmup)


def _prepare_out_dir(out_dir: Path, *, resume: bool, overwrite: bool, is_main: bool) -> None:
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    entries = {p.name for p in out_dir.iterdir()}
    ours = (out_dir / TRAINING_CONFIG).exists() or (out_dir / STATE_DIR).exists()
    if not ours:
        raise ProbeError(f"output directory {out_dir} is not empty and holds no crosscoder run ({', '.join(sorted(entries)[:5])}); choose another")
    if resume:
        return
    if not overwrite:
        raise ProbeError(f"output directory {out_dir} holds another crosscoder run: pass resume (--resume) to continue it or overwrite (--overwrite) to replace it")
    if is_main:
        for name in _RUN_FILES:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _resolve_config(config: CrosscoderConfig, source) -> CrosscoderConfig:
    names = list(source.model_names)
    if config.model_names and list(config.model_names) != names:
        raise ProbeError(
            f"the crosscoder is configured for models {config.model_names} (N={len(config.model_names)}) "
            f"but the data holds {names} (N={len(names)})"
        )
    if config.d_model and config.d_model != source.d_model:
        raise ProbeError(f"the crosscoder is configured for d_model {config.d_model}, the data has {source.d_model}")
    layer = getattr(source, "layer", None)
    if config.layer is not None and layer is not None and config.layer != layer:
        raise ProbeError(f"the crosscoder is configured for layer {config.layer}, the data comes from layer {layer}")
    return replace(config, model_names=names, d_model=source.d_model, layer=config.layer if config.layer is not None else layer)


def train_crosscoder(
    source,
    crosscoder_config: CrosscoderConfig | None = None,
    training_config: CrosscoderTrainingConfig | None = None,
    out_dir: str | os.PathLike = "crosscoder",
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Crosscoder:
    """Train a crosscoder on ``source`` (a PairedActivations, LiveActivations or ActivationStore).

    Writes ``out_dir/config.json`` + ``model.safetensors`` (the crosscoder), ``training_config.json``,
    ``metrics.jsonl`` (one JSON line per log step) and ``trainer_state/`` (optimizer, counters,
    RNG, step: resuming gives the same result as an uninterrupted run). Returns the crosscoder
    (unwrapped, on the training device).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cc_config = _resolve_config(crosscoder_config or CrosscoderConfig(), source)
    train_cfg = training_config or CrosscoderTrainingConfig()
    out_dir = Path(out_dir)
    precision = train_cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(
        mixed_precision=precision, cpu=not torch.cuda.is_available(), log_with=train_cfg.report_to or None, project_dir=str(out_dir)
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    source_world = getattr(source, "world_size", 1)
    rank_local_source = source_world > 1
    if rank_local_source and source_world != world:
        raise ProbeError(f"the live source is split over {source_world} ranks but {world} processes run")
    if train_cfg.batch_size % world:
        raise ProbeError(f"batch_size {train_cfg.batch_size} must be divisible by the {world} data-parallel processes")
    local_batch = train_cfg.batch_size // world
    n_tokens = train_cfg.n_tokens
    if n_tokens is None:
        if not hasattr(source, "n_tokens"):
            raise ProbeError("live sources have no fixed length: set n_tokens (the number of training tokens)")
        n_tokens = source.n_tokens
    total_steps = max(1, n_tokens // train_cfg.batch_size)
    log_every = train_cfg.log_every
    checkpoint_every = max(log_every, train_cfg.checkpoint_every // log_every * log_every)

    _prepare_out_dir(out_dir, resume=resume, overwrite=overwrite, is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    state = load_training_state(out_dir / STATE_DIR) if resume else None
    saved_configs = {"crosscoder": asdict(cc_config), "training": asdict(train_cfg)}
    if state is not None:
        before = state["meta"]["configs"]
        ignore = {"max_steps_per_run", "report_to", "log_every", "checkpoint_every"}
        changed = [k for k, v in before["training"].items() if k not in ignore and saved_configs["training"].get(k) != v]
        changed += [k for k, v in before["crosscoder"].items() if saved_configs["crosscoder"].get(k) != v]
        if changed:
            raise ProbeError(f"cannot resume {out_dir}: settings differ from the interrupted run ({', '.join(changed)})")

    torch.manual_seed(train_cfg.seed)
    model = Crosscoder(cc_config)
    model.reset_parameters(torch.Generator().manual_seed(train_cfg.seed))
    model.to(accelerator.device)
    batches = _global_batches(source, train_cfg, local_batch, rank, world, rank_local_source, accelerator.device)
    if state is None:
        scale_source = source.iter_batches(min(4096, train_cfg.scale_tokens), shuffle=True, seed=train_cfg.seed + 1, epochs=1)
        model.set_scales_from(scale_source, max_tokens=train_cfg.scale_tokens)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2))
    tokens_since_fired = torch.zeros(cc_config.n_features, dtype=torch.long, device=accelerator.device)
    fired_ever = torch.zeros(cc_config.n_features, dtype=torch.bool, device=accelerator.device)
    start_step = 0
    if state is not None:
        model.load_state_dict({k: v.to(accelerator.device) for k, v in state["model"].items()})
        load_optimizer_tensors(optimizer, state["optimizer"], state["meta"]["optimizer"])
        tokens_since_fired.copy_(state["counters"]["tokens_since_fired"])
        fired_ever.copy_(state["counters"]["fired_ever"])
        restore_rng(state["rng"])
        start_step = state["step"]
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / TRAINING_CONFIG).write_text(json.dumps(saved_configs, indent=2))
        _truncate_metrics(out_dir / METRICS, start_step)  # drop lines logged after the state we resume from
    if train_cfg.report_to:
        accelerator.init_trackers("posttrain-probe-crosscoder", config={**asdict(train_cfg), **{f"cc_{k}": v for k, v in asdict(cc_config).items()}})

    for _ in range(start_step):  # data position: the same stream, skipped without compute
        next(batches)
    stop_step = total_steps if train_cfg.max_steps_per_run is None else min(total_steps, start_step + train_cfg.max_steps_per_run)
    bar = tqdm(total=total_steps, initial=start_step, desc="crosscoder", unit="step", disable=not progress or not accelerator.is_main_process)
    dead_after = min(train_cfg.dead_after_tokens, max(n_tokens // 2, train_cfg.batch_size))
    sums = _MetricSums(cc_config.n_models, accelerator.device)
    # Non-finite inputs are flagged per model on the device every step and read at log steps.
    bad_inputs = torch.zeros(cc_config.n_models, dtype=torch.bool, device=accelerator.device)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)
    started = time.perf_counter()
    step = start_step
    for step in range(start_step, stop_step):
        x = next(batches)
        bad_now = ~torch.isfinite(x).all(dim=2).all(dim=0)
        first_bad_step = torch.where((first_bad_step < 0) & bad_now.any(), step + 1, first_bad_step)
        bad_inputs |= bad_now
        for group in optimizer.param_groups:
            group["lr"] = train_cfg.lr * lr_factor(step, total_steps, train_cfg.lr_decay_fraction)
        l1 = train_cfg.l1_coefficient * l1_factor(step, total_steps, train_cfg.l1_warmup_fraction)
        # No feature can be dead before `dead_after` tokens have passed: skip AuxK until then.
        dead_mask = tokens_since_fired >= dead_after if step * train_cfg.batch_size >= dead_after else None
        with accelerator.autocast():
            out = wrapped(x, l1_coefficient=l1, dead_mask=dead_mask, aux_k=train_cfg.aux_k, aux_coefficient=train_cfg.aux_coefficient, threshold_decay=train_cfg.threshold_decay)
        accelerator.backward(out.loss)
        if train_cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(wrapped.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        fired = (out.codes > 0).any(dim=0)
        if world > 1:
            fired = accelerator.reduce(fired.to(torch.int32), reduction="sum") > 0
        tokens_since_fired = torch.where(fired, torch.zeros_like(tokens_since_fired), tokens_since_fired + train_cfg.batch_size)
        fired_ever |= fired
        sums.add(out)
        done = step + 1
        if done % log_every == 0 or done == stop_step:
            record = sums.pop(accelerator, step=done, tokens=done * train_cfg.batch_size, lr=optimizer.param_groups[0]["lr"], l1_coefficient=l1)
            if world > 1:
                bad_inputs = accelerator.reduce(bad_inputs.to(torch.int32), reduction="sum") > 0
            if bad_inputs.any() or not math.isfinite(record["loss"]):
                raise ProbeError(_nonfinite_message(bad_inputs, int(first_bad_step), cc_config.model_names, done, log_every))
            record["dead_fraction"] = float((tokens_since_fired >= train_cfg.dead_after_tokens).float().mean() if done * train_cfg.batch_size >= train_cfg.dead_after_tokens else (~fired_ever).float().mean())
            record["tokens_per_s"] = (done - start_step) * train_cfg.batch_size / (time.perf_counter() - started)
            if accelerator.is_main_process:
                with open(out_dir / METRICS, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4g}", fvu="/".join(f"{v:.3f}" for v in record["fvu"]), l0=f"{record['l0']:.1f}", dead=f"{record['dead_fraction']:.2%}")
            if train_cfg.report_to:
                accelerator.log({k: v for k, v in record.items() if not isinstance(v, list)} | {f"fvu/{n}": v for n, v in zip(cc_config.model_names, record["fvu"])}, step=done)
        bar.update(1)
        if done % checkpoint_every == 0 and done != stop_step:
            _checkpoint(accelerator, model, optimizer, tokens_since_fired, fired_ever, done, out_dir, saved_configs)
    bar.close()
    done = max(step + 1, start_step) if stop_step > start_step else start_step
    _checkpoint(accelerator, model, optimizer, tokens_since_fired, fired_ever, done, out_dir, saved_configs)
    accelerator.wait_for_everyone()
    if train_cfg.report_to:
        accelerator.end_training()
    return model


def _checkpoint(accelerator, model: Crosscoder, optimizer, tokens_since_fired, fired_ever, step: int, out_dir: Path, configs: dict) -> None:
    """Crosscoder weights at the run root and the resumable state under trainer_state/ (rank 0 writes)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.save_pretrained(out_dir)
        inner_optimizer = getattr(optimizer, "optimizer", optimizer)
        save_training_state(
            out_dir / STATE_DIR,
            step,
            model_state=model.state_dict(),
            optimizer=inner_optimizer,
            counters={"tokens_since_fired": tokens_since_fired, "fired_ever": fired_ever},
            meta={"configs": configs},
        )
    accelerator.wait_for_everyone()


def _global_batches(source, cfg: CrosscoderTrainingConfig, local_batch: int, rank: int, world: int, rank_local: bool, device) -> Iterator[torch.Tensor]:
    """This rank's [local_batch, N, d] slices of the global batch stream, forever (epochs repeat)."""
    batch = local_batch if rank_local else cfg.batch_size
    stream = source.iter_batches(batch, shuffle=True, seed=cfg.seed, epochs=None, buffer_tokens=cfg.buffer_tokens, drop_last=True)
    for x in stream:
        if not rank_local and world > 1:
            x = x[rank * local_batch : (rank + 1) * local_batch]
        yield x.to(device, non_blocking=True)


def _nonfinite_message(bad_inputs: torch.Tensor, first_bad_step: int, names: list[str], step: int, log_every: int) -> str:
    bad = [name for name, flag in zip(names, bad_inputs.tolist()) if flag]
    if bad:
        where = f"at step {first_bad_step}" if first_bad_step > 0 else f"by step {step}"
        return f"NaN/inf in the activations of {', '.join(bad)} {where}: training stopped (no checkpoint was written after it)"
    return f"non-finite loss at step {step} (or one of the {log_every - 1} steps before it) with finite inputs: training diverged, lower the lr"


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= ``step`` (all of them are rewritten atomically)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class _MetricSums:
    """Per-step metrics summed on the device; read (one sync) at log steps."""

    def __init__(self, n_models: int, device) -> None:
        self.device = device
        self.reset(n_models)

    def reset(self, n_models: int) -> None:
        self.scalars = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, mse, sparsity, l0
        self.fvu = torch.zeros(n_models, device=self.device, dtype=torch.float64)
        self.count = 0

    def add(self, out) -> None:
        self.scalars += torch.stack([out.loss, out.mse, out.sparsity, out.l0]).detach().to(torch.float64)
        self.fvu += out.fvu.detach().to(torch.float64)
        self.count += 1

    def pop(self, accelerator, **extra: Any) -> dict[str, Any]:
        values = torch.cat([self.scalars, self.fvu]) / max(self.count, 1)
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="mean")
        values = values.tolist()
        record = {**extra, "loss": values[0], "mse": values[1], "sparsity": values[2], "l0": values[3], "fvu": values[4:]}
        self.reset(len(self.fvu))
        return record


if __name__ == "__main__":  # accelerate launch -m posttrain_probe.crosscoder.train --config FILE [options]
    import sys

    from posttrain_probe.cli import app

    app(["crosscoder", "train", *sys.argv[1:]])
