"""The teacher of ``data prepare``: user prompts -> ``n`` sampled completions each, by vLLM or HF ``generate``.

Both backends are one :class:`Teacher`, whose ``generate(prompts, n)`` returns, for every user prompt (problem +
instruction), ``n`` completions in sampling order. Prompts are rendered (chat template) and tokenised by
:func:`encode_prompts` for both, so the two backends see the same token ids. :func:`choose_backend` decides
between them, and refuses an impossible choice, before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from posttrain_probe.dtypes import dtype_name
from posttrain_probe.errors import ProbeError
from posttrain_probe.models import vllm_missing
from posttrain_probe.prepare.config import BACKENDS, DataPrepareConfig

Generate = Callable[[list[str], int], list[list[str]]]
"""``generate(prompts, n)``: ``n`` completions (text after the prompt) for every user prompt, in prompt order."""


class Teacher(NamedTuple):
    """A loaded teacher model behind the one generation interface."""

    generate: Generate
    """User prompts and samples per prompt -> completions."""
    batch_size: int | None
    """Prompts per ``generate`` call (None: all at once, the backend batches itself)."""
    settings: dict[str, Any]
    """What provenance records: backend, model, dtype, device, whether the chat template was applied."""


_NEUTRAL = {"min_p": 0.0, "typical_p": 1.0, "repetition_penalty": 1.0}
"""Sampling settings a model's generation_config may set, at their no-op values: HF ``generate`` samples with
temperature and top_p only, as vLLM does with explicit SamplingParams."""


def choose_backend(backend: str, *, tensor_parallel_size: int = 1) -> str:
    """``"vllm"`` or ``"hf"`` for a config's ``backend`` (auto | vllm | hf; auto: vllm when :func:`vllm_missing`
    finds nothing missing); ProbeError when vllm is asked for but not installed or no GPU is visible, or when the
    choice is hf and ``tensor_parallel_size`` > 1 (HF ``generate`` does not split the teacher). Loads nothing."""
    if backend not in BACKENDS:
        raise ProbeError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    missing = [] if backend == "hf" else vllm_missing()
    if backend == "hf" or (backend == "auto" and missing):
        if tensor_parallel_size > 1:
            raise ProbeError(
                f"tensor_parallel_size={tensor_parallel_size} needs the vllm backend: HF generate runs the teacher on "
                "one device; set backend vllm on a GPU machine, or tensor_parallel_size 1"
            )
        return "hf"
    if not missing:
        return "vllm"
    if "the vllm package" in missing:
        raise ProbeError(
            "backend 'vllm' needs the vllm package, which is not installed: expected `pip install 'posttrain-probe[vllm]'`, or backend hf"
        )
    raise ProbeError("backend 'vllm' needs a CUDA GPU and torch sees none: expected a GPU machine, or backend hf")


def encode_prompts(tokenizer, prompts: list[str], *, chat_template: bool) -> list[list[int]]:
    """Token ids of each user prompt: as one user turn of the tokenizer's chat template with the generation prompt
    (when ``chat_template`` and the tokenizer has one; the template carries its own special tokens), else the plain
    text with the tokenizer's special tokens (e.g. BOS)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer(prompts, add_special_tokens=True)["input_ids"]


def load_teacher(config: DataPrepareConfig, backend: str, *, progress: bool = False) -> Teacher:
    """The teacher of ``config`` on ``backend`` (``"hf"`` or ``"vllm"``, from :func:`choose_backend`)."""
    return vllm_teacher(config, progress=progress) if backend == "vllm" else hf_teacher(config)


def hf_teacher(config: DataPrepareConfig) -> Teacher:
    """HF ``generate``: batches of ``config.batch_size`` prompts, left-padded, ``n`` samples per prompt
    (``num_return_sequences``) with ``temperature``/``top_p`` only (greedy at temperature 0; top_k, min_p, typical_p
    and repetition penalty of the model's generation_config are switched off, as in vLLM), seeded once with
    ``config.seed`` when loaded, so a run on the same hardware repeats exactly."""
    import torch
    from transformers import set_seed

    from posttrain_probe.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(config.teacher)
    model = load_causal_lm(config.teacher, dtype=dtype, device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ProbeError(
            f"the tokenizer of {config.teacher!r} has neither a pad nor an eos token: expected one of them"
        )
    if config.temperature > 0:
        sampling: dict[str, Any] = dict(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0)
        neutral = _NEUTRAL
    else:
        sampling, neutral = dict(do_sample=False), {"repetition_penalty": 1.0}
    defaults = model.generation_config  # generation_config.json's values would apply to every setting left unset
    sampling.update({k: v for k, v in neutral.items() if getattr(defaults, k, None) not in (None, v)})
    set_seed(config.seed)

    @torch.inference_mode()
    def generate(prompts: list[str], n: int) -> list[list[str]]:
        encoded = encode_prompts(tokenizer, prompts, chat_template=config.chat_template)
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: the prompt ends where generation starts
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=config.max_new_tokens,
            num_return_sequences=n,
            pad_token_id=pad_id,
            **sampling,
        )
        texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]  # samples of prompt i are adjacent

    settings = dict(
        backend="hf",
        model=config.teacher,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        chat_template=bool(config.chat_template and getattr(tokenizer, "chat_template", None)),
    )
    return Teacher(generate, config.batch_size, settings)


def vllm_teacher(config: DataPrepareConfig, *, progress: bool = False) -> Teacher:
    """vLLM offline inference: ``LLM(model, dtype, seed, tensor_parallel_size)``, one ``generate`` call over all prompts (vLLM schedules
    its own batches), ``SamplingParams(n, temperature, top_p, max_tokens)``; the prompts go in as token ids from
    :func:`encode_prompts`, so no second BOS is added."""
    import vllm
    from vllm import LLM, SamplingParams

    dtype = "auto" if config.dtype == "auto" else dtype_name(config.dtype, what="teacher")
    llm = LLM(model=config.teacher, dtype=dtype, seed=config.seed, tensor_parallel_size=config.tensor_parallel_size)
    tokenizer = llm.get_tokenizer()

    def generate(prompts: list[str], n: int) -> list[list[str]]:
        params = SamplingParams(
            n=n, temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens
        )
        encoded = encode_prompts(tokenizer, prompts, chat_template=config.chat_template)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=progress)
        return [[sample.text for sample in output.outputs] for output in outputs]

    settings = dict(
        backend="vllm",
        vllm_version=vllm.__version__,
        model=config.teacher,
        dtype=dtype,
        device="cuda",
        tensor_parallel_size=config.tensor_parallel_size,
        chat_template=bool(config.chat_template and getattr(tokenizer, "chat_template", None)),
    )
    return Teacher(generate, None, settings)
