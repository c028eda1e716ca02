"""Settings of one lm-eval run of the study (:class:`LmEvalConfig`), with or without a feature intervention;
torch-free. The ``posttrain-probe lm-eval`` command is lm-eval's own CLI and does not use it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from posttrain_probe.analysis.critical import split_names
from posttrain_probe.errors import ProbeError
from posttrain_probe.eval.intervene_config import check_model_args_text
from posttrain_probe.models import vllm_missing

LM_EVAL_MODELS = ("probe-hf", "vllm", "auto")
"""The lm-eval models a study's evaluation can run on (:attr:`LmEvalConfig.model`)."""


@dataclass(kw_only=True)
class LmEvalConfig:
    """Settings of :func:`~posttrain_probe.eval.runner.lm_eval`: lm-eval ``tasks`` with the ``probe-hf`` model
    (docs/methods.md sec. 6-7); with ``crosscoder`` and ``features`` the feature set is resolved once and the
    intervention attached.

    Python: ``lm_eval(LmEvalConfig(model_args="pretrained=runs/rl,dtype=bfloat16", tasks=["probe_mcq"], out="runs/eval/rl",
    crosscoder="runs/cc", features="runs/genfeat/generalization_features.json", mode="zero", model_name="rl"))``;
    YAML (e.g. a section of the study's file): the same keys, ``model_args`` a ``k=v,k=v`` string or a mapping.
    """

    model_args: str = field(
        metadata={"help": "HF model_args as lm-eval's --model_args: pretrained=PATH,k=v,... (or a mapping)."}
    )
    model: str = field(
        default="probe-hf",
        metadata={
            "help": "lm-eval model: probe-hf (HF generate + the feature hooks) | vllm (lm-eval's vLLM model: fast "
            "generation, no intervention, needs vllm and a GPU) | auto (vllm when no intervention is set, vllm is "
            "installed and a GPU is present, else probe-hf)."
        },
    )
    vllm_args: str = field(
        default="",
        metadata={
            "help": "Extra model_args of the vllm model only, k=v,... (e.g. tensor_parallel_size=8,"
            "gpu_memory_utilization=0.8,max_model_len=32768)."
        },
    )
    tasks: list[str] = field(metadata={"help": "lm-eval task names (repeat or comma-separate)."})
    out: Path | None = field(
        default=None,
        metadata={
            "help": "Output directory (lm-eval's --output_path): results and per-task sample logs, lm_eval.json."
        },
    )
    include_path: list[str] = field(
        default_factory=list, metadata={"help": "lm-eval task folder(s) besides the shipped ones."}
    )
    log_samples: bool = field(default=True, metadata={"help": "Keep (and with out, write) the per-document records."})
    limit: float | None = field(
        default=None, metadata={"help": "Documents per task (an int, or a fraction < 1), as lm-eval's --limit."}
    )
    samples: str | None = field(
        default=None,
        metadata={
            "help": "Doc ids per task, as lm-eval's --samples: a JSON {task: [ids]} or its file (excludes limit)."
        },
    )
    batch_size: str = field(default="8", metadata={"help": "lm-eval batch size (an int or auto)."})
    device: str = field(default="cpu", metadata={"help": "lm-eval device (cpu, cuda, cuda:0)."})
    apply_chat_template: bool = field(default=False, metadata={"help": "As lm-eval's --apply_chat_template."})
    num_fewshot: int | None = field(default=None, metadata={"help": "As lm-eval's --num_fewshot."})
    confirm_run_unsafe_code: bool = field(
        default=False,
        metadata={
            "help": "As lm-eval's --confirm_run_unsafe_code: let code tasks (humaneval in paper_s) execute the "
            "model's code (also needs HF_ALLOW_CODE_EVAL=1)."
        },
    )
    crosscoder: Path | None = field(
        default=None, metadata={"help": "Crosscoder directory of the intervention (none: plain hf)."}
    )
    features: str | None = field(
        default=None,
        metadata={"help": "Feature set of the intervention: a feature-set JSON, a category or indices 3,17,42."},
    )
    mode: str | None = field(default=None, metadata={"help": "zero (default) | set | scale | add | steer."})
    value: float | None = field(
        default=None,
        metadata={
            "help": "set: the value (default 3.0); scale: factor; add: delta; steer: multiple of the max activation (default 2.0)."
        },
    )
    model_name: str | None = field(
        default=None, metadata={"help": "Crosscoder branch whose per-source code is edited."}
    )
    positions: str | None = field(default=None, metadata={"help": "all (default) | prompt | last_prompt."})
    reference: str | None = field(
        default=None, metadata={"help": "steer: the corpus of the max activations (dataset spec)."}
    )
    allow_model_mismatch: bool = field(
        default=False,
        metadata={"help": "Intervene even when pretrained is not the branch's model (nor tuned from it)."},
    )

    def __post_init__(self) -> None:
        if self.model not in LM_EVAL_MODELS:
            raise ProbeError(f"model={self.model!r}: expected one of {', '.join(LM_EVAL_MODELS)}")
        if self.model == "vllm" and self.crosscoder is not None:
            raise ProbeError(
                "model=vllm cannot run an intervention (vLLM generates from its own copy of the weights, without the "
                "feature hooks): use model=probe-hf, or auto, which stays on probe-hf for runs with an intervention"
            )
        if isinstance(self.vllm_args, Mapping):
            self.vllm_args = ",".join(f"{k}={v}" for k, v in self.vllm_args.items())
        if self.vllm_args:
            check_model_args_text(str(self.vllm_args), "vllm_args")
        for name in ("out", "crosscoder"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        if isinstance(self.model_args, Mapping):
            self.model_args = dict(self.model_args)
        else:
            check_model_args_text(str(self.model_args), "model_args")
        self.tasks = split_names(self.tasks)
        if not self.tasks:
            raise ProbeError("tasks is empty: expected at least one lm-eval task name")
        self.include_path = [
            str(p)
            for p in ([self.include_path] if isinstance(self.include_path, (str, Path)) else self.include_path or [])
        ]
        if isinstance(self.features, (list, tuple)):
            self.features = ",".join(str(f) for f in self.features)
        self.batch_size = str(self.batch_size)
        if self.limit is not None and (self.limit <= 0):
            raise ProbeError(f"limit must be > 0 (documents per task, or a fraction), got {self.limit}")
        if self.limit is not None and self.samples is not None:
            raise ProbeError("give either samples (doc ids per task) or limit, not both")
        if self.crosscoder is None and any(
            v is not None
            for v in (self.features, self.mode, self.value, self.model_name, self.positions, self.reference)
        ):
            raise ProbeError(
                "features, mode, value, model_name, positions and reference need crosscoder (the crosscoder whose features are edited)"
            )

    @property
    def doc_ids(self) -> dict[str, list[int]] | None:
        """``samples`` as {task: [doc ids]} (None: every document, or ``limit``)."""
        if self.samples is None:
            return None
        text = self.samples
        if isinstance(text, Mapping):
            return {str(t): [int(i) for i in ids] for t, ids in text.items()}
        if Path(text).is_file():
            text = Path(text).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ProbeError(
                f"samples {self.samples!r}: expected a JSON {{task: [doc ids]}} or its file ({err})"
            ) from None
        if not isinstance(data, dict):
            raise ProbeError(f"samples {self.samples!r}: expected a JSON object {{task: [doc ids]}}")
        return {str(t): [int(i) for i in ids] for t, ids in data.items()}

    def chosen_model(self, *, vllm_installed: bool | None = None, gpu: bool | None = None) -> tuple[str, str]:
        """``(model, why)``: the lm-eval model this run uses -- ``probe-hf`` or ``vllm`` -- and the reason, one line.

        ``model=vllm`` without the vllm package or a GPU raises :class:`ProbeError`; ``auto`` takes vllm only for
        a run without an intervention on a machine with both. ``vllm_installed`` / ``gpu`` default to this machine.
        """
        if self.model == "probe-hf":
            return "probe-hf", "model=probe-hf"
        if self.crosscoder is not None:  # only auto gets here: vllm with a crosscoder fails in __post_init__
            return "probe-hf", "an intervention runs on probe-hf (vLLM has no feature hooks)"
        missing = vllm_missing(vllm_installed=vllm_installed, gpu=gpu)
        if not missing:
            return "vllm", f"model={self.model}: vllm is installed and a GPU is present"
        if self.model == "vllm":
            raise ProbeError(
                f"model=vllm needs {' and '.join(missing)} (pip install 'posttrain-probe[vllm]' on a GPU machine); "
                "use model=probe-hf or auto here"
            )
        return "probe-hf", f"model=auto: no {' and no '.join(missing)}, so probe-hf"

    @property
    def lm_eval_batch_size(self) -> int | str:
        """``batch_size`` as lm-eval takes it (an int, or ``auto``)."""
        return int(self.batch_size) if self.batch_size.isdigit() else self.batch_size

    @property
    def lm_eval_limit(self) -> int | float | None:
        """``limit`` as lm-eval takes it: a whole number as an int (documents), else a fraction."""
        return int(self.limit) if self.limit is not None and float(self.limit).is_integer() else self.limit
