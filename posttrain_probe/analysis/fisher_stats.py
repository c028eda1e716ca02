"""Fisher statistics of per-source codes over reasoning and solution tokens (paper S eq. 1, eq. 14; docs/methods.md sec. 8).

The formulas: :func:`fisher_importance_ratio` (S eq. 1), :func:`magnitude_floor` and :func:`select_fisher_features`
(the selection), :func:`rho_statistic` (S eq. 14); and their accumulation over the tokens of a corpus
(:func:`segment_statistics` -> :class:`SegmentStats`): E_reasoning[f_j^2] and E_solution[f_j^2] as token-weighted
means over all segment tokens (the first position, special tokens and padding never count), accumulated in
float64 on the model's device. Code units: the crosscoder's per-source codes f^m (its normalised-input units).

Throughput: the corpus is tokenised once (:func:`packed_batches`) and its documents packed by length into
forwards of ``batch_size * seq_len`` tokens; a model's segment residuals can be carried from its selection pass to
its rho pass (:class:`SegmentResiduals`), so each model runs once over the corpus.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from posttrain_probe.analysis.reasonscore import ReasonScoreAccumulator
from posttrain_probe.analysis.segments import SegmentBatch, SegmentCorpus
from posttrain_probe.errors import ProbeError

EPSILON = 1e-8
"""Denominator floor of the importance ratio (paper S eq. 1)."""
DEFAULT_TOP_K = 50
DEFAULT_FLOOR_QUANTILE = 0.9
_ENCODE_TOKENS = 1024
_ENCODE_ELEMENTS = 1 << 22
_CPU_ENCODE_TOKENS = 32
_CPU_ENCODE_ELEMENTS = 1 << 18
_TOKENISE_DOCS = 64
"""Documents tokenised per call of :func:`~posttrain_probe.analysis.segments.segment_batches` when packing."""
RESIDUAL_BYTES = 1 << 30
"""Default budget of :class:`SegmentResiduals`: segment residuals kept between two passes of one model."""


def _encode_chunk(n_features: int, device: torch.device) -> int:
    """Tokens encoded at once by :func:`segment_statistics`: on an accelerator ``max(_ENCODE_TOKENS,
    _ENCODE_ELEMENTS // F)`` (few large kernels; bounds the [tokens, F] code tensors), on CPU ``max(_CPU_ENCODE_TOKENS,
    _CPU_ENCODE_ELEMENTS // F)``: [tokens, F] float32 blocks of about 1 MiB stay in cache (at F = 512 the encode and
    its statistics run 2.3x faster in 512-token chunks than in 8192-token ones)."""
    if device.type == "cpu":
        return max(_CPU_ENCODE_TOKENS, _CPU_ENCODE_ELEMENTS // n_features)
    return max(_ENCODE_TOKENS, _ENCODE_ELEMENTS // n_features)


# -- the formulas -------------------------------------------------------------------------------------


def fisher_importance_ratio(e_reasoning: torch.Tensor, e_solution: torch.Tensor, eps: float = EPSILON) -> torch.Tensor:
    """ImportanceRatio(j) = E_reasoning[f_j^2] / max(E_solution[f_j^2], eps) (paper S eq. 1, docs/methods.md sec. 8).

    Args:
        e_reasoning: ``[F]`` mean squared code of every feature over reasoning tokens (code units squared).
        e_solution: ``[F]`` the same over solution tokens.
        eps: floor of the denominator (paper: 1e-8).

    Returns:
        ``[F]`` float64, unitless (>= 0).
    """
    e_r = torch.as_tensor(e_reasoning, dtype=torch.float64)
    e_s = torch.as_tensor(e_solution, dtype=torch.float64, device=e_r.device)
    if e_r.ndim != 1 or e_s.shape != e_r.shape:
        raise ProbeError(f"e_reasoning {tuple(e_r.shape)} and e_solution {tuple(e_s.shape)} must both be [F]")
    if not eps > 0:
        raise ProbeError(f"eps must be > 0, got {eps!r}")
    return e_r / e_s.clamp_min(eps)


def magnitude_floor(e_reasoning: torch.Tensor, live: torch.Tensor, quantile: float = DEFAULT_FLOOR_QUANTILE) -> float:
    """The ``quantile`` of E_reasoning[f^2] over live features (default 0.9: the top decile starts here).

    ``e_reasoning`` ``[F]`` (code units squared), ``live`` ``[F]`` bool. Linear interpolation between order
    statistics (``torch.quantile``). Returns the floor in code units squared.
    """
    if not 0.0 <= quantile < 1.0:
        raise ProbeError(f"floor quantile must be in [0, 1), got {quantile!r} (0.9 = top decile)")
    values = torch.as_tensor(e_reasoning, dtype=torch.float64)[torch.as_tensor(live, dtype=torch.bool)]
    if values.numel() == 0:
        raise ProbeError("no live feature: no feature fired on any reasoning or solution token")
    return float(torch.quantile(values.cpu(), quantile))


@dataclass
class FisherSelection:
    """Result of :func:`select_fisher_features` (CPU tensors)."""

    features: list[int]
    """Selected features, best first (ratio descending; ties: larger E_r, then lower index)."""
    ratio: torch.Tensor
    """[F] float64 importance ratio of every feature."""
    live: torch.Tensor
    """[F] bool: fired on at least one reasoning or solution token."""
    candidates: torch.Tensor
    """[F] bool: live, E_r > 0 and E_r >= floor."""
    floor: float
    """Magnitude floor on E_r (code units squared)."""
    floor_quantile: float | None
    """Quantile the floor was taken at (None: given as an absolute value)."""
    k: int
    """Requested number of features."""


def select_fisher_features(
    e_reasoning: torch.Tensor,
    e_solution: torch.Tensor,
    live: torch.Tensor,
    *,
    k: int = DEFAULT_TOP_K,
    floor_quantile: float = DEFAULT_FLOOR_QUANTILE,
    floor: float | None = None,
    eps: float = EPSILON,
) -> FisherSelection:
    """Candidate reasoning features: high importance ratio **and** E_r above a magnitude floor (docs/methods.md sec. 8).

    Args:
        e_reasoning, e_solution: ``[F]`` E[f_j^2] over reasoning / solution tokens (code units squared).
        live: ``[F]`` bool, features that fired on some segment token.
        k: number of features returned (fewer if fewer candidates exist).
        floor_quantile: the floor is this quantile of E_r over live features (:func:`magnitude_floor`).
        floor: an absolute floor instead (code units squared); overrides ``floor_quantile``.
        eps: denominator floor of the ratio.

    Returns:
        :class:`FisherSelection`; ``features`` are the top-k candidates by ratio, best first.
    """
    e_r = torch.as_tensor(e_reasoning, dtype=torch.float64).cpu()
    e_s = torch.as_tensor(e_solution, dtype=torch.float64).cpu()
    live = torch.as_tensor(live, dtype=torch.bool).cpu()
    if live.shape != e_r.shape:
        raise ProbeError(f"live {tuple(live.shape)} must match e_reasoning {tuple(e_r.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ProbeError(f"k must be a positive number of features, got {k!r}")
    ratio = fisher_importance_ratio(e_r, e_s, eps)
    if floor is None:
        value, quantile = magnitude_floor(e_r, live, floor_quantile), float(floor_quantile)
    else:
        if not (math.isfinite(floor) and floor >= 0):
            raise ProbeError(f"floor must be a finite value >= 0 (code units squared), got {floor!r}")
        value, quantile = float(floor), None
    candidates = live & (e_r > 0) & (e_r >= value)
    index = torch.arange(e_r.numel())
    # rank by ratio desc, then E_r desc, then index asc: stable sorts from the last key to the first
    order = index[candidates]
    order = order[torch.sort(-e_r[order], stable=True).indices]
    order = order[torch.sort(-ratio[order], stable=True).indices]
    return FisherSelection([int(i) for i in order[:k]], ratio, live, candidates, value, quantile, k)


def rho_statistic(hits: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """rho(x) = (1/T) sum_t 1[exists j in S_reasoning: f_j(h_t) > 0] (paper S eq. 14, docs/methods.md sec. 8).

    Args:
        hits: ``[...]`` number of tokens of a segment of a sequence on which some selected feature fires.
        n_tokens: ``[...]`` T, the number of tokens of that segment.

    Returns:
        ``[...]`` float64 in [0, 1]; NaN where the segment has no tokens (the sequence has no such segment).
    """
    hits = torch.as_tensor(hits, dtype=torch.float64)
    n_tokens = torch.as_tensor(n_tokens, dtype=torch.float64, device=hits.device)
    return torch.where(n_tokens > 0, hits / n_tokens.clamp_min(1), torch.full_like(hits, math.nan))


# -- accumulation over tokens -------------------------------------------------------------------------


@dataclass
class SegmentStats:
    """Per-feature statistics of one model's per-source codes over the segment tokens (float64/int64, CPU)."""

    n_tokens: torch.Tensor
    """[2] tokens in the reasoning / solution segments."""
    sq_sum: torch.Tensor
    """[2, F] sum of f_j^2 over reasoning / solution tokens (code units squared)."""
    active: torch.Tensor | None
    """[2, F] int64 tokens with f_j > 0 per segment (None: not on disk, for a model other than the select model
    of a :meth:`FisherReport.read <posttrain_probe.analysis.fisher_report.FisherReport.read>`)."""
    doc_tokens: torch.Tensor
    """[n_docs, 2] int64 segment tokens per document (T of eq. 14)."""
    hits: torch.Tensor | None = None
    """[n_docs, 2] tokens with some selected feature active, per document and segment (when features were given)."""
    n_cut: int = 0
    """Documents whose segments were cut by ``seq_len``."""

    @property
    def mean_sq(self) -> torch.Tensor:
        """[2, F] E_reasoning[f^2], E_solution[f^2] (token-weighted; 0 for an empty segment)."""
        return self.sq_sum / self.n_tokens.clamp_min(1).double()[:, None]

    @property
    def frequency(self) -> torch.Tensor:
        """[2, F] fraction of reasoning / solution tokens with f_j > 0."""
        if self.active is None:
            raise ProbeError(
                "these statistics were read back without their active counts (only the select model's are on disk)"
            )
        return self.active.double() / self.n_tokens.clamp_min(1).double()[:, None]

    @property
    def live(self) -> torch.Tensor:
        """[F] bool: fired on at least one segment token."""
        if self.active is None:
            raise ProbeError(
                "these statistics were read back without their active counts (only the select model's are on disk)"
            )
        return self.active.sum(dim=0) > 0

    @property
    def rho(self) -> torch.Tensor:
        """[n_docs, 2] rho of every document's reasoning / solution segment (NaN: no such segment)."""
        if self.hits is None:
            raise ProbeError("rho needs the selected features: run segment_statistics with features=")
        return rho_statistic(self.hits, self.doc_tokens)


