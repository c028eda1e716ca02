"""``FeatureMonitorCallback``: the base model's features in the live model during training (docs/monitor.md),
for any transformers / TRL Trainer.

    trainer.add_callback(FeatureMonitorCallback(trainer, MonitorArguments(monitor_crosscoder="runs/cc")))

or from the parsed ``MonitorArguments`` (a recipe's TrlParser): ``monitor_callback(trainer, args, probe_args)``.
The probe set and the run directory are the probe callbacks' (``ProbeArguments``); with
``add_probe_callbacks`` on the same trainer the monitor shares their run. Every ``monitor_every`` optimizer
steps (and at the last step) it logs :class:`~posttrain_probe.analysis.monitor.MonitorFigures` to the
Trainer's ``report_to`` and appends ``{"step": ..., figures, "seconds": ...}`` to ``<run>/monitor.jsonl``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from posttrain_probe.activations.capture import capture_batch
from posttrain_probe.analysis.monitor import (
    MONITOR_CATEGORIES,
    MonitorFigures,
    MonitorSums,
    category_masks,
    check_monitored_model,
    figures_from_sums,
    monitor_sums,
)
from posttrain_probe.callbacks.arguments import ProbeArguments
from posttrain_probe.callbacks.probe_run import ProbeRun, _restore_rng, _rng_state
from posttrain_probe.callbacks.trainer_callbacks import _ProbeCallback
from posttrain_probe.crosscoder.model import crosscoder_fingerprint
from posttrain_probe.errors import ProbeError

logger = logging.getLogger(__name__)

MONITOR_LOG = "monitor.jsonl"
MONITOR_BASE = "monitor_base.safetensors"
"""The base model's probe-set sums (safetensors), kept so that a resumed run compares with the base, not the checkpoint."""
MISMATCH_HINT = "pass --monitor_allow_model_mismatch to override"
"""How the model-identity error tells a recipe's user to let a mismatch through (verl's config rewrites it)."""


