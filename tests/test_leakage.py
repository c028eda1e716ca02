"""Leakage of gradient blocking (docs/methods.md sec. 9, paper S E.1): the formula, the report files, `posttrain-probe leakage`
on a tiny base model fine-tuned with and without blocking (same data and seed), and clear errors for bad input.

The blocking crosscoder here is built by hand: tied, orthonormal, unit-gain features (f_2k = relu(q_k . x),
f_2k+1 = relu(-q_k . x) for an orthonormal basis q), so that the paper's sae-mode blocking is exactly the projection
onto the protected directions at the site. Features of the first half of the basis are "shared" (same decoder in
both models), the rest "base-only". A trained L1 crosscoder shrinks its codes (encoder . decoder < 1 per feature) and
blocks only part of the gradient; with exact blocking what is left is the leakage through the weights below the
site, which the test checks is well below the unblocked run's movement.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from posttrain_probe.analysis.leakage import leakage
from posttrain_probe.analysis.leakage_config import LeakageConfig
from posttrain_probe.analysis.leakage_crosscoder import crosscoder_leakage, match_protected
from posttrain_probe.analysis.leakage_report import LeakageReport
from posttrain_probe.analysis.leakage_shift import feature_shift, relative_change
from posttrain_probe.cli import app
from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig
from posttrain_probe.synthetic import arithmetic_dataset
from posttrain_probe.testing import tiny_model, tiny_tokenizer

runner = CliRunner()
D_MODEL, N_SHARED = 64, 32  # 2 * 64 features; the first 2 * 32 are "shared"


def exact_crosscoder(d_model: int = D_MODEL, layer: int = 2, seed: int = 0) -> Crosscoder:
    """Two-model (base, sft) crosscoder of signed orthonormal directions; features < 2 * N_SHARED are shared,
    the others base-only (sft decoder 0.2 x the base one: NormRatio 0.9)."""
    q, _ = torch.linalg.qr(torch.randn(d_model, d_model, generator=torch.Generator().manual_seed(seed)))
    dirs = torch.stack([q.T, -q.T], dim=1).reshape(2 * d_model, d_model)  # row 2k = +q_k, 2k+1 = -q_k
    cc = Crosscoder(CrosscoderConfig(model_names=["base", "sft"], d_model=d_model, n_features=2 * d_model, layer=layer))
    sft_scale = torch.ones(2 * d_model)
    sft_scale[2 * min(N_SHARED, d_model // 2) :] = 0.2
    with torch.no_grad():
        cc.W_dec.copy_(torch.stack([dirs, dirs * sft_scale[:, None]], dim=1))
        cc.W_enc.copy_(dirs.T[None].expand(2, -1, -1))
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    return cc


def _finetune(model, tokenizer, callbacks, out_dir, steps: int = 20):
    """A few AdamW steps of causal-LM training with the transformers Trainer (one CPU thread), saved to out_dir."""
    from transformers import Trainer, TrainingArguments

    texts = list(arithmetic_dataset(n=160, seed=5)["text"])
    encoded = tokenizer(texts, truncation=True, max_length=64, padding="max_length")
    rows = [
        {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(ids).masked_fill(torch.tensor(mask) == 0, -100),
        }
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])
    ]
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
        lr_scheduler_type="constant", weight_decay=0.0, use_cpu=True, report_to="none", save_strategy="no", seed=0,
        logging_steps=1000, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks).train()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{base, blocked, plain, crosscoder}: the tiny base, and two fine-tunes of it (same data, same seed), one with the
    crosscoder's shared features blocked by GradientBlockingCallback (built from BlockingArguments, as the recipe does)."""
    from posttrain_probe.callbacks import BlockingArguments, blocking_callback

    root = tmp_path_factory.mktemp("leakage")
    tokenizer = tiny_tokenizer()
    exact_crosscoder().save_pretrained(root / "cc")
    paths = {"crosscoder": root / "cc", "base": root / "base"}
    tiny_model("qwen3").save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    callback = blocking_callback(BlockingArguments(block_crosscoder=str(root / "cc"), block_features="shared"))
    assert callback.blocker.features == list(range(2 * N_SHARED)) and callback.blocker.layer == 2
    paths["blocked"] = _finetune(tiny_model("qwen3"), tokenizer, [callback], root / "blocked")
    assert not callback.blocker.is_attached  # removed at the end of training
    paths["plain"] = _finetune(tiny_model("qwen3"), tokenizer, [], root / "plain")
    return paths