class PackedBatches(Sequence[SegmentBatch]):
    """The batches of :func:`packed_batches`: every document's tokens kept once, compactly (int32 ids, int8 labels,
    about 5 bytes a token), and a batch padded only when it is read (``batches[i]``, iteration)."""

    def __init__(self, rows: list[tuple[torch.Tensor, torch.Tensor, int]], groups: list[list[int]], pad_id: int):
        self._rows = rows  # per document: input ids [n] int32, segment labels [n] int8, cut (0/1)
        self._groups = groups  # per batch: its documents, longest first
        self._pad_id = pad_id

    def __len__(self) -> int:
        return len(self._groups)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        chosen = self._groups[index]
        width = max(1, len(self._rows[chosen[0]][0]))
        ids = torch.full((len(chosen), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        segments = torch.zeros((len(chosen), width), dtype=torch.int8)
        for row, i in enumerate(chosen):
            tokens, labels, _ = self._rows[i]
            ids[row, : len(tokens)], segments[row, : len(tokens)] = tokens, labels
            mask[row, : len(tokens)] = 1
        n_cut = sum(self._rows[i][2] for i in chosen)
        return SegmentBatch(ids, mask, segments, torch.as_tensor(chosen, dtype=torch.long), n_cut)


def packed_batches(corpus: SegmentCorpus, *, max_tokens: int | None = None) -> PackedBatches:
    """The documents of ``corpus`` tokenised once and packed by length into right-padded batches.

    Documents are tokenised and labelled by :func:`~posttrain_probe.analysis.segments.segment_batches` (truncated at
    ``corpus.seq_len``), then taken longest first and grouped so that a batch holds at most ``max_tokens`` tokens,
    padding included (default: ``corpus.batch_size`` times the longest document's tokens): shorter documents share a
    forward, and by default no forward is larger than one of ``batch_size`` of the corpus's longest documents (on a
    CPU, a 47 x 348-token forward costs 1.4x per token what a 4 x 348 one does; an accelerator may take
    ``batch_size * seq_len``). ``doc_ids`` keep each document's index in
    ``corpus.docs`` and ``n_cut`` counts the batch's cut documents, so the statistics do not depend on the grouping.
    """
    from posttrain_probe.analysis.segments import segment_batches

    def tokenised(docs) -> SegmentBatch:
        return next(iter(segment_batches(docs, corpus.tokenizer, seq_len=corpus.seq_len, batch_size=len(docs))))

    rows: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    for start in range(0, corpus.n_docs, _TOKENISE_DOCS):
        docs = corpus.docs[start : start + _TOKENISE_DOCS]
        batch = tokenised(docs)
        cut = [tokenised([doc]).n_cut for doc in docs] if batch.n_cut else [0] * len(docs)  # which ones were cut
        lengths = batch.attention_mask.sum(dim=1).tolist()
        ids = batch.input_ids.to(torch.int32)
        rows += [(ids[r, :n].clone(), batch.segments[r, :n].clone(), cut[r]) for r, n in enumerate(lengths)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # stable: ties keep the corpus order
    budget = (
        max_tokens if max_tokens is not None else corpus.batch_size * max(1, len(rows[order[0]][0]) if order else 1)
    )
    groups: list[list[int]] = []
    start = 0
    while start < len(order):
        width = max(1, len(rows[order[start]][0]))  # the group's longest document
        groups.append(order[start : start + max(1, budget // width)])
        start += len(groups[-1])
    pad_id = corpus.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = corpus.tokenizer.eos_token_id or 0
    return PackedBatches(rows, groups, pad_id)


class SegmentResiduals:
    """The residuals of one model's segment tokens, per batch, kept between passes over the same batches.

    A pass of :func:`segment_statistics` given this object reads the batches it holds instead of running the
    model, and stores the batches it runs while the stored tensors stay within ``max_bytes`` (a later pass then
    runs the model on the rest only). Tensors stay on the model's device. Only for passes of the **same** model,
    layer and batches (:func:`packed_batches`).
    """

    def __init__(self, max_bytes: int = RESIDUAL_BYTES):
        self.max_bytes = int(max_bytes)
        self.n_bytes = 0
        # batch index -> (x [n, d] raw residuals, segment labels [n] (1 or 2), document ids [n])
        self.batches: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Batch ``index``'s ``(x, segment labels, document ids)``, or None when not kept."""
        return self.batches.get(index)

    def put(self, index: int, x: torch.Tensor, seg: torch.Tensor, doc: torch.Tensor) -> None:
        """Keep batch ``index``'s segment tokens if they fit the budget."""
        size = sum(t.numel() * t.element_size() for t in (x, seg, doc))
        if index not in self.batches and self.n_bytes + size <= self.max_bytes:
            self.batches[index] = (x, seg, doc)
            self.n_bytes += size


@torch.no_grad()
def segment_statistics(
    model: nn.Module,
    crosscoder,
    branch: str | int,
    corpus: SegmentCorpus,
    *,
    layer: int,
    features: list[int] | None = None,
    reasonscore: ReasonScoreAccumulator | None = None,
    batches: Sequence[SegmentBatch] | None = None,
    residuals: SegmentResiduals | None = None,
    statistics: SegmentStats | None = None,
    progress: bool = False,
    desc: str = "fisher",
) -> SegmentStats:
    """Truncated forwards of ``model`` over the documents of ``corpus`` and the statistics of the branch's per-source codes.

    Kept tokens: real, not the first position, not a special token (``corpus.special_ids``). Per segment
    (reasoning, solution): token counts, sum f_j^2 and active counts, accumulated in float64/int64 on the model's
    device; with ``features`` (the selected set S) also per document the tokens on which some j in S fires (rho);
    with ``reasonscore``, its window statistics over **all** kept tokens. ``crosscoder`` must sit on the model's
    device; codes are ``crosscoder.encode_source(a, branch)`` of the raw residual ``a`` entering block ``layer``.

    The documents run in the batches of :func:`packed_batches` (``batches``: those of ``corpus`` made once for
    several passes; default: made here). ``residuals`` (:class:`SegmentResiduals`) carries this model's segment
    residuals from one pass to the next: a pass without ``reasonscore`` reads the batches it holds instead of
    running the model. ``statistics``: this model's statistics from an earlier pass over the same batches (its
    selection pass); then only rho's hits are computed, encoding the selected ``features`` alone (O(d |S|) per
    token instead of O(d F)), and returned with the other fields of ``statistics``.
    """
    from tqdm.auto import tqdm

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batches = packed_batches(corpus) if batches is None else batches
    n_features = crosscoder.config.n_features
    dtype = crosscoder.W_enc.dtype
    chunk = _encode_chunk(n_features, device)
    sq_sum = torch.zeros(2, n_features, dtype=torch.float64, device=device)
    active = torch.zeros(2, n_features, dtype=torch.int64, device=device)
    n_docs = corpus.n_docs
    doc_tokens = torch.zeros(n_docs, 2, dtype=torch.int64, device=device)
    selected = torch.as_tensor(list(features), dtype=torch.long, device=device) if features is not None else None
    hits = torch.zeros(n_docs, 2, dtype=torch.float64, device=device) if selected is not None else None
    special = torch.as_tensor(sorted(set(int(i) for i in corpus.special_ids)), dtype=torch.long, device=device)
    only_hits, encoder = statistics is not None, crosscoder
    if only_hits:
        if selected is None or reasonscore is not None:
            raise ProbeError("statistics= computes rho's hits only: pass features= and no reasonscore=")
        if selected.numel():  # the selected features' codes alone: restrict's encode_source = the full one's [:, S]
            encoder = crosscoder.restrict(list(features), dtype=dtype).to(device)
    segment_ids = torch.tensor([[1], [2]], device=device)
    work = None  # [chunk, F] float32 scratch of the full-width statistics
    n_cut = 0
    training = model.training
    model.eval()
    try:
        bar = tqdm(total=n_docs, desc=desc, unit="doc", disable=not progress)
        for index, batch in enumerate(batches):
            bar.update(batch.input_ids.shape[0])
            n_cut += batch.n_cut
            tokens = residuals.get(index) if residuals is not None and reasonscore is None else None
            words = None
            if tokens is None:
                tokens, words = _batch_tokens(model, batch, layer, special, reasonscore, device)
                if tokens is None:
                    continue
                if residuals is not None:
                    in_seg = tokens[1] > 0
                    residuals.put(index, *(t if reasonscore is None else t[in_seg] for t in tokens))
            x, seg_flat, doc_flat = tokens
            fired = []
            for start in range(0, x.shape[0], chunk):
                part = slice(start, start + chunk)
                if only_hits:
                    if selected.numel():
                        fired.append((encoder.encode_source(x[part].to(dtype), branch) > 0).any(dim=1))
                    continue
                codes = crosscoder.encode_source(x[part].to(dtype), branch)
                # [2, n] segment one-hot (reasoning, solution): per-segment sums as two matmuls, added in float64
                # per chunk (counts are exact in float32 below 2^24 tokens per chunk)
                one_hot, values = (seg_flat[part].unsqueeze(0) == segment_ids).float(), codes.float()
                # f^2 and the firing indicator written into one float32 buffer per pass (on CPU (values > 0).float()
                # makes a bool tensor and converts it, 10x slower at [512, 512]; a fresh [chunk, F] block per op
                # costs allocation and page faults)
                if work is None:
                    work = torch.empty(chunk, n_features, dtype=torch.float32, device=device)
                buffer = work[: values.shape[0]]
                sq_sum += (one_hot @ torch.mul(values, values, out=buffer)).double()
                active += (one_hot @ torch.gt(values, 0, out=buffer)).long()
                if selected is not None and selected.numel():
                    fired.append((codes[:, selected] > 0).any(dim=1))
                if reasonscore is not None:
                    reasonscore.update(codes, words[part])
            in_any = seg_flat > 0
            where = (doc_flat[in_any], seg_flat[in_any] - 1)
            doc_tokens.index_put_(where, torch.ones_like(where[0]), accumulate=True)
            if selected is not None and selected.numel():
                hits.index_put_(where, torch.cat(fired)[in_any].double(), accumulate=True)
        bar.close()
    finally:
        model.train(training)
    if only_hits:
        if not torch.equal(doc_tokens.cpu(), statistics.doc_tokens):
            raise ProbeError("statistics= must come from a pass over the same documents and batches")
        return replace(statistics, hits=hits.cpu())
    n_tokens = doc_tokens.sum(dim=0)
    return SegmentStats(
        n_tokens.cpu(), sq_sum.cpu(), active.cpu(), doc_tokens.cpu(), hits.cpu() if hits is not None else None, n_cut
    )


def _batch_tokens(model: nn.Module, batch: SegmentBatch, layer: int, special, reasonscore, device):
    """One truncated forward: ``((x [n, d], segment labels [n], document ids [n]), reasonscore word masks [n, G])``
    of the tokens counted (segment tokens; every kept token with ``reasonscore``), or ``(None, None)``."""
    from posttrain_probe.layers import truncated_forward

    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    keep = mask.bool() & (mask.cumsum(dim=1) > 1) & ~torch.isin(ids, special)
    seg = torch.where(keep, batch.segments.to(device).long(), 0)
    rows, cols = (keep if reasonscore is not None else seg > 0).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return None, None
    # rows are right-padded: under causal attention no real token sees a pad, so the model runs unmasked (HF
    # models then take their causal fast path instead of an explicit [B, 1, T, T] mask) and pads are dropped
    x = truncated_forward(model, ids, torch.ones_like(mask), [layer])[layer][rows, cols]
    words = reasonscore.masks(ids, keep)[rows, cols] if reasonscore is not None else None
    return (x, seg[rows, cols], batch.doc_ids.to(device)[rows]), words