@dataclass
class MonitorArguments:
    """Which crosscoder/SAE branch to watch the live model with, how often, and when to warn or stop."""

    monitor_crosscoder: str | None = field(
        default=None,
        metadata={"help": "Crosscoder (or SAE) directory trained on the base model at the site; unset: no monitor."},
    )
    monitor_model: str | None = field(
        default=None, metadata={"help": "Crosscoder branch (model name) of the base model (default: its first model)."}
    )
    monitor_finetuned: str | None = field(
        default=None,
        metadata={
            "help": "Fine-tuned model of the NormRatio categories (default: the other model of a two-model crosscoder)."
        },
    )
    monitor_layer: int | None = field(default=None, metadata={"help": "Site L (default: the crosscoder's layer)."})
    monitor_every: int = field(
        default=50, metadata={"help": "Compute the figures every N optimizer steps (and at the last step)."}
    )
    monitor_categories: list[str] = field(
        default_factory=list,
        metadata={
            "help": "NormRatio categories to report (base-only, shared, finetune-only); empty: all, with a two-model crosscoder."
        },
    )
    monitor_norm_ratio_scale: str = field(
        default="all",
        metadata={"help": "NormRatio denominator of the categories: all (docs/methods.md default) or pair (paper S)."},
    )
    monitor_suppress_fraction: float = field(
        default=0.5,
        metadata={
            "help": "A base-active feature counts as suppressed when its live mean falls below this fraction of its base mean."
        },
    )
    monitor_top_k: int = field(
        default=10, metadata={"help": "Report this many of the most changed features (ids and signed changes)."}
    )
    monitor_max_suppressed: float | None = field(
        default=None, metadata={"help": "Warn when the suppressed fraction exceeds this (0..1); unset: no check."}
    )
    monitor_max_fvu: float | None = field(
        default=None,
        metadata={"help": "Warn when the branch's FVU on the live activations exceeds this; unset: no check."},
    )
    monitor_stop_on_alert: bool = field(
        default=False, metadata={"help": "On a warning, save a checkpoint and stop training."}
    )
    monitor_allow_model_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Monitor even when the model being trained is not the one the crosscoder branch was trained on (nor tuned from it)."
        },
    )

    def __post_init__(self) -> None:
        from posttrain_probe.analysis.attribution import NORM_RATIO_SCALES

        if self.monitor_every < 1:
            raise ProbeError(f"monitor_every must be >= 1 optimizer step, got {self.monitor_every}")
        bad = [c for c in self.monitor_categories if c not in MONITOR_CATEGORIES]
        if bad:
            raise ProbeError(f"monitor_categories {bad} are not among {list(MONITOR_CATEGORIES)}")
        if self.monitor_norm_ratio_scale not in NORM_RATIO_SCALES:
            raise ProbeError(
                f"monitor_norm_ratio_scale {self.monitor_norm_ratio_scale!r} is not one of {NORM_RATIO_SCALES}"
            )
        if not 0 < self.monitor_suppress_fraction <= 1:
            raise ProbeError(f"monitor_suppress_fraction must be in (0, 1], got {self.monitor_suppress_fraction}")
        if self.monitor_top_k < 0:
            raise ProbeError(f"monitor_top_k must be >= 0, got {self.monitor_top_k}")
        if self.monitor_max_suppressed is not None and not 0 <= self.monitor_max_suppressed <= 1:
            raise ProbeError(f"monitor_max_suppressed must be in [0, 1], got {self.monitor_max_suppressed}")
        if self.monitor_max_fvu is not None and self.monitor_max_fvu < 0:
            raise ProbeError(f"monitor_max_fvu must be >= 0, got {self.monitor_max_fvu}")
        if self.monitor_stop_on_alert and self.monitor_max_suppressed is None and self.monitor_max_fvu is None:
            raise ProbeError("monitor_stop_on_alert needs a threshold: set monitor_max_suppressed or monitor_max_fvu")


