"""``+probe=on_ckpt``: snapshots and activations from verl's own checkpoint saves (documented keys only).

on_ckpt.yaml sets ``trainer.checkpoint_callback_class`` to :class:`ProbeCheckpointCallback` and adds
``hf_model`` to the actor's checkpoint ``save_contents``. verl's trainer (any ``trainer_mode``) then
calls :meth:`ProbeCheckpointCallback.on_save` in its driver process (the TaskRunner) after every
checkpoint it saves (``trainer.save_freq`` steps and the last step), with the
``<default_local_dir>/global_step_N`` folder, where verl's FSDP checkpoint manager wrote the HF model
to ``actor/huggingface/`` (config, generation config, tokenizer, safetensors). The callback

- at the first save: loads the base model (``actor_rollout_ref.model.path``), opens (or, when
  verl resumed from a checkpoint, continues) ``<run>/probe.json`` and captures the base model (step 0);
- copies ``actor/huggingface`` to ``<run>/snapshots/step-N`` (out of verl's checkpoint rotation,
  ``max_actor_ckpt_to_keep``), loads it and captures the probe set into ``<run>/activations/step-N``.

Probe set, token selection, run directory and store formats are those of the TRL callbacks
(:class:`~posttrain_probe.callbacks.probe_run.ProbeRun`), so the same model, probe set and layers give
the same store. The forwards run in the TaskRunner process (on its GPU if Ray gave it one, else on
CPU) while the training workers wait; for large models ``+probe=on`` is faster.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from verl.trainer.ppo.checkpoint_callback import CheckpointCallback

from posttrain_probe.callbacks.probe_run import ProbeRun
from posttrain_probe.callbacks.verl.config import check_job_config, paradigm_of, resolve_run_dir
from posttrain_probe.errors import ProbeError
from posttrain_probe.models import load_causal_lm

HF_SUBDIR = os.path.join("actor", "huggingface")
"""Where verl's v1 trainer + FSDP checkpoint manager put the HF export inside ``global_step_N``."""


def save_steps(save_freq: int, total_steps: int) -> list[int]:
    """The steps at which verl's trainer saves a checkpoint: every ``save_freq`` steps and the last one."""
    steps = list(range(save_freq, total_steps + 1, save_freq))
    return steps if steps and steps[-1] == total_steps else [*steps, total_steps]


def resume_step_of(config) -> int:
    """The global step verl's trainer will resume from (``trainer.resume_mode``), read before it loads anything:
    ``auto`` -> the latest checkpoint in ``default_local_dir`` (0 if none), ``resume_path`` -> that folder's step,
    ``disable`` -> 0."""
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    mode = OmegaConf.select(config, "trainer.resume_mode", default="auto")
    if mode == "disable":
        return 0
    if mode == "resume_path":
        path = str(OmegaConf.select(config, "trainer.resume_from_path"))
    else:
        path = find_latest_ckpt_path(os.path.abspath(str(OmegaConf.select(config, "trainer.default_local_dir"))))
        if path is None:
            return 0
    try:
        return int(str(path).rstrip("/").split("global_step_")[-1])
    except ValueError:
        raise ProbeError(f"cannot read the resume step from {path!r}: expected a global_step_N folder") from None


