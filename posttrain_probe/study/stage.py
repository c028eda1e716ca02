"""One stage of a study (:class:`Stage`): what it runs, what it reads and writes, what decides a re-run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Stage:
    """One resumable unit of a study."""

    name: str
    """Stage name (``--stage NAME``), e.g. ``train-sft``, ``crosscoder-base-rl``."""
    kind: str
    """``world``, ``train``, ``report`` or the ``STEPS`` key of the step it runs."""
    deps: tuple[str, ...]
    """Stages whose outputs it reads."""
    sections: tuple[str, ...]
    """Study-file sections its config comes from (a changed one re-runs it)."""
    outputs: tuple[Path, ...]
    """Files and directories it writes (removed before a re-run)."""
    build: Callable[[], Any] = field(repr=False)
    """-> the config (step, world, report) or the :class:`~posttrain_probe.study.launch.Launch` (train)."""
    about: str = ""
    """One line for the plan."""
    skip_if: Callable[[], str | None] | None = field(default=None, repr=False)
    """Checked when the stage is due: a reason to skip it (its inputs hold nothing to work on), or None."""
    inputs: Any = None
    """More of what decides its result, hashed with its sections (e.g. an arm's resolved recipe options)."""
    settings: tuple[str, ...] | None = None
    """``study:`` keys its result depends on (None: every key but :data:`NOT_HASHED`)."""