def _leakage(runs, blocked: str, out, *extra):
    result = runner.invoke(app, [str(a) for a in [
        "leakage", "--crosscoder", runs["crosscoder"], "--base", runs["base"], "--blocked", runs[blocked], "--features", "shared",
        "--dataset", "synthetic:arithmetic", "--seq-len", "64", "--max-tokens", "3000", "--out", out, *extra,
    ]])  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads((out / "leakage.json").read_text()), result.output


def test_relative_change_formula():
    """sum |f_blocked - f_base| / sum f_base per feature; NaN where the feature never fires on base."""
    rel = relative_change(torch.tensor([1.0, 0.0, 3.0, 2.0]), torch.tensor([2.0, 0.0, 3.0, 0.0]))
    assert rel[0] == 0.5 and math.isnan(rel[1]) and rel[2] == 1.0 and math.isnan(rel[3])

    cc = exact_crosscoder(d_model=8, layer=0)
    torch.manual_seed(0)
    base, blocked = torch.randn(50, 8), torch.randn(50, 8)
    shift = feature_shift(
        cc, [torch.stack([base[:20], blocked[:20]], 1), torch.stack([base[20:], blocked[20:]], 1)], "base"
    )
    f_base, f_blocked = cc.encode_source(base, "base").double(), cc.encode_source(blocked, "base").double()
    assert shift.n_tokens == 50
    torch.testing.assert_close(shift.base_sum, f_base.sum(0))
    torch.testing.assert_close(shift.relative_change, (f_blocked - f_base).abs().sum(0) / f_base.sum(0))
    assert torch.equal(shift.blocked_active, (f_blocked > 0).sum(0))


def test_matching_by_base_decoder_cosine():
    """A crosscoder matched against itself (features permuted) recovers the permutation with cosine 1, both ways."""
    cc = exact_crosscoder(d_model=8, layer=0)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    other = exact_crosscoder(d_model=8, layer=0)
    with torch.no_grad():
        other.W_dec.copy_(cc.W_dec[perm])
    protected = [0, 3, 5, 7]
    inverse = torch.argsort(perm)
    for method in ("hungarian", "argmax"):
        matching = match_protected(cc, other, protected, matching=method)
        assert matching.perm.tolist() == inverse[protected].tolist()
        assert torch.allclose(matching.cosine, torch.ones(4)) and matching.quality.frac_above_0_9 == 1.0
    part = crosscoder_leakage(cc, other, protected)
    assert part.summary()["protected"]["categories"]["shared"] == 4 and part.blocked == "sft"


@pytest.mark.slow
def test_blocked_model_moved_its_protected_features_less(runs, tmp_path):
    blocked, output = _leakage(runs, "blocked", tmp_path / "blocked")
    plain, _ = _leakage(runs, "plain", tmp_path / "plain")
    assert "protected / unprotected" in output
    b, p = blocked["relative_change"], plain["relative_change"]
    assert b["protected"]["n_features"] == 2 * N_SHARED and b["unprotected"]["n_features"] == 2 * (D_MODEL - N_SHARED)
    assert b["protected"]["n_active_on_base"] > 0.9 * 2 * N_SHARED
    # Blocking kept the protected features much closer to the base than plain fine-tuning did ...
    assert b["protected"]["median"] < 0.7 * p["protected"]["median"], (b, p)
    assert b["protected"]["pooled"] < 0.7 * p["protected"]["pooled"], (b, p)
    # ... and closer than the unprotected features of the same blocked model; without blocking the two groups move alike.
    assert b["median_ratio_protected_to_unprotected"] < 0.7 and b["pooled_ratio_protected_to_unprotected"] < 0.7, b
    assert 0.6 < p["median_ratio_protected_to_unprotected"] < 1.6, p

    out = tmp_path / "blocked"
    assert (
        blocked["settings"]["layer"] == 2
        and blocked["settings"]["model_name"] == "base"
        and blocked["n_tokens"] == 3000
    )
    assert blocked["protected_features"] == list(range(2 * N_SHARED))
    for name in ("leakage.json", "features.csv", "leakage.png", "leakage.svg"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "features.csv").open()))
    assert len(rows) == 2 * D_MODEL and sum(int(r["protected"]) for r in rows) == 2 * N_SHARED
    assert {"relative_change", "base_mean", "blocked_mean", "base_frequency"} <= set(rows[0])


