"""N-model sparse crosscoders (docs/methods.md sec. 3): the model, its config and its training loop.

The configs are imported eagerly (torch-free); the model, calibration and training are imported on
first use, so the command line starts without importing torch, and
`python -m posttrain_probe.crosscoder.train` runs its module once.
"""

from posttrain_probe.crosscoder.config import CrosscoderConfig, CrosscoderTrainingConfig
from posttrain_probe.lazy import lazy_attributes

__all__ = [
    "Crosscoder",
    "CrosscoderConfig",
    "CrosscoderOutput",
    "CrosscoderTrainingConfig",
    "SourceCalibration",
    "calibrate_source_thresholds",
    "train_crosscoder",
]

_LAZY = {
    "Crosscoder": "model",
    "CrosscoderOutput": "model",
    "SourceCalibration": "calibrate",
    "calibrate_source_thresholds": "calibrate",
    "train_crosscoder": "train",
}

__getattr__ = lazy_attributes(__name__, _LAZY)