class CheckpointProbeRun(ProbeRun):
    """A :class:`ProbeRun` in one process over models loaded from disk (the base model, then each snapshot)."""

    def __init__(self, args, *, paradigm: str, trainer_name: str, tokenizer, train_files: list[str]) -> None:
        from accelerate import PartialState

        super().__init__(None, args, paradigm=paradigm)
        self._processes = PartialState(cpu=not torch.cuda.is_available())
        self._tokenizer = tokenizer
        self._train_files = train_files
        self._trainer_name = trainer_name
        self._model = None
        self._train_data = None

    @property
    def accelerator(self):
        return self._processes

    @property
    def model(self):
        if self._model is None:
            raise ProbeError("no model loaded: call load_model(path) first")
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def trainer_name(self) -> str:
        return self._trainer_name

    @property
    def train_dataset(self):
        """``data.train_files`` as one dataset (sampled for the probe set when probe.dataset is not set)."""
        if self._train_data is None:
            from posttrain_probe.callbacks.verl.worker import train_files_dataset

            self._train_data = train_files_dataset(self._train_files)
        return self._train_data

    def load_model(self, path: str | os.PathLike) -> None:
        """Load the HF model at ``path`` for the next capture (after :meth:`open`, only the blocks the layers need)."""
        self.release_model()
        keep = max(self.layers) if self.started else None
        self._model = load_causal_lm(path, dtype="auto", keep_layers=keep)

    def release_model(self) -> None:
        """Drop the loaded model (its memory is not needed until the next save)."""
        self._model = None

    def copy_snapshot(self, step: int, hf_dir: Path) -> float:
        """Copy verl's HF export ``hf_dir`` to ``snapshots/step-NNNNNN`` (staging folder, then rename); returns seconds."""
        started = time.perf_counter()
        target = self.run.snapshot_dir(step)
        staging = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(hf_dir, staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        seconds = time.perf_counter() - started
        self.run.record(
            "snapshots",
            {
                "step": step,
                "path": str(target.relative_to(self.run.path)),
                "peft": None,
                "seconds": round(seconds, 3),
                "source": str(hf_dir),
            },
        )
        return seconds


class ProbeCheckpointCallback(CheckpointCallback):
    """verl ``CheckpointCallback``: snapshot + probe activations at every checkpoint verl saves (see the module docstring)."""

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.probe = check_job_config(config)
        if self.probe.mode != "on_ckpt":
            raise ProbeError(f"ProbeCheckpointCallback belongs to +probe=on_ckpt, got probe.mode={self.probe.mode}")
        if OmegaConf.select(config, "actor_rollout_ref.actor.checkpoint.async_save", default=False):
            raise ProbeError(
                "+probe=on_ckpt reads each checkpoint when verl reports it saved; set actor_rollout_ref.actor.checkpoint.async_save=false"
            )
        self.run_dir = resolve_run_dir(self.probe, config)
        self.resume_step = resume_step_of(config)  # before verl's trainer loads that checkpoint
        self.probe_run: CheckpointProbeRun | None = None

    def on_save(self, trainer, global_step: int, checkpoint_dir: str, async_save: bool = False, **kwargs: Any) -> None:
        """Snapshot ``<checkpoint_dir>/actor/huggingface`` as step ``global_step`` and capture the probe set with it."""
        if async_save:
            raise ProbeError(
                f"checkpoint {checkpoint_dir} was saved asynchronously and may be incomplete: set actor_rollout_ref.actor.checkpoint.async_save=false"
            )
        hf_dir = Path(checkpoint_dir) / HF_SUBDIR
        if not list(hf_dir.glob("*.safetensors")):
            raise ProbeError(
                f"verl's checkpoint {checkpoint_dir} holds no HF model in {HF_SUBDIR}: "
                "add hf_model to actor_rollout_ref.actor.checkpoint.save_contents"
            )
        run = self._start(trainer)
        args, metrics = run.args, {}
        run.run.lock()  # verl has no end-of-training hook: the directory is held while writing only
        try:
            if args.probe_save_snapshots and global_step not in run.run.steps_done("snapshots"):
                metrics["probe/snapshot_seconds"] = run.copy_snapshot(global_step, hf_dir)
            if args.probe_stream_activations and global_step not in run.run.steps_done("activations"):
                run.load_model(run.run.snapshot_dir(global_step) if args.probe_save_snapshots else hf_dir)
                result = run.capture(global_step)
                metrics.update({f"probe/{key}": value for key, value in result.items() if key != "seconds"})
                metrics["probe/activation_seconds"] = result["seconds"]
        finally:
            run.run.close()
        run.release_model()
        tracking = getattr(trainer, "logger", None)
        if metrics and tracking is not None:
            tracking.log(data=metrics, step=global_step)

    def _start(self, trainer) -> CheckpointProbeRun:
        """First save: load the base model, open (or continue) the run directory, capture step 0."""
        if self.probe_run is not None:
            return self.probe_run
        from verl.utils.fs import copy_to_local

        config = self.config
        train_files = OmegaConf.select(config, "data.train_files")
        train_files = (
            OmegaConf.to_container(train_files, resolve=True) if OmegaConf.is_config(train_files) else train_files
        )
        args = self.probe.to_probe_arguments()
        if args.probe_dataset is None and args.probe_column is None:
            args.probe_column = OmegaConf.select(config, "data.prompt_key", default=None)
        run = CheckpointProbeRun(
            args,
            paradigm=paradigm_of(config),
            trainer_name=type(trainer).__name__,
            tokenizer=trainer.tokenizer,
            train_files=[train_files] if isinstance(train_files, str) else list(train_files or []),
        )
        base = copy_to_local(
            str(OmegaConf.select(config, "actor_rollout_ref.model.path")),
            use_shm=bool(OmegaConf.select(config, "actor_rollout_ref.model.use_shm", default=False)),
        )
        run.load_model(base)
        save_freq = int(OmegaConf.select(config, "trainer.save_freq"))
        run.open(self.run_dir, save_steps(save_freq, int(trainer.total_training_steps)), resume_step=self.resume_step)
        try:
            if args.probe_stream_activations and 0 not in run.run.steps_done("activations"):
                run.capture(0)
        finally:
            run.run.close()  # taken again for every write (on_save)
        run.release_model()
        self.probe_run = run
        return run
