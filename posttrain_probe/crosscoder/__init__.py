"""N-model sparse crosscoders (SPEC sec. 3): the model, its config and its training loop."""

from posttrain_probe.crosscoder.calibrate import SourceCalibration, calibrate_source_thresholds
from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder, CrosscoderOutput

__all__ = [
    "Crosscoder",
    "CrosscoderConfig",
    "CrosscoderOutput",
    "CrosscoderTrainingConfig",
    "SourceCalibration",
    "calibrate_source_thresholds",
    "train_crosscoder",
]


def __getattr__(name: str):
    # Imported on first use, so `python -m posttrain_probe.crosscoder.train` runs its module once.
    if name in ("CrosscoderTrainingConfig", "train_crosscoder"):
        from posttrain_probe.crosscoder import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
