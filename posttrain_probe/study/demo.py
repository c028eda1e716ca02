"""The study files shipped with the package: the embedded CPU demo (``posttrain-probe demo [--quick]``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def demo_config(quick: bool = False) -> Path:
    """Path of the shipped demo study file: ``configs/demo.yaml`` or, with ``quick``, ``configs/demo_quick.yaml``."""
    name = "demo_quick.yaml" if quick else "demo.yaml"
    return Path(str(resources.files("posttrain_probe.study") / "configs" / name))