class FeatureMonitorCallback(_ProbeCallback):
    """Figures of the live model's probe-set activations at site L against the base's (:mod:`posttrain_probe.analysis.monitor`).

    Every check of the inputs (:func:`check_monitored_model`, the categories) runs here, before training.
    ``crosscoder`` (a Crosscoder object) replaces ``args.monitor_crosscoder``. The probe set and run
    directory: ``run`` if given, else the run of probe callbacks on the same trainer (found at
    ``on_train_begin``, so the order of ``add_callback`` does not matter), else a run of its own from
    ``probe_args`` (default ``ProbeArguments()``). Under data parallelism each rank encodes its share
    of the probe set and the sums are all-reduced: the figures are those of one process.
    """

    def __init__(
        self,
        trainer,
        args: MonitorArguments,
        probe_args: ProbeArguments | None = None,
        *,
        crosscoder=None,
        run: ProbeRun | None = None,
    ) -> None:
        super().__init__(trainer, probe_args, run=run)
        self._run_given = run is not None
        self.args = args
        if crosscoder is None:
            if args.monitor_crosscoder is None:
                raise ProbeError("the feature monitor needs a crosscoder: set monitor_crosscoder to its directory")
            from posttrain_probe.crosscoder.inspect import load_crosscoder

            crosscoder = load_crosscoder(args.monitor_crosscoder)
        self.crosscoder = crosscoder.eval().requires_grad_(False)
        self.fingerprint = crosscoder_fingerprint(crosscoder)
        """The crosscoder's (as given, before the float32 copy the forwards use): checked on resume."""
        self.slot = crosscoder.model_index(args.monitor_model if args.monitor_model is not None else 0)
        self.layer, self.model_mismatch = check_monitored_model(
            crosscoder,
            trainer.model,
            layer=args.monitor_layer,
            branch=self.slot,
            allow_model_mismatch=args.monitor_allow_model_mismatch,
            override_hint=MISMATCH_HINT,
        )
        self.masks = category_masks(
            crosscoder,
            model=self.slot,
            finetuned=args.monitor_finetuned,
            categories=args.monitor_categories or None,
            norm_ratio_scale=args.monitor_norm_ratio_scale,
        )
        self.base: MonitorSums | None = None
        self.resume_step = 0
        self.history: dict[int, MonitorFigures] = {}
        """step -> figures computed by this callback (every rank)."""

    # -- set-up ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._adopt_probe_run()
        super().on_train_begin(args, state, control, **kwargs)
        self.resume_step = state.global_step
        path = self.probe.run.path
        try:
            if self.resume_step == 0:
                started = time.perf_counter()
                self.base = self._probe_sums()
                if self.probe.accelerator.is_main_process:
                    self._save_base(path / MONITOR_BASE)
                    (path / MONITOR_LOG).unlink(missing_ok=True)
                self._record(args, state, control, 0, self.base, time.perf_counter() - started)
            else:
                self._load_base(path / MONITOR_BASE)
                if self.probe.accelerator.is_main_process:
                    self._trim_log(path / MONITOR_LOG, self.resume_step)
        except BaseException:
            self.probe.run.close()  # training does not start: another run may use the directory
            raise
        self.probe.accelerator.wait_for_everyone()

    def _adopt_probe_run(self) -> None:
        """Use the run of probe callbacks on the same trainer (one probe set, one directory lock)."""
        if self._run_given or self.probe.started:
            return
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, _ProbeCallback) and callback.probe is not self.probe:
                self.probe = callback.probe
                return

    def _identity(self) -> dict[str, str]:
        """What the saved base sums must agree with: crosscoder, branch, site, probe set."""
        return {
            "crosscoder": self.fingerprint,
            "model": self.crosscoder.model_names[self.slot],
            "layer": str(self.layer),
            "probe_fingerprint": self.probe.probe_fingerprint(),
        }

    def _save_base(self, path) -> None:
        from safetensors.torch import save_file

        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"sums": self.base.flat().cpu().contiguous()}, str(tmp), metadata=self._identity())
        os.replace(tmp, path)

    def _load_base(self, path) -> None:
        """The base sums the interrupted run saved (main process reads, every rank gets them)."""
        flat, error = None, None
        if self.probe.accelerator.is_main_process:
            if not path.exists():
                error = (
                    f"cannot resume the feature monitor: {path} is missing (the monitor was not on when the run "
                    "started), and the resumed model is not the base model"
                )
            else:
                from safetensors import safe_open

                with safe_open(str(path), "pt") as handle:
                    saved, flat = handle.metadata() or {}, handle.get_tensor("sums")
                differs = [key for key, value in self._identity().items() if saved.get(key) != value]
                if differs:
                    error = f"{path} holds the base sums of another monitor ({', '.join(differs)} differ): choose another probe_run_dir"
        flat, error = self.probe.share((flat, error))
        if error is not None:
            raise ProbeError(error)
        self.base = MonitorSums.from_flat(flat, self.crosscoder.config.n_features)

    @staticmethod
    def _trim_log(path, step: int) -> None:
        """Keep the lines of steps <= ``step`` (once each): the resumed run logs the later steps again."""
        if not path.exists():
            return
        kept: dict[int, str] = {}
        for line in path.read_text().splitlines():
            try:
                entry_step = int(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line a killed run left half-written
            if entry_step <= step:
                kept.setdefault(entry_step, line)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept[s] + "\n" for s in sorted(kept)))
        os.replace(tmp, path)

    # -- the figures ----------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step <= self.resume_step or step in self.history:
            return
        if step % self.args.monitor_every and step != state.max_steps:
            return
        started = time.perf_counter()
        self._record(args, state, control, step, self._probe_sums(), time.perf_counter() - started)

    def _record(self, args, state, control, step: int, live: MonitorSums, seconds: float) -> MonitorFigures:
        """Figures of ``live`` against the base: logged, appended to monitor.jsonl, checked against the thresholds."""
        a = self.args
        figures = figures_from_sums(
            self.base, live, masks=self.masks, suppress_fraction=a.monitor_suppress_fraction, top_k=a.monitor_top_k
        )
        self.history[step] = figures
        self._report(args, state, control, figures.to_log() | {"monitor/seconds": seconds})
        if self.probe.accelerator.is_main_process:
            line = json.dumps({"step": step, **figures.to_json(), "seconds": round(seconds, 4)})
            with open(self.probe.run.path / MONITOR_LOG, "a") as handle:
                handle.write(line + "\n")
        alerts = []
        if step > 0 and a.monitor_max_suppressed is not None and figures.suppressed_fraction > a.monitor_max_suppressed:
            alerts.append(
                f"suppressed fraction {figures.suppressed_fraction:.3f} > monitor_max_suppressed {a.monitor_max_suppressed}"
            )
        if step > 0 and a.monitor_max_fvu is not None and figures.fvu > a.monitor_max_fvu:
            alerts.append(f"FVU {figures.fvu:.3f} > monitor_max_fvu {a.monitor_max_fvu}")
        if alerts:
            if state.is_world_process_zero:
                stop = "; saving a checkpoint and stopping" if a.monitor_stop_on_alert else ""
                logger.warning(f"feature monitor at step {step}: {'; '.join(alerts)}{stop}")
            if a.monitor_stop_on_alert:
                control.should_training_stop = True
                control.should_save = True
        return figures

    @torch.no_grad()
    def _probe_sums(self) -> MonitorSums:
        """Sums of the current model's probe-set activations at site L, all-reduced over ranks.

        As :meth:`ProbeRun.capture`: each rank runs the same number of truncated forwards over its
        slice of the probe set (ZeRO-3 / FSDP gather collectively); the model comes back in its own
        train/eval mode with every RNG state unchanged.
        """
        probe = self.probe
        accelerator, model = probe.accelerator, probe.model
        rank, world = accelerator.process_index, accelerator.num_processes
        batches = probe.probe_batches()
        mine = batches[rank::world]
        rounds = -(-len(batches) // world)
        bos = probe.tokenizer.bos_token_id
        config = self.crosscoder.config
        total, device = None, None
        rng, was_training = _rng_state(), model.training
        model.eval()
        try:
            for index in range(rounds):
                batch = mine[index] if index < len(mine) else batches[0]  # padding round: result dropped
                acts = capture_batch([model], batch, [self.layer], bos_token_id=bos).acts[self.layer][:, 0]
                device = acts.device
                if index < len(mine):
                    sums = monitor_sums(self._encoder(acts.device), acts, model=self.slot)
                    total = sums if total is None else total + sums
        finally:
            model.train(was_training)
            _restore_rng(rng)
        if total is None:
            total = MonitorSums.zeros(config.n_features, config.d_model, device=device)
        if world > 1:
            total = MonitorSums.from_flat(accelerator.reduce(total.flat(), reduction="sum"), config.n_features)
        return total

    def _encoder(self, device):
        """The crosscoder in float32 on ``device`` (moved once)."""
        cc = self.crosscoder
        if cc.W_enc.device != device or cc.W_enc.dtype != torch.float32:
            self.crosscoder = cc = copy.deepcopy(cc).to(device, torch.float32)
        return cc


def monitor_callback(
    trainer, args: MonitorArguments, probe_args: ProbeArguments | None = None
) -> FeatureMonitorCallback | None:
    """``FeatureMonitorCallback(trainer, args, probe_args)``, or None when ``args.monitor_crosscoder`` is unset."""
    if args.monitor_crosscoder is None:
        return None
    return FeatureMonitorCallback(trainer, args, probe_args)
