"""The batched accumulation of ``features fisher`` against a per-document reference (docs/methods.md sec. 8).

:func:`segment_statistics` packs documents of different lengths into right-padded forwards
(:func:`packed_batches`) and can carry a model's segment residuals from its selection pass to its rho pass
(:class:`SegmentResiduals`). Checked on a tiny Qwen3 model and a random crosscoder: every statistic (token counts,
sum f^2, active counts, per-document T and rho hits, the ReasonScore window means) equals a reference that runs
each document alone (one unpadded HF forward with ``output_hidden_states``, token by token), for several
packings, with documents cut by ``seq_len``; and the rho pass over carried residuals equals one that runs the
model again, without running it.
"""

from __future__ import annotations

import pytest
import torch

from posttrain_probe.analysis import fisher_stats
from posttrain_probe.analysis.fisher_config import SegmentFormat
from posttrain_probe.analysis.fisher_stats import (
    SegmentResiduals,
    packed_batches,
    segment_statistics,
)
from posttrain_probe.analysis.reasonscore import REASON_TOKENS, ReasonScoreAccumulator, reasoning_token_groups
from posttrain_probe.analysis.segments import SegmentCorpus, document_column, segment_batches, split_document
from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig
from posttrain_probe.errors import ProbeError
from posttrain_probe.synthetic import openthoughts_dataset
from posttrain_probe.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER, N_DOCS, N_FEATURES = 2, 7, 40
SELECTED = [1, 5, 8, 13, 21, 34]


