"""The ``crosscoder train`` step: a :class:`~posttrain_probe.crosscoder.config.CrosscoderTrainConfig` in, a
:class:`CrosscoderRun` out (the engine is :func:`posttrain_probe.crosscoder.train.train_crosscoder`).

    crosscoder_train(CrosscoderTrainConfig(acts=["runs/acts"], out="runs/cc", crosscoder=CrosscoderConfig(layer=18)))
    posttrain-probe crosscoder train --acts runs/acts --layer 18 --out runs/cc
    posttrain-probe crosscoder train --config crosscoder.yaml      # keys: acts, out, ...; sections crosscoder:, training:
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from posttrain_probe.crosscoder.config import CrosscoderConfig, CrosscoderTrainConfig
from posttrain_probe.crosscoder.layout import STATUS, write_status
from posttrain_probe.errors import ProbeError
from posttrain_probe.models import parse_model_specs


class CrosscoderRun(NamedTuple):
    """A crosscoder training run as its directory holds it (``training_status.json`` + ``config.json``)."""

    out: Path
    """The run directory: the crosscoder (config.json + model.safetensors), metrics.jsonl, trainer_state/."""
    step: int
    """Optimizer step the weights at the run root are from."""
    total_steps: int
    """Steps of the whole run."""
    tokens: int
    """Training tokens seen up to ``step``."""
    complete: bool
    """True once the run reached ``total_steps``; False: continue it with ``resume``."""
    warnings: list[str] | None
    """Quality warnings of a finished run (:func:`posttrain_probe.crosscoder.metrics.quality_warnings`); None: not checked (unfinished)."""
    config: CrosscoderConfig
    """The trained crosscoder's config (its ``config.json``)."""
    summary: dict[str, Any] | None = None
    """End-of-run figures of a finished run: train and inference L0, FVU, dead and never-fired fractions, the
    threshold calibration (BatchTopK); None: unfinished."""

    def status(self) -> dict[str, Any]:
        """The content of ``training_status.json``."""
        status = {"complete": self.complete, "step": self.step, "total_steps": self.total_steps, "tokens": self.tokens}
        if self.summary is not None:
            status["summary"] = self.summary
        return status if self.warnings is None else {**status, "warnings": list(self.warnings)}

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``training_status.json`` into ``out`` atomically (config.json and the weights are the
        checkpoints' to write); returns ``{"status": path}``."""
        write_status(Path(out), self.status())
        return {"status": Path(out) / STATUS}

    @classmethod
    def read(cls, out: str | os.PathLike) -> CrosscoderRun:
        """The run in ``out``; ProbeError when it holds no crosscoder training run."""
        out = Path(out)
        if not (out / STATUS).exists() or not (out / "config.json").exists():
            raise ProbeError(f"{out} holds no crosscoder training run: expected {STATUS} and config.json")
        status = json.loads((out / STATUS).read_text())
        config = CrosscoderConfig(**json.loads((out / "config.json").read_text()))
        return cls(
            out,
            status["step"],
            status["total_steps"],
            status.get("tokens", 0),
            status.get("complete", True),
            status.get("warnings"),
            config,
            status.get("summary"),
        )


def crosscoder_train(config: CrosscoderTrainConfig, *, source=None, progress: bool = True) -> CrosscoderRun:
    """Train (or resume) the crosscoder run ``config.out``; returns it as :class:`CrosscoderRun`.

    The data are ``config.acts`` (stores) or ``config.model`` + ``config.dataset`` (live forwards),
    or ``source``: an already opened activation source (PairedActivations, LiveActivations, ...).
    Quality warnings of a finished run are recorded in the result (and training_status.json), not raised.
    """
    from posttrain_probe.crosscoder.metrics import CrosscoderQualityWarning
    from posttrain_probe.crosscoder.train import train_crosscoder

    if source is None:
        from posttrain_probe.crosscoder.sources import open_source

        cc = config.crosscoder
        source = open_source(
            acts=config.acts,
            models=parse_model_specs(config.model) if config.model else None,
            dataset=config.dataset,
            layer=cc.layer,
            model_names=cc.model_names or None,
            seq_len=config.seq_len,
            forward_batch_size=config.forward_batch_size,
        )
    elif config.acts or config.model:
        raise ProbeError("give the training data once: source= or config.acts / config.model, not both")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CrosscoderQualityWarning)  # kept in CrosscoderRun.warnings
        train_crosscoder(
            source,
            config.crosscoder,
            config.training,
            config.out,
            resume=config.resume,
            overwrite=config.overwrite,
            progress=progress,
        )
    return CrosscoderRun.read(config.out)
