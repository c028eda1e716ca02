"""Shared fixtures: tiny models on disk, built offline once per test session; single-threaded torch."""

from __future__ import annotations

import pytest
import torch

from posttrain_probe.testing import save_tiny_pair, tiny_tokenizer

# Seconds the slowest test files take (setup + calls, 2 workers on 2 cores, 2026-12-05; 1744 s for all files).
# pytest-xdist's --dist loadfile hands files to its workers in collection order: these first, longest first, then
# the others in their usual order, so that no minutes-long file starts last while the other worker idles
# (xdist's own default orders files by their number of tests, which puts the one-test README run at the very end).
SLOW_FILES = {
    "test_readme.py": 207,
    "test_study.py": 166,
    "test_verl_trainer.py": 139,
    "test_callbacks_distributed.py": 116,
    "test_recipes.py": 105,
    "test_verl_worker.py": 66,
    "test_verl_monitor.py": 65,
    "test_gpu_suite.py": 60,
    "test_collect.py": 57,
    "test_lm_eval_cli.py": 51,
    "test_blocking_distributed.py": 50,
    "test_vllm_check.py": 47,
    "test_verl_config.py": 47,
    "test_preserve_distributed.py": 37,
    "test_blocking_fsdp.py": 35,
    "test_sft_blocked.py": 33,
    "test_crosscoder_training.py": 32,
    "test_intervene.py": 32,
    "test_crosscoder_quality.py": 32,
    "test_feature_monitor.py": 31,
    "test_layers_fsdp.py": 31,
}


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist present: keep the order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -SLOW_FILES.get(item.path.name, 0))  # stable: each file's tests keep their order


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
