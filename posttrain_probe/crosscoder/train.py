"""Train a crosscoder from paired activation stores or live forwards, on one or many devices.

    posttrain-probe crosscoder train --acts runs/acts --layer 18 --out runs/cc
    accelerate launch -m posttrain_probe crosscoder train --config recipes/configs/tiny/crosscoder.yaml

Paper schedules by default (docs/methods.md sec. 3): Adam(0.9, 0.999), lr 1e-4 constant then linear decay to
0 over the last 20% of steps, λ = 2 warmed up linearly over the first 5%, grad-norm clip 1.0,
batch 1024 tokens. Data parallel with accelerate: ``batch_size`` is the global batch; with store
sources every rank reads the same shuffled stream and trains on its slice of each global batch,
so the run means the same as a single-process one.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from posttrain_probe.crosscoder.config import CrosscoderConfig, CrosscoderTrainingConfig, dead_window_tokens
from posttrain_probe.crosscoder.layout import CALIBRATION, METRICS, STATE_DIR, STATUS, TRAINING_CONFIG, write_status
from posttrain_probe.crosscoder.metrics import (
    CrosscoderQualityWarning,
    MetricSums,
    NonFiniteInputs,
    quality_warnings,
)
from posttrain_probe.crosscoder.model import Crosscoder, CrosscoderOutput
from posttrain_probe.crosscoder.schedules import l1_factor, lr_factor
from posttrain_probe.crosscoder.state import (
    load_optimizer_tensors,
    load_training_state,
    restore_rng,
    save_training_state,
)
from posttrain_probe.errors import ProbeError
from posttrain_probe.locks import is_lock_file, main_process_holds

_RUN_FILES = ("config.json", "model.safetensors", "README.md", TRAINING_CONFIG, METRICS, STATE_DIR, STATUS, CALIBRATION)


def _prepare_out_dir(out_dir: Path, *, resume: bool, overwrite: bool, is_main: bool) -> None:
    entries = {p.name for p in out_dir.iterdir() if not is_lock_file(p.name)} if out_dir.exists() else set()
    if not entries:
        return
    ours = (out_dir / TRAINING_CONFIG).exists() or (out_dir / STATE_DIR).exists()
    if not ours:
        raise ProbeError(
            f"output directory {out_dir} is not empty and holds no crosscoder run ({', '.join(sorted(entries)[:5])}); choose another"
        )
    if resume:
        return
    if not overwrite:
        raise ProbeError(
            f"output directory {out_dir} holds another crosscoder run: pass resume (--resume) to continue it or overwrite (--overwrite) to replace it"
        )
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
    from posttrain_probe.model_identity import source_fingerprints

    prints = config.model_fingerprints if config.model_fingerprints is not None else source_fingerprints(source)
    return replace(
        config,
        model_names=names,
        d_model=source.d_model,
        layer=config.layer if config.layer is not None else layer,
        model_fingerprints=prints,
    )


class _Plan(NamedTuple):
    """Sizes of a run, fixed by the training config, the source and the number of processes."""

    local_batch: int
    n_tokens: int
    total_steps: int
    checkpoint_every: int
    rank_local_source: bool


@dataclass
class _Training:
    """Everything the training loop reads and updates (one run, one process)."""

    accelerator: Any
    model: Crosscoder
    optimizer: Any
    batches: Iterator[torch.Tensor]
    tokens_since_fired: torch.Tensor
    fired_ever: torch.Tensor
    start_step: int
    dead_window: int
    """Trailing window (tokens) of dead-feature detection (:func:`dead_window_tokens`)."""
    auxk_dead: torch.Tensor
    """[F] bool: the features AuxK trains now (the dead set of the last log step on the log grid; checkpointed)."""
    cc_config: CrosscoderConfig
    train_cfg: CrosscoderTrainingConfig
    plan: _Plan
    out_dir: Path
    saved_configs: dict[str, Any]

    @property
    def lr(self) -> float:
        """Peak Adam lr (the configured one, or the activation's default)."""
        return self.train_cfg.learning_rate(self.cc_config)


@main_process_holds("out_dir", what="crosscoder run")  # a second training into out_dir fails at once
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

    cc_config = _resolve_config(crosscoder_config or CrosscoderConfig(), source)
    train_cfg = training_config or CrosscoderTrainingConfig()
    out_dir = Path(out_dir)
    precision = train_cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=not torch.cuda.is_available(),
        log_with=train_cfg.report_to or None,
        project_dir=str(out_dir),
    )
    plan = _plan(source, train_cfg, accelerator.num_processes)
    _prepare_out_dir(out_dir, resume=resume, overwrite=overwrite, is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    saved_configs = {"crosscoder": asdict(cc_config), "training": asdict(train_cfg)}
    state = _resume_state(out_dir, resume, saved_configs)
    run = _start(accelerator, source, cc_config, train_cfg, plan, state, out_dir, saved_configs)
    wrapped, run.optimizer = accelerator.prepare(run.model, run.optimizer)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / TRAINING_CONFIG).write_text(json.dumps(saved_configs, indent=2))
        _truncate_metrics(out_dir / METRICS, run.start_step)  # drop lines logged after the state we resume from
    if train_cfg.report_to:
        accelerator.init_trackers(
            "posttrain-probe-crosscoder",
            config={**asdict(train_cfg), **{f"cc_{k}": v for k, v in asdict(cc_config).items()}},
        )
    try:
        done = _train_steps(run, wrapped, progress)
    finally:
        run.batches.close()  # stops a prefetching thread and the source's reader
    calibration = _calibrate_threshold(run, source) if run.start_step < plan.total_steps <= done else None
    _checkpoint(run, done)
    if accelerator.is_main_process and done >= plan.total_steps:
        _report_quality(out_dir, cc_config, plan.total_steps, calibration, progress)
    accelerator.wait_for_everyone()
    if train_cfg.report_to:
        accelerator.end_training()
    return run.model


