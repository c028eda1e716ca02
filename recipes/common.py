"""What the recipes share: math-data script arguments, the model/tokenizer loader and the column mapping.

Real runs name a model (hub id or local path) and a `datasets` dataset; the column mapping turns a math
dataset's own columns into what TRL's trainers read:

    SFT   prompt = [user: question (+ instruction)], completion = [assistant: worked solution / CoT trace]
    GRPO  prompt = [user: question (+ instruction)], solution = gold final answer (read by accuracy_reward)

SFT uses TRL's conversational prompt-completion format, so the loss (and sft_kl's KL term) covers the
completion tokens only (SFTConfig.completion_only_loss defaults to True for it).

CPU/CI only: ``model_name_or_path: tiny:<arch>`` builds a tiny random model of :mod:`posttrain_probe.testing`
(``tiny:qwen3``, ``tiny:llama``, ...) with the tiny tokenizer, and ``dataset_name: synthetic:arithmetic``
a synthetic dataset, so every recipe runs offline in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ScriptArguments

from posttrain_probe.math_answers import MATH_INSTRUCTION, math_prompt
from posttrain_probe.models import vllm_missing

TINY_PREFIX = "tiny:"


def parse_recipe_args(parser, argv: list[str] | None = None) -> tuple:
    """``parser.parse_args_and_config()`` with a one-line error (exit 2) for unknown YAML keys and bad values.

    TrlParser raises ValueError("Unknown arguments from config file: [...]") for a misspelled YAML key;
    printed as a traceback it hides the one thing to fix.
    """
    import sys

    from posttrain_probe.errors import ProbeError

    try:
        return parser.parse_args_and_config(args=argv)
    except (ValueError, ProbeError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass
class MathScriptArguments(ScriptArguments):
    """TRL's ScriptArguments (dataset_name, dataset_config, dataset_train_split, ...) plus the column mapping.

    ``dataset_name`` is anything :func:`posttrain_probe.data.load_dataset_spec` reads: a `datasets` hub name
    (with ``dataset_config``), a local file or folder, or ``synthetic:arithmetic`` (tiny runs).
    """

    question_column: str = field(default="question", metadata={"help": "Column holding the problem statement."})
    answer_column: str = field(
        default="answer",
        metadata={
            "help": "Column holding the worked solution (SFT target: the full CoT trace). A column of lists (e.g. "
            "OpenR1-Math-220k's `generations`) takes the first trace that `correct_column` marks correct. GRPO "
            "reads the gold answer from it when `final_answer_column` is unset ('#### N' endings, as in gsm8k, "
            "are cut to N)."
        },
    )
    correct_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of bools (or lists of bools parallel to a list `answer_column`) marking correct "
            "traces; SFT keeps correct traces only and drops rows without one."
        },
    )
    final_answer_column: str | None = field(
        default="final_answer",
        metadata={
            "help": "Column holding the gold final answer that GRPO's reward verifies (math-verify); empty: "
            "read it from `answer_column`."
        },
    )
    instruction: str | None = field(
        default=None,
        metadata={
            "help": "Text appended to every question after a blank line, e.g. the eval suites' math instruction "
            f"'{MATH_INSTRUCTION}' (empty: the question alone)."
        },
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N rows of the training split."}
    )


def check_vllm_generation(training_args, *, vllm_installed: bool | None = None, gpu: bool | None = None) -> None:
    """One-line ``ValueError`` when ``use_vllm: true`` cannot run here (no vllm package, or no CUDA GPU), before
    anything is loaded (:func:`posttrain_probe.models.vllm_missing`); a no-op when ``use_vllm`` is off (generation then
    runs through HF ``generate``).

    With ``vllm_mode: colocate`` TRL keeps a vLLM copy of the policy in the training processes and syncs the
    weights into it before each generation round; the probe callbacks never read that copy: snapshots and
    activations come from the trained model (``trainer.model``), as without vLLM.
    """
    if not getattr(training_args, "use_vllm", False):
        return
    missing = vllm_missing(vllm_installed=vllm_installed, gpu=gpu)
    if missing:
        raise ValueError(
            f"use_vllm=true (vllm_mode={getattr(training_args, 'vllm_mode', None)}) needs {' and '.join(missing)} "
            "(pip install 'posttrain-probe[vllm]' on a GPU machine); pass --use_vllm false to generate with HF generate"
        )


def load_model_and_tokenizer(model_args, training_args):
    """``(model, tokenizer)``: the model as TRL's trainers take it and its tokenizer (pad token = eos if missing).

    For a hub id or local path the model is that string and ``training_args.model_init_kwargs`` carries
    revision/dtype/attention implementation, as in TRL's own scripts. ``tiny:<arch>`` (CPU/CI) builds
    :func:`posttrain_probe.testing.tiny_model` and :func:`~posttrain_probe.testing.tiny_tokenizer` instead.
    """
    from transformers import AutoTokenizer

    name = model_args.model_name_or_path
    if name is None:
        raise ValueError("model_name_or_path is required: a hub id, a local path, or tiny:<arch> for CPU runs")
    if name.startswith(TINY_PREFIX):
        from posttrain_probe.testing import tiny_tokenizer

        return tiny_model(name), tiny_tokenizer()
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    tokenizer = AutoTokenizer.from_pretrained(
        name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    return name, _with_pad_token(tokenizer)


def tiny_model(name: str):
    """The tiny random model of ``tiny:<arch>`` (the same weights on every call: seed 0)."""
    from posttrain_probe.testing import ARCHITECTURES
    from posttrain_probe.testing import tiny_model as build

    arch = name[len(TINY_PREFIX) :] or "qwen3"
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown tiny model {name!r}: expected tiny:<arch> with arch one of {', '.join(ARCHITECTURES)}"
        )
    return build(arch)


def _with_pad_token(tokenizer):
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {tokenizer.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_train_dataset(script_args):
    """The raw training split named by ``script_args`` (first ``max_samples`` rows)."""
    from posttrain_probe.data import load_dataset_spec

    return load_dataset_spec(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        config_name=script_args.dataset_config,
        n_docs=script_args.max_samples,
    )


def _question(row, script_args) -> str:
    """The user prompt of a row: its question, a blank line, ``instruction`` (the eval suites' and ``data prepare``'s
    :func:`~posttrain_probe.math_answers.math_prompt`)."""
    return math_prompt(str(row[script_args.question_column]), script_args.instruction)


def _check_columns(dataset, names) -> None:
    missing = [name for name in names if name is not None and name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"column(s) {missing} not in the dataset: it has {dataset.column_names} (set the *_column options)"
        )


def sft_dataset(script_args):
    """Conversational prompt-completion rows (question -> correct worked solution) for SFTTrainer."""
    dataset = load_train_dataset(script_args)
    _check_columns(dataset, [script_args.question_column, script_args.answer_column, script_args.correct_column])

    def trace(row) -> str | None:
        value, correct = (
            row[script_args.answer_column],
            row[script_args.correct_column] if script_args.correct_column else None,
        )
        if isinstance(value, list):
            flags = correct if isinstance(correct, list) else [True] * len(value)
            return next((text for text, ok in zip(value, flags) if ok and text), None)
        return value if correct is None or correct else None

    def to_example(row):
        return {
            "prompt": [{"role": "user", "content": _question(row, script_args)}],
            "completion": [{"role": "assistant", "content": trace(row) or ""}],
        }

    dataset = dataset.filter(lambda row: trace(row) is not None)
    if len(dataset) == 0:
        raise ValueError(f"no row of {script_args.dataset_name} has a correct trace in {script_args.answer_column!r}")
    return dataset.map(to_example, remove_columns=dataset.column_names)


def final_answer(text: str) -> str:
    """The gold answer of a worked solution: the part after '####' (gsm8k, thousands separators dropped), else
    the text itself (math-verify finds a \\boxed{} answer in it)."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    return text


def grpo_dataset(script_args):
    """Conversational prompts with a ``solution`` column (the gold final answer) for GRPOTrainer."""
    dataset = load_train_dataset(script_args)
    source = script_args.final_answer_column or script_args.answer_column
    _check_columns(dataset, [script_args.question_column, source])

    def to_example(row):
        gold = str(row[source])
        return {
            "prompt": [{"role": "user", "content": _question(row, script_args)}],
            "solution": gold if script_args.final_answer_column else final_answer(gold),
        }

    return dataset.map(to_example, remove_columns=dataset.column_names)
