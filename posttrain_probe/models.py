"""Load HF causal LMs and tokenizers by path or hub name, with errors a user can act on; say whether vLLM can run
here (:func:`vllm_missing`).

Torch is imported on first use, so step configs can parse ``NAME=PATH`` model specs at CLI start-up."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain_probe.dtypes import dtype_name
from posttrain_probe.errors import ProbeError

if TYPE_CHECKING:
    import torch
    from torch import nn


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device; None picks the current CUDA device (per rank under
    torchrun/accelerate, which set it) when available, else cpu."""
    import torch

    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Model compute dtype: 'auto'/None is bfloat16 on GPU, float32 on CPU."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype_name(dtype, what="model"))


def vllm_missing(*, vllm_installed: bool | None = None, gpu: bool | None = None) -> list[str]:
    """What vLLM generation lacks on this machine, in words: ``"the vllm package"`` (not importable) and/or
    ``"a CUDA GPU"`` (torch sees none); ``[]`` when vLLM can run. Loads neither vllm nor, unless asked, torch.

    ``vllm_installed`` / ``gpu`` replace the checks (tests, callers that already know)."""
    if vllm_installed is None:
        vllm_installed = importlib.util.find_spec("vllm") is not None
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    return [what for what, ok in (("the vllm package", vllm_installed), ("a CUDA GPU", gpu)) if not ok]


def check_model_path(path: str | os.PathLike, what: str = "model") -> None:
    """Refuse a model spec that names a local path which does not exist (before any hub lookup).

    A spec is local when it exists, starts with ``/``, ``./``, ``../`` or ``~``, has more than one
    ``/`` (a hub name is ``name`` or ``org/name``), or its parent is an existing local directory. A local spec that does not exist gets a one-line
    ProbeError naming it, instead of the hub client's "Repo id must be in the form ..." message.
    """
    spec = str(path)
    if Path(spec).expanduser().exists():
        return
    parent = Path(spec).expanduser().parent
    local_parent = str(parent) not in ("", ".") and parent.is_dir()
    if (
        spec.startswith(("/", "./", "../", "~"))
        or spec.count("/") > 1
        or local_parent
        or (os.sep != "/" and os.sep in spec)
    ):
        raise ProbeError(
            f"{what} path {spec!r} does not exist: expected a local directory with config.json, or a hub name such as Qwen/Qwen3-4B-Base"
        )


def load_causal_lm(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    keep_layers: int | None = None,
) -> nn.Module:
    """Load a causal LM (eval mode) from a local directory or hub name onto ``device``.

    ``keep_layers=k`` keeps decoder blocks 0..k only, to save memory and loading time when only sites <= k are
    captured (block k stays: the capture hook sits on it): a text LM whose config gives ``num_hidden_layers`` is built
    with k+1 blocks, so the weights of the others are never read; any other model is loaded whole and the blocks
    after k dropped. ``config.num_hidden_layers`` keeps the checkpoint's value either way (the model's identity,
    :mod:`posttrain_probe.model_identity`).
    """
    from transformers import AutoModelForCausalLM

    from posttrain_probe.layers import decoder_blocks

    check_model_path(path)
    device = resolve_device(device)
    try:
        model = None
        if keep_layers is not None:
            model = _load_first_blocks(str(path), resolve_dtype(dtype, device), keep_layers + 1)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype, device))
    except (OSError, ValueError) as err:
        where = "local directory" if Path(path).exists() else "local directory or hub model"
        raise ProbeError(f"cannot load model {str(path)!r}: not a {where} with a HF causal LM ({err})") from err
    if keep_layers is not None:
        blocks = decoder_blocks(model)
        del blocks[keep_layers + 1 :]
    return model.to(device).eval()


def _load_first_blocks(path: str, dtype, n_blocks: int):
    """The causal LM at ``path`` built with its first ``n_blocks`` decoder blocks (the checkpoint's weights of the
    others are not read; ``config.num_hidden_layers`` is set back to the checkpoint's value), or None when its config
    has no top-level ``num_hidden_layers`` of more blocks (then the caller loads it whole). A kept weight the
    checkpoint lacks is a ProbeError (transformers would initialise it at random with a warning); its report of the
    skipped blocks' weights, which lists nothing else then, is dropped.
    """
    import logging
    import re

    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):  # e.g. a PEFT adapter directory: transformers' whole load resolves it
        return None
    total = getattr(config, "num_hidden_layers", None)
    if not isinstance(total, int) or isinstance(total, bool) or not 1 <= n_blocks < total:
        return None
    config.num_hidden_layers = n_blocks

    class _SkippedBlocksReport(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "LOAD REPORT" not in str(record.msg)

    quiet = _SkippedBlocksReport()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(quiet)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    finally:
        logger.removeFilter(quiet)
    model.config.num_hidden_layers = total
    block = re.compile(r"\.layers\.(\d+)\.")
    others = [
        k for k in info.get("unexpected_keys", ()) if not ((m := block.search(k)) and int(m.group(1)) >= n_blocks)
    ]
    missing = list(info.get("missing_keys", ()))
    if missing or others or info.get("mismatched_keys"):
        raise ProbeError(
            f"model {path!r} built with its first {n_blocks} of {total} blocks does not match its checkpoint: "
            f"missing {missing[:5]}, unexpected {others[:5]}, mismatched {list(info.get('mismatched_keys', ()))[:5]}"
        )
    return model


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved with a model (local directory or hub name)."""
    from transformers import AutoTokenizer

    check_model_path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ProbeError(f"cannot load the tokenizer of {str(path)!r}: {err}") from err


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the token -> id map (added tokens included): equal iff ids mean the same strings.

    The chat template is not part of it: fine-tuned models often change it without changing ids.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def check_same_hidden_size(hidden_sizes: Mapping[str, int]) -> None:
    """Refuse models of different residual widths; ``hidden_sizes`` maps model name -> d."""
    (first, size), *others = hidden_sizes.items()
    for name, other in others:
        if other != size:
            raise ProbeError(
                f"models {first!r} (hidden size {size}) and {name!r} (hidden size {other}) have different "
                "hidden sizes; expected tuned versions of one base model"
            )


def check_same_tokenizer(tokenizers: Mapping[str, object]) -> None:
    """Refuse tokenizers that map ids to different strings; ``tokenizers`` maps model name -> tokenizer."""
    prints = {name: tokenizer_fingerprint(tok) for name, tok in tokenizers.items()}
    (first, fingerprint), *others = prints.items()
    for name, other in others:
        if other != fingerprint:
            a, b = tokenizers[first], tokenizers[name]
            raise ProbeError(
                f"models {first!r} and {name!r} have different tokenizers ({len(a)} vs {len(b)} tokens, "
                f"vocab fingerprint {fingerprint[:12]} vs {other[:12]}); paired capture needs identical token ids"
            )


def parse_model_specs(specs: list[str] | dict[str, str]) -> dict[str, str]:
    """``["base=PATH", "sft=PATH"]`` (the ``--model NAME=PATH`` form of every step config) -> ``{"base": "PATH", "sft": "PATH"}``.

    A mapping is returned as a dict of strings; names must be unique and non-empty.
    """
    if isinstance(specs, dict):
        return {str(name): str(path) for name, path in specs.items()}
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep or not name or not path:
            raise ProbeError(f"--model {spec!r}: expected NAME=PATH, e.g. --model base=Qwen/Qwen3-4B-Base")
        if name in models:
            raise ProbeError(f"--model name {name!r} is given twice")
        models[name] = path
    return models
