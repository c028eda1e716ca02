"""Shared fixtures: tiny models on disk, built offline once per test session; single-threaded torch."""

from __future__ import annotations

import pytest
import torch

from posttrain_probe.testing import save_tiny_pair, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict:
    """{"base": path, "tuned": path}: a tiny Qwen3 model and a copy tuned by real optimizer steps."""
    return save_tiny_pair(tmp_path_factory.mktemp("models"), "qwen3", steps=10)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a whole test module, restored afterwards: tiny models gain
    nothing from intra-op threads, and on a shared machine their spinning makes tests several times
    slower. Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def tokenizer():
    return tiny_tokenizer()
