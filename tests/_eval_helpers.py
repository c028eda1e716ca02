"""Shared pieces of the lm-eval tests (test_lm_eval*.py, test_critical.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain_probe.analysis.feature_sets import write_feature_set
from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder

LAYER = 2
FEATURES = [1, 4, 9, 17, 30]


def save_random_crosscoder(path: Path) -> Path:
    """A random two-branch crosscoder (base, rl) at layer 2 of the tiny models (d = 64, F = 32),
    with codes that fire on a good share of tokens and non-trivial scales; saved to ``path``."""
    cc = Crosscoder(CrosscoderConfig(model_names=["base", "rl"], d_model=64, n_features=32, layer=LAYER))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(cc.W_enc.shape, generator=gen) / 8)
        cc.W_dec.copy_(torch.randn(cc.W_dec.shape, generator=gen) * 0.5)
        cc.b_enc.copy_(torch.randn(32, generator=gen) * 0.5)
        cc.scales.copy_(torch.tensor([0.7, 1.3]))
    cc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tiny_pair) -> Path:
    """The tiny base Qwen3 of the session's ``tiny_pair`` (conftest.py)."""
    return tiny_pair["base"]


@pytest.fixture(scope="module")
def cc_dir(tmp_path_factory) -> Path:
    """A :func:`save_random_crosscoder` for the module."""
    return save_random_crosscoder(tmp_path_factory.mktemp("cc"))


@pytest.fixture(scope="module")
def feature_file(cc_dir, tmp_path_factory) -> Path:
    """A feature-set file of :data:`FEATURES` on ``cc_dir``, selected on probe_mcq."""
    return write_feature_set(
        tmp_path_factory.mktemp("features") / "set.json", FEATURES, crosscoder=str(cc_dir), tasks=["probe_mcq"]
    )


@pytest.fixture(scope="module", autouse=True)
def lm_eval_logging():
    """lm-eval's CLI attaches its log handler to the stderr of the moment, once per process; bind it
    to the session's stderr rather than to the first CliRunner's (closed after that invocation)."""
    from lm_eval.utils import setup_logging

    setup_logging()
