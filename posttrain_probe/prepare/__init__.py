"""Data preparation for the SFT-vs-RL study: rejection-sampled teacher traces over a math problem set, written as
an SFT dataset (problem + trace) and an RL dataset (problem + gold answer) over the same problems (docs/data.md).

* :class:`~posttrain_probe.prepare.config.DataPrepareConfig` -- the settings (torch-free).
* :func:`posttrain_probe.prepare.prepare.data_prepare` -- the step (-> :class:`~posttrain_probe.prepare.prepare.PreparedData`).
* :mod:`posttrain_probe.prepare.generate` -- the teacher backends (vLLM, HF ``generate``).

Only the config is imported here; torch, transformers and math-verify load when the step runs.
"""

from posttrain_probe.prepare.config import BACKENDS, DEFAULT_INSTRUCTION, DataPrepareConfig

__all__ = ["BACKENDS", "DEFAULT_INSTRUCTION", "DataPrepareConfig"]
