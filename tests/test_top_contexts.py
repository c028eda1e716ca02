"""Top-activating contexts: planted hits come back exactly, in order, with their windows; random data matches brute force."""

from __future__ import annotations

import pytest
import torch

from posttrain_probe.activations import ActivationStore, ActivationStoreWriter
from posttrain_probe.analysis.top_contexts import Context, render_tokens, top_contexts
from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder
from posttrain_probe.errors import ProbeError

D, LAYER = 16, 3


def _store(path, acts, token_ids, doc_ids, positions, *, shard_tokens=50, model="base"):
    with ActivationStoreWriter(
        path, layer=LAYER, d_model=D, model=model, dtype="float32", shard_tokens=shard_tokens
    ) as writer:
        for start in range(0, acts.shape[0], 23):  # writes of 23 tokens: shards cut inside documents
            part = slice(start, start + 23)
            writer.write(acts[part], token_ids[part], doc_ids[part], positions[part])
    return ActivationStore(path)


def _documents(n_docs: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids, positions of ``n_docs`` documents of 5..30 tokens, first position and ~10% of the rest dropped."""
    doc_ids, positions = [], []
    for doc in range(n_docs):
        length = int(torch.randint(5, 31, (), generator=generator))
        kept = [p for p in range(1, length) if torch.rand((), generator=generator) > 0.1]
        doc_ids += [doc * 7 + 100] * len(kept)  # ids not equal to row numbers
        positions += kept
    return torch.tensor(doc_ids), torch.tensor(positions)


def _crosscoder(W_enc: torch.Tensor, b_enc: torch.Tensor | None = None, names=("base",)) -> Crosscoder:
    """A ReLU crosscoder with encoder [N, D, F] as given (scales 1): feature j's code is relu(x . W_enc[m, :, j] + b_j)."""
    cc = Crosscoder(CrosscoderConfig(model_names=list(names), d_model=D, n_features=W_enc.shape[-1], layer=LAYER))
    with torch.no_grad():
        cc.W_enc.copy_(W_enc)
        if b_enc is not None:
            cc.b_enc.copy_(b_enc)
    return cc


def _brute_force(codes, token_ids, doc_ids, positions, features, k, window) -> dict[int, list[Context]]:
    """Reference: per feature, each document's best row (first on ties), top k by activation, windows by loops."""
    out = {}
    for column, feature in enumerate(features):
        best: dict[int, tuple[float, int]] = {}
        for row in range(codes.shape[0]):
            value, doc = float(codes[row, column]), int(doc_ids[row])
            if value > 0 and (doc not in best or value > best[doc][0]):
                best[doc] = (value, row)
        ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[1][1]))[:k]
        contexts = []
        for doc, (value, row) in ranked:
            position = int(positions[row])
            near = sorted(
                (int(positions[r]), int(token_ids[r]))
                for r in range(codes.shape[0])
                if int(doc_ids[r]) == doc and abs(int(positions[r]) - position) <= window
            )
            ids = tuple(t for _, t in near)
            contexts.append(Context(feature, value, doc, position, ids, [p for p, _ in near].index(position)))
        out[feature] = contexts
    return out


def _assert_same(got: dict[int, list[Context]], want: dict[int, list[Context]]) -> None:
    assert list(got) == list(want)
    for feature in want:
        assert len(got[feature]) == len(want[feature]), feature
        for a, b in zip(got[feature], want[feature]):
            assert (a.feature, a.doc_id, a.position, a.token_ids, a.highlight) == (
                b.feature,
                b.doc_id,
                b.position,
                b.token_ids,
                b.highlight,
            )
            assert a.activation == pytest.approx(b.activation, rel=1e-5)


