"""``probe.*``: what ``+probe=on`` / ``+probe=on_ckpt`` do in a verl run, and the checks made before it starts.

The keys are the fields of :class:`~posttrain_probe.callbacks.arguments.ProbeArguments` without their
``probe_`` prefix (``probe.layers=[18]`` is ``probe_layers=[18]`` of the TRL callbacks), plus ``mode``
and the node ``monitor`` (``probe.monitor.*``: the fields of the feature monitor's ``MonitorArguments``
without their ``monitor_`` prefix, :class:`VerlMonitorConfig`). The same dataclass is the Hydra schema
of the ``probe`` node (so Hydra rejects unknown keys and wrong types while composing), the dict handed
to the worker, and the Python API.

This module is imported by the Hydra plugin in every Hydra application: keep it free of heavy
imports (torch, verl, ray); they happen inside the functions that need them.
"""

from __future__ import annotations

import os
import re
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from hydra.experimental.callback import Callback

from posttrain_probe.callbacks.arguments import ProbeArguments
from posttrain_probe.errors import ProbeError

if typing.TYPE_CHECKING:
    from posttrain_probe.callbacks.feature_monitor import MonitorArguments

MODES = ("on", "on_ckpt")
PROBE_TRAINER_MODE = "probe"
"""``trainer.v1.trainer_mode`` under which the probe trainer is registered (verl's sync trainer + probe hooks)."""
CHECKPOINT_CALLBACK = "posttrain_probe.callbacks.verl.checkpoint_callback.ProbeCheckpointCallback"
SETUP_HOOK = "posttrain_probe.callbacks.verl.setup_hook.setup"
ENTRY_POINT_GROUP = "verl.plugins"
ENTRY_POINT_NAME = "posttrain_probe"


VERL_HELP = {
    "run_dir": "Run directory for probe.json, snapshots/ and activations/ (default: <trainer.default_local_dir>/probe).",
    "snapshot_fraction": "Snapshot every this fraction of the run (0.2: five snapshots, as in the papers). mode=on only.",
    "snapshot_steps": "Snapshot every N training steps instead of by fraction. mode=on only.",
    "snapshot_at": "Snapshot at exactly these training steps instead. mode=on only.",
    "dataset": "Probe set: a parquet/JSONL path or any dataset spec of `posttrain-probe collect` (default: a fixed sample of data.train_files).",
    "column": "Text or chat-messages column of the probe set (default: data.prompt_key for the training data).",
    "seq_len": "Tokens per probe document (at most data.max_prompt_length).",
}
"""Help of the ``probe.*`` keys whose meaning in a verl run differs from the TRL callbacks' (the others keep theirs)."""
NOT_IN_VERL = ("probe", "probe_peft_snapshot")
"""ProbeArguments fields without a ``probe.*`` key: ``+probe=...`` switches the probe on; verl snapshots full weights."""


def _probe_argument_keys(cls: type) -> type:
    """Add the fields of :class:`ProbeArguments` (except :data:`NOT_IN_VERL`) to ``cls`` without their ``probe_``
    prefix, with the same types and defaults, in the same order, after ``mode`` and before the other keys of
    ``cls`` (``monitor``), before ``@dataclass`` makes them fields."""
    annotations = cls.__annotations__
    own = {name: annotations.pop(name) for name in list(annotations) if name != "mode"}
    for f in fields(ProbeArguments):
        if f.name in NOT_IN_VERL:
            continue
        name = f.name.removeprefix("probe_")
        annotations[name] = f.type
        metadata = {"help": VERL_HELP.get(name, f.metadata["help"])}
        default = {"default": f.default} if f.default_factory is MISSING else {"default_factory": f.default_factory}
        setattr(cls, name, field(**default, metadata=metadata))
    annotations.update(own)
    return cls