@pytest.fixture(scope="module")
def setup():
    """A tiny model, a random crosscoder with codes of a useful size, and N_DOCS documents of different lengths."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen3", seed=3)
    cc = Crosscoder(CrosscoderConfig(model_names=["m"], d_model=64, n_features=N_FEATURES, layer=LAYER))
    cc.reset_parameters(torch.Generator().manual_seed(1))
    data = openthoughts_dataset(n=N_DOCS, seed=5)
    fmt = SegmentFormat()
    column = document_column(list(data.column_names), fmt)
    docs = [split_document(row, fmt, tokenizer, column=column) for row in data]
    with torch.no_grad():
        ids = tokenizer(docs[0].text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        h = model(ids, output_hidden_states=True).hidden_states[LAYER][0]
        cc.scales.fill_(8.0 / float(h.norm(dim=-1).mean()))
        cc.b_enc.fill_(-0.1)
    special = frozenset(tokenizer.all_special_ids) | {tokenizer.pad_token_id}
    return {"tokenizer": tokenizer, "model": model, "cc": cc, "docs": docs, "special": special}


def _corpus(setup, seq_len: int, batch_size: int) -> SegmentCorpus:
    return SegmentCorpus(setup["docs"], setup["tokenizer"], seq_len, batch_size, setup["special"])


def _accumulator(setup) -> ReasonScoreAccumulator:
    words, groups = reasoning_token_groups(setup["tokenizer"], REASON_TOKENS)
    return ReasonScoreAccumulator(words, groups, N_FEATURES, weights=setup["cc"].W_dec.detach()[:, 0].norm(dim=-1))


def _reference(setup, seq_len: int) -> dict:
    """Every statistic from one unpadded forward per document, accumulated token by token."""
    model, cc, special = setup["model"], setup["cc"], setup["special"]
    sq_sum = torch.zeros(2, N_FEATURES, dtype=torch.float64)
    active = torch.zeros(2, N_FEATURES, dtype=torch.int64)
    n_tokens = torch.zeros(2, dtype=torch.int64)
    doc_tokens = torch.zeros(N_DOCS, 2, dtype=torch.int64)
    hits = torch.zeros(N_DOCS, 2, dtype=torch.float64)
    reason, n_cut = _accumulator(setup), 0
    for d, doc in enumerate(setup["docs"]):
        (one,) = segment_batches([doc], setup["tokenizer"], seq_len=seq_len, batch_size=1)
        n_cut += one.n_cut
        ids, labels = one.input_ids, one.segments[0].long()
        with torch.no_grad():
            codes = cc.encode_source(model(ids, output_hidden_states=True).hidden_states[LAYER][0], 0)
        kept = [t for t in range(1, ids.shape[1]) if int(ids[0, t]) not in special]
        reason.update(codes[kept], reason.masks(ids)[0, kept])
        for t in kept:
            j = int(labels[t]) - 1
            if j < 0:
                continue
            sq_sum[j] += codes[t].double().square()
            active[j] += (codes[t] > 0).long()
            n_tokens[j] += 1
            doc_tokens[d, j] += 1
            hits[d, j] += float(bool((codes[t, SELECTED] > 0).any()))
    return {
        "sq_sum": sq_sum, "active": active, "n_tokens": n_tokens, "doc_tokens": doc_tokens, "hits": hits,
        "n_cut": n_cut, "reasonscore": reason.result(),
    }  # fmt: skip


def _check(stats, reason, ref) -> None:
    assert torch.equal(stats.n_tokens, ref["n_tokens"]) and torch.equal(stats.doc_tokens, ref["doc_tokens"])
    assert stats.n_cut == ref["n_cut"]
    torch.testing.assert_close(stats.sq_sum, ref["sq_sum"], rtol=1e-5, atol=1e-9)
    # a code exactly at the ReLU threshold may flip with float rounding between padded and unpadded forwards
    assert (stats.active - ref["active"]).abs().max() <= 1
    assert (stats.hits - ref["hits"]).abs().max() <= 1
    if reason is not None:
        want = ref["reasonscore"]
        assert reason.word_tokens == want.word_tokens and (reason.n_in, reason.n_out) == (want.n_in, want.n_out)
        torch.testing.assert_close(reason.mean_in, want.mean_in, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(reason.mean_out, want.mean_out, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(reason.word_means, want.word_means, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    ("seq_len", "batch_size", "chunk"), [(512, 1, None), (512, 3, None), (512, 3, 37), (4096, 4, None), (160, 2, 64)]
)
def test_packed_forwards_match_one_unpadded_forward_per_document(setup, seq_len, batch_size, chunk, monkeypatch):
    """Different packings (one document per forward up to all in one; 160: every document cut), encoded in one step
    per batch or in chunks of ``chunk`` tokens, give the reference."""
    if chunk is not None:
        monkeypatch.setattr(fisher_stats, "_encode_chunk", lambda n_features, device: chunk)
    corpus = _corpus(setup, seq_len, batch_size)
    batches = packed_batches(corpus)
    reason = _accumulator(setup)
    stats = segment_statistics(
        setup["model"], setup["cc"], 0, corpus, layer=LAYER, features=SELECTED, reasonscore=reason, batches=batches
    )
    ref = _reference(setup, seq_len)
    _check(stats, reason.result(), ref)
    if seq_len == 160:
        assert ref["n_cut"] == N_DOCS


@pytest.mark.parametrize("tokenise_docs", [64, 3])
@pytest.mark.parametrize("cut", [False, True])
def test_packing_keeps_every_document_once_within_the_token_budget(setup, tokenise_docs, cut, monkeypatch):
    """Tokenised in chunks of ``tokenise_docs`` documents; with ``cut``, seq_len cuts some documents but not all."""
    monkeypatch.setattr(fisher_stats, "_TOKENISE_DOCS", tokenise_docs)
    full = [int(b.attention_mask.sum()) for b in segment_batches(setup["docs"], setup["tokenizer"], batch_size=1)]
    seq_len, batch_size = (sorted(full)[N_DOCS // 2] if cut else 512), 3
    corpus = _corpus(setup, seq_len, batch_size)
    batches = packed_batches(corpus)
    alone = list(segment_batches(setup["docs"], setup["tokenizer"], seq_len=seq_len, batch_size=1))
    assert 0 < sum(b.n_cut for b in alone) < N_DOCS if cut else sum(b.n_cut for b in alone) == 0
    seen = torch.cat([b.doc_ids for b in batches]).tolist()
    assert sorted(seen) == list(range(N_DOCS))
    assert len(batches) < N_DOCS  # short documents share a forward
    longest = max(full)
    assert all(b.input_ids.numel() <= batch_size * min(longest, seq_len) for b in batches)
    wide = packed_batches(corpus, max_tokens=batch_size * 4096)  # an accelerator's budget: fewer, larger forwards
    assert len(wide) < len(batches) and sorted(torch.cat([b.doc_ids for b in wide]).tolist()) == list(range(N_DOCS))
    assert any(not b.attention_mask.all() for b in batches)  # ... with padding
    for batch in batches:
        assert batch.input_ids.numel() <= batch_size * max(int(alone[d].attention_mask.sum()) for d in range(N_DOCS))
        assert batch.n_cut == sum(alone[d].n_cut for d in batch.doc_ids.tolist())
        for row, d in enumerate(batch.doc_ids.tolist()):
            n = int(alone[d].attention_mask.sum())
            assert torch.equal(batch.input_ids[row, :n], alone[d].input_ids[0, :n])
            assert torch.equal(batch.segments[row, :n], alone[d].segments[0, :n])
            assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()  # right-padded


def _forward_counter(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("budget", [None, "one batch"])
def test_rho_pass_from_carried_residuals_equals_a_second_forward(setup, budget):
    """The selection pass (with ReasonScore) carries the segment residuals; the rho pass reads them (all of them,
    or those that fit the budget, running the model for the rest) and gives what a fresh pass gives."""
    model, cc = setup["model"], setup["cc"]
    corpus = _corpus(setup, 512, 3)
    batches = packed_batches(corpus)
    assert len(batches) >= 2
    residuals = SegmentResiduals()
    if budget is not None:
        first = segment_statistics(model, cc, 0, corpus, layer=LAYER, batches=batches[:1], residuals=SegmentResiduals())
        residuals = SegmentResiduals(max_bytes=int(first.n_tokens.sum()) * (64 * 4 + 16))
    selection = segment_statistics(
        model, cc, 0, corpus, layer=LAYER, reasonscore=_accumulator(setup), batches=batches, residuals=residuals
    )
    assert set(residuals.batches) == (set(range(len(batches))) if budget is None else {0})
    assert residuals.n_bytes <= residuals.max_bytes
    calls, handle = _forward_counter(model)
    try:
        carried = segment_statistics(
            model, cc, 0, corpus, layer=LAYER, features=SELECTED, batches=batches, residuals=residuals
        )
    finally:
        handle.remove()
    assert len(calls) == len(batches) - len(residuals.batches)
    fresh = segment_statistics(model, cc, 0, corpus, layer=LAYER, features=SELECTED, batches=batches)
    for name in ("n_tokens", "sq_sum", "active", "doc_tokens", "hits"):
        assert torch.equal(getattr(carried, name), getattr(fresh, name)), name
    assert carried.n_cut == fresh.n_cut == selection.n_cut
    # the selection pass's chunks also hold the tokens outside the segments: the same codes summed in float32 within
    # other chunks (BLAS kernels differ between CPUs, so the order of those sums is not fixed: a few float32 ulps)
    torch.testing.assert_close(selection.sq_sum, fresh.sq_sum, rtol=1e-6, atol=0)
    assert torch.equal(selection.active, fresh.active)


@pytest.mark.parametrize("activation", ["relu", "batchtopk", "relu-float64"])
def test_hits_only_pass_equals_the_full_rho_pass(setup, activation):
    """The select model's rho pass (``statistics=`` its selection pass) encodes the selected features alone and
    gives the hits of a full pass (every feature encoded), with the selection pass's other statistics; for a
    BatchTopK crosscoder too (the restricted encoder keeps the features' decoder norms and the threshold)."""
    model, cc = setup["model"], setup["cc"]
    if activation == "batchtopk":
        config = CrosscoderConfig(
            model_names=["m"], d_model=64, n_features=N_FEATURES, layer=LAYER, activation="batchtopk", k=4
        )
        topk = Crosscoder(config)
        topk.load_state_dict(cc.state_dict(), strict=False)
        topk.threshold.fill_(0.01)  # score f * ||d|| (decoder norms 0.08 here): codes above 0.125 count
        cc = topk
    if activation == "relu-float64":  # the restricted encoder keeps float64 weights: no rounding flips a code
        cc = Crosscoder(cc.config).double()
        cc.load_state_dict(setup["cc"].state_dict())
    corpus = _corpus(setup, 512, 3)
    batches = packed_batches(corpus)
    residuals = SegmentResiduals()
    first = segment_statistics(model, cc, 0, corpus, layer=LAYER, batches=batches, residuals=residuals)
    full = segment_statistics(model, cc, 0, corpus, layer=LAYER, features=SELECTED, batches=batches)
    only = segment_statistics(
        model, cc, 0, corpus, layer=LAYER, features=SELECTED, batches=batches, residuals=residuals, statistics=first
    )
    assert 0 < int(full.hits.sum()) < int(full.doc_tokens.sum())  # some selected feature fires, not everywhere
    assert torch.equal(only.hits, full.hits)
    assert only.sq_sum is first.sq_sum and only.active is first.active and torch.equal(only.doc_tokens, full.doc_tokens)
    with pytest.raises(ProbeError, match="pass features= and no reasonscore="):
        segment_statistics(model, cc, 0, corpus, layer=LAYER, batches=batches, statistics=first)
    with pytest.raises(ProbeError, match="same documents and batches"):
        segment_statistics(model, cc, 0, corpus, layer=LAYER, features=SELECTED, batches=batches[:1], statistics=first)


def test_restricted_encoder_is_the_full_one_bit_for_bit_in_its_own_dtype():
    """``Crosscoder.restrict(S, dtype=)`` gives ``encode_source(x)[:, S]`` exactly in the crosscoder's dtype; a float32
    copy of float64 weights rounds them, and a code at exactly 0 then fires (1/3 in float32 is above 1/3)."""
    cc = Crosscoder(CrosscoderConfig(model_names=["m"], d_model=4, n_features=6, layer=LAYER)).double()
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0, 0, :] = 1 / 3
        cc.b_enc.fill_(-1.0)
        cc.scales.fill_(1.0)
    x = torch.tensor([[3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    features = [1, 4]
    full = cc.encode_source(x, 0)[:, features]
    assert torch.equal(full, torch.zeros(1, 2, dtype=torch.float64))
    assert torch.equal(cc.restrict(features, dtype=torch.float64).encode_source(x, 0), full)
    assert (cc.restrict(features).double().encode_source(x, 0) > 0).all()  # the float32 copy: the rounding fires
