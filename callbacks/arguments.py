"""``ProbeArguments``: what the probe callbacks do, parsed by recipes with TrlParser (or built in Python).

Every field starts with ``probe`` so the dataclass sits next to TRL's configs in one parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain_probe.dtypes import dtype_name
from posttrain_probe.errors import ProbeError


@dataclass
class ProbeArguments:
    """Snapshots and activation streaming during training (SnapshotCallback, ActivationStreamCallback)."""

    probe: bool = field(default=True, metadata={"help": "Switch the probe callbacks on."})
    probe_run_dir: str | None = field(
        default=None,
        metadata={"help": "Run directory for probe.json, snapshots/ and activations/ (default: <output_dir>/probe)."},
    )
    probe_snapshot_fraction: float = field(
        default=0.2,
        metadata={"help": "Snapshot every this fraction of the run (0.2: five snapshots, as in the papers)."},
    )
    probe_snapshot_steps: int | None = field(
        default=None, metadata={"help": "Snapshot every N optimizer steps instead of by fraction."}
    )
    probe_snapshot_at: list[int] = field(
        default_factory=list, metadata={"help": "Snapshot at exactly these optimizer steps instead."}
    )
    probe_save_snapshots: bool = field(
        default=True, metadata={"help": "Write HF-loadable snapshots (snapshots/step-NNNNNN)."}
    )
    probe_peft_snapshot: str = field(
        default="merged", metadata={"help": "PEFT models: 'merged' (full weights) or 'adapter' (adapter only)."}
    )
    probe_stream_activations: bool = field(
        default=True, metadata={"help": "Capture probe-set activations at step 0 (base) and at every snapshot point."}
    )
    probe_layers: list[int] = field(
        default_factory=list,
        metadata={"help": "Sites to capture (residual stream entering block L); empty: n_layers // 2."},
    )
    probe_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Probe set: a dataset spec as for `posttrain-probe collect` (default: a fixed sample of the training data)."
        },
    )
    probe_dataset_split: str = field(default="train", metadata={"help": "Split of probe_dataset."})
    probe_column: str | None = field(default=None, metadata={"help": "Text or chat-messages column of the probe set."})
    probe_n_docs: int = field(default=64, metadata={"help": "Documents in the probe set."})
    probe_seq_len: int = field(
        default=512, metadata={"help": "Tokens per probe document (must fit the model context)."}
    )
    probe_batch_size: int = field(default=8, metadata={"help": "Probe documents per forward."})
    probe_dtype: str = field(default="bfloat16", metadata={"help": "Storage dtype of the activations."})
    probe_seed: int = field(default=0, metadata={"help": "Seed of the probe-set sample."})
    probe_drift: bool = field(
        default=True,
        metadata={"help": "Log the mean relative change of probe activations vs the base per layer at each snapshot."},
    )

    def __post_init__(self) -> None:
        if not 0 < self.probe_snapshot_fraction <= 1:
            raise ProbeError(f"probe_snapshot_fraction must be in (0, 1], got {self.probe_snapshot_fraction}")
        if self.probe_snapshot_steps is not None and self.probe_snapshot_steps < 1:
            raise ProbeError(f"probe_snapshot_steps must be >= 1, got {self.probe_snapshot_steps}")
        if self.probe_peft_snapshot not in ("merged", "adapter"):
            raise ProbeError(f"probe_peft_snapshot must be 'merged' or 'adapter', got {self.probe_peft_snapshot!r}")
        for name in ("probe_n_docs", "probe_seq_len", "probe_batch_size"):
            if getattr(self, name) < 1:
                raise ProbeError(f"{name} must be >= 1, got {getattr(self, name)}")
        dtype_name(self.probe_dtype)  # fails now, not after the run directory was written
        if any(step < 1 for step in self.probe_snapshot_at):
            raise ProbeError(f"probe_snapshot_at must hold optimizer steps >= 1, got {self.probe_snapshot_at}")


def snapshot_schedule(args: ProbeArguments, max_steps: int) -> list[int]:
    """Optimizer steps (1-based, <= max_steps) at which snapshots and activations are taken."""
    if max_steps < 1:
        raise ProbeError(f"the run has {max_steps} optimizer steps: nothing to snapshot")
    if args.probe_snapshot_at:
        steps = sorted({s for s in args.probe_snapshot_at if s <= max_steps})
    elif args.probe_snapshot_steps is not None:
        steps = list(range(args.probe_snapshot_steps, max_steps + 1, args.probe_snapshot_steps))
    else:
        fraction = args.probe_snapshot_fraction
        count = int(1 / fraction + 1e-9)  # 0.2 -> 5 snapshots (20%, ..., 100%); 0.4 -> 40%, 80%
        steps = sorted({max(1, round(max_steps * fraction * i)) for i in range(1, count + 1)})
    if not steps:
        raise ProbeError(
            f"the snapshot schedule (fraction {args.probe_snapshot_fraction}, every {args.probe_snapshot_steps}, "
            f"at {args.probe_snapshot_at}) yields no snapshot in a run of {max_steps} steps"
        )
    return steps