@dataclass
class VerlMonitorConfig:
    """``probe.monitor.*``: the feature monitor (docs/monitor.md) on the live actor of a ``+probe=on`` run.

    The keys are the fields of :class:`~posttrain_probe.callbacks.feature_monitor.MonitorArguments` without
    their ``monitor_`` prefix, with the same types, defaults and meaning (``probe.monitor.every=50`` is
    ``monitor_every=50``; the help is MonitorArguments'); :meth:`to_monitor_arguments` builds it, so its checks
    are the ones that run. They are listed here, not derived from it as the ``probe.*`` keys are from
    ProbeArguments, because MonitorArguments' module imports torch and this one must not;
    tests/test_verl_monitor.py checks that names, types and defaults agree. ``crosscoder`` unset: no monitor.
    """

    crosscoder: str | None = None
    model: str | None = None
    finetuned: str | None = None
    layer: int | None = None
    every: int = 50
    categories: list[str] = field(default_factory=list)
    norm_ratio_scale: str = "all"
    suppress_fraction: float = 0.5
    top_k: int = 10
    max_suppressed: float | None = None
    max_fvu: float | None = None
    stop_on_alert: bool = False
    allow_model_mismatch: bool = False

    def __post_init__(self) -> None:
        _check_types(self, VerlMonitorConfig, "probe.monitor.")

    def to_monitor_arguments(self) -> MonitorArguments:
        """The equivalent ``MonitorArguments`` of the TRL callback (checked there; messages name ``probe.monitor.*``)."""
        from posttrain_probe.callbacks.feature_monitor import MonitorArguments

        try:
            return MonitorArguments(**{f"monitor_{f.name}": getattr(self, f.name) for f in fields(self)})
        except ProbeError as err:
            raise ProbeError(monitor_message(err)) from None

    @classmethod
    def from_dict(cls, values: typing.Mapping[str, Any]) -> VerlMonitorConfig:
        """Build from ``probe.monitor.*`` values (a mapping); unknown keys name the valid ones."""
        if not isinstance(values, typing.Mapping):
            raise ProbeError(f"probe.monitor must be a mapping of probe.monitor.* keys, got {type(values).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ProbeError(
                f"unknown probe key(s) {', '.join(f'probe.monitor.{k}' for k in unknown)}: valid keys are "
                f"{', '.join(f'probe.monitor.{k}' for k in valid)}"
            )
        return cls(**dict(values))


def monitor_message(error: Exception | str) -> str:
    """A message of the feature monitor's checks with the verl names of its keys (``monitor_every`` ->
    ``probe.monitor.every``, the model-mismatch override -> ``probe.monitor.allow_model_mismatch=true``)."""
    from posttrain_probe.model_identity import OVERRIDE_HINT

    names = "|".join(f.name for f in fields(VerlMonitorConfig))
    message = str(error)
    for hint in (OVERRIDE_HINT, "pass --monitor_allow_model_mismatch to override"):  # the TRL callback's hint
        message = message.replace(hint, "set probe.monitor.allow_model_mismatch=true to override")
    return re.sub(rf"\bmonitor_({names})\b", r"probe.monitor.\1", message)


