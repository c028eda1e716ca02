"""The files of a crosscoder run directory (torch-free): what ``crosscoder train`` and ``crosscoder calibrate``
write next to ``config.json`` and ``model.safetensors``, and the atomic status writer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATUS = "training_status.json"
"""Which step the weights at the run root are from, and whether training completed."""
STATE_DIR = "trainer_state"
"""Resumable optimizer, RNG and counter state of an unfinished (or finished) training run."""
METRICS = "metrics.jsonl"
"""One JSON record per log step (loss, FVU per model, L0, dead fraction)."""
TRAINING_CONFIG = "training_config.json"
"""The CrosscoderTrainingConfig of the run."""
CALIBRATION = "calibration.json"
"""The CalibrationReport of the last calibration, next to the calibrated crosscoder's config.json."""


def write_status(out_dir: Path, status: dict[str, Any]) -> None:
    """Replace ``out_dir/training_status.json`` atomically."""
    tmp = out_dir / f".{STATUS}.tmp"
    tmp.write_text(json.dumps(status, indent=2))
    os.replace(tmp, out_dir / STATUS)
