"""Configuration of an N-model sparse crosscoder (docs/methods.md sec. 3, saved as its config.json), of its training run
and of the calibration of its per-source thresholds.

Torch-free, so the CLI builds its options from these dataclasses without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from posttrain_probe.errors import ProbeError
from posttrain_probe.models import parse_model_specs

FORMAT_VERSION = 1
ACTIVATIONS = ("relu", "batchtopk")


@dataclass
class CrosscoderConfig:
    """Architecture of a crosscoder over N models at one site (N = 1 is a plain SAE)."""

    model_names: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Names of the N models in slot order (e.g. base sft rl); empty: taken from the training data."
        },
    )
    d_model: int = field(
        default=0, metadata={"help": "Residual-stream width d of every model (filled from the data when 0)."}
    )
    n_features: int = field(default=32768, metadata={"help": "Dictionary size F (paper R: 32768)."})
    activation: str = field(
        default="relu", metadata={"help": "relu (decoder-norm-weighted L1, the papers') or batchtopk."}
    )
    k: int = field(
        default=32, metadata={"help": "BatchTopK: mean active features per token (top k*B of a batch of B tokens)."}
    )
    layer: int | None = field(
        default=None,
        metadata={
            "help": "Site the activations come from (residual stream entering block L), for bookkeeping and checks."
        },
    )
    dec_init_norm: float = field(
        default=0.08, metadata={"help": "Norm of every decoder vector d_i^m at initialisation (W_enc = W_dec^T)."}
    )
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
    model_fingerprints: list[dict | str | None] | None = field(
        default=None,
        metadata={
            "cli": False,
            "help": "Per model in slot order, the fingerprint (posttrain_probe.model_identity) of the model its activations came "
            "from, recorded by training from stores or live models; steps that apply the crosscoder to a model check it. "
            "None (older crosscoders, raw tensors) or a None entry: not checked.",
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
            raise ProbeError(
                f"need n_features >= 1, d_model >= 0, k >= 1; got {self.n_features}, {self.d_model}, {self.k}"
            )
        if self.source_thresholds is not None:
            self._check_source_thresholds()
        if self.model_fingerprints is not None:
            prints = list(self.model_fingerprints)
            if self.model_names and len(prints) != len(self.model_names):
                raise ProbeError(
                    f"model_fingerprints must hold one entry per model {self.model_names}, got {len(prints)}"
                )
            self.model_fingerprints = prints
        if self.format_version > FORMAT_VERSION:
            raise ProbeError(
                f"crosscoder format version {self.format_version} is newer than this posttrain-probe reads "
                f"({FORMAT_VERSION}); upgrade posttrain-probe"
            )

    def _check_source_thresholds(self) -> None:
        values = self.source_thresholds
        if self.activation != "batchtopk":
            raise ProbeError(
                f"source_thresholds {values!r} are BatchTopK inference thresholds; this crosscoder's activation is {self.activation!r}"
            )
        try:
            if isinstance(values, (str, bytes)) or isinstance(values, bool):
                raise TypeError
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ProbeError(
                f"source_thresholds must be a list of numbers (one per model), got {self.source_thresholds!r}"
            ) from None
        if self.model_names and len(values) != len(self.model_names):
            raise ProbeError(
                f"source_thresholds {values} must hold one threshold per model {self.model_names}, got {len(values)}"
            )
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ProbeError(f"source_thresholds {values} must be finite and >= 0")
        self.source_thresholds = values

    @property
    def n_models(self) -> int:
        return len(self.model_names)


@dataclass
class CrosscoderTrainingConfig:
    """Optimisation settings of a crosscoder run (Python API, CLI and YAML)."""

    n_tokens: int | None = field(
        default=None,
        metadata={"help": "Training tokens in all (default: one pass over the store; required for live sources)."},
    )
    batch_size: int = field(default=1024, metadata={"help": "Global batch in tokens (split over data-parallel ranks)."})
    lr: float | None = field(
        default=None,
        metadata={
            "help": "Adam learning rate (constant, then linear decay). Default: 1e-4 for relu (SPEC sec. 3); "
            "2e-4 / sqrt(n_features / 2^14) for batchtopk, the sparse-autoencoder scaling rule."
        },
    )
    lr_decay_fraction: float = field(
        default=0.2, metadata={"help": "Final fraction of steps over which lr decays linearly to 0."}
    )
    l1_coefficient: float = field(
        default=2.0, metadata={"help": "λ of the decoder-norm-weighted L1 penalty (relu crosscoders)."}
    )
    l1_warmup_fraction: float = field(
        default=0.05, metadata={"help": "Initial fraction of steps over which λ rises linearly from 0."}
    )
    beta1: float = field(default=0.9, metadata={"help": "Adam beta1."})
    beta2: float = field(default=0.999, metadata={"help": "Adam beta2."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0: off)."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and data order."})
    scale_tokens: int = field(
        default=100_000, metadata={"help": "Tokens used to estimate the normalisation scales s_m."}
    )
    dead_after_tokens: int = field(
        default=10_000_000,
        metadata={
            "help": "A feature is dead when it has not fired in a trailing window of this many tokens (or of 5% of "
            "the run's tokens, if shorter); dead features get the AuxK loss (batchtopk) and are logged as dead_fraction."
        },
    )
    aux_k: int = field(default=512, metadata={"help": "BatchTopK: dead features used by the AuxK loss per token."})
    aux_coefficient: float = field(default=1 / 32, metadata={"help": "BatchTopK: weight of the AuxK loss."})
    threshold_decay: float = field(default=0.99, metadata={"help": "BatchTopK: EMA decay of the inference threshold."})
    calibration_tokens: int = field(
        default=100_000,
        metadata={
            "help": "BatchTopK: tokens on which the inference threshold is calibrated when training ends, so that "
            "inference codes have mean L0 = k there (0: keep the training EMA)."
        },
    )
    buffer_tokens: int | None = field(
        default=None, metadata={"help": "Tokens held for shuffling (default: the source's)."}
    )
    log_every: int = field(default=25, metadata={"help": "Steps between metric logs (the only host-device syncs)."})
    checkpoint_every: int = field(
        default=1000, metadata={"help": "Steps between resumable checkpoints (rounded to a multiple of log_every)."}
    )
    max_steps_per_run: int | None = field(
        default=None,
        metadata={
            "help": "Stop with a checkpoint after this many steps in this invocation (time-limited jobs); resume later."
        },
    )
    mixed_precision: str = field(
        default="auto",
        metadata={"help": "auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp16 or no. Master weights stay fp32."},
    )
    report_to: list[str] = field(
        default_factory=list, metadata={"help": "Extra trackers via accelerate: wandb, tensorboard."}
    )

    def learning_rate(self, crosscoder: CrosscoderConfig) -> float:
        """The peak Adam lr of a run of ``crosscoder``: ``lr`` when set, else 1e-4 for relu (SPEC sec. 3) and
        2e-4 / sqrt(F / 2^14) for batchtopk (1.4e-4 at F = 32768, 4e-4 at F = 4096; docs/methods.md sec. 3)."""
        if self.lr is not None:
            return self.lr
        if crosscoder.activation == "batchtopk":
            return 2e-4 / math.sqrt(crosscoder.n_features / 2**14)
        return 1e-4

    def __post_init__(self) -> None:
        for name in ("batch_size", "log_every", "checkpoint_every", "scale_tokens"):
            if getattr(self, name) < 1:
                raise ProbeError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_decay_fraction", "l1_warmup_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ProbeError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ProbeError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("l1_coefficient", "grad_clip", "aux_coefficient"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ProbeError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2", "threshold_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ProbeError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if isinstance(self.calibration_tokens, bool) or self.calibration_tokens < 0:
            raise ProbeError(
                f"calibration_tokens must be >= 0 (0: keep the training EMA), got {self.calibration_tokens}"
            )
        for name in ("dead_after_tokens", "aux_k"):
            if getattr(self, name) < 1:
                raise ProbeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_tokens is not None and self.n_tokens < self.batch_size:
            raise ProbeError(f"n_tokens ({self.n_tokens}) must be at least one batch ({self.batch_size})")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise ProbeError(f"mixed_precision {self.mixed_precision!r}: expected auto, bf16, fp16 or no")


@dataclass
class CrosscoderTrainConfig:
    """A crosscoder training run: its data, its output and the nested crosscoder and training settings
    (Python API, `posttrain-probe crosscoder train` and YAML, with sections ``crosscoder:`` and ``training:``)."""

    acts: list[str] = field(
        default_factory=list,
        metadata={"help": "A collect output directory, or one store directory per model (repeat)."},
    )
    model: list[str] = field(
        default_factory=list, metadata={"help": "Live training: NAME=PATH per model (repeat), with --dataset."}
    )
    dataset: str | None = field(default=None, metadata={"help": "Live training: dataset spec as for `collect`."})
    seq_len: int = field(default=512, metadata={"help": "Live training: tokens per document."})
    forward_batch_size: int = field(default=8, metadata={"help": "Live training: documents per model forward."})
    out: Path | None = field(default=None, metadata={"help": "Output directory of the crosscoder run (required)."})
    resume: bool = field(default=False, metadata={"help": "Continue the interrupted run in --out."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the run in --out."})
    crosscoder: CrosscoderConfig = field(
        default_factory=CrosscoderConfig, metadata={"help": "Architecture of the crosscoder."}
    )
    training: CrosscoderTrainingConfig = field(
        default_factory=CrosscoderTrainingConfig, metadata={"help": "Optimisation settings."}
    )

    def __post_init__(self) -> None:
        if self.out is None:
            raise ProbeError("--out is required (the directory of the crosscoder run)")
        self.out = Path(self.out)
        self.acts = [str(path) for path in ([self.acts] if isinstance(self.acts, (str, Path)) else self.acts)]
        self.model = [f"{name}={path}" for name, path in parse_model_specs(self.model).items()]
        if isinstance(self.crosscoder, dict):
            self.crosscoder = CrosscoderConfig(**self.crosscoder)
        if isinstance(self.training, dict):
            self.training = CrosscoderTrainingConfig(**self.training)
        for name in ("seq_len", "forward_batch_size"):
            if getattr(self, name) < 1:
                raise ProbeError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class CalibrateConfig:
    """Calibrate per-source BatchTopK inference thresholds (Python API, `posttrain-probe crosscoder calibrate` and YAML)."""

    crosscoder: Path = field(metadata={"help": "BatchTopK crosscoder directory (config.json + model.safetensors)."})
    acts: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Calibration activations: a collect output directory, or one store directory per model in the crosscoder's model order (repeat)."
        },
    )
    max_tokens: int = field(
        default=100_000,
        metadata={
            "help": "Calibration tokens (the first ones of the stores). Memory: about 2 x k x max_tokens floats per model."
        },
    )
    k: int | None = field(
        default=None,
        metadata={"help": "Target mean L0 per token of the per-source codes (default: the crosscoder's training k)."},
    )
    batch_size: int = field(default=1024, metadata={"help": "Tokens scored at once (memory only)."})
    out: Path | None = field(
        default=None, metadata={"help": "Write the calibrated crosscoder here (default: in place, into --crosscoder)."}
    )
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available)."})
    clear: bool = field(
        default=False,
        metadata={
            "help": "Remove calibrated thresholds instead (encode_source uses the joint threshold again); no --acts."
        },
    )
    allow_incomplete: bool = field(
        default=False, metadata={"help": "Accept the weights of an unfinished crosscoder training run."}
    )

    def __post_init__(self) -> None:
        self.crosscoder = Path(self.crosscoder)
        self.out = None if self.out is None else Path(self.out)
        self.acts = [str(path) for path in ([self.acts] if isinstance(self.acts, (str, Path)) else self.acts)]
        if self.clear and self.acts:
            raise ProbeError("--clear removes the calibrated thresholds and reads no activations: drop --acts")


DEAD_WINDOW_RUN_FRACTION = 0.05
"""The trailing window of dead-feature detection is at most this fraction of a run's tokens."""


