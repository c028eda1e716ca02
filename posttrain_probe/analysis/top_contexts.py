"""Top-activating contexts of crosscoder features on a probe set, for feature cards.

:func:`top_contexts` streams one model's activation store once, encodes every token with that
model's per-source code f^m of the selected features (:meth:`Crosscoder.encode_source`, via
:meth:`Crosscoder.restrict`) and keeps a running top-k per feature, at most one position per
document (its best). A second, cheap pass reads only the token tensors of the winning documents
to cut the windows of tokens around each hit. :func:`render_tokens` turns a window into
displayable strings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from posttrain_probe.activations.store import ActivationStore
from posttrain_probe.crosscoder.inspect import as_crosscoder
from posttrain_probe.errors import ProbeError

_NO_DOC = torch.iinfo(torch.int64).min
"""Document id of an empty top-k slot (its activation is -inf)."""


@dataclass(frozen=True)
class Context:
    """One top-activating token of a feature with the tokens around it."""

    feature: int
    """Feature index i in the crosscoder."""
    activation: float
    """Per-source code f^m_i at the token (crosscoder code units, > 0)."""
    doc_id: int
    """Document id of the token in the store."""
    position: int
    """Position of the token in its document (the store's ``positions``)."""
    token_ids: tuple[int, ...]
    """Token ids of the window: the store's tokens of this document within ±window positions, in position order."""
    highlight: int
    """Index into ``token_ids`` of the token the activation is at."""


def top_contexts(
    crosscoder,
    store: ActivationStore | str | os.PathLike,
    features: list[int],
    *,
    model_name: str | int | None = None,
    k: int = 5,
    window: int = 8,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
) -> dict[int, list[Context]]:
    """The ``k`` top-activating contexts of each feature in ``features`` on ``store``: {feature: [Context]}.

    ``store`` holds one model's activations at the crosscoder's layer; the code is that model's
    per-source code f^m = act(W_enc^m ã^m + b_enc) (docs/methods.md sec. 3; for a 1-model
    crosscoder the joint code). ``model_name`` picks the slot (default: the only slot, else the
    store's model name). A document contributes at most one context per feature, at its best
    position (the first in store order on ties); only tokens with f^m_i > 0 count, so a rarely
    firing feature can have fewer than ``k`` contexts. Lists are sorted by activation, highest first.

    One pass over the store in batches of ``batch_size`` tokens, with ``device`` for the encoder
    (default: the crosscoder's), plus one pass over the token ids of the winning documents.
    """
    crosscoder, _ = as_crosscoder(crosscoder)
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    features = [int(f) for f in features]
    if k < 1 or window < 0 or batch_size < 1:
        raise ProbeError(f"need k >= 1, window >= 0 and batch_size >= 1; got {k}, {window} and {batch_size}")
    bad = [f for f in features if not 0 <= f < crosscoder.config.n_features]
    if bad:
        raise ProbeError(f"features {bad[:5]} are out of range for a crosscoder of {crosscoder.config.n_features}")
    if len(set(features)) != len(features):
        raise ProbeError(f"features {features} contain duplicates; expected distinct feature indices")
    if store.d_model != crosscoder.config.d_model:
        raise ProbeError(
            f"store {store.path} has d_model {store.d_model}, the crosscoder expects {crosscoder.config.d_model}"
        )
    crosscoder.site(store.layer, what=f"the activation store {store.path}")
    slot = _slot(crosscoder, store, model_name)
    if not features:
        return {}

    device = torch.device(device) if device is not None else crosscoder.W_enc.device
    encoder = crosscoder.restrict(features).to(device)
    best = _TopK(k, len(features), device)
    row0 = 0
    for index in range(store.n_shards):
        shard = store.load_shard(index)
        acts, doc_ids = shard["acts"], shard["doc_ids"]
        for start in range(0, acts.shape[0], batch_size):
            x = acts[start : start + batch_size].to(device, torch.float32)
            with torch.no_grad():
                codes = encoder.encode_source(x, slot)
            best.update(codes, doc_ids[start : start + batch_size].to(device), row0 + start)
        row0 += acts.shape[0]

    values, docs, rows = (t.cpu() for t in best.result())
    windows = _windows(store, docs[torch.isfinite(values)].unique())
    contexts: dict[int, list[Context]] = {}
    for column, feature in enumerate(features):
        hits = [
            (float(v), int(r), int(d)) for v, r, d in zip(values[:, column], rows[:, column], docs[:, column]) if v > 0
        ]
        hits.sort(key=lambda hit: (-hit[0], hit[1]))
        contexts[feature] = [_context(feature, value, row, doc, windows[doc], window) for value, row, doc in hits]
    return contexts


def _slot(crosscoder, store: ActivationStore, model_name: str | int | None) -> int:
    """The crosscoder slot whose per-source code to read; refuses a store of another model when both are fingerprinted."""
    from posttrain_probe.model_identity import describe, mismatch, slot_fingerprint

    if model_name is not None:
        slot = crosscoder.model_index(model_name)
    elif crosscoder.n_models == 1:
        slot = 0
    elif store.model_name in crosscoder.model_names:
        slot = crosscoder.model_index(store.model_name)
    else:
        raise ProbeError(
            f"store {store.path} is of model {store.model_name!r}, not one of the crosscoder's {crosscoder.model_names}: "
            "pass model_name to say which slot's code to read"
        )
    recorded, have = slot_fingerprint(crosscoder, slot), store.manifest.model.get("fingerprint")
    if recorded is not None and have is not None and mismatch(have, recorded):
        raise ProbeError(
            f"store {store.path} holds activations of {describe(have)}, but crosscoder slot "
            f"{crosscoder.model_names[slot]!r} was trained on {describe(recorded)}"
        )
    return slot


class _TopK:
    """Running top-k per column of [batch, S] codes, at most one entry per document per column."""

    def __init__(self, k: int, n_columns: int, device: torch.device) -> None:
        self.values = torch.full((k, n_columns), float("-inf"), device=device)
        self.docs = torch.full((k, n_columns), _NO_DOC, dtype=torch.int64, device=device)
        self.rows = torch.full((k, n_columns), -1, dtype=torch.int64, device=device)

    def update(self, codes: torch.Tensor, doc_ids: torch.Tensor, row0: int) -> None:
        """Merge a batch: codes [B, S], doc_ids [B], its first token's row number ``row0`` in the store."""
        k = self.values.shape[0]
        # 1. each document's best token per column within the batch (the first row on ties)
        docs, inverse = doc_ids.unique(return_inverse=True)
        best = codes.new_full((docs.shape[0], codes.shape[1]), float("-inf"))
        best.scatter_reduce_(0, inverse[:, None].expand_as(codes), codes, reduce="amax")
        batch_rows = torch.arange(codes.shape[0], device=codes.device)[:, None].expand_as(codes)
        at_best = torch.where(codes == best[inverse], batch_rows, codes.shape[0])
        first = torch.full_like(best, codes.shape[0], dtype=torch.int64)
        first.scatter_reduce_(0, inverse[:, None].expand_as(codes), at_best, reduce="amin")
        # 2. the batch's top k documents per column (documents are distinct within a column here)
        top = best.topk(min(k, best.shape[0]), dim=0)
        new_values = top.values
        new_docs = docs[top.indices]
        new_rows = first.gather(0, top.indices) + row0
        # 3. a document already kept keeps only its better entry (the earlier one on ties)
        same = self.docs[:, None, :] == new_docs[None, :, :]  # [k_old, k_new, S]
        inf = new_values.new_tensor(float("-inf"))
        old_of_new = torch.where(same, self.values[:, None, :], inf).amax(0)
        new_of_old = torch.where(same, new_values[None, :, :], inf).amax(1)
        new_values = torch.where(same.any(0) & (old_of_new >= new_values), inf, new_values)
        old_values = torch.where(same.any(1) & (new_of_old > self.values), inf, self.values)
        # 4. top k of old + new
        values = torch.cat([old_values, new_values])
        keep = values.topk(k, dim=0).indices
        self.values = values.gather(0, keep)
        self.docs = torch.cat([self.docs, new_docs]).gather(0, keep)
        self.rows = torch.cat([self.rows, new_rows]).gather(0, keep)
        self.docs = torch.where(torch.isfinite(self.values), self.docs, _NO_DOC)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, doc ids, store rows), each [k, S]; empty slots have value -inf."""
        return self.values, self.docs, self.rows


def _windows(store: ActivationStore, docs: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """For each document in ``docs``, its tokens in the store: {doc: {"rows", "positions", "token_ids"}}."""
    from safetensors import safe_open

    parts = []
    row0 = 0
    for shard in store.manifest.shards:  # token tensors only; load_shard of pass one checked the sha256
        with safe_open(str(store.path / shard["file"]), framework="pt") as handle:
            doc_ids = handle.get_tensor("doc_ids")
            mask = torch.isin(doc_ids, docs)
            if mask.any():
                rows = mask.nonzero().squeeze(1)
                parts.append(
                    (
                        rows + row0,
                        doc_ids[rows],
                        handle.get_tensor("positions")[rows].long(),
                        handle.get_tensor("token_ids")[rows].long(),
                    )
                )
        row0 += int(shard["n_tokens"])
    if not parts:
        return {}
    rows, doc_ids, positions, token_ids = (torch.cat(p) for p in zip(*parts))
    out = {}
    for doc in docs.tolist():
        mine = (doc_ids == doc).nonzero().squeeze(1)
        order = positions[mine].argsort(stable=True)
        mine = mine[order]
        out[doc] = {"rows": rows[mine], "positions": positions[mine], "token_ids": token_ids[mine]}
    return out


def _context(feature: int, value: float, row: int, doc: int, tokens: dict[str, torch.Tensor], window: int) -> Context:
    """The Context of the token at store row ``row`` of document ``doc``."""
    at = int((tokens["rows"] == row).nonzero()[0, 0])
    position = int(tokens["positions"][at])
    near = (tokens["positions"] - position).abs() <= window
    return Context(
        feature=feature,
        activation=value,
        doc_id=doc,
        position=position,
        token_ids=tuple(tokens["token_ids"][near].tolist()),
        highlight=int(near[:at].sum()),
    )


_SENTENCEPIECE_SPACE = "▁"


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character a byte-level BPE token uses for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_decoder()


def _readable(token: str) -> str:
    """One token as text: byte-level BPE ('Ġ' = space, 'Ċ' = newline) decoded, SentencePiece '▁' as a space,
    byte tokens '<0x0A>' decoded; a token whose bytes are not valid UTF-8 on their own keeps its spelling."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)]).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return token
    if _SENTENCEPIECE_SPACE not in token and all(char in _BYTE_LEVEL for char in token):
        try:
            return bytes(_BYTE_LEVEL[char] for char in token).decode("utf-8")
        except UnicodeDecodeError:
            pass  # part of a multi-byte character, or not a byte-level vocabulary
    return token.replace(_SENTENCEPIECE_SPACE, " ")


def render_tokens(tokenizer, context: Context) -> list[str]:
    """Displayable strings of ``context.token_ids``, one per token (``context.highlight`` indexes the same list).

    ``tokenizer.convert_ids_to_tokens`` made readable: byte-level BPE tokens decoded ('Ġ' becomes a space),
    SentencePiece '▁' a space, byte tokens like '<0x0A>' decoded; then a newline is shown as '↵', a tab
    as '⇥', and an empty token as '∅'. Leading spaces are kept: display with ``white-space: pre``.
    Callers escape the strings for their output format.
    """
    strings = []
    for token in tokenizer.convert_ids_to_tokens(list(context.token_ids)):
        text = _readable(str(token) if token is not None else "")
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "↵").replace("\t", "⇥")
        strings.append(text or "∅")
    return strings
