"""lm-eval's prompts as the model sees them: the context token ids of lm-eval's ``HFLM``
(:func:`lm_eval_context_ids`) and the residual stream at the last prompt token of a batch of prompts
(:func:`last_prompt_activations`, truncated forwards over padded batches: :func:`pad_batch`,
:func:`last_token_positions`). Used by ``features generalization`` (docs/methods.md sec. 6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from posttrain_probe.errors import ProbeError

OUTPUT_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling", "generate_until")
"""lm-eval task output types; they decide how the context is tokenised (:func:`lm_eval_context_ids`)."""


def lm_eval_context_ids(
    tokenizer,
    context: str,
    *,
    output_type: str = "loglikelihood",
    add_bos_token: bool | None = None,
    prefix_token_id: int | None = None,
) -> list[int]:
    """Token ids lm-eval's ``HFLM`` (causal models) feeds the model for ``context`` (lm-eval 0.4.x).

    - ``loglikelihood`` / ``multiple_choice``: ``LM._encode_pair`` moves trailing whitespace of the
      context to the continuation, then ``HFLM.tok_encode``: ``add_special_tokens`` = ``add_bos_token``
      when given (HFLM's model_arg, default None: the tokenizer's own default), but False when the text
      already starts with the decoded prefix token (``prefix_token_id``, default BOS, else EOS). An
      empty context becomes ``[prefix_token_id]``.
    - ``generate_until``: ``HFLM.tok_batch_encode``: the context as is; ``add_special_tokens`` False
      when it starts with the tokenizer's BOS string, else ``add_bos_token`` when given.
    - ``loglikelihood_rolling`` has no prompt; it is refused.

    Returns the ids (no truncation: lm-eval left-truncates only contexts longer than its max_length).
    """
    if output_type not in OUTPUT_TYPES or output_type == "loglikelihood_rolling":
        raise ProbeError(
            f"output_type {output_type!r}: expected one of loglikelihood, multiple_choice, generate_until (a task with a prompt)"
        )
    if prefix_token_id is None:
        prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {} if add_bos_token is None else {"add_special_tokens": bool(add_bos_token)}
    if output_type == "generate_until":
        bos = getattr(tokenizer, "bos_token", None)
        if bos is not None and context.startswith(bos):
            kwargs = {"add_special_tokens": False}
        return list(tokenizer(context, **kwargs)["input_ids"])
    if context == "":
        if prefix_token_id is None:
            raise ProbeError("an empty context needs a prefix token, but the tokenizer has neither BOS nor EOS")
        return [int(prefix_token_id)]
    context = context.rstrip()
    if prefix_token_id is not None and context.startswith(tokenizer.decode(prefix_token_id)):
        kwargs = {"add_special_tokens": False}
    return list(tokenizer.encode(context, **kwargs))


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of every row of a padded batch, left or right padding alike.

    Args:
        attention_mask: ``[B, T]`` (1/True = real token, 0 = padding).

    Returns:
        ``[B]`` int64 positions in [0, T). Rows without a real token are refused.
    """
    mask = torch.as_tensor(attention_mask).bool()
    if mask.ndim != 2:
        raise ProbeError(f"attention_mask has shape {tuple(mask.shape)}; expected [batch, seq]")
    if not mask.any(dim=1).all():
        raise ProbeError("a row of the attention mask has no real token; expected at least one per row")
    return mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)


def pad_batch(
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    padding_side: str = "right",
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token id lists into ``input_ids``, ``attention_mask`` and ``position_ids``, each ``[B, T]`` int64.

    ``position_ids`` count real tokens from 0 in each row (0 on padding), so a left-padded row sees
    the same positions as it would unpadded.
    """
    if padding_side not in ("left", "right"):
        raise ProbeError(f"padding_side {padding_side!r}: expected 'left' or 'right'")
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ProbeError("cannot pad an empty batch or an empty sequence")
    rows = [torch.as_tensor(list(s), dtype=torch.long) for s in sequences]
    ones = [torch.ones_like(r) for r in rows]
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side=padding_side)
    mask = torch.nn.utils.rnn.pad_sequence(ones, batch_first=True, padding_value=0, padding_side=padding_side)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0) * mask
    return input_ids.to(device), mask.to(device), positions.to(device)


@torch.no_grad()
def last_prompt_activations(
    model: nn.Module,
    token_ids: Sequence[Sequence[int]],
    layer: int,
    *,
    batch_size: int = 8,
    padding_side: str = "right",
    pad_id: int = 0,
    progress: bool | str = False,
) -> torch.Tensor:
    """Residual stream at site ``layer`` (docs/methods.md sec. 1) at the last token of every prompt.

    Truncated forwards (no block >= ``layer`` runs) over batches of ``batch_size`` prompts, sorted by
    length to keep padding small, padded on ``padding_side`` with explicit ``position_ids``; the last
    real token of each row is found from the attention mask.

    Args:
        model: HF causal LM (on its device; its dtype is kept).
        token_ids: n prompts as token id lists (e.g. :func:`lm_eval_context_ids`).
        progress: show a progress bar (a string is its description).

    Returns:
        ``[n, d]`` float32 on the CPU, raw model units, in the order of ``token_ids``.
    """
    from posttrain_probe.layers import truncated_forward

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ProbeError(f"batch_size={batch_size!r}: expected a positive int (prompts per forward)")
    device = next(model.parameters()).device
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
    from tqdm.auto import tqdm

    out: torch.Tensor | None = None
    starts = range(0, len(order), batch_size)
    for start in tqdm(
        starts, desc=progress if isinstance(progress, str) else "prompts", unit="batch", disable=not progress
    ):
        rows = order[start : start + batch_size]
        input_ids, mask, positions = pad_batch(
            [token_ids[i] for i in rows], pad_id=pad_id, padding_side=padding_side, device=device
        )
        hidden = truncated_forward(model, input_ids, mask, [layer], position_ids=positions)[layer]
        last = last_token_positions(mask)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float().cpu()
        if out is None:
            out = torch.empty(len(token_ids), picked.shape[1], dtype=torch.float32)
        out[torch.as_tensor(rows)] = picked
    if out is None:
        raise ProbeError("no prompts: expected at least one")
    return out
