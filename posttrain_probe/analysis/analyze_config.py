"""Settings of ``posttrain-probe analyze`` (:class:`AnalyzeConfig`) and ``posttrain-probe dynamics`` (:class:`DynamicsConfig`).

Torch-free: the CLI builds its options from these dataclasses at startup. Field names are the flags
(``--table-format``) and the YAML keys (``table_format``). The defaults of the formulas' settings live here
too, so the formulas (:mod:`~posttrain_probe.analysis.attribution`, :mod:`~posttrain_probe.analysis.dynamics`,
:mod:`~posttrain_probe.analysis.duplicates`) and the steps share one value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from posttrain_probe.errors import ProbeError

NORM_RATIO_SCALES = ("all", "pair")
"""Denominators of NormRatio: max decoder norm over all model slots (default) or over the compared pair."""
TABLE_FORMATS = ("parquet", "csv")
"""Formats of the per-feature table of ``analyze``."""
DEFAULT_DUPLICATE_COSINE = 0.95
"""Two latents are duplicates when their whole decoders have at least this cosine."""
DEFAULT_K = 50
"""Size of the top-NRN feature sets T_c of checkpoint dynamics (paper R sec. 5.2)."""
DEFAULT_NORM_FLOOR = 0.01
"""A score is undefined where both compared decoder norms are below this fraction of the largest one."""
DEFAULT_MIN_COSINE = 0.7
"""Per-checkpoint crosscoders: matched pairs need at least this whole-decoder cosine."""
DEFAULT_TIE_ATOL = 1e-6
"""Scores within this absolute distance of the k-th score tie with it."""


def _check_duplicate_cosine(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ProbeError(f"duplicate_cosine={value!r} is invalid; expected a cosine in (0, 1]")


@dataclass(kw_only=True)
class AnalyzeConfig:
    """Settings of ``analyze`` (docs/methods.md sec. 4): NRN, MAS, NormRatio, decoder cosine, categories and
    figures of a crosscoder against its base model, and the NormRatio feature sets for gradient blocking.

    Python: ``analyze(AnalyzeConfig(crosscoder="runs/cc", out="runs/analysis"))``;
    CLI: ``posttrain-probe analyze --crosscoder runs/cc --out runs/analysis``;
    YAML: ``posttrain-probe analyze --config analyze.yaml`` with the same keys.
    """

    crosscoder: Path = field(metadata={"help": "Crosscoder directory."})
    out: Path = field(metadata={"help": "Output directory for the table, summary.json and figures."})
    base: str = field(default="base", metadata={"help": "Name of the base model in the crosscoder."})
    acts: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Activations (as for `crosscoder train --acts`) for activation frequency / max / dead flags."
        },
    )
    stats_tokens: int = field(
        default=1_000_000, metadata={"help": "Tokens read from --acts for the activation statistics."}
    )
    table_format: str = field(default="parquet", metadata={"help": "Feature table format: parquet or csv."})
    p: float = field(
        default=1.0, metadata={"help": "Norm order of NRN and MAS (1 = the paper's; 2 = relative decoder norm)."}
    )
    norm_ratio_scale: str = field(
        default="all",
        metadata={
            "help": "NormRatio denominator: all (max decoder norm over every model slot, docs/methods.md) or pair (over the two compared models, paper S)."
        },
    )
    allow_incomplete: bool = field(
        default=False, metadata={"help": "Accept the weights of an unfinished crosscoder training run."}
    )
    duplicate_cosine: float = field(
        default=DEFAULT_DUPLICATE_COSINE,
        metadata={
            "help": "Latents whose whole decoders have at least this cosine are duplicates: grouped, counted once in the *_dedup counts."
        },
    )

    def __post_init__(self) -> None:
        self.crosscoder, self.out = Path(self.crosscoder), Path(self.out)
        self.acts = [str(a) for a in ([self.acts] if isinstance(self.acts, (str, Path)) else self.acts or [])]
        if self.table_format not in TABLE_FORMATS:
            raise ProbeError(f"table format {self.table_format!r}: expected parquet or csv")
        if self.norm_ratio_scale not in NORM_RATIO_SCALES:
            raise ProbeError(f"norm_ratio_scale {self.norm_ratio_scale!r} is not one of {NORM_RATIO_SCALES}")
        _check_duplicate_cosine(self.duplicate_cosine)
        if self.stats_tokens < 1:
            raise ProbeError(f"stats_tokens must be >= 1, got {self.stats_tokens}")


@dataclass(kw_only=True)
class DynamicsConfig:
    """Settings of ``dynamics`` (docs/methods.md sec. 5, paper R fig. 2, 8-11): top-k NRN overlap and rank shifts
    across checkpoints, from one multi-model crosscoder or one two-model crosscoder per checkpoint.

    Python: ``dynamics(DynamicsConfig(crosscoder=["runs/cc"], out="runs/dynamics"))``;
    CLI: ``posttrain-probe dynamics --crosscoder runs/cc --out runs/dynamics``;
    YAML: ``posttrain-probe dynamics --config dynamics.yaml`` with the same keys.
    """

    crosscoder: list[str] = field(
        metadata={
            "help": "One multi-model crosscoder over base + checkpoints, or one two-model crosscoder per checkpoint (repeat, in training order)."
        }
    )
    out: Path = field(metadata={"help": "Output directory."})
    base: str = field(default="base", metadata={"help": "Name of the base model."})
    checkpoint: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Checkpoint model names in order (multi-model crosscoder; default: all but --base); labels of per-checkpoint crosscoders."
        },
    )
    k: int = field(default=DEFAULT_K, metadata={"help": "Size of the top-NRN feature sets."})
    p: float = field(default=1.0, metadata={"help": "Norm order of NRN (1 = the paper's; 2 = relative decoder norm)."})
    norm_floor: float = field(
        default=DEFAULT_NORM_FLOOR,
        metadata={
            "help": "A score is undefined where both compared decoder norms are below this fraction of the crosscoder's largest one."
        },
    )
    min_cosine: float = field(
        default=DEFAULT_MIN_COSINE,
        metadata={"help": "Per-checkpoint crosscoders: whole-decoder cosine below which a latent stays unmatched."},
    )
    allow_incomplete: bool = field(
        default=False, metadata={"help": "Accept the weights of unfinished crosscoder training runs."}
    )
    tie_atol: float = field(
        default=DEFAULT_TIE_ATOL,
        metadata={
            "help": "Scores within this distance of the k-th score tie with it (reported; an undetermined top-k is flagged)."
        },
    )
    duplicate_cosine: float | None = field(
        default=DEFAULT_DUPLICATE_COSINE,
        metadata={
            "cli": False,
            "help": "Duplicate latents (whole-decoder cosine at least this) count once, by their group's representative (None: no grouping).",
        },
    )

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.crosscoder = [
            str(c) for c in ([self.crosscoder] if isinstance(self.crosscoder, (str, Path)) else self.crosscoder or [])
        ]
        self.checkpoint = [str(c) for c in self.checkpoint or []]
        if not self.crosscoder:
            raise ProbeError(
                "crosscoder is empty: expected one multi-model crosscoder or one two-model crosscoder per checkpoint"
            )
        if self.duplicate_cosine is not None:
            _check_duplicate_cosine(self.duplicate_cosine)