def _base_vs_blocked_crosscoder(runs, out_dir):
    """A base-vs-blocked crosscoder trained on the tokens leakage compares (3000 tokens, several passes)."""
    from posttrain_probe.activations.live import LiveActivations
    from posttrain_probe.activations.live_config import LiveConfig
    from posttrain_probe.activations.memory import MemoryActivations
    from posttrain_probe.crosscoder import CrosscoderTrainingConfig, train_crosscoder

    live = LiveActivations(
        {"base": runs["base"], "blocked": runs["blocked"]},
        "synthetic:arithmetic",
        layer=2,
        config=LiveConfig(seq_len=64, max_tokens=3000),
    )
    acts = torch.cat([chunk.cpu() for chunk in live.chunks()])
    config = CrosscoderConfig(model_names=["base", "blocked"], n_features=128, layer=2)
    training = CrosscoderTrainingConfig(n_tokens=24000, batch_size=256, lr=0.003, log_every=20)
    train_crosscoder(MemoryActivations(acts, ["base", "blocked"], 2), config, training, out_dir, progress=False)
    return out_dir


@pytest.mark.slow
def test_base_vs_blocked_crosscoder(runs, tmp_path):
    """--blocked-crosscoder: a base-vs-blocked crosscoder trained on the compared activations; every protected feature is
    matched (one-to-one) and lands in a NormRatio band; the CSV and figure carry the matches."""
    out = tmp_path / "leak"
    trained = _base_vs_blocked_crosscoder(runs, out / "crosscoder")
    report, output = _leakage(runs, "blocked", out, "--blocked-crosscoder", trained)
    part = report["crosscoder"]
    assert "base-vs-blocked crosscoder" in output
    assert (out / "crosscoder" / "model.safetensors").is_file() and part["path"] == str(out / "crosscoder")
    assert part["models"] == ["base", "blocked"] and part["n_features"] == 128
    assert (
        sum(part["protected"]["categories"].values()) == 2 * N_SHARED
        and part["protected"]["categories"]["unmatched"] == 0
    )
    assert part["matching"]["method"] == "hungarian" and part["matching"]["n_distinct_targets"] == 2 * N_SHARED
    quality = part["matching"]["quality"]
    assert -1 <= quality["mean"] <= 1 and quality["n_matched"] == 2 * N_SHARED
    assert part["protected"]["left_shared_band"] <= part["protected"]["n_live"]
    assert sum(part["all_features"]["categories"].values()) == 128
    rows = [r for r in csv.DictReader((out / "features.csv").open()) if r["protected"] == "1"]
    assert all(
        r["matched_feature"] != "" and r["matched_category"] in ("shared", "base-only", "finetune-only", "dead")
        for r in rows
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--features", "sft-only"], "unknown feature set 'sft-only'"),
        (["--features", "shared", "--model-name", "rl"], "model 'rl' is not in this crosscoder"),
        (["--features", "3,999"], "out of range"),
        (["--features", "shared", "--layer", "1"], "trained at layer 2, leakage asked for layer 1"),
        (["--features", "shared", "--matching", "greedy"], "matching 'greedy'"),
        (["--features", "shared", "--blocked-crosscoder", "."], "holds no crosscoder"),
    ],
)
def test_bad_input_exits_2(runs, tmp_path, extra, message):
    result = runner.invoke(app, [str(a) for a in [
        "leakage", "--crosscoder", runs["crosscoder"], "--base", runs["base"], "--blocked", runs["plain"],
        "--dataset", "synthetic:arithmetic", "--out", tmp_path / "out", *extra,
    ]])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_width_mismatch_and_missing_crosscoder_exit_2(runs, tmp_path):
    exact_crosscoder(d_model=32).save_pretrained(tmp_path / "narrow")
    base = [
        "leakage", "--base", runs["base"], "--blocked", runs["plain"], "--features", "shared",
        "--dataset", "synthetic:arithmetic", "--out", tmp_path / "out",
    ]  # fmt: skip
    result = runner.invoke(app, [str(a) for a in [*base, "--crosscoder", tmp_path / "narrow"]])
    assert result.exit_code == 2 and "d_model 32" in result.output and "hidden size is 64" in result.output, (
        result.output
    )
    result = runner.invoke(app, [str(a) for a in [*base, "--crosscoder", tmp_path / "missing"]])
    assert result.exit_code == 2 and "does not exist" in result.output, result.output


