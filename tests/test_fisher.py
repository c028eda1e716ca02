"""Fisher reasoning features (paper S eq. 1, B.1; docs/methods.md sec. 8) and the ReasonScore baseline (Galichin et al. 2025).

docs/methods.md sec. 8 gives no worked value for the Fisher ratio, so the formula is checked on a hand example (exact
ratio, the 1e-8 denominator floor, a tiny high-ratio feature removed by the magnitude floor). Segment splitting
runs on the real tiny BPE tokenizer (offset mapping), ReasonScore against a straightforward loop implementation,
and the command end to end on a tiny base/tuned pair with a random crosscoder, checked against an independent
recomputation from full HF forwards (``output_hidden_states``).
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from posttrain_probe.analysis.fisher_config import FisherConfig, SegmentFormat
from posttrain_probe.analysis.fisher_report import FisherReport
from posttrain_probe.analysis.fisher_stats import (
    SegmentStats,
    fisher_importance_ratio,
    magnitude_floor,
    rho_statistic,
    select_fisher_features,
)
from posttrain_probe.analysis.reasonscore import (
    REASON_TOKENS,
    REASONING_WORDS,
    ReasonScoreAccumulator,
    reason_score,
    reasoning_token_groups,
    reasoning_word_masks,
)
from posttrain_probe.analysis.segments import find_delimited, segment_batches, split_document, token_segments
from posttrain_probe.cli import app
from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig
from posttrain_probe.errors import ProbeError
from posttrain_probe.synthetic import openthoughts_dataset
from posttrain_probe.testing import tiny_tokenizer

runner = CliRunner()
LAYER = 2


# -- the formula ------------------------------------------------------------------------------------


def test_importance_ratio_floor_and_selection_on_a_hand_example():
    # codes of 5 features on 4 reasoning tokens and 2 solution tokens
    reasoning = torch.tensor(
        [[1.0, 0.0, 0.001, 0.0, 3.0], [2.0, 0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 3.0], [1.0, 2.0, 0.0, 0.0, 3.0]]
    )
    solution = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 3.0]])
    e_r, e_s = reasoning.square().mean(0), solution.square().mean(0)
    assert e_r.tolist() == pytest.approx([1.5, 1.0, 2.5e-7, 0.0, 9.0])
    assert e_s.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0, 5.0])
    ratio = fisher_importance_ratio(e_r, e_s)
    assert ratio.dtype == torch.float64
    assert ratio[0].item() == pytest.approx(1.5)
    assert ratio[1].item() == pytest.approx(1.0 / 1e-8)  # E_s = 0: the epsilon floor
    assert ratio[2].item() == pytest.approx(2.5e-7 / 1e-8)  # = 25: high ratio, tiny magnitude
    assert ratio[4].item() == pytest.approx(1.8)
    assert fisher_importance_ratio(torch.tensor([2.0]), torch.tensor([1e-9]), eps=1e-8).item() == pytest.approx(2e8)

    live = torch.cat([reasoning, solution]).gt(0).any(0)
    assert live.tolist() == [True, True, True, False, True]
    # quantile 0.5 of E_r over the 4 live features [1.5, 1.0, 2.5e-7, 9.0] = (1.0 + 1.5) / 2
    assert magnitude_floor(e_r, live, 0.5) == pytest.approx(1.25)
    picked = select_fisher_features(e_r, e_s, live, k=2, floor_quantile=0.5)
    assert picked.floor == pytest.approx(1.25)
    assert picked.candidates.tolist() == [True, False, False, False, True]
    assert picked.features == [4, 0]  # feature 2 (ratio 25) is below the floor, feature 1 too
    # a floor low enough to admit the tiny feature ranks it by its ratio
    low = select_fisher_features(e_r, e_s, live, k=10, floor=0.0)
    assert low.features == [1, 2, 4, 0] and low.floor_quantile is None
    assert select_fisher_features(e_r, e_s, live, k=10, floor_quantile=0.0).features == [1, 2, 4, 0]
    with pytest.raises(ProbeError, match="quantile"):
        select_fisher_features(e_r, e_s, live, floor_quantile=1.0)
    with pytest.raises(ProbeError, match="no live feature"):
        magnitude_floor(e_r, torch.zeros(5, dtype=torch.bool))


def test_rho_on_a_hand_example():
    # one sequence, 5 reasoning tokens; S = {1, 3}; codes [T, F]
    codes = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.3, 0.0, 0.1]]
    )
    hits = (codes[:, [1, 3]] > 0).any(1).sum()
    assert rho_statistic(hits, torch.tensor(5)).item() == pytest.approx(3 / 5)
    out = rho_statistic(torch.tensor([[3, 0], [0, 0]]), torch.tensor([[5, 0], [4, 2]]))
    assert out[0, 0].item() == pytest.approx(0.6) and math.isnan(out[0, 1].item())
    assert out[1].tolist() == [0.0, 0.0]


# -- segments ------------------------------------------------------------------------------------------


def _segment_text(doc, labels, offsets, kind):
    return "".join(doc.text[s:e] for (s, e), lab in zip(offsets.tolist(), labels.tolist()) if lab == kind)


def _labels(doc, tokenizer):
    enc = tokenizer(doc.text, add_special_tokens=doc.add_special_tokens, return_offsets_mapping=True)
    offsets = torch.tensor([list(o) for o in enc["offset_mapping"]])
    return token_segments(offsets[None], [doc])[0], offsets


def test_openthoughts_tags_on_the_tiny_tokenizer(tokenizer):
    fmt = SegmentFormat()
    text = (
        "Q: 2+3?<|begin_of_thought|>\n\nWait, let me add. Hmm 2 + 3 = 5.\n\n<|end_of_thought|>\n\n"
        "<|begin_of_solution|>\nThe answer is 5.<|end_of_solution|>"
    )
    doc = split_document({"text": text}, fmt, tokenizer)
    assert [doc.text[s:e] for s, e in doc.reasoning] == ["Wait, let me add. Hmm 2 + 3 = 5."]
    assert [doc.text[s:e] for s, e in doc.solution] == ["The answer is 5."]
    assert [doc.text[s:e] for s, e in doc.tags] == [
        "<|begin_of_thought|>",
        "<|end_of_thought|>",
        "<|begin_of_solution|>",
        "<|end_of_solution|>",
    ]
    labels, offsets = _labels(doc, tokenizer)
    assert _segment_text(doc, labels, offsets, 1) == "Wait, let me add. Hmm 2 + 3 = 5."
    # the tiny BPE merges '.<|' into one token: it touches a tag, so it is in no segment
    assert _segment_text(doc, labels, offsets, 2) == "The answer is 5"
    for (s, e), lab in zip(offsets.tolist(), labels.tolist()):
        if any(s < te and e > ts for ts, te in doc.tags):
            assert lab == 0, doc.text[s:e]
    assert labels[0] == 0  # BOS


def test_chat_rows_search_the_assistant_turn_only(tokenizer):
    fmt = SegmentFormat()
    row = {
        "conversations": [
            {
                "from": "user",
                "value": "Use <|begin_of_thought|> notes <|end_of_thought|> then <|begin_of_solution|> x <|end_of_solution|>. What is 2+2?",
            },
            {
                "from": "assistant",
                "value": "<|begin_of_thought|>\n\nHmm, 2 + 2 = 4.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n4\n\n<|end_of_solution|>",
            },
        ]
    }
    doc = split_document(row, fmt, tokenizer)
    assert doc.text.startswith("<|im_start|>user\n") and not doc.add_special_tokens  # rendered by the chat template
    assert [doc.text[s:e] for s, e in doc.reasoning] == ["Hmm, 2 + 2 = 4."]
    assert [doc.text[s:e] for s, e in doc.solution] == ["4"]
    labels, offsets = _labels(doc, tokenizer)
    assert _segment_text(doc, labels, offsets, 1) == "Hmm, 2 + 2 = 4."
    assert _segment_text(doc, labels, offsets, 2) == "4"
    # the synthetic OpenThoughts rows: the segments are exactly the metadata columns
    data = openthoughts_dataset(n=3)
    for row in data:
        doc = split_document(row, fmt, tokenizer)
        assert [doc.text[s:e] for s, e in doc.reasoning] == [row["deepseek_reasoning"]]
        assert [doc.text[s:e] for s, e in doc.solution] == [row["deepseek_solution"]]


def test_delimiter_and_column_formats(tokenizer):
    think = SegmentFormat(
        format="delimiters", reasoning_delimiters=("<think>", "</think>"), solution_delimiters=("</think>", "")
    )
    doc = split_document({"text": "Q: 7*6?<think>\nhmm, 7*6 = 42\n</think>\nAnswer: 42\n"}, think, tokenizer)
    assert [doc.text[s:e] for s, e in doc.reasoning] == ["hmm, 7*6 = 42"]
    assert [doc.text[s:e] for s, e in doc.solution] == ["Answer: 42"]
    labels, offsets = _labels(doc, tokenizer)
    assert _segment_text(doc, labels, offsets, 2) == "Answer: 42"
    assert "hmm" in _segment_text(doc, labels, offsets, 1)
    # an unterminated block (a cut trace) runs to the end of the text
    assert find_delimited("a [r] b [r] c", "[r]", "[/r]") == ([(6, 13)], [(2, 5)])
    assert find_delimited("x <a>1</a> <a>2</a>", "<a>", "</a>") == (
        [(5, 6), (14, 15)],
        [(2, 5), (6, 10), (11, 14), (15, 19)],
    )

    cols = SegmentFormat(
        format="columns",
        reasoning_column="deepseek_reasoning",
        solution_column="deepseek_solution",
        prompt_column="problem",
    )
    row = openthoughts_dataset(n=1)[0]
    doc = split_document(row, cols, tokenizer)
    assert (
        doc.text == f"{row['problem']}\n\n{row['deepseek_reasoning']}\n\n{row['deepseek_solution']}"
        and doc.add_special_tokens
    )
    assert [doc.text[s:e] for s, e in doc.reasoning] == [row["deepseek_reasoning"]]
    assert [doc.text[s:e] for s, e in doc.solution] == [row["deepseek_solution"]]
    batch = next(segment_batches([doc], tokenizer, seq_len=4096))
    labels = batch.segments[0]
    offsets = torch.tensor([list(o) for o in tokenizer(doc.text, return_offsets_mapping=True)["offset_mapping"]])
    assert _segment_text(doc, labels, offsets, 1) == row["deepseek_reasoning"]
    assert _segment_text(doc, labels, offsets, 2) == row["deepseek_solution"]
    assert batch.n_cut == 0 and next(segment_batches([doc], tokenizer, seq_len=40)).n_cut == 1

    with pytest.raises(ProbeError, match="needs reasoning_delimiters"):
        SegmentFormat(format="delimiters")
    with pytest.raises(ProbeError, match="only used with format 'delimiters'"):
        SegmentFormat(reasoning_delimiters=("<a>", "</a>"))
    with pytest.raises(ProbeError, match="needs solution_column"):
        SegmentFormat(format="columns", reasoning_column="r")
    with pytest.raises(ProbeError, match="not one of"):
        SegmentFormat(format="xml")


# -- ReasonScore ----------------------------------------------------------------------------------------


def _word_windows_by_loops(ids, groups, window):
    """in_group[g][b][t]: explicit occurrence search of every variant, each occurrence token's window marked."""
    n_rows, length = len(ids), len(ids[0])
    in_group = [[[False] * length for _ in range(n_rows)] for _ in groups]
    for g, variants in enumerate(groups):
        for b in range(n_rows):
            for variant in variants:
                for p in range(length - len(variant) + 1):
                    if ids[b][p : p + len(variant)] == list(variant):
                        for q in range(p, p + len(variant)):
                            for t in range(q - window[0], q + window[1] + 1):
                                if 0 <= t < length:
                                    in_group[g][b][t] = True
    return in_group


