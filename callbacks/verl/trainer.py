"""verl's synchronous PPO/GRPO trainer with probe snapshots and activations (``+probe=on``).

Registered with verl's own ``register_trainer`` as ``trainer.v1.trainer_mode=probe``; on.yaml selects
it. It is :class:`verl.trainer.ppo.v1.trainer_sync.PPOTrainerSync` with three additions:

- the actor/rollout role runs :class:`~posttrain_probe.callbacks.verl.worker.ProbeActorRolloutRefWorker`
  (verl's worker plus ``probe_init`` / ``probe_step``);
- after verl's set-up and checkpoint loading, while the rollout engine still sleeps:
  ``probe_init`` once, then ``probe_step(0)`` (the base model's activations);
- at the end of each scheduled step (``snapshot_schedule`` of the TRL callbacks: ``probe.snapshot_fraction``,
  ``probe.snapshot_steps`` or ``probe.snapshot_at``), after the actor update and verl's checkpoint
  save but before verl wakes the rollout engine: ``probe_step(step)`` (snapshot + activations);
- with ``probe.monitor.crosscoder``, the same at every ``probe.monitor.every`` steps and the last step: the
  feature monitor's figures (docs/monitor.md), logged by verl as ``monitor/*``. When an alert asks to stop
  (``probe.monitor.stop_on_alert``), the trainer saves a checkpoint (unless verl just saved one) and lowers
  ``total_training_steps`` to the current step, so verl's ``fit`` loop logs this step and ends.

Metrics of step 0 (the base model) are logged with verl's first step, named ``probe/base_*`` and ``monitor/base_*``.

verl's trainer base branches on the *string* ``trainer.v1.trainer_mode`` (replay buffer, refill,
TransferQueue checkpointing); the constructor sets it back to ``sync`` so this is exactly verl's sync
trainer. A resumed run (verl's ``resume_mode``) continues the same probe directory: the worker opens
it with the step verl resumed from, drops what an interrupted run wrote after it and skips steps
already recorded.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from omegaconf import OmegaConf, open_dict
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.debug import marked_timer

from posttrain_probe.callbacks.arguments import snapshot_schedule
from posttrain_probe.callbacks.verl.config import (
    PROBE_TRAINER_MODE,
    VerlProbeConfig,
    check_job_config,
    paradigm_of,
    resolve_run_dir,
)
from posttrain_probe.callbacks.verl.monitor import MONITOR_STOP, monitor_due
from posttrain_probe.callbacks.verl.worker import ProbeActorRolloutRefWorker
from posttrain_probe.errors import ProbeError

logger = logging.getLogger(__name__)
_ACTOR_ROLES = (Role.ActorRollout, Role.ActorRolloutRef)  # the colocated roles of verl's sync trainer


@register_trainer(PROBE_TRAINER_MODE)
class ProbePPOTrainer(PPOTrainerSync):
    """``PPOTrainerSync`` + probe hooks (see the module docstring)."""

    def __init__(self, config) -> None:
        mode = OmegaConf.select(config, "trainer.v1.trainer_mode")
        if mode != PROBE_TRAINER_MODE:
            raise ProbeError(
                f"ProbePPOTrainer runs as trainer.v1.trainer_mode={PROBE_TRAINER_MODE}, got {mode}: build it through +probe=on"
            )
        self.probe: VerlProbeConfig = check_job_config(config)
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"  # trainer_base compares this string: behave as verl's sync trainer
        super().__init__(config)
        self.probe_schedule: list[int] = []
        self.probe_info: dict[str, Any] | None = None

    # -- roles --------------------------------------------------------------------------------
    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        roles = [role for role in _ACTOR_ROLES if role in self.role_worker_mapping]
        if not roles:
            raise ProbeError(
                f"verl's role mapping has no colocated actor/rollout role ({', '.join(map(str, _ACTOR_ROLES))}): +probe=on needs the sync trainer's hybrid engine"
            )
        for role in roles:
            self.role_worker_mapping[role] = ray.remote(ProbeActorRolloutRefWorker)

    # -- hooks ----------------------------------------------------------------------------------
    def on_init_end(self) -> None:
        """verl has built the workers, put the rollout replicas to sleep and loaded a checkpoint (if
        resuming): open the probe run and capture the base model, then let verl sync weights."""
        self.probe_schedule = snapshot_schedule(self.probe.to_probe_arguments(), self.total_training_steps)
        self.probe_info = self.actor_rollout_wg.probe_init(self.probe_payload())[0]
        metrics = self.actor_rollout_wg.probe_step(0, snapshot=False)[0]
        self._add_probe_metrics({_base_name(key): value for key, value in metrics.items()})
        super().on_init_end()

    def on_step_end(self) -> None:
        """After the actor update and checkpoint save, before verl wakes the rollout engine."""
        metrics: dict[str, float] = {}
        step = self.global_steps
        scheduled = step in self.probe_schedule
        if scheduled or monitor_due(self.probe.monitor, step, self.total_training_steps):
            with marked_timer("probe", self.timing_raw, color="purple"):
                metrics = self.actor_rollout_wg.probe_step(step, snapshot=scheduled, activations=scheduled)[0]
        if metrics.get(MONITOR_STOP):
            self._stop_after_this_step()
        super().on_step_end()
        self._add_probe_metrics(metrics)

    # -- helpers --------------------------------------------------------------------------------
    def probe_payload(self) -> dict[str, Any]:
        """What ``probe_init`` gets: the ``probe.*`` values plus what the worker cannot see in its own
        (actor_rollout_ref) config: run directory, resume step, schedule, training files, prompt limit."""
        config = self.config
        train_files = OmegaConf.select(config, "data.train_files")
        if OmegaConf.is_config(train_files):
            train_files = OmegaConf.to_container(train_files, resolve=True)
        return {
            **self.probe.to_dict(),
            "run_dir": resolve_run_dir(self.probe, config),
            "resume_step": int(self.global_steps),
            "schedule": list(self.probe_schedule),
            "total_training_steps": int(self.total_training_steps),
            "paradigm": paradigm_of(config),
            "trainer": type(self).__name__,
            "train_files": [train_files] if isinstance(train_files, str) else list(train_files or []),
            "prompt_key": OmegaConf.select(config, "data.prompt_key", default="prompt"),
            "column": self.probe.column
            or (None if self.probe.dataset else OmegaConf.select(config, "data.prompt_key", default=None)),
            "max_prompt_length": OmegaConf.select(config, "data.max_prompt_length", default=None),
            "base_model": str(OmegaConf.select(config, "actor_rollout_ref.model.path")),
        }

    def _stop_after_this_step(self) -> None:
        """The feature monitor's alert with probe.monitor.stop_on_alert: save a checkpoint of this step (as the
        TRL callback has the Trainer do) and end verl's fit loop after this step (``while global_steps <=
        total_training_steps``), as at its last step."""
        step, save_freq = self.global_steps, int(self.config.trainer.save_freq)
        if not (save_freq > 0 and (step % save_freq == 0 or step >= self.total_training_steps)):
            with marked_timer("save_checkpoint", self.timing_raw, color="green"):
                self._save_checkpoint()
        logger.warning(f"the feature monitor stops training after step {step} (probe.monitor.stop_on_alert)")
        self.total_training_steps = step

    def _add_probe_metrics(self, metrics: dict[str, float]) -> None:
        """Hand metrics to verl's step logging (``fit`` merges ``_pending_sync_metrics`` into the step's metrics)."""
        if metrics:
            self._pending_sync_metrics = {**(getattr(self, "_pending_sync_metrics", None) or {}), **metrics}


def _base_name(key: str) -> str:
    """``probe/x`` -> ``probe/base_x``, ``monitor/x`` -> ``monitor/base_x``: a step-0 metric, logged with step 1."""
    group, _, name = key.partition("/")
    return f"{group}/base_{name}"