def test_report_read_gives_back_what_write_wrote(runs, tmp_path):
    """LeakageReport.read(out) gives back the report leakage() wrote (the table holds 6 significant digits), part 2 included."""
    other = exact_crosscoder(seed=1)
    other.save_pretrained(tmp_path / "base-vs-blocked")
    config = LeakageConfig(
        crosscoder=runs["crosscoder"], base=str(runs["base"]), blocked=str(runs["blocked"]), features="shared",
        dataset="synthetic:arithmetic", seq_len=64, max_tokens=1000, out=tmp_path / "out", blocked_crosscoder=tmp_path / "base-vs-blocked",
    )  # fmt: skip
    report = leakage(config)
    back = LeakageReport.read(tmp_path / "out")
    assert back.features == report.features and back.crosscoder.features == report.crosscoder.features

    def close(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
        if isinstance(a, float) and isinstance(b, (int, float)):
            return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)
        return a == b

    assert close(back.to_dict(), report.to_dict()), (back.to_dict(), report.to_dict())
    assert torch.equal(back.crosscoder.matching.perm, report.crosscoder.matching.perm)


def test_config_from_yaml_equals_config_from_flags(tmp_path, monkeypatch):
    import posttrain_probe.analysis.leakage as leakage_module
    from posttrain_probe.config_io import load_config
    from posttrain_probe.errors import ProbeError

    seen = []

    def capture(config, **kwargs):
        seen.append(config)
        raise ProbeError("captured")

    monkeypatch.setattr(leakage_module, "leakage", capture)
    result = runner.invoke(app, [
        "leakage", "--crosscoder", "runs/cc", "--base", "Qwen/Qwen3-4B-Base", "--blocked", "runs/blocked", "--features", "3,17",
        "--dataset", "synthetic:arithmetic", "--out", "runs/leakage", "--max-tokens", "0", "--blocked-crosscoder", "runs/cc2",
        "--matching", "argmax", "--allow-model-mismatch",
    ])  # fmt: skip
    assert "captured" in result.output, result.output
    (tmp_path / "leakage.yaml").write_text(
        "crosscoder: runs/cc\nbase: Qwen/Qwen3-4B-Base\nblocked: runs/blocked\nfeatures: '3,17'\ndataset: synthetic:arithmetic\n"
        "out: runs/leakage\nmax_tokens: 0\nblocked_crosscoder: runs/cc2\nmatching: argmax\nallow_model_mismatch: true\n"
    )
    assert seen[0] == load_config(LeakageConfig, tmp_path / "leakage.yaml")


@pytest.mark.parametrize("with_crosscoder", [False, True])
def test_figure_legends_clear_the_bars(tmp_path, monkeypatch, with_crosscoder):
    """Planted shifts with bars under every corner of the axes (the legend used to land on them, as in the demo
    report's Figure 13): every legend lies in the band above the bars of its panel."""
    import matplotlib.transforms as mtransforms

    from posttrain_probe.analysis import plots
    from posttrain_probe.analysis.dynamics import FeatureMatching, MatchQuality
    from posttrain_probe.analysis.leakage_crosscoder import CrosscoderLeakage
    from posttrain_probe.analysis.leakage_report import plot_leakage
    from posttrain_probe.analysis.leakage_shift import FeatureShift

    gen = torch.Generator().manual_seed(0)
    n = 400
    change = 10.0 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 3.3 - 3.0)  # flat: bars under every corner
    base = torch.ones(n, dtype=torch.float64)
    shift = FeatureShift(n, base, base, change * base, torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.long))
    part2 = None
    if with_crosscoder:
        ratio = torch.cat([torch.full((300,), 0.02), torch.rand(100, generator=gen)])  # a tall bar at NormRatio 0
        matching = FeatureMatching(torch.arange(50), torch.ones(50), MatchQuality(1.0, 1.0, 1.0, 1.0, 50))
        part2 = CrosscoderLeakage(list(range(50)), matching, "hungarian", ratio, ["base", "blocked"], "base", "blocked")
    report = LeakageReport(list(range(0, n, 8)), shift, crosscoder=part2)
    figures = []
    save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figures.append(fig) or save(fig, path, **kw))
    assert [p.suffix for p in plot_leakage(report, tmp_path / "leakage")] == [".png", ".svg"]
    fig = figures[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    axes = fig.axes
    assert len(axes) == (2 if with_crosscoder else 1)
    for ax in axes:
        legend = ax.get_legend().get_window_extent(renderer)
        for stairs in ax.patches:
            counts, edges = stairs.get_data().values, stairs.get_data().edges
            for left, right, count in zip(edges[:-1], edges[1:], counts):
                if count <= 0:
                    continue
                corners = ax.transData.transform([(left, ax.get_ylim()[0]), (right, count)])
                bar = mtransforms.Bbox(corners)
                assert not legend.overlaps(bar), (ax.get_title(), left, right, count)