def _reasonscore_by_loops(ids, keep, groups, codes, weights, window, alpha, eps=1e-12):
    """Straightforward ReasonScore: explicit occurrence search, windows, means, entropy and the formula."""
    n_rows, length = len(ids), len(ids[0])
    in_group = _word_windows_by_loops(ids, groups, window)
    n_features = len(codes[0][0])

    def mean(cells):
        if not cells:
            return [0.0] * n_features
        return [sum(codes[b][t][i] * weights[i] for b, t in cells) / len(cells) for i in range(n_features)]

    cells = [(b, t) for b in range(n_rows) for t in range(length) if keep[b][t]]
    word_means = [mean([(b, t) for b, t in cells if in_group[g][b][t]]) for g in range(len(groups))]
    inside = [(b, t) for b, t in cells if any(in_group[g][b][t] for g in range(len(groups)))]
    outside = [(b, t) for b, t in cells if (b, t) not in inside]
    mu_in, mu_out = mean(inside), mean(outside)
    scores = []
    for i in range(n_features):
        total = sum(word_means[g][i] for g in range(len(groups)))
        probs = [word_means[g][i] / (total + eps) for g in range(len(groups))]
        h = -sum(p * math.log(p) for p in probs if p > 0) / math.log(len(groups))
        scores.append(mu_in[i] / (sum(mu_in) + eps) * h**alpha - mu_out[i] / (sum(mu_out) + eps))
    return scores


