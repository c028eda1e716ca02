"""Shared fixtures: tiny models on disk, built offline once per test session."""

from __future__ import annotations

import pytest

from posttrain_probe.testing import save_tiny_pair, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict:
    """{"base": path, "tuned": path}: a tiny Qwen3 model and a copy tuned by real optimizer steps."""
    return save_tiny_pair(tmp_path_factory.mktemp("models"), "qwen3", steps=10)


@pytest.fixture()
def tokenizer():
    return tiny_tokenizer()
