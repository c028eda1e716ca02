"""Shared, expensive test data for test_generalization.py and test_intervene.py (built once per process).

Real lm-eval runs (posttrain_probe.eval.runner.evaluate, sample logs on disk) of a tiny base model and
its tuned copy on three offline tasks, then ``posttrain-probe critical`` on the logs:

* ``probe_mcq`` -- the shipped multiple-choice task (first ``N_DOCS`` documents);
* ``probe_mcq_qa`` -- a task defined here (``include_path``): the same questions in another prompt
  format ("Question: ...\\nAnswer:"), on a local file of ``N_DOCS`` documents;
* ``probe_math`` -- the shipped generation task (first ``N_MATH_DOCS`` documents); the tiny models never produce a right boxed answer,
  so it has no generalization-critical sample.

plus a two-model crosscoder ``["base", "rl"]`` with random weights and scales estimated on the
models' activations at ``LAYER``.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

N_DOCS = 64
N_MATH_DOCS = 8
LAYER = 2
TASKS = ("probe_mcq", "probe_mcq_qa", "probe_math")

_QA_YAML = """task: probe_mcq_qa
custom_dataset: !function posttrain_probe.eval.tasks.load_local_jsonl
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question.strip()}}}}\\nChoices: A. {{{{choices[0]}}}} B. {{{{choices[1]}}}} C. {{{{choices[2]}}}} D. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


class CriticalRuns(NamedTuple):
    root: Path
    base: Path
    """Base model directory."""
    rl: Path
    """Tuned ("RL") model directory."""
    include_path: Path
    """Folder of the probe_mcq_qa task YAML."""
    critical: Path
    """critical.json written by `posttrain-probe critical`."""
    crosscoder: Path
    """Random base-vs-rl crosscoder (branches "base", "rl") at LAYER."""
    other_crosscoder: Path
    """Another crosscoder of the same shape (other weights)."""


@functools.lru_cache(maxsize=1)
def critical_runs() -> CriticalRuns:
    """Build (once per process) the models, lm-eval runs, critical.json and crosscoders."""
    import torch
    from typer.testing import CliRunner

    from posttrain_probe.cli import app
    from posttrain_probe.crosscoder import Crosscoder
    from posttrain_probe.crosscoder.config import CrosscoderConfig
    from posttrain_probe.eval.lm_eval_config import LmEvalConfig
    from posttrain_probe.eval.runner import evaluate
    from posttrain_probe.eval.tasks import TASKS_DIR
    from posttrain_probe.layers import truncated_forward
    from posttrain_probe.models import load_causal_lm, load_tokenizer
    from posttrain_probe.testing import save_tiny_pair

    root = Path(tempfile.mkdtemp(prefix="pp-critical-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    models = save_tiny_pair(root / "models", "qwen3", steps=10)

    include = root / "tasks"
    include.mkdir()
    lines = (TASKS_DIR / "probe_mcq_test.jsonl").read_text().splitlines()[:N_DOCS]
    (include / "qa.jsonl").write_text("\n".join(lines) + "\n")
    (include / "probe_mcq_qa.yaml").write_text(_QA_YAML.format(data=include / "qa.jsonl"))

    for name in ("base", "tuned"):  # generation is the slow part: fewer documents of probe_math
        for tasks, limit in ((["probe_mcq", "probe_mcq_qa"], N_DOCS), (["probe_math"], N_MATH_DOCS)):
            evaluate(
                LmEvalConfig(
                    model_args={"pretrained": str(models[name])},
                    tasks=tasks,
                    include_path=[str(include)],
                    limit=limit,
                    batch_size="32",
                    out=root / "runs" / name,
                )
            )
    critical = root / "critical.json"
    result = CliRunner().invoke(
        app,
        [
            "critical",
            "--base-samples",
            str(root / "runs" / "base"),
            "--rl-samples",
            str(root / "runs" / "tuned"),
            "--out",
            str(critical),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(critical.read_text())
    assert data["tasks"]["probe_mcq"]["n_critical"] > 0 and data["tasks"]["probe_mcq_qa"]["n_critical"] > 0, data[
        "tasks"
    ]
    assert "probe_math" in data["no_critical"], data["no_critical"]

    tokenizer = load_tokenizer(models["base"])
    texts = [json.loads(line)["question"] + " " + " ".join(json.loads(line)["choices"]) for line in lines]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    acts = []
    for name in ("base", "tuned"):
        model = load_causal_lm(models[name], device="cpu")
        hidden = truncated_forward(model, enc["input_ids"], enc["attention_mask"], [LAYER])[LAYER]
        acts.append(hidden[enc["attention_mask"].bool()])  # [tokens, d]
    paired = torch.stack(acts, dim=1)  # [tokens, 2, d]
    paths = {}
    for label, seed in (("crosscoder", 0), ("other_crosscoder", 1)):
        torch.manual_seed(seed)
        cc = Crosscoder(
            CrosscoderConfig(model_names=["base", "rl"], d_model=paired.shape[-1], n_features=128, layer=LAYER)
        )
        cc.set_scales_from([paired])
        paths[label] = root / label
        cc.save_pretrained(paths[label])
    return CriticalRuns(
        root, models["base"], models["tuned"], include, critical, paths["crosscoder"], paths["other_crosscoder"]
    )