def test_reasonscore_matches_a_straightforward_computation():
    # token ids: word groups "wait" = {[7], [8, 9]}, "hmm" = {[5]}, "but" = {[11]} (never occurs)
    groups = [[[7], [8, 9]], [[5]], [[11]]]
    ids = [[1, 3, 7, 4, 4, 4, 8, 9, 2, 0], [1, 4, 5, 4, 4, 4, 4, 7, 0, 0]]
    keep = [[t > 0 and ids[b][t] not in (0, 1, 2) for t in range(10)] for b in range(2)]
    gen = torch.Generator().manual_seed(3)
    codes = torch.relu(torch.randn(2, 10, 6, generator=gen)).double()
    weights = torch.rand(6, generator=gen).double() + 0.5
    expected = _reasonscore_by_loops(ids, keep, groups, codes.tolist(), weights.tolist(), (1, 2), 0.7)

    acc = ReasonScoreAccumulator(["wait", "hmm", "but"], groups, 6, weights=weights, alpha=0.7, window=(1, 2))
    ids_t, keep_t = torch.tensor(ids), torch.tensor(keep)
    masks = acc.masks(ids_t, keep_t)
    rows, cols = keep_t.nonzero(as_tuple=True)
    acc.update(codes[rows, cols][:7], masks[rows, cols][:7])  # two updates: accumulation across batches
    acc.update(codes[rows, cols][7:], masks[rows, cols][7:])
    result = acc.result()
    assert result.score.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert result.word_tokens[2] == 0 and result.n_in + result.n_out == int(keep_t.sum())
    # windows: "wait" at row 0 position 2 covers 1..4, "wait" = [8, 9] at 6-7 covers 5..9 (keep drops 8, 9)
    assert masks[0, :, 0].tolist() == [False, True, True, True, True, True, True, True, False, False]
    assert masks[1, :, 1].tolist() == [False, True, True, True, True, False, False, False, False, False]

    # the formula itself: a feature spread evenly over the words and absent elsewhere scores highest
    score, entropy = reason_score(
        torch.tensor([1.0, 1.0, 0.0]),
        torch.tensor([0.0, 0.5, 1.0]),
        torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]]),
        alpha=0.7,
    )
    assert entropy.tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert score.tolist() == pytest.approx([0.5, 0.5 * 0.0 - 0.5 / 1.5, -1.0 / 1.5])