@dataclass
@_probe_argument_keys
class VerlProbeConfig:
    """Snapshots and probe-set activations of a verl run (the ``probe`` node of its config).

    ``mode``, then the fields of :class:`ProbeArguments` without their ``probe_`` prefix (except
    :data:`NOT_IN_VERL`): ``run_dir``, ``snapshot_fraction``, ``snapshot_steps``, ``snapshot_at``,
    ``save_snapshots``, ``stream_activations``, ``layers``, ``dataset``, ``dataset_split``, ``column``,
    ``n_docs``, ``seq_len``, ``batch_size``, ``dtype``, ``seed``, ``drift``; then ``monitor``
    (:class:`VerlMonitorConfig`).
    """

    mode: str = field(
        default="on",
        metadata={
            "help": "'on': probe trainer + worker on the live actor; 'on_ckpt': from verl's own checkpoint saves. Set by +probe=on / +probe=on_ckpt."
        },
    )
    monitor: VerlMonitorConfig = field(
        default_factory=VerlMonitorConfig,
        metadata={
            "help": "The feature monitor, probe.monitor.* (VerlMonitorConfig); off unless probe.monitor.crosscoder is set."
        },
    )

    def __post_init__(self) -> None:
        _check_types(self, VerlProbeConfig, "probe.")
        if self.mode not in MODES:
            raise ProbeError(f"probe.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        bad = [layer for layer in self.layers if layer < 0]
        if bad:
            raise ProbeError(
                f"probe.layers {bad} are not sites: expected integers >= 0 (residual stream entering block L)"
            )
        try:
            self.to_probe_arguments()  # the TRL callbacks' checks, one copy of them
        except ProbeError as err:
            raise ProbeError(f"{err}".replace("probe_", "probe.")) from None

    def to_probe_arguments(self) -> ProbeArguments:
        """The equivalent :class:`ProbeArguments` of the TRL callbacks (same names with a ``probe_`` prefix)."""
        return ProbeArguments(
            probe=True,
            **{f"probe_{f.name}": getattr(self, f.name) for f in fields(self) if f.name not in ("mode", "monitor")},
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every key (what the trainer hands to the worker)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: typing.Mapping[str, Any]) -> VerlProbeConfig:
        """Build from ``probe.*`` values (an OmegaConf node or a dict); unknown keys name the valid ones."""
        if hasattr(values, "_get_node"):  # an OmegaConf node: plain containers, interpolations resolved
            from omegaconf import OmegaConf

            values = OmegaConf.to_container(values, resolve=True)
        if not isinstance(values, typing.Mapping):
            raise ProbeError(f"probe must be a mapping of probe.* keys, got {type(values).__name__}")
        unknown = sorted(set(values) - set(probe_keys()))
        if unknown:
            raise ProbeError(
                f"unknown probe key(s) {', '.join(f'probe.{k}' for k in unknown)}: valid keys are {', '.join(probe_keys())}"
            )
        values = dict(values)
        if isinstance(values.get("monitor"), typing.Mapping):
            values["monitor"] = VerlMonitorConfig.from_dict(values["monitor"])
        return cls(**values)


def probe_keys() -> list[str]:
    """The valid ``probe.*`` keys, in declaration order."""
    return [f.name for f in fields(VerlProbeConfig)]


def _check_types(config, cls: type, prefix: str) -> None:
    """Each field of dataclass ``cls`` holds a value of its annotated type; ProbeError naming ``<prefix><key>``."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        value, expected = getattr(config, f.name), hints[f.name]
        if not _matches(value, expected):
            raise ProbeError(f"{prefix}{f.name}={value!r} has the wrong type: expected {_type_name(expected)}")


def _matches(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    args = typing.get_args(expected)
    if typing.get_origin(expected) is list:
        return f"a list of {_type_name(args[0])}"
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "null" if expected is type(None) else expected.__name__


# -- Hydra schema ------------------------------------------------------------------------------
def _schema_class(cls: type, **namespace: Any) -> type:
    """Dataclass ``cls`` under a name that lists its valid keys: OmegaConf's "Key 'x' not in '<name>'" then
    tells the user what to write; ``namespace`` overrides fields. It is an attribute of this module (created
    at import), so configs holding the typed node unpickle in every process (verl sends its config to Ray workers)."""
    name = f"{cls.__name__}(valid keys: {' '.join(f.name for f in fields(cls))})"
    body = {"__module__": __name__, "__qualname__": name, "__doc__": cls.__doc__, **namespace}
    schema = dataclass(type(name, (cls,), body))
    setattr(sys.modules[__name__], name, schema)
    return schema


VerlMonitorSchema = _schema_class(VerlMonitorConfig)
VerlProbeSchema = _schema_class(
    VerlProbeConfig,
    __annotations__={"monitor": VerlMonitorSchema},
    monitor=field(default_factory=VerlMonitorSchema),
)
SCHEMA_GROUP = "posttrain_probe"
SCHEMA_NAME = "probe_schema"


def register_schema() -> None:
    """Store the ``probe`` schema in Hydra's ConfigStore as ``/posttrain_probe/probe_schema`` (on.yaml uses it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=SCHEMA_GROUP, name=SCHEMA_NAME, node=VerlProbeSchema, provider="posttrain-probe")


# -- checks of the whole verl config ------------------------------------------------------------
def probe_config(config) -> VerlProbeConfig:
    """The validated ``probe`` node of a verl config (ProbeError if it is missing or wrong)."""
    node = config.get("probe", None) if hasattr(config, "get") else None
    if node is None:
        raise ProbeError("the verl config has no probe node: add +probe=on (or +probe=on_ckpt) to the command line")
    return VerlProbeConfig.from_dict(node)


def check_job_config(config) -> VerlProbeConfig:
    """Everything about a verl config with ``+probe=...`` that can be checked before anything starts.

    Runs in the driver (Hydra callback, before ``main``) and again where the trainer or the
    checkpoint callback is built. Returns the validated probe config.
    """
    from omegaconf import OmegaConf

    probe = probe_config(config)
    select = lambda key, default=None: OmegaConf.select(config, key, default=default)  # noqa: E731
    if not select("trainer.use_v1", True):
        raise ProbeError(
            "+probe needs verl's v1 trainer (trainer.use_v1=true); the legacy trainer has no trainer registry or checkpoint callback"
        )
    if probe.mode == "on":
        mode = select("trainer.v1.trainer_mode")
        if mode == "sync":
            raise ProbeError(
                "trainer.v1.trainer_mode=sync selects verl's plain sync trainer and would switch the probe off; "
                f"+probe=on already runs verl's sync trainer with the probe hooks (trainer.v1.trainer_mode={PROBE_TRAINER_MODE}): drop the override"
            )
        if mode != PROBE_TRAINER_MODE:
            raise ProbeError(
                f"+probe=on runs with verl's synchronous trainer only (probe forwards and snapshots happen while the rollout "
                f"engine sleeps), got trainer.v1.trainer_mode={mode}: drop the override, or use +probe=on_ckpt, which works "
                "with every trainer mode from verl's checkpoint saves"
            )
        if not select("actor_rollout_ref.hybrid_engine", True):
            raise ProbeError(
                "+probe=on needs actor_rollout_ref.hybrid_engine=true (actor and rollout colocated, as in verl's sync trainer)"
            )
    else:
        callback = select("trainer.checkpoint_callback_class")
        if callback != CHECKPOINT_CALLBACK:
            raise ProbeError(
                f"+probe=on_ckpt needs trainer.checkpoint_callback_class={CHECKPOINT_CALLBACK}, got {callback}: drop the override"
            )
        save_freq = select("trainer.save_freq", -1)
        if not isinstance(save_freq, int) or save_freq < 1:
            raise ProbeError(
                f"+probe=on_ckpt snapshots verl's checkpoint saves, but trainer.save_freq={save_freq} saves none: set trainer.save_freq=N (steps)"
            )
        contents = list(select("actor_rollout_ref.actor.checkpoint.save_contents", []) or [])
        if "hf_model" not in contents:
            raise ProbeError(
                f"+probe=on_ckpt needs hf_model in actor_rollout_ref.actor.checkpoint.save_contents, got {contents}: add it"
            )
        if probe.snapshot_steps is not None or probe.snapshot_at:
            raise ProbeError(
                "+probe=on_ckpt takes a snapshot at every checkpoint verl saves: set trainer.save_freq instead of "
                "probe.snapshot_steps / probe.snapshot_at"
            )
        if probe.monitor.crosscoder is not None:
            raise ProbeError(
                "probe.monitor.crosscoder needs +probe=on: the feature monitor runs in the actor worker every "
                "probe.monitor.every steps, +probe=on_ckpt sees the model only at verl's checkpoint saves"
            )
    if probe.monitor != VerlMonitorConfig():
        probe.monitor.to_monitor_arguments()  # MonitorArguments' checks (imports torch: only when set)
    return probe


def resolve_run_dir(probe: VerlProbeConfig, config) -> str:
    """Absolute run directory: ``probe.run_dir`` or ``<trainer.default_local_dir>/probe``, relative to the cwd as verl's checkpoints are."""
    from omegaconf import OmegaConf

    path = probe.run_dir or os.path.join(str(OmegaConf.select(config, "trainer.default_local_dir")), "probe")
    return os.path.abspath(os.path.expanduser(path))


def paradigm_of(config) -> str:
    """'grpo' for verl's GRPO advantage estimator, else the estimator name ('gae' -> 'ppo')."""
    from omegaconf import OmegaConf

    estimator = str(OmegaConf.select(config, "algorithm.adv_estimator", default="gae"))
    return {"gae": "ppo"}.get(estimator, estimator)


class ProbeConfigCheck(Callback):
    """Hydra callback (``hydra.callbacks`` of on.yaml / on_ckpt.yaml): runs :func:`check_job_config` and the
    Ray registration check in the driver before verl's ``main``, so a wrong config fails in seconds.

    With ``probe.monitor.crosscoder`` set it also loads the crosscoder and checks it against the actor
    (:func:`~posttrain_probe.callbacks.verl.monitor.check_monitor`: site, width, base model, categories).

    Hydra turns exceptions of callbacks into warnings and carries on, so a failed check prints
    ``error: <message>`` on stderr and exits with status 2 (as the ``posttrain-probe`` CLI does).
    """

    def on_job_start(self, config, **kwargs: Any) -> None:
        from posttrain_probe.callbacks.verl.setup_hook import check_ray_registration

        try:
            probe = check_job_config(config)
            if probe.monitor.crosscoder is not None:
                from posttrain_probe.callbacks.verl.monitor import check_monitor

                check_monitor(probe.monitor, config)
            check_ray_registration()
        except ProbeError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