def dead_window_tokens(dead_after_tokens: int, batch_size: int, n_tokens: int) -> int:
    """Tokens in the trailing window of dead-feature detection: min(``dead_after_tokens``, 5% of the
    run's ``n_tokens``), at least one batch. A feature that fired in none of the last window
    tokens is dead (docs/methods.md sec. 3)."""
    return max(batch_size, min(dead_after_tokens, int(n_tokens * DEAD_WINDOW_RUN_FRACTION)))


@dataclass
class SweepKConfig:
    """A sweep over BatchTopK's k: one crosscoder per k on the same data, scored on held-out activations
    (Python API, `posttrain-probe crosscoder sweep-k` and YAML, with sections ``crosscoder:`` and ``training:``)."""

    acts: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training activations: a collect output directory, or one store directory per model (repeat)."
        },
    )
    held_out_acts: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Held-out activations of the same models and site (e.g. `collect` on another split), read as --acts."
        },
    )
    k_values: list[int] = field(
        default_factory=lambda: [8, 16, 32, 64], metadata={"help": "Values of k to train (repeat)."}
    )
    held_out_tokens: int = field(default=50_000, metadata={"help": "Held-out tokens scored per k (the first ones)."})
    out: Path | None = field(
        default=None, metadata={"help": "Output directory: one crosscoder run per k (k<k>/) and sweep.json (required)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace earlier runs in --out."})
    crosscoder: CrosscoderConfig = field(
        default_factory=lambda: CrosscoderConfig(activation="batchtopk"),
        metadata={"help": "Architecture (the activation is set to batchtopk; k comes from --k-values)."},
    )
    training: CrosscoderTrainingConfig = field(
        default_factory=CrosscoderTrainingConfig, metadata={"help": "Optimisation settings, the same for every k."}
    )

    def __post_init__(self) -> None:
        if self.out is None:
            raise ProbeError("--out is required (the directory of the sweep)")
        self.out = Path(self.out)
        self.acts = [str(p) for p in ([self.acts] if isinstance(self.acts, (str, Path)) else self.acts)]
        self.held_out_acts = [
            str(p)
            for p in ([self.held_out_acts] if isinstance(self.held_out_acts, (str, Path)) else self.held_out_acts)
        ]
        if isinstance(self.crosscoder, dict):
            self.crosscoder = CrosscoderConfig(**self.crosscoder)
        if isinstance(self.training, dict):
            self.training = CrosscoderTrainingConfig(**self.training)
        self.crosscoder.activation = "batchtopk"  # what a k sweep trains
        if not self.k_values or any(isinstance(k, bool) or int(k) != k or k < 1 for k in self.k_values):
            raise ProbeError(f"k_values must be one or more integers >= 1, got {self.k_values}")
        self.k_values = sorted({int(k) for k in self.k_values})
        if self.held_out_tokens < 1:
            raise ProbeError(f"held_out_tokens must be >= 1, got {self.held_out_tokens}")