@pytest.mark.parametrize("window", [(0, 0), (1, 2), (3, 1)])
def test_word_windows_match_an_occurrence_loop_on_random_ids(window):
    """The vectorised window masks (all variants in one pass, patterns right-padded with -1, a sliding max) equal
    the loop reference on random ids over a 6-token vocabulary (overlapping occurrences, variants of lengths 1-3
    sharing tokens, groups sharing a variant, a variant longer than the rows, and occurrences at both row ends)."""
    gen = torch.Generator().manual_seed(sum(window))
    ids = torch.randint(0, 6, (5, 23), generator=gen)
    groups = [[[1], [2, 3]], [[3, 3, 4]], [[5, 1], [0, 0, 0], [1]], [list(range(30))]]
    got = reasoning_word_masks(ids, groups, window=window)
    want = _word_windows_by_loops(ids.tolist(), groups, window)
    assert got.shape == (5, 23, 4) and got.any()
    assert got.permute(2, 0, 1).tolist() == want


def test_reasoning_words_on_the_tiny_tokenizer(tokenizer):
    words, groups = reasoning_token_groups(tokenizer)
    assert words == list(REASONING_WORDS) and len(REASON_TOKENS) == 34
    assert len(groups[words.index("wait")]) == 4 and len(groups[words.index("but")]) == 1
    # tokenised in one call, each variant alone: the ids of a call per variant
    for variant in REASON_TOKENS:
        alone = tokenizer(variant, add_special_tokens=False)["input_ids"]
        assert alone in groups[words.index(variant.lstrip().lower())]
    distinct = {(v.lstrip().lower(), tuple(tokenizer(v, add_special_tokens=False)["input_ids"])) for v in REASON_TOKENS}
    assert sum(map(len, groups)) == len(distinct)
    text = "Okay.\nWait, let me check. Hmm, but maybe not."
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    acc = ReasonScoreAccumulator(words, groups, 1)
    masks = acc.masks(ids)[0]
    found = {w for g, w in enumerate(words) if masks[:, g].any()}
    assert found == {"wait", "let me", "hmm", "maybe"}  # "but" is listed only as "But"


# -- end to end ------------------------------------------------------------------------------------


N_DOCS, SEQ_LEN, K = 8, 512, 5


