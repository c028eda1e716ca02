"""Configuration of an N-model sparse crosscoder (SPEC sec. 3): saved as the crosscoder's config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from posttrain_probe.errors import ProbeError

FORMAT_VERSION = 1
ACTIVATIONS = ("relu", "batchtopk")


@dataclass
class CrosscoderConfig:
    """Architecture of a crosscoder over N models at one site (N = 1 is a plain SAE)."""

    model_names: list[str] = field(default_factory=list, metadata={"help": "Names of the N models in slot order (e.g. base sft rl); empty: taken from the training data."})
    d_model: int = field(default=0, metadata={"help": "Residual-stream width d of every model (filled from the data when 0)."})
    n_features: int = field(default=32768, metadata={"help": "Dictionary size F (paper R: 32768)."})
    activation: str = field(default="relu", metadata={"help": "relu (decoder-norm-weighted L1, the papers') or batchtopk."})
    k: int = field(default=32, metadata={"help": "BatchTopK: mean active features per token (top k*B of a batch of B tokens)."})
    layer: int | None = field(default=None, metadata={"help": "Site the activations come from (residual stream entering block L), for bookkeeping and checks."})
    dec_init_norm: float = field(default=0.08, metadata={"help": "Norm of every decoder vector d_i^m at initialisation (W_enc = W_dec^T)."})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Version of the saved crosscoder format."})
    source_thresholds: list[float] | None = field(
        default=None,
        metadata={
            "cli": False,
            "help": "BatchTopK: per-source inference thresholds theta_m on f^m_i * sum_m ||d_i^m||, one per model in slot "
            "order (set by calibrate_source_thresholds / `posttrain-probe crosscoder calibrate`); None: encode_source "
            "uses the joint threshold.",
        },
    )

    def __post_init__(self) -> None:
        names = list(self.model_names)
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ProbeError(f"model_names must be distinct non-empty names, got {self.model_names!r}")
        self.model_names = names
        if self.activation not in ACTIVATIONS:
            raise ProbeError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.n_features < 1 or self.d_model < 0 or self.k < 1:
            raise ProbeError(f"need n_features >= 1, d_model >= 0, k >= 1; got {self.n_features}, {self.d_model}, {self.k}")
        if self.source_thresholds is not None:
            self._check_source_thresholds()
        if self.format_version > FORMAT_VERSION:
            raise ProbeError(
                f"crosscoder format version {self.format_version} is newer than this posttrain-probe reads "
                f"({FORMAT_VERSION}); upgrade posttrain-probe"
            )

    def _check_source_thresholds(self) -> None:
        values = self.source_thresholds
        if self.activation != "batchtopk":
            raise ProbeError(f"source_thresholds {values!r} are BatchTopK inference thresholds; this crosscoder's activation is {self.activation!r}")
        try:
            if isinstance(values, (str, bytes)) or isinstance(values, bool):
                raise TypeError
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ProbeError(f"source_thresholds must be a list of numbers (one per model), got {self.source_thresholds!r}") from None
        if self.model_names and len(values) != len(self.model_names):
            raise ProbeError(f"source_thresholds {values} must hold one threshold per model {self.model_names}, got {len(values)}")
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ProbeError(f"source_thresholds {values} must be finite and >= 0")
        self.source_thresholds = values

    @property
    def n_models(self) -> int:
        return len(self.model_names)
