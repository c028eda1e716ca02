"""N-model sparse crosscoders (docs/methods.md sec. 3): the model, its config, its training loop and the steps
``crosscoder_train`` (:mod:`.run`) and ``crosscoder_calibrate`` (:mod:`.calibrate`).

The configs are imported eagerly (torch-free); the model, calibration and training are imported on
first use, so the command line starts without importing torch.
"""

from posttrain_probe.crosscoder.config import (
    CalibrateConfig,
    CrosscoderConfig,
    CrosscoderTrainConfig,
    CrosscoderTrainingConfig,
)
from posttrain_probe.lazy import lazy_attributes

__all__ = [
    "CalibrateConfig",
    "CalibrationReport",
    "Crosscoder",
    "CrosscoderConfig",
    "CrosscoderOutput",
    "CrosscoderRun",
    "CrosscoderTrainConfig",
    "CrosscoderTrainingConfig",
    "JointCalibration",
    "SourceCalibration",
    "calibrate_joint_threshold",
    "calibrate_source_thresholds",
    "crosscoder_calibrate",
    "crosscoder_fingerprint",
    "crosscoder_train",
    "train_crosscoder",
]

_LAZY = {
    "Crosscoder": "model",
    "CrosscoderOutput": "model",
    "crosscoder_fingerprint": "model",
    "CalibrationReport": "calibrate",
    "crosscoder_calibrate": "calibrate",
    "CrosscoderRun": "run",
    "crosscoder_train": "run",
    "JointCalibration": "calibrate",
    "SourceCalibration": "calibrate",
    "calibrate_joint_threshold": "calibrate",
    "calibrate_source_thresholds": "calibrate",
    "train_crosscoder": "train",
}

__getattr__ = lazy_attributes(__name__, _LAZY)