def _crosscoder(names, tiny_pair, seed=0, n_features=48):
    """A random crosscoder at LAYER with scales from the base model's activations (codes of a useful size)."""
    from transformers import AutoModelForCausalLM

    cc = Crosscoder(CrosscoderConfig(model_names=names, d_model=64, n_features=n_features, layer=LAYER))
    cc.reset_parameters(torch.Generator().manual_seed(seed))
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["base"])
    ids = tiny_tokenizer()(list(openthoughts_dataset(n=4)["text"]), return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model(**ids, output_hidden_states=True).hidden_states[LAYER]
        norm = h[ids["attention_mask"].bool()].norm(dim=-1).mean()
        cc.scales.fill_(8.0 / float(norm))
        cc.b_enc.fill_(-0.1)
    return cc


@pytest.fixture(scope="module")
def fisher_run(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher")
    cc = _crosscoder(["base", "tuned"], tiny_pair)
    cc.save_pretrained(root / "cc")
    data = root / "openthoughts.jsonl"
    openthoughts_dataset(n=N_DOCS).to_json(str(data))
    out = root / "out"
    result = runner.invoke(app, [
        "features", "fisher", "--crosscoder", str(root / "cc"), "--model", f"base={tiny_pair['base']}",
        "--model", f"tuned={tiny_pair['tuned']}", "--dataset", str(data), "--max-docs", str(N_DOCS),
        "--seq-len", str(SEQ_LEN), "--forward-batch-size", "4", "--top-k", str(K), "--floor-quantile", "0.5",
        "--device", "cpu", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    return {"out": out, "cc": cc, "data": str(data), "stdout": result.output}


def _read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _independent(tiny_pair, cc, name, features):
    """E_r, E_s per feature and rho per document from full HF forwards, token labels by a plain loop."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[name]).eval()
    sums, counts, rho = torch.zeros(2, cc.config.n_features, dtype=torch.float64), [0, 0], []
    for row in openthoughts_dataset(n=N_DOCS):
        messages = [
            {"role": "user", "content": row["conversations"][0]["value"]},
            {"role": "assistant", "content": row["conversations"][1]["value"]},
        ]
        text = tok.apply_chat_template(messages, tokenize=False)
        start = text.find(row["conversations"][1]["value"])
        r0 = text.find(row["deepseek_reasoning"], start)
        s0 = text.find(row["deepseek_solution"], r0 + len(row["deepseek_reasoning"]))
        spans = {1: (r0, r0 + len(row["deepseek_reasoning"])), 2: (s0, s0 + len(row["deepseek_solution"]))}
        tags = []
        for tag in ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>"):
            at = text.find(tag, start)
            tags.append((at, at + len(tag)))
        enc = tok(text, add_special_tokens=False, truncation=True, max_length=SEQ_LEN, return_offsets_mapping=True)
        with torch.no_grad():
            h = model(torch.tensor([enc["input_ids"]]), output_hidden_states=True).hidden_states[LAYER][0]
            codes = cc.encode_source(h, name).double()
        tokens: list[list[int]] = [[], []]
        for t, ((s, e), tid) in enumerate(zip(enc["offset_mapping"], enc["input_ids"])):
            if t == 0 or tid in tok.all_special_ids or e <= s:
                continue
            if any(s < te and e > ts for ts, te in tags):
                continue
            inside = [k for k, (a, b) in spans.items() if s < b and e > a]
            if len(inside) == 1:
                tokens[inside[0] - 1].append(t)
        fired = (codes[:, features] > 0).any(dim=1)
        for j in range(2):
            sums[j] += codes[tokens[j]].square().sum(dim=0)
            counts[j] += len(tokens[j])
        rho.append([fired[tokens[j]].double().mean().item() if tokens[j] else math.nan for j in range(2)])
    return sums / torch.tensor(counts, dtype=torch.float64)[:, None], rho


def test_cli_end_to_end_matches_an_independent_computation(fisher_run, tiny_pair):
    out, cc = fisher_run["out"], fisher_run["cc"]
    for name in (
        "fisher_features.json",
        "reasonscore_features.json",
        "features.csv",
        "rho.csv",
        "summary.json",
        "rho.png",
        "rho.svg",
    ):
        assert (out / name).exists(), name
    fset = json.loads((out / "fisher_features.json").read_text())
    prov = fset["provenance"]
    assert (
        prov["method"] == "fisher-importance-ratio"
        and prov["model"] == "base"
        and prov["layer"] == LAYER
        and prov["k"] == K
    )
    assert prov["dataset"] == fisher_run["data"] and prov["floor_quantile"] == 0.5 and prov["floor"] > 0
    ranked = prov["ranked"]
    assert sorted(ranked) == fset["features"] and len(ranked) == K
    # the set is usable by the interventions: it resolves against its crosscoder (fingerprint checked)
    from posttrain_probe.analysis.feature_sets import resolve_features
    from posttrain_probe.crosscoder.inspect import load_crosscoder

    assert resolve_features(load_crosscoder(out.parent / "cc"), str(out / "fisher_features.json")) == sorted(ranked)

    rows = _read_csv(out / "features.csv")
    assert len(rows) == cc.config.n_features
    e_r = torch.tensor([float(r["e_reasoning"]) for r in rows], dtype=torch.float64)
    e_s = torch.tensor([float(r["e_solution"]) for r in rows], dtype=torch.float64)
    ratio = torch.tensor([float(r["importance_ratio"]) for r in rows], dtype=torch.float64)
    ref, ref_rho = _independent(tiny_pair, cc, "base", ranked)
    torch.testing.assert_close(e_r, ref[0], rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(e_s, ref[1], rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(ratio, e_r / e_s.clamp_min(1e-8), rtol=1e-9, atol=0)
    summary = json.loads((out / "summary.json").read_text())
    floor = summary["fisher"]["floor"]
    candidates = [i for i, r in enumerate(rows) if r["live"] == "true" and e_r[i] >= floor and e_r[i] > 0]
    assert [i for i, r in enumerate(rows) if r["candidate"] == "true"] == candidates
    assert ranked == sorted(candidates, key=lambda i: (-ratio[i].item(), -e_r[i].item(), i))[:K]
    assert [i for i, r in enumerate(rows) if r["selected"] == "true"] == sorted(ranked)

    rho_rows = _read_csv(out / "rho.csv")
    assert len(rho_rows) == 2 * N_DOCS and {r["model"] for r in rho_rows} == {"base", "tuned"}
    _, ref_rho_tuned = _independent(tiny_pair, cc, "tuned", ranked)
    for name, reference in (("base", ref_rho), ("tuned", ref_rho_tuned)):
        got = [r for r in rho_rows if r["model"] == name]
        for r, (want_r, want_s) in zip(got, reference):
            n_r, n_s = int(r["n_reasoning_tokens"]), int(r["n_solution_tokens"])
            assert abs(float(r["rho_reasoning"]) - want_r) <= 1.01 / n_r  # at most one token flips at f = 0
            if n_s:
                assert abs(float(r["rho_solution"]) - want_s) <= 1.01 / n_s
            else:
                assert r["rho_solution"] == "" and math.isnan(want_s)
    assert set(summary["rho"]["models"]) == {"base", "tuned"}
    stats = summary["rho"]["models"]["base"]["reasoning"]
    assert stats["n_docs"] == N_DOCS and 0.0 <= stats["mean"] <= 1.0

    # ReasonScore: the table's top-k is the ReasonScore feature set; the reasoning words were found in context
    rs = summary["reasonscore"]
    assert rs["alpha"] == 0.7 and rs["window"] == {"before": 1, "after": 2} and rs["decoder_norm_weighted"]
    for word in ("wait", "hmm", "let me", "therefore", "maybe"):
        assert rs["words"][word] > 0, word
    scores = [float(r["reasonscore"]) for r in rows]
    top = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:K]
    assert json.loads((out / "reasonscore_features.json").read_text())["provenance"]["ranked"] == top
    assert "e_reasoning_tuned" in rows[0] and "importance_ratio_tuned" in rows[0]
    assert "features selected" in fisher_run["stdout"]


def test_sae_encodes_every_model_with_its_one_branch(fisher_run, tiny_pair, tmp_path):
    sae = _crosscoder(["distill"], tiny_pair, seed=1, n_features=32)
    sae.save_pretrained(tmp_path / "sae")
    result = runner.invoke(app, [
        "features", "fisher", "--sae", str(tmp_path / "sae"), "--model", f"base={tiny_pair['base']}", "--model",
        f"sft={tiny_pair['tuned']}", "--select-model", "sft", "--dataset", fisher_run["data"], "--max-docs", "4",
        "--format", "delimiters", "--column", "text", "--reasoning-delimiters", "<|begin_of_thought|>", "<|end_of_thought|>",
        "--solution-delimiters", "<|begin_of_solution|>", "",
        "--seq-len", "384", "--top-k", "3", "--no-reasonscore", "--table-format", "parquet", "--device", "cpu", "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    fmt = summary["settings"]["segment_format"]
    assert (
        fmt["format"] == "delimiters"
        and fmt["solution_delimiters"] == ["<|begin_of_solution|>", ""]
        and summary["settings"]["column"] == "text"
    )
    assert summary["documents"]["with_reasoning"] == summary["documents"]["with_solution"] == 4
    assert summary["settings"]["kind"] == "sae" and summary["settings"]["branches"] == {
        "base": "distill",
        "sft": "distill",
    }
    assert summary["fisher"]["model"] == "sft" and summary["fisher"]["n_selected"] == 3 and "reasonscore" not in summary
    assert (tmp_path / "out" / "features.parquet").exists() and not (
        tmp_path / "out" / "reasonscore_features.json"
    ).exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "sft=MODEL"], "model 'sft' is not in this crosscoder"),
        (["--model", "base=MODEL", "--sae", "CC"], "exactly one of --crosscoder DIR and --sae DIR"),
        (["--model", "base=MODEL", "--select-model", "rl"], "select model 'rl' is not one of"),
        (["--model", "base=MODEL", "--format", "delimiters"], "needs reasoning_delimiters"),
        (["--model", "base=MODEL", "--dataset", "NOTAGS"], "no reasoning segment found in any of the 2 documents"),
    ],
)
def test_bad_input_exits_2(fisher_run, tiny_pair, tmp_path, extra, message):
    (tmp_path / "plain.jsonl").write_text(
        "".join(json.dumps({"text": f"just text {i}, no tags"}) + "\n" for i in range(3))
    )
    cc_dir = str(fisher_run["out"].parent / "cc")
    args = [
        "features",
        "fisher",
        "--crosscoder",
        cc_dir,
        "--dataset",
        fisher_run["data"],
        "--max-docs",
        "2",
        "--out",
        str(tmp_path / "o"),
    ]
    args += [
        a.replace("MODEL", str(tiny_pair["base"]))
        .replace("CC", cc_dir)
        .replace("NOTAGS", str(tmp_path / "plain.jsonl"))
        for a in extra
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_crosscoder_of_another_width_is_refused_naming_the_model(fisher_run, tiny_pair, tmp_path):
    cc = Crosscoder(CrosscoderConfig(model_names=["base", "tuned"], d_model=32, n_features=8, layer=LAYER))
    cc.save_pretrained(tmp_path / "cc32")
    args = ["features", "fisher", "--crosscoder", str(tmp_path / "cc32"), "--model", f"base={tiny_pair['base']}"]
    result = runner.invoke(app, args + ["--dataset", fisher_run["data"], "--max-docs", "2", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert f"model 'base' ({tiny_pair['base']}): the crosscoder has d_model 32, the model's hidden size is 64" in (
        " ".join(result.output.split())
    )


def test_neither_crosscoder_nor_sae_and_sae_of_two_models(fisher_run, tiny_pair, tmp_path):
    base = [
        "features",
        "fisher",
        "--model",
        f"base={tiny_pair['base']}",
        "--dataset",
        fisher_run["data"],
        "--out",
        str(tmp_path),
    ]
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "exactly one of --crosscoder DIR and --sae DIR" in result.output
    result = runner.invoke(app, base + ["--sae", str(fisher_run["out"].parent / "cc")])
    assert result.exit_code == 2 and "has models ['base', 'tuned']: pass it as --crosscoder" in result.output


def test_rho_summary_warns_when_the_selection_fires_everywhere():
    """A selection active on every token (an undertrained, non-sparse crosscoder) gives rho = 1 in both
    segments: the summary says so instead of reporting an uninformative AUC of 0.5 silently."""

    def report(hits):
        stats = SegmentStats(
            n_tokens=torch.tensor([20, 10]),
            sq_sum=torch.ones(2, 4, dtype=torch.float64),
            active=torch.ones(2, 4, dtype=torch.int64),
            doc_tokens=torch.tensor([[10, 5], [10, 5]]),
            hits=hits,
        )
        return FisherReport(
            settings={}, select_model="m", selection=None, stats={"m": stats}, documents={}
        ).rho_summary()["m"]

    everywhere = report(torch.tensor([[10, 5], [10, 5]], dtype=torch.float64))
    assert everywhere["separation"]["auc_reasoning_above_solution"] == 0.5
    assert "fire on almost every token" in everywhere["warning"]
    informative = report(torch.tensor([[9, 1], [8, 0]], dtype=torch.float64))
    assert "warning" not in informative and informative["separation"]["auc_reasoning_above_solution"] == 1.0


@pytest.mark.parametrize("n_models", [1, 3])
def test_rho_figure_keeps_every_label_inside_its_fixed_layout(n_models, tmp_path, monkeypatch):
    """The rho figure has fixed margins (no layout pass when saved): with one panel, 40+ character model names (of
    wide letters), a segment missing in one model and 5-digit document counts, every text lies inside the figure and
    no two panels (titles and tick labels included) overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    import posttrain_probe.analysis.plots as plots
    from posttrain_probe.analysis.fisher_report import plot_rho_distributions

    figures, save = [], plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figures.append(fig) or save(fig, path, **kw))
    gen = torch.Generator().manual_seed(0)
    names = ["W" * 44, "checkpoints/qwen3-4b-base-sft-blocked-on-50-features-step-1000", "rl"][:n_models]
    rho = {name: (torch.rand(12_345, generator=gen), torch.rand(12_345, generator=gen)) for name in names}
    rho[names[0]] = (rho[names[0]][0], torch.full((12_345,), math.nan))
    written = plot_rho_distributions(rho, tmp_path / "rho", title_suffix="layer 18, top-50 Fisher features")
    assert [p.name for p in written] == ["rho.png", "rho.svg"] and all(p.stat().st_size > 0 for p in written)
    fig = figures[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    frame = fig.bbox
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
    elided = [t.get_text() for t in texts if "…" in t.get_text()]
    assert len(elided) == (1 if n_models == 1 else 2) and elided[0].startswith("WWW")  # long names fit their panel
    for artist in texts + fig.legends:
        box = artist.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, artist
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
    assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:]))
    assert len({ax.get_ylim() for ax in fig.axes}) == 1  # one y scale for every panel


# -- the step's config and result ----------------------------------------------------------------------


def _close(a, b):
    """Equal JSON values, floats to 1e-12 relative (a table in CSV and a sum rebuilt from a mean round once)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)
    return a == b


def test_report_read_gives_back_what_write_wrote(fisher_run, tmp_path):
    out = fisher_run["out"]
    report = FisherReport.read(out)
    on_disk = json.loads((out / "summary.json").read_text())
    assert _close(report.summary(), {k: v for k, v in on_disk.items() if k != "files"})
    assert report.select_model == "base" and list(report.stats) == ["base", "tuned"] and report.table_format == "csv"
    assert report.features == [r["feature"] for r in on_disk["fisher"]["selected"]]
    report.write(tmp_path / "again")
    assert _close(json.loads((tmp_path / "again" / "summary.json").read_text())["rho"], on_disk["rho"])
    for name in ("features.csv", "rho.csv"):
        assert _read_csv(tmp_path / "again" / name) == _read_csv(out / name), name
    assert (
        json.loads((tmp_path / "again" / "reasonscore_features.json").read_text())["features"]
        == json.loads((out / "reasonscore_features.json").read_text())["features"]
    )


def test_config_from_yaml_equals_config_from_flags(tmp_path, monkeypatch):
    import posttrain_probe.analysis.fisher as fisher_module

    seen = []

    def capture(config, **kwargs):
        seen.append(config)
        raise ProbeError("captured")

    monkeypatch.setattr(fisher_module, "features_fisher", capture)
    result = runner.invoke(app, [
        "features", "fisher", "--sae", "runs/sae", "--model", "base=m0", "--model", "sft=m1", "--select-model", "sft",
        "--dataset", "traces.jsonl", "--format", "delimiters", "--reasoning-delimiters", "<think>", "</think>",
        "--solution-delimiters", "</think>", "", "--top-k", "7", "--alpha", "0.5", "--max-docs", "0", "--out", "runs/fisher",
    ])  # fmt: skip
    assert "captured" in result.output, result.output
    (tmp_path / "fisher.yaml").write_text(
        "sae: runs/sae\nmodel: [base=m0, sft=m1]\nselect_model: sft\ndataset: traces.jsonl\ntop_k: 7\nalpha: 0.5\n"
        "max_docs: 0\nout: runs/fisher\nsegments:\n  format: delimiters\n  reasoning_delimiters: ['<think>', '</think>']\n"
        "  solution_delimiters: ['</think>', '']\n"
    )
    from posttrain_probe.config_io import load_config

    from_yaml = load_config(FisherConfig, tmp_path / "fisher.yaml")
    assert seen[0] == from_yaml
    assert from_yaml.segments == SegmentFormat("delimiters", ("<think>", "</think>"), ("</think>", ""))
    result = runner.invoke(app, ["features", "fisher", "--config", str(tmp_path / "fisher.yaml"), "--top-k", "9"])
    assert "captured" in result.output and seen[1].top_k == 9 and seen[1].segments == from_yaml.segments


def test_python_step_with_objects_matches_the_cli(fisher_run, tiny_pair, tmp_path):
    """features_fisher(config, crosscoder=<Crosscoder>) selects what the CLI selected from the crosscoder's directory."""
    from posttrain_probe.analysis.fisher import features_fisher

    config = FisherConfig(
        crosscoder=fisher_run["out"].parent / "cc", model=[f"base={tiny_pair['base']}", f"tuned={tiny_pair['tuned']}"],
        dataset=fisher_run["data"], max_docs=N_DOCS, seq_len=SEQ_LEN, top_k=K, floor_quantile=0.5, device="cpu", out=tmp_path / "py",
    )  # fmt: skip
    report = features_fisher(config, crosscoder=fisher_run["cc"])
    on_disk = json.loads((fisher_run["out"] / "summary.json").read_text())
    assert report.features == [r["feature"] for r in on_disk["fisher"]["selected"]]
    assert report.settings["crosscoder"] is None and (tmp_path / "py" / "summary.json").exists()