def _plan(source, train_cfg: CrosscoderTrainingConfig, world: int) -> _Plan:
    """Batch split, training tokens, steps and checkpoint interval; ProbeError for sizes that cannot work."""
    source_world = getattr(source, "world_size", 1)
    rank_local_source = source_world > 1
    if rank_local_source and source_world != world:
        raise ProbeError(f"the live source is split over {source_world} ranks but {world} processes run")
    if train_cfg.batch_size % world:
        raise ProbeError(f"batch_size {train_cfg.batch_size} must be divisible by the {world} data-parallel processes")
    n_tokens = train_cfg.n_tokens
    if n_tokens is None:
        if not hasattr(source, "n_tokens"):
            raise ProbeError("live sources have no fixed length: set n_tokens (the number of training tokens)")
        n_tokens = source.n_tokens
    log_every = train_cfg.log_every
    checkpoint_every = max(log_every, train_cfg.checkpoint_every // log_every * log_every)
    return _Plan(
        train_cfg.batch_size // world,
        n_tokens,
        max(1, n_tokens // train_cfg.batch_size),
        checkpoint_every,
        rank_local_source,
    )


def _resume_state(out_dir: Path, resume: bool, saved_configs: dict[str, Any]) -> dict[str, Any] | None:
    """The interrupted run's state when resuming (None otherwise); ProbeError if there is none or its settings differ."""
    state = load_training_state(out_dir / STATE_DIR) if resume else None
    if resume and state is None:
        raise ProbeError(
            f"resume: {out_dir} holds no interrupted crosscoder run to continue (no {STATE_DIR}/); run without --resume to start one"
        )
    if state is not None:
        before = state["meta"]["configs"]
        ignore = {"max_steps_per_run", "report_to", "log_every", "checkpoint_every"}
        changed = [
            k for k, v in before["training"].items() if k not in ignore and saved_configs["training"].get(k) != v
        ]
        changed += [k for k, v in before["crosscoder"].items() if saved_configs["crosscoder"].get(k) != v]
        if changed:
            raise ProbeError(
                f"cannot resume {out_dir}: settings differ from the interrupted run ({', '.join(changed)})"
            )
    return state


def _start(
    accelerator,
    source,
    cc_config: CrosscoderConfig,
    train_cfg: CrosscoderTrainingConfig,
    plan: _Plan,
    state,
    out_dir: Path,
    saved_configs,
) -> _Training:
    """The model (initialised, or restored with optimizer, counters and RNG from ``state``) and the batch stream."""
    torch.manual_seed(train_cfg.seed)
    model = Crosscoder(cc_config)
    model.reset_parameters(torch.Generator().manual_seed(train_cfg.seed))
    model.to(accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    if state is None:
        scale_source = source.iter_batches(
            min(4096, train_cfg.scale_tokens), shuffle=True, seed=train_cfg.seed + 1, epochs=1
        )
        model.set_scales_from(scale_source, max_tokens=train_cfg.scale_tokens)
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=train_cfg.learning_rate(cc_config),
        betas=(train_cfg.beta1, train_cfg.beta2),
        fused=accelerator.device.type == "cuda" or None,  # one kernel over all parameters on a GPU
    )
    tokens_since_fired = torch.zeros(cc_config.n_features, dtype=torch.long, device=accelerator.device)
    fired_ever = torch.zeros(cc_config.n_features, dtype=torch.bool, device=accelerator.device)
    auxk_dead = torch.zeros(cc_config.n_features, dtype=torch.bool, device=accelerator.device)
    start_step = 0
    if state is not None:
        model.load_state_dict({k: v.to(accelerator.device) for k, v in state["model"].items()})
        load_optimizer_tensors(optimizer, state["optimizer"], state["meta"]["optimizer"])
        tokens_since_fired.copy_(state["counters"]["tokens_since_fired"])
        fired_ever.copy_(state["counters"]["fired_ever"])
        if "auxk_dead" in state["counters"]:  # states written before it existed: none dead until the next log step
            auxk_dead.copy_(state["counters"]["auxk_dead"])
        restore_rng(state["rng"])
        start_step = state["step"]
    batches = _global_batches(
        source, train_cfg, plan.local_batch, rank, world, plan.rank_local_source, accelerator.device, skip=start_step
    )
    return _Training(
        accelerator,
        model,
        optimizer,
        batches,
        tokens_since_fired,
        fired_ever,
        start_step,
        dead_window_tokens(train_cfg.dead_after_tokens, train_cfg.batch_size, plan.n_tokens),
        auxk_dead,
        cc_config,
        train_cfg,
        plan,
        out_dir,
        saved_configs,
    )


def _train_steps(run: _Training, wrapped, progress: bool) -> int:
    """Optimizer steps from ``run.start_step`` to the end (or ``max_steps_per_run``) with logs and checkpoints; the last step done."""
    from tqdm.auto import tqdm

    accelerator, train_cfg, cc_config, plan = run.accelerator, run.train_cfg, run.cc_config, run.plan
    total_steps, start_step, log_every = plan.total_steps, run.start_step, train_cfg.log_every
    stop_step = (
        total_steps
        if train_cfg.max_steps_per_run is None
        else min(total_steps, start_step + train_cfg.max_steps_per_run)
    )
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="crosscoder",
        unit="step",
        disable=not progress or not accelerator.is_main_process,
    )
    dead = _auxk_indices(run.auxk_dead)
    sums = MetricSums(cc_config.n_models, accelerator.device)
    bad_inputs = NonFiniteInputs(cc_config.n_models, accelerator.device)
    started = time.perf_counter()
    step = start_step
    for step in range(start_step, stop_step):
        x = next(run.batches)
        bad_inputs.add(x, step)
        out, l1 = _optimizer_step(run, wrapped, x, step, dead)
        sums.add(out)
        done = step + 1
        if done % log_every == 0 or done == stop_step:
            record = sums.pop(
                accelerator,
                step=done,
                tokens=done * train_cfg.batch_size,
                lr=run.optimizer.param_groups[0]["lr"],
                l1_coefficient=l1,
            )
            bad_inputs.check(accelerator, record["loss"], cc_config.model_names, done, log_every)
            if done % log_every == 0:  # on the log grid only, so that a resumed run sees the same sets
                dead = _refresh_dead(run, done)
            _log(run, record, bar, started, done)
        bar.update(1)
        if done % plan.checkpoint_every == 0 and done != stop_step:
            _checkpoint(run, done)
    bar.close()
    return max(step + 1, start_step) if stop_step > start_step else start_step


def _refresh_dead(run: _Training, done: int) -> torch.Tensor | None:
    """Set ``run.auxk_dead`` to the features that fired in none of the last ``run.dead_window`` tokens after
    ``done`` steps; their indices (None when there are none): the AuxK set until the next refresh."""
    if done * run.train_cfg.batch_size >= run.dead_window:
        run.auxk_dead = run.tokens_since_fired >= run.dead_window
    return _auxk_indices(run.auxk_dead)


def _auxk_indices(dead: torch.Tensor) -> torch.Tensor | None:
    """Indices [n_dead] of a dead mask [F], None when empty (one device sync: called at log steps only)."""
    index = dead.nonzero().squeeze(1)
    return index if index.numel() else None


def _optimizer_step(
    run: _Training, wrapped, x: torch.Tensor, step: int, dead: torch.Tensor | None
) -> tuple[CrosscoderOutput, float]:
    """One optimizer step on the batch ``x`` at 0-based ``step`` (scheduled lr and λ, AuxK on the ``dead``
    features' indices, clipped gradients) and the update of the firing counters; the forward's output and λ."""
    accelerator, train_cfg, optimizer = run.accelerator, run.train_cfg, run.optimizer
    total_steps = run.plan.total_steps
    for group in optimizer.param_groups:
        group["lr"] = run.lr * lr_factor(step, total_steps, train_cfg.lr_decay_fraction)
    l1 = train_cfg.l1_coefficient * l1_factor(step, total_steps, train_cfg.l1_warmup_fraction)
    with accelerator.autocast():
        out = wrapped(
            x,
            l1_coefficient=l1,
            dead_mask=dead,
            aux_k=train_cfg.aux_k,
            aux_coefficient=train_cfg.aux_coefficient,
            threshold_decay=train_cfg.threshold_decay,
        )
    accelerator.backward(out.loss)
    if train_cfg.grad_clip > 0:
        accelerator.clip_grad_norm_(wrapped.parameters(), train_cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    fired = out.fired
    if accelerator.num_processes > 1:
        fired = accelerator.reduce(fired.to(torch.int32), reduction="sum") > 0
    run.tokens_since_fired = torch.where(
        fired, torch.zeros_like(run.tokens_since_fired), run.tokens_since_fired + train_cfg.batch_size
    )
    run.fired_ever |= fired
    return out, l1


def _log(run: _Training, record: dict[str, Any], bar, started: float, done: int) -> None:
    """Complete a log step's metrics (dead fraction, throughput) and write them to metrics.jsonl, the bar and the trackers."""
    train_cfg, accelerator = run.train_cfg, run.accelerator
    window = min(run.dead_window, done * train_cfg.batch_size)  # the trailing window, or the run so far
    record["dead_fraction"] = float((run.tokens_since_fired >= window).float().mean())
    record["never_fired_fraction"] = float((~run.fired_ever).float().mean())
    record["tokens_per_s"] = (done - run.start_step) * train_cfg.batch_size / (time.perf_counter() - started)
    if accelerator.is_main_process:
        with open(run.out_dir / METRICS, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        bar.set_postfix(
            loss=f"{record['loss']:.4g}",
            fvu="/".join(f"{v:.3f}" for v in record["fvu"]),
            l0=f"{record['l0']:.1f}",
            dead=f"{record['dead_fraction']:.2%}",
        )
    if train_cfg.report_to:
        accelerator.log(
            {k: v for k, v in record.items() if not isinstance(v, list)}
            | {f"fvu/{n}": v for n, v in zip(run.cc_config.model_names, record["fvu"])},
            step=done,
        )


def _checkpoint(run: _Training, step: int) -> None:
    """Crosscoder weights at the run root, their status, and the resumable state under trainer_state/ (rank 0 writes)."""
    accelerator, out_dir, configs, total_steps = run.accelerator, run.out_dir, run.saved_configs, run.plan.total_steps
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.model.save_pretrained(out_dir)
        batch = configs["training"]["batch_size"]
        write_status(
            out_dir, {"complete": step >= total_steps, "step": step, "total_steps": total_steps, "tokens": step * batch}
        )
        inner_optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
        save_training_state(
            out_dir / STATE_DIR,
            step,
            model_state=run.model.state_dict(),
            optimizer=inner_optimizer,
            counters={
                "tokens_since_fired": run.tokens_since_fired,
                "fired_ever": run.fired_ever,
                "auxk_dead": run.auxk_dead,
            },
            meta={"configs": configs},
        )
    accelerator.wait_for_everyone()


def _global_batches(
    source,
    cfg: CrosscoderTrainingConfig,
    local_batch: int,
    rank: int,
    world: int,
    rank_local: bool,
    device,
    *,
    skip: int = 0,
) -> Iterator[torch.Tensor]:
    """This rank's [local_batch, N, d] slices of the global batch stream, float32 on ``device``, forever (epochs
    repeat), from its batch ``skip`` on (a resumed run's data position: the batches before it are drawn from the
    same stream and dropped on the host).

    For a GPU, a source whose batches are built in host memory (stores; ``batches_on_host``) is read on a
    background thread two batches ahead (:func:`~posttrain_probe.activations.prefetch.prefetched`: reading,
    shuffle-buffer refills and pinning overlap the training step). The batches leave the host in the source's
    dtype (bf16 stores: half the bytes of float32) from pinned memory, so each copy is queued behind the running
    step instead of holding the host until the GPU is idle (a copy from pageable memory does), and become float32
    on the GPU.
    """
    from posttrain_probe.activations.prefetch import prefetched

    batch = local_batch if rank_local else cfg.batch_size
    cuda = torch.device(device).type == "cuda"
    # the project's sources take dtype= (None: keep theirs); another object with an iter_batches is called as before
    keep_dtype = {"dtype": None} if cuda and "dtype" in inspect.signature(source.iter_batches).parameters else {}
    stream = source.iter_batches(
        batch, shuffle=True, seed=cfg.seed, epochs=None, buffer_tokens=cfg.buffer_tokens, drop_last=True, **keep_dtype
    )

    def host_side() -> Iterator[torch.Tensor]:
        for index, x in enumerate(stream):
            if index < skip:
                continue
            if not rank_local and world > 1:
                x = x[rank * local_batch : (rank + 1) * local_batch]
            if cuda and x.device.type == "cpu":  # a live source's batches may already be on the GPU
                x = x.pin_memory()
            yield x

    batches = prefetched(host_side()) if cuda and getattr(source, "batches_on_host", False) else host_side()
    try:
        for x in batches:
            yield x.to(device, non_blocking=True).float()
    finally:
        batches.close()


def _calibrate_threshold(run: _Training, source) -> dict[str, Any] | None:
    """BatchTopK: calibrate the inference threshold on ``calibration_tokens`` tokens of the source when training
    ends (:func:`calibrate_joint_threshold`; under several processes the ranks' thresholds are averaged)."""
    from posttrain_probe.crosscoder.calibrate import calibrate_joint_threshold

    cfg = run.train_cfg
    if run.cc_config.activation != "batchtopk" or cfg.calibration_tokens == 0:
        return None
    batches = (
        x.to(run.accelerator.device)
        for x in source.iter_batches(
            min(4096, cfg.calibration_tokens), shuffle=True, seed=cfg.seed + 2, epochs=1, drop_last=False
        )
    )
    was_training = run.model.training
    run.model.eval()
    result = calibrate_joint_threshold(run.model, batches, max_tokens=cfg.calibration_tokens)
    run.model.train(was_training)
    if run.accelerator.num_processes > 1:
        run.model.threshold.copy_(run.accelerator.reduce(run.model.threshold.clone(), reduction="mean"))
    return result._asdict() | {"threshold": float(run.model.threshold)}


def _report_quality(
    out_dir: Path,
    cc_config: CrosscoderConfig,
    total_steps: int,
    calibration: dict[str, Any] | None = None,
    progress: bool = True,
) -> None:
    """Record (in training_status.json) the summary and the quality warnings of a finished run; print the
    summary (with ``progress``) and warn about each problem."""
    import warnings

    lines = (out_dir / METRICS).read_text().splitlines() if (out_dir / METRICS).exists() else []
    if not lines:
        return
    last = json.loads(lines[-1])
    problems = quality_warnings(last, cc_config, total_steps)
    summary = {
        "train_l0": last["l0"],
        "fvu": last["fvu"],
        "dead_fraction": last["dead_fraction"],
        "never_fired_fraction": last.get("never_fired_fraction"),
    }
    status = json.loads((out_dir / STATUS).read_text())
    if calibration is None and "summary" in status:  # a finished run resumed again: keep its calibration figures
        summary = status["summary"]
    elif calibration is not None:
        summary |= {"inference_l0": calibration["l0_calibrated"], "threshold_calibration": calibration}
    write_status(out_dir, {**status, "summary": summary, "warnings": problems})
    never = summary.get("never_fired_fraction")
    if progress:
        print(
            f"crosscoder {out_dir}: train L0 {summary['train_l0']:.1f}"
            + (f", inference L0 {summary['inference_l0']:.1f}" if "inference_l0" in summary else "")
            + f", FVU {'/'.join(f'{v:.3f}' for v in summary['fvu'])}, dead {summary['dead_fraction']:.1%}"
            + (f", never fired {never:.1%}" if never is not None else "")
        )
    for problem in problems:
        warnings.warn(f"crosscoder {out_dir}: {problem}", CrosscoderQualityWarning, stacklevel=4)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= ``step`` (all of them are rewritten atomically)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
