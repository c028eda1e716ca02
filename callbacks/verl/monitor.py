"""``probe.monitor.*``: the feature monitor (docs/monitor.md) on the live actor of a ``+probe=on`` run.

The worker runs the TRL callback itself, :class:`~posttrain_probe.callbacks.feature_monitor.FeatureMonitorCallback`,
so base sums, ``monitor_base.safetensors``, ``monitor.jsonl``, resume and alerts are the same code in both
training loops. :class:`WorkerMonitor` is what the callback sees as its Trainer -- the model it checks the
crosscoder against and a log sink -- and plays the Trainer's ``on_train_begin`` (first call) and
``on_step_end`` in the engine's forward context
(:meth:`~posttrain_probe.callbacks.verl.worker.VerlProbeRun.actor_forward`). The callback's forwards run
through the live actor (the probe run's model, verl's FSDP module); the figures it reports become the
worker's ``probe_step`` metrics, which the probe trainer hands to verl's logger. It splits the probe set
over the worker group's ranks and all-reduces the sums over verl's process group
(``VerlProbeRun.accelerator.reduce``): the figures of one process.

The crosscoder is checked (site, width, base model, categories) against :func:`actor_skeleton`, the actor's
checkpoint as the meta-device architecture with its input embedding read from disk, in the driver
(:func:`check_monitor`, before verl starts anything) and again in the worker: the sharded FSDP module holds
no whole embedding to compare, and FSDP2 renames its class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from posttrain_probe.callbacks.verl.config import VerlMonitorConfig, monitor_message
from posttrain_probe.errors import ProbeError

MONITOR_STOP = "monitor/stop"
"""Metric ``probe_step`` returns (1.0) when the monitor asks to stop (an alert with ``probe.monitor.stop_on_alert``)."""


def monitor_due(monitor: VerlMonitorConfig, step: int, total_steps: int) -> bool:
    """Whether the monitor computes figures at training step ``step`` >= 1: every ``every`` steps and at the last."""
    return monitor.crosscoder is not None and (step % monitor.every == 0 or step == total_steps)


class WorkerMonitor:
    """``FeatureMonitorCallback`` on a verl worker's actor (module docstring); collective, like ``probe_step``.

    Built in ``probe_init``: the callback's checks of the crosscoder against the actor's checkpoint (site,
    width, base model, categories; :func:`actor_skeleton` of the path verl loaded the actor from) run here,
    before the run directory is written. ``resume_step``: the global step verl resumed from (the callback
    then reads the base sums saved by the first run and trims monitor.jsonl).
    """

    def __init__(self, run, monitor: VerlMonitorConfig, *, total_steps: int, resume_step: int) -> None:
        from posttrain_probe.callbacks.feature_monitor import FeatureMonitorCallback

        model_config = run.engine.model_config
        self.run = run
        self.total_steps = total_steps
        self.resume_step = resume_step
        self.begun = False
        self.logs: dict[str, float] = {}
        self._checked = actor_skeleton(
            str(model_config.local_path), trust_remote_code=bool(getattr(model_config, "trust_remote_code", False))
        )
        try:
            self.callback = FeatureMonitorCallback(self, monitor.to_monitor_arguments(), run=run)
        except ProbeError as err:
            raise ProbeError(monitor_message(err)) from None
        finally:
            self._checked = None  # the embedding it holds is not needed again

    # -- what FeatureMonitorCallback uses of its Trainer --------------------------------------------
    @property
    def model(self) -> nn.Module:
        """What the callback checks the crosscoder against when it is built: the actor's checkpoint (module
        docstring); the live actor when that cannot be read (the callback's forwards use the probe run's model)."""
        return self._checked if self._checked is not None else self.run.model

    @property
    def callback_handler(self) -> WorkerMonitor:
        """The callback reports its figures with ``trainer.callback_handler.on_log``: they land in :attr:`logs`."""
        return self

    def on_log(self, args, state, control, logs: dict[str, float]) -> None:
        self.logs.update(logs)

    # -- the worker's side --------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        """Figures at training step ``step`` when due (metrics ``monitor/*``, empty otherwise); the first call
        also begins the monitor (base sums and step 0 of a fresh run, or the saved base sums on resume).
        Adds :data:`MONITOR_STOP` when the callback asks the Trainer to stop."""
        from transformers.trainer_callback import TrainerControl, TrainerState

        main = self.run.accelerator.is_main_process
        state = TrainerState(max_steps=self.total_steps, is_world_process_zero=main, is_local_process_zero=main)
        control = TrainerControl()
        self.logs = {}
        with self.run.actor_forward():
            if not self.begun:
                state.global_step = self.resume_step
                self.callback.on_train_begin(None, state, control)
                self.begun = True
            if step > 0:
                state.global_step = step
                self.callback.on_step_end(None, state, control)
        metrics = dict(self.logs)
        if control.should_training_stop:
            metrics[MONITOR_STOP] = 1.0
        return metrics


# -- the driver's check ----------------------------------------------------------------------------
def check_monitor(monitor: VerlMonitorConfig, config) -> None:
    """``FeatureMonitorCallback``'s checks in the driver: ``monitor`` against the actor of verl ``config``
    (``actor_rollout_ref.model.path``) on the meta device; ProbeError naming the ``probe.monitor.*`` keys.

    A remote actor path (``hdfs://...``) is not read here; the worker checks the actor at ``probe_init``.
    """
    from omegaconf import OmegaConf

    from posttrain_probe.callbacks.feature_monitor import FeatureMonitorCallback

    args = monitor.to_monitor_arguments()
    path = str(OmegaConf.select(config, "actor_rollout_ref.model.path"))
    trust_remote_code = bool(OmegaConf.select(config, "actor_rollout_ref.model.trust_remote_code", default=False))
    actor = actor_skeleton(path, trust_remote_code=trust_remote_code)
    if actor is None:
        return
    try:
        FeatureMonitorCallback(SimpleNamespace(model=actor), args)
    except ProbeError as err:
        raise ProbeError(monitor_message(err)) from None


def actor_skeleton(path: str, *, trust_remote_code: bool = False) -> nn.Module | None:
    """The causal LM of ``path`` (local directory or hub name) on the meta device, with its input embedding
    read from the checkpoint's safetensors when they are on this machine (the weight sample of
    :func:`~posttrain_probe.model_identity.model_fingerprint`); None for a remote path (``scheme://``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if "://" in path:
        return None
    local = path if os.path.isdir(path) else _cached_snapshot(path)
    try:
        model_config = AutoConfig.from_pretrained(local or path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ProbeError(
            f"cannot read the actor's config {path} (actor_rollout_ref.model.path) to check probe.monitor.crosscoder against it: {err}"
        ) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    if local is not None:
        _load_input_embedding(model, Path(local))
    return model


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot of hub model ``repo_id`` if it is in the HF cache (nothing is downloaded)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, or not a repo id: the config alone is checked
        return None


def _load_input_embedding(model: nn.Module, directory: Path) -> None:
    """Replace the meta input embedding of ``model`` by the checkpoint's in ``directory`` (safetensors,
    sharded or not); left on the meta device (config fields only are compared) when it is not found."""
    from safetensors import safe_open

    embedding = model.get_input_embeddings()
    name = next((n for n, p in model.named_parameters() if p is embedding.weight), None)
    index = directory / "model.safetensors.index.json"
    file = json.loads(index.read_text()).get("weight_map", {}).get(name) if index.exists() else "model.safetensors"
    if name is None or file is None or not (directory / file).exists():
        return
    with safe_open(str(directory / file), "pt") as handle:
        if name in handle.keys():
            embedding.weight = nn.Parameter(handle.get_tensor(name), requires_grad=False)


__all__ = ["MONITOR_STOP", "WorkerMonitor", "actor_skeleton", "check_monitor", "monitor_due"]
