"""Splitting texts into reasoning and solution token segments (paper S; docs/methods.md sec. 8).

A document's reasoning and solution segments are marked by OpenThoughts tags (``<|begin_of_thought|>`` ...
``<|end_of_thought|>``, ``<|begin_of_solution|>`` ... ``<|end_of_solution|>``), by a user-given delimiter pair per
segment, or come from a reasoning column + a solution column joined into one text (:class:`~posttrain_probe.analysis.fisher_config.SegmentFormat`).
Character spans are found in the text as the model sees it (chat-template rendering included;
:func:`split_document`) and mapped to tokens through the tokenizer's offset mapping (:func:`token_segments`), so
any fast tokenizer works. A token is in a segment when it overlaps the segment's text (surrounding whitespace
trimmed) and overlaps neither a tag nor the other segment: **tag tokens are excluded**, also tokens that merge a
tag with a neighbouring character. :func:`segment_batches` tokenises documents into model inputs with token labels
(1 reasoning, 2 solution, 0 neither). Used by :mod:`posttrain_probe.analysis.fisher`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from posttrain_probe.analysis.fisher_config import SegmentFormat
from posttrain_probe.errors import ProbeError

SEGMENTS = ("reasoning", "solution")
"""Segment names; token labels are 1 (reasoning) and 2 (solution), 0 elsewhere."""
CHAT_COLUMNS = ("conversations", "messages")
"""Columns tried first (chat turns) before the text columns of :data:`posttrain_probe.data.TEXT_COLUMNS`."""
_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "system": "system",
}

__all__ = [
    "CHAT_COLUMNS",
    "SEGMENTS",
    "SegmentBatch",
    "SegmentCorpus",
    "Segments",
    "document_column",
    "find_delimited",
    "segment_batches",
    "split_document",
    "token_segments",
]


class Segments(NamedTuple):
    """One document as the model sees it, with its segments as character spans ``[start, end)``."""

    text: str
    """The text tokenised (chat turns rendered with the tokenizer's chat template)."""
    reasoning: list[tuple[int, int]]
    """Reasoning spans (tags and surrounding whitespace excluded)."""
    solution: list[tuple[int, int]]
    """Solution spans."""
    tags: list[tuple[int, int]]
    """Delimiter spans: tokens overlapping them are in no segment."""
    add_special_tokens: bool
    """Tokenise with the tokenizer's special tokens (plain text) or without (chat-template output)."""


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def find_delimited(
    text: str, begin: str, end: str, start: int = 0, stop: int | None = None
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Every ``begin ... end`` block of ``text[start:stop]``: (content spans, tag spans), as character offsets.

    Content spans exclude the tags and surrounding whitespace (empty contents are dropped). ``end == ""`` or a
    missing end tag (a truncated trace) lets the content run to ``stop``. ``begin`` must not be empty.
    """
    if not begin:
        raise ProbeError("the begin delimiter of a segment must not be empty")
    stop = len(text) if stop is None else stop
    contents: list[tuple[int, int]] = []
    tags: list[tuple[int, int]] = []
    pos = start
    while pos < stop:
        b = text.find(begin, pos, stop)
        if b < 0:
            break
        content_start = b + len(begin)
        tags.append((b, content_start))
        e = text.find(end, content_start, stop) if end else -1
        if e < 0:
            content_end, pos = stop, stop
        else:
            content_end, pos = e, e + len(end)
            tags.append((e, pos))
        span = _trim(text, content_start, content_end)
        if span[0] < span[1]:
            contents.append(span)
    return contents, tags


def _chat_messages(value: list) -> list[dict[str, str]]:
    messages = []
    for turn in value:
        if not isinstance(turn, Mapping):
            raise ProbeError(f"chat turn {turn!r}: expected a mapping with role/content or from/value")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise ProbeError(
                f"chat turn {dict(turn)!r}: expected string role/content (or from/value, as OpenThoughts has)"
            )
        messages.append({"role": _ROLES.get(role.lower(), role), "content": content})
    return messages


def _render_chat(messages: list[dict[str, str]], tokenizer) -> tuple[str, list[tuple[int, int]], bool]:
    """Text of the conversation and the character regions of the assistant turns in it."""
    template = bool(getattr(tokenizer, "chat_template", None))
    text = (
        tokenizer.apply_chat_template(messages, tokenize=False)
        if template
        else "\n".join(m["content"] for m in messages)
    )
    regions: list[tuple[int, int]] = []
    pos = 0
    for i, message in enumerate(messages):
        found = text.find(message["content"], pos) if message["content"] else -1
        if found < 0:  # the template changed the content: the turn runs to where the next one starts
            if message["role"] == "assistant":
                nxt = [text.find(m["content"], pos) for m in messages[i + 1 :] if m["content"]]
                nxt = [n for n in nxt if n >= 0]
                regions.append((pos, min(nxt) if nxt else len(text)))
            continue
        if message["role"] == "assistant":
            regions.append((found, found + len(message["content"])))
        pos = found + len(message["content"])
    return text, regions, not template


def document_column(names: Sequence[str], fmt: SegmentFormat) -> str:
    """The dataset column holding the documents (openthoughts/delimiters formats).

    ``fmt.column`` when given (it must be among ``names``), else the first of ``names`` among
    :data:`CHAT_COLUMNS` then :data:`posttrain_probe.data.TEXT_COLUMNS`.
    """
    from posttrain_probe.data import TEXT_COLUMNS

    if fmt.column is not None:
        if fmt.column not in names:
            raise ProbeError(f"column {fmt.column!r} is not in the dataset: expected one of {list(names)}")
        return fmt.column
    for candidate in (*CHAT_COLUMNS, *TEXT_COLUMNS):
        if candidate in names:
            return candidate
    raise ProbeError(
        f"no chat or text column found among {list(names)}: pass --column (expected one of {[*CHAT_COLUMNS, *TEXT_COLUMNS]})"
    )


def split_document(row: Mapping[str, Any], fmt: SegmentFormat, tokenizer, *, column: str | None = None) -> Segments:
    """The text of one dataset row and its reasoning/solution character spans (module docstring).

    - ``openthoughts`` / ``delimiters``: the row's chat column (``conversations`` with ``from``/``value`` turns, as
      OpenThoughts-114k stores them, or ``messages`` with ``role``/``content``) is rendered with the tokenizer's
      chat template and the tags are searched in the **assistant turns only** (the OpenThoughts system prompt
      itself mentions the tags); a plain text column is searched whole.
    - ``columns``: ``[prompt + sep] + reasoning + sep + solution`` as one plain text.

    ``column``: the chat/text column (default: :class:`SegmentFormat` ``.column`` or the first present of
    conversations, messages, text, ...).
    """
    if fmt.format == "columns":
        parts: list[tuple[str, int]] = []
        if fmt.prompt_column:
            parts.append((_string_cell(row, fmt.prompt_column), 0))
        parts.append((_string_cell(row, fmt.reasoning_column), 1))
        parts.append((_string_cell(row, fmt.solution_column), 2))
        text, spans = "", {1: [], 2: []}
        for j, (part, kind) in enumerate(parts):
            if j:
                text += fmt.separator
            start = len(text)
            text += part
            if kind:
                span = _trim(text, start, len(text))
                if span[0] < span[1]:
                    spans[kind].append(span)
        return Segments(text, spans[1], spans[2], [], True)
    name = column or document_column(list(row.keys()), fmt)
    if name not in row:
        raise ProbeError(f"column {name!r} is not in the dataset row: expected one of {list(row.keys())}")
    value = row[name]
    if isinstance(value, str):
        text, regions, specials = value, [(0, len(value))], True
    elif isinstance(value, list):
        text, regions, specials = _render_chat(_chat_messages(value), tokenizer)
    else:
        raise ProbeError(f"column {name!r} holds a {type(value).__name__}: expected text or a list of chat turns")
    (r_begin, r_end), (s_begin, s_end) = fmt.delimiters
    reasoning, solution, tags = [], [], []
    for start, stop in regions:
        contents, found = find_delimited(text, r_begin, r_end, start, stop)
        reasoning += contents
        tags += found
        contents, found = find_delimited(text, s_begin, s_end, start, stop)
        solution += contents
        tags += found
    return Segments(text, reasoning, solution, tags, specials)


def _string_cell(row: Mapping[str, Any], name: str | None) -> str:
    if name not in row:
        raise ProbeError(f"column {name!r} is not in the dataset: expected one of {list(row.keys())}")
    value = row[name]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProbeError(f"column {name!r} holds a {type(value).__name__}: expected text")
    return value


def token_segments(offsets: torch.Tensor, docs: Sequence[Segments]) -> torch.Tensor:
    """Segment label of every token: 1 reasoning, 2 solution, 0 neither (module docstring).

    Args:
        offsets: ``[B, T, 2]`` int64 character offsets ``[start, end)`` of each token in its document's text
            (the tokenizer's offset mapping; ``(0, 0)`` for special tokens and padding).
        docs: the B documents' :class:`Segments`.

    Returns:
        ``[B, T]`` int8. A token gets a segment when it overlaps that segment's text and overlaps no tag and no
        text of the other segment; empty tokens (special, padding) get 0.
    """
    if offsets.ndim != 3 or offsets.shape[2] != 2 or offsets.shape[0] != len(docs):
        raise ProbeError(f"offsets must be [B, T, 2] for {len(docs)} documents, got {tuple(offsets.shape)}")
    n_spans = max(1, max((len(d.reasoning) + len(d.solution) + len(d.tags) for d in docs), default=0))
    spans = torch.zeros(len(docs), n_spans, 2, dtype=torch.long)
    kinds = torch.full((len(docs), n_spans), -1, dtype=torch.long)
    for b, doc in enumerate(docs):
        items = [(s, 1) for s in doc.reasoning] + [(s, 2) for s in doc.solution] + [(s, 0) for s in doc.tags]
        if items:
            spans[b, : len(items)] = torch.tensor([s for s, _ in items], dtype=torch.long)
            kinds[b, : len(items)] = torch.tensor([k for _, k in items], dtype=torch.long)
    tok_start, tok_end = offsets[..., 0:1], offsets[..., 1:2]  # [B, T, 1]
    overlap = (tok_start < spans[:, None, :, 1]) & (tok_end > spans[:, None, :, 0]) & (tok_end > tok_start)  # [B, T, S]
    hit = {k: (overlap & (kinds == k)[:, None, :]).any(dim=2) for k in (0, 1, 2)}
    labels = torch.zeros(offsets.shape[:2], dtype=torch.int8)
    labels[hit[1] & ~hit[2] & ~hit[0]] = 1
    labels[hit[2] & ~hit[1] & ~hit[0]] = 2
    return labels


class SegmentBatch(NamedTuple):
    """One batch of documents as model inputs, with token segment labels."""

    input_ids: torch.Tensor
    """[B, T] int64, right-padded."""
    attention_mask: torch.Tensor
    """[B, T] int64."""
    segments: torch.Tensor
    """[B, T] int8: 1 reasoning, 2 solution, 0 neither (:func:`token_segments`)."""
    doc_ids: torch.Tensor
    """[B] int64 index of the document in the dataset."""
    n_cut: int
    """Documents of the batch whose reasoning or solution text runs past the last kept token (``seq_len``)."""


def segment_batches(
    docs: Sequence[Segments], tokenizer, *, seq_len: int = 4096, batch_size: int = 4
) -> Iterator[SegmentBatch]:
    """Tokenise :class:`Segments` documents into :class:`SegmentBatch` es (truncated at ``seq_len`` tokens)."""
    if seq_len < 2:
        raise ProbeError(f"seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ProbeError(f"batch_size must be >= 1, got {batch_size}")
    if not getattr(tokenizer, "is_fast", False):
        raise ProbeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: segment spans need its offset mapping (use a tokenizers-backed tokenizer)"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        encoded: list[Any] = [None] * len(chunk)
        for special in {doc.add_special_tokens for doc in chunk}:  # one tokenizer call per flag value
            rows = [row for row, doc in enumerate(chunk) if doc.add_special_tokens == special]
            found = tokenizer(
                [chunk[row].text for row in rows],
                truncation=True,
                max_length=seq_len,
                add_special_tokens=special,
                return_offsets_mapping=True,
            )
            for i, row in enumerate(rows):
                encoded[row] = {key: found[key][i] for key in ("input_ids", "offset_mapping")}
        width = max(1, max(len(e["input_ids"]) for e in encoded))
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        offsets = torch.zeros((len(chunk), width, 2), dtype=torch.long)
        n_cut = 0
        for row, (doc, enc) in enumerate(zip(chunk, encoded)):
            n = len(enc["input_ids"])
            # through numpy: torch.tensor of a list of n (start, end) tuples costs 3.5x more
            input_ids[row, :n] = torch.from_numpy(np.array(enc["input_ids"], dtype=np.int64))
            attention_mask[row, :n] = 1
            if n:
                flat = np.fromiter(itertools.chain.from_iterable(enc["offset_mapping"]), dtype=np.int64, count=2 * n)
                offsets[row, :n] = torch.from_numpy(flat.reshape(n, 2))
            last = int(offsets[row, :n, 1].max()) if n else 0
            n_cut += any(end > last for _, end in doc.reasoning + doc.solution)
        yield SegmentBatch(
            input_ids, attention_mask, token_segments(offsets, chunk), torch.arange(start, start + len(chunk)), n_cut
        )


class SegmentCorpus(NamedTuple):
    """The documents of a Fisher run as model inputs: every pass over them tokenises them the same way."""

    docs: Sequence[Segments]
    """The documents (:func:`split_document`)."""
    tokenizer: Any
    """The fast tokenizer all models share."""
    seq_len: int
    """Tokens per document (longer ones are truncated)."""
    batch_size: int
    """Documents per forward."""
    special_ids: frozenset[int]
    """Token ids that never count (the tokenizer's special tokens and padding)."""

    @property
    def n_docs(self) -> int:
        """Documents in the corpus."""
        return len(self.docs)

    def batches(self) -> Iterator[SegmentBatch]:
        """:func:`segment_batches` of the documents."""
        return segment_batches(self.docs, self.tokenizer, seq_len=self.seq_len, batch_size=self.batch_size)
