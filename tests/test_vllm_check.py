"""benchmarks/vllm_check.py (the GPU check of the vLLM paths), run with its HF fallbacks on the CPU (``--device cpu
--tiny``): the same orchestration and checks, so the script the next GPU session runs cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.mark.slow
def test_cpu_fallbacks_pass_the_checks(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vllm_check.py"), "--device", "cpu", "--tiny", "--limit", "2",
         "--work", str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"grpo_hf_generate", "lm_eval_probe_hf"}
    grpo = results["grpo_hf_generate"]["detail"]
    # the probe's stored activations are the trained snapshot's, and training did move the weights
    assert "stored vs snapshot forward" in grpo and " 0/" not in grpo.split(";")[1]
    assert "model probe-hf" in results["lm_eval_probe_hf"]["detail"]
    assert "| grpo_hf_generate | pass |" in result.stdout