def test_planted_contexts(tmp_path):
    generator = torch.Generator().manual_seed(0)
    doc_ids, positions = _documents(40, generator)
    n = doc_ids.shape[0]
    token_ids = torch.randint(6, 500, (n,), generator=generator)
    directions = torch.linalg.qr(torch.randn(D, D, generator=generator)).Q  # orthonormal columns
    planted_dirs, background = directions[:, :3], directions[:, 3:]
    acts = torch.randn(n, D - 3, generator=generator) @ background.T  # codes of every feature are 0 here
    rows_of = {(int(d), int(p)): r for r, (d, p) in enumerate(zip(doc_ids, positions))}
    docs = sorted({int(d) for d in doc_ids})

    def plant(feature: int, doc: int, index: int, magnitude: float) -> tuple[int, int]:
        """Add magnitude * direction of ``feature`` at the index-th kept token of ``doc``; returns (doc, position)."""
        doc_positions = positions[doc_ids == doc]
        position = int(doc_positions[index % len(doc_positions)])
        acts[rows_of[(doc, position)]] += magnitude * planted_dirs[:, feature]
        return doc, position

    # feature 0: seven documents, two hits in one of them (its best counts once): top 5 of them
    expected0 = [plant(0, docs[i], i % 4 + 1, m) for i, m in [(3, 9.0), (17, 8.0), (25, 7.0), (4, 6.0), (39, 5.0)]]
    assert plant(0, docs[17], -1, 7.5)[1] > expected0[1][1]  # a second, weaker hit in the document of 8.0, after it
    assert plant(0, docs[25], 0, 6.5)[1] < expected0[2][1]  # and one before the 7.0 of its document
    plant(0, docs[8], 1, 2.0)
    plant(0, docs[30], 0, 1.0)
    # feature 1: two documents only -> two contexts; a hit at a document's first and last kept token
    expected1 = [plant(1, docs[5], -1, 4.0), plant(1, docs[0], 0, 3.0)]
    # feature 2: never fires
    W_enc = torch.cat([planted_dirs, torch.zeros(D, 1)], dim=1)[None]  # [1, D, 4]; feature 3 dead too
    cc = _crosscoder(W_enc, b_enc=torch.full((4,), -1e-3))  # the bias cuts float round-off of the background
    store = _store(tmp_path / "store", acts, token_ids, doc_ids, positions)

    got = top_contexts(cc, store, [1, 0, 2], k=5, window=4, batch_size=37)
    # one token per batch: a document's hits meet in the running top-k, not within a batch
    _assert_same(top_contexts(cc, store, [1, 0, 2], k=5, window=4, batch_size=1), got)
    assert [(c.doc_id, c.position) for c in got[0]] == expected0
    assert [c.activation for c in got[0]] == pytest.approx([9.0, 8.0, 7.0, 6.0, 5.0], abs=2e-3)
    assert [(c.doc_id, c.position) for c in got[1]] == expected1
    assert got[2] == []
    for context in got[0] + got[1]:
        assert context.token_ids[context.highlight] == int(token_ids[rows_of[(context.doc_id, context.position)]])
        assert 1 <= len(context.token_ids) <= 9
    assert got[1][1].highlight == 0  # the document's first kept token: nothing to its left

    codes = cc.encode_source(acts, "base").detach()[:, [1, 0, 2]]
    _assert_same(got, _brute_force(codes, token_ids, doc_ids, positions, [1, 0, 2], k=5, window=4))
    # the same from a path, in one batch, and with another batch size
    _assert_same(top_contexts(cc, tmp_path / "store", [1, 0, 2], k=5, window=4, batch_size=10_000), got)


def test_random_codes_match_brute_force(tmp_path):
    """Dense random codes, documents interleaved in store order, two-model crosscoder read at one slot."""
    generator = torch.Generator().manual_seed(1)
    doc_ids, positions = _documents(30, generator)
    order = torch.randperm(doc_ids.shape[0], generator=generator)
    doc_ids, positions = doc_ids[order], positions[order]
    n = doc_ids.shape[0]
    token_ids = torch.randint(6, 500, (n,), generator=generator)
    acts = torch.randn(n, D, generator=generator)
    W_enc = torch.randn(2, D, 6, generator=generator)
    cc = _crosscoder(W_enc, b_enc=torch.full((6,), -1.0), names=("base", "tuned"))
    store = _store(tmp_path / "store", acts, token_ids, doc_ids, positions, model="tuned")
    features = [5, 0, 3]
    codes = cc.encode_source(acts, "tuned").detach()[:, features]
    want = _brute_force(codes, token_ids, doc_ids, positions, features, k=4, window=3)
    for batch_size in (1, 16, 1000):
        _assert_same(top_contexts(cc, store, features, k=4, window=3, batch_size=batch_size), want)  # slot from store
    other = top_contexts(cc, store, features, model_name="base", k=4, window=3)
    codes_base = cc.encode_source(acts, "base").detach()[:, features]
    _assert_same(other, _brute_force(codes_base, token_ids, doc_ids, positions, features, k=4, window=3))


def test_bad_inputs(tmp_path):
    generator = torch.Generator().manual_seed(2)
    doc_ids, positions = _documents(3, generator)
    n = doc_ids.shape[0]
    store = _store(tmp_path / "s", torch.randn(n, D), torch.zeros(n, dtype=torch.long), doc_ids, positions, model="x")
    cc = _crosscoder(torch.randn(2, D, 4), names=("base", "tuned"))
    with pytest.raises(ProbeError, match="pass model_name"):
        top_contexts(cc, store, [0])
    with pytest.raises(ProbeError, match="out of range"):
        top_contexts(cc, store, [4], model_name="base")
    with pytest.raises(ProbeError, match="not in this crosscoder"):
        top_contexts(cc, store, [0], model_name="rl")
    cc.config.layer = LAYER + 1
    with pytest.raises(ProbeError, match="layer"):
        top_contexts(cc, store, [0], model_name="base")
    assert top_contexts(_crosscoder(torch.randn(1, D, 4)), store, []) == {}


def test_render_tokens(tokenizer):
    text = "Hello world,\n\tthe cat sat."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    context = Context(feature=0, activation=1.0, doc_id=0, position=3, token_ids=tuple(ids), highlight=2)
    strings = render_tokens(tokenizer, context)
    assert len(strings) == len(ids)
    assert "".join(strings) == text.replace("\n", "\u21b5").replace("\t", "\u21e5")
    assert not any(marker in "".join(strings) for marker in ("\u0120", "\u010a"))
    bos = render_tokens(tokenizer, Context(0, 1.0, 0, 0, (1,), 0))
    assert bos == ["<|bos|>"]
