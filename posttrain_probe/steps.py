"""Every post-hoc step of posttrain-probe: its command, config dataclass, function and typed result.

Each step has the same shape (docs/architecture.md): ``function(config) -> result``, where the config is
a torch-free dataclass with a help string per field (the CLI's options and the YAML keys) and the
result writes itself to a directory (``result.write(out)``) and reads back (``Result.read(out)``); ``critical``
writes one JSON file (``critical.json``) instead of a directory.
Entries are import paths, resolved on use, so this registry imports nothing heavy::

    from posttrain_probe.steps import STEPS
    step = STEPS["analyze"]
    config = step.load_config("analyze.yaml")      # or step.config_class(**fields)
    result = step.function(config)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain_probe.config_io import config_from_mapping, load_config


def _resolve(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Step:
    """One post-hoc step: where its pieces live."""

    command: tuple[str, ...]
    """The CLI words, e.g. ``("features", "fisher")``."""
    config: str
    """``module:Class`` of the config dataclass (torch-free module)."""
    run: str
    """``module:function`` of the step function (takes the config, returns the result)."""
    result: str
    """``module:Class`` of the typed result (``write(out)``, ``read(out)``)."""
    generated_cli: bool = True
    """The command's options are generated from the config (False: ``lm-eval`` passes lm-eval's own CLI through)."""

    @property
    def config_class(self) -> type:
        """The config dataclass."""
        return _resolve(self.config)

    @property
    def function(self) -> Callable[..., Any]:
        """The step function (imports its module, which may import torch)."""
        return _resolve(self.run)

    @property
    def result_class(self) -> type:
        """The typed result class."""
        return _resolve(self.result)

    def load_config(self, path: str | Path) -> Any:
        """The step's config from a YAML file whose keys are the config's field names."""
        return load_config(self.config_class, path)

    def config_from(self, mapping: dict[str, Any]) -> Any:
        """The step's config from a mapping (a section of a study file)."""
        return config_from_mapping(self.config_class, mapping, source=" ".join(self.command))


_P = "posttrain_probe."
STEPS: dict[str, Step] = {
    "collect": Step(
        ("collect",),
        _P + "activations.config:CollectConfig",
        _P + "activations.collect:collect",
        _P + "activations.collect:CollectResult",
    ),
    "crosscoder_train": Step(
        ("crosscoder", "train"),
        _P + "crosscoder.config:CrosscoderTrainConfig",
        _P + "crosscoder.run:crosscoder_train",
        _P + "crosscoder.run:CrosscoderRun",
    ),
    "crosscoder_calibrate": Step(
        ("crosscoder", "calibrate"),
        _P + "crosscoder.config:CalibrateConfig",
        _P + "crosscoder.calibrate:crosscoder_calibrate",
        _P + "crosscoder.calibrate:CalibrationReport",
    ),
    "crosscoder_sweep_k": Step(
        ("crosscoder", "sweep-k"),
        _P + "crosscoder.config:SweepKConfig",
        _P + "crosscoder.sweep:crosscoder_sweep_k",
        _P + "crosscoder.sweep:SweepResult",
    ),
    "analyze": Step(
        ("analyze",),
        _P + "analysis.analyze_config:AnalyzeConfig",
        _P + "analysis.report:analyze",
        _P + "analysis.report:AnalysisResult",
    ),
    "dynamics": Step(
        ("dynamics",),
        _P + "analysis.analyze_config:DynamicsConfig",
        _P + "analysis.checkpoint_dynamics:dynamics",
        _P + "analysis.checkpoint_dynamics:DynamicsResult",
    ),
    "critical": Step(
        ("critical",),
        _P + "analysis.critical_config:CriticalConfig",
        _P + "analysis.critical:critical",
        _P + "analysis.critical:CriticalSamples",
    ),
    "features_generalization": Step(
        ("features", "generalization"),
        _P + "eval.generalization_config:GeneralizationConfig",
        _P + "eval.generalization:features_generalization",
        _P + "eval.generalization:GeneralizationFeatures",
    ),
    "features_fisher": Step(
        ("features", "fisher"),
        _P + "analysis.fisher_config:FisherConfig",
        _P + "analysis.fisher:features_fisher",
        _P + "analysis.fisher_report:FisherReport",
    ),
    "intervene": Step(
        ("intervene",),
        _P + "eval.intervene_config:InterveneConfig",
        _P + "eval.intervention_effects:intervene",
        _P + "eval.effects:InterventionEffects",
    ),
    "leakage": Step(
        ("leakage",),
        _P + "analysis.leakage_config:LeakageConfig",
        _P + "analysis.leakage:leakage",
        _P + "analysis.leakage_report:LeakageReport",
    ),
    "data_prepare": Step(
        ("data", "prepare"),
        _P + "prepare.config:DataPrepareConfig",
        _P + "prepare.prepare:data_prepare",
        _P + "prepare.prepare:PreparedData",
    ),
    "lm_eval": Step(
        ("lm-eval",),
        _P + "eval.lm_eval_config:LmEvalConfig",
        _P + "eval.runner:lm_eval",
        _P + "eval.runner:LmEvalResult",
        generated_cli=False,
    ),
}
"""Every post-hoc step by name (the function's name)."""
