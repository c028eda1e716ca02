"""TrainerCallbacks for any transformers Trainer (TRL's SFTTrainer and GRPOTrainer included).

    trainer = SFTTrainer(...)
    add_probe_callbacks(trainer, ProbeArguments(probe_layers=[18]))
    trainer.train()

``SnapshotCallback`` writes HF snapshots at the schedule's steps; ``ActivationStreamCallback``
captures the probe set with the base model at step 0 and at the same steps. Both take the trainer,
as TRL's own callbacks do, to reach its accelerator and processing class.
"""

from __future__ import annotations

from transformers import TrainerCallback

from posttrain_probe.callbacks.arguments import ProbeArguments
from posttrain_probe.callbacks.probe_run import ProbeRun


class _ProbeCallback(TrainerCallback):
    def __init__(self, trainer, args: ProbeArguments | None = None, *, run: ProbeRun | None = None) -> None:
        self.probe = run or ProbeRun(trainer, args or ProbeArguments())
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.probe.begin(state)
        self.probe.run.lock()  # again, when the same trainer trains a second time

    def on_train_end(self, args, state, control, **kwargs):
        if self.probe.run is not None:
            self.probe.run.close()  # another run may now write into the run directory

    def _report(self, args, state, control, metrics: dict[str, float]) -> None:
        """Send probe metrics to the Trainer's log history and report_to integrations without
        touching its own logging: no Trainer.log call (which would consume TRL's pending metrics)
        and the step's should_log flag is kept, so the loss log cadence is unchanged."""
        should_log = control.should_log
        state.log_history.append({**metrics, "step": state.global_step})
        self.trainer.callback_handler.on_log(args, state, control, logs=dict(metrics))
        control.should_log = should_log

    def _due(self, state, kind: str) -> bool:
        return state.global_step in self.probe.schedule and state.global_step not in self.probe.run.steps_done(kind)


class SnapshotCallback(_ProbeCallback):
    """HF-loadable snapshots at fractions of training (default every 1/5), every N steps or at listed steps."""

    def on_step_end(self, args, state, control, **kwargs):
        if self.probe.args.probe_save_snapshots and self._due(state, "snapshots"):
            seconds = self.probe.save_snapshot(state.global_step)
            self._report(args, state, control, {"probe/snapshot_seconds": seconds})


class ActivationStreamCallback(_ProbeCallback):
    """Probe-set residual activations: the base model at step 0, the current model at each snapshot point."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.probe.args.probe_stream_activations and 0 not in self.probe.run.steps_done("activations"):
            self.probe.capture(0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.probe.args.probe_stream_activations and self._due(state, "activations"):
            result = self.probe.capture(state.global_step)
            metrics = {f"probe/{key}": value for key, value in result.items() if key != "seconds"}
            self._report(args, state, control, metrics | {"probe/activation_seconds": result["seconds"]})


def add_probe_callbacks(
    trainer, args: ProbeArguments | None = None, *, paradigm: str | None = None, monitor=None
) -> list[TrainerCallback]:
    """Add both probe callbacks (sharing one run) to ``trainer``, and the feature monitor when ``monitor``
    (``MonitorArguments``) names a crosscoder; returns them. The probe callbacks are skipped when ``args.probe``
    is off; the monitor then keeps its own run."""
    args = args or ProbeArguments()
    run, callbacks = None, []
    if args.probe:
        run = ProbeRun(trainer, args, paradigm=paradigm)
        callbacks = [SnapshotCallback(trainer, run=run), ActivationStreamCallback(trainer, run=run)]
    if monitor is not None and monitor.monitor_crosscoder is not None:
        from posttrain_probe.callbacks.feature_monitor import FeatureMonitorCallback

        callbacks.append(FeatureMonitorCallback(trainer, monitor, args, run=run))
    for callback in callbacks:
        trainer.add_callback(callback)
    return callbacks
