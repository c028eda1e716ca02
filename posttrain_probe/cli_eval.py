"""CLI commands registered on `posttrain_probe.cli.app` (imported at the end of cli.py)."""

from __future__ import annotations
