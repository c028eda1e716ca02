"""Figures: every plot function writes a readable PNG and an SVG, and rejects bad input."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from posttrain_probe.analysis.dynamics import RankShifts, rank_shifts, topk_overlap
from posttrain_probe.analysis.plots import (
    plot_mas_distributions,
    plot_norm_ratio_vs_cosine,
    plot_nrn_histograms,
    plot_rank_shifts,
    plot_topk_overlap,
)
from posttrain_probe.errors import ProbeError

F = 400
RNG = np.random.default_rng(0)


def _check_written(paths: list[Path], stem: Path) -> None:
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert all(p.parent == stem.parent and p.stem == stem.name for p in paths)
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
    image = matplotlib.image.imread(paths[0])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)
    assert image[..., :3].std() > 0  # something was drawn
    assert paths[1].read_text().lstrip().startswith("<?xml") and "<svg" in paths[1].read_text()


def _nrn(spread: float) -> np.ndarray:
    x = np.clip(0.5 + RNG.laplace(0, spread, F), 0, 1)
    x[:5] = np.nan
    return x


def _scores() -> torch.Tensor:
    return torch.rand(4, F, generator=torch.Generator().manual_seed(1))


def test_plot_nrn_histograms(tmp_path):
    stem = tmp_path / "figs" / "nrn"  # parent is created
    paths = plot_nrn_histograms({"SFT": _nrn(0.1), "GRPO": torch.tensor(_nrn(0.03))}, stem, bins=40, title="t")
    _check_written(paths, stem)


def test_plot_mas_distributions(tmp_path):
    logits = RNG.normal(size=(F, 3))
    mas = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    mas[0] = np.nan
    paths = plot_mas_distributions(mas, ["base", "SFT", "GRPO"], tmp_path / "mas.png")  # suffix dropped
    _check_written(paths, tmp_path / "mas")


def test_plot_norm_ratio_vs_cosine(tmp_path):
    nr = np.clip(0.5 + RNG.laplace(0, 0.08, F), 0, 1)
    cos = np.clip(1 - RNG.exponential(0.2, F), -1, 1)
    cats = np.where(nr > 0.6, "base-only", np.where(nr < 0.4, "finetune-only", "shared")).tolist()
    cats[:3] = ["dead"] * 3
    cats[3] = "fine-tune-only"  # alias
    cats[4] = "other"  # unknown labels get a spare colour
    paths = plot_norm_ratio_vs_cosine(nr, cos, cats, tmp_path / "nr", highlight=np.arange(10, 20))
    _check_written(paths, tmp_path / "nr")


def test_plot_topk_overlap(tmp_path):
    ov = topk_overlap(_scores(), k=50)
    paths = plot_topk_overlap(ov, ["c1", "c2", "c3", "c4"], tmp_path / "overlap")
    _check_written(paths, tmp_path / "overlap")


def test_plot_rank_shifts(tmp_path):
    rs = rank_shifts(_scores(), k=50)
    assert rs.blank.any() and (~rs.blank).any()
    paths = plot_rank_shifts(rs, ["c1", "c2", "c3", "c4"], tmp_path / "shifts")
    _check_written(paths, tmp_path / "shifts")


@pytest.mark.parametrize("k", [10, 50])
def test_rank_shifts_title_and_key_do_not_overlap(k, tmp_path, monkeypatch):
    """The title, the key of the blank cells and every label lie inside the figure, and no two of them overlap (the
    key once sat above the axes and ran into a long title at k = 10)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    import posttrain_probe.analysis.plots as plots

    figures, save = [], plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figures.append(fig) or save(fig, path, **kw))
    labels = [f"rl-step-{i}" for i in range(1, 6)]
    plot_rank_shifts(
        rank_shifts(torch.rand(5, 200, generator=torch.Generator().manual_seed(0)), k=k), labels, tmp_path / "rs"
    )
    fig = figures[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    (axes, *_), (legend,) = fig.axes, fig.legends
    title, key = axes.title.get_window_extent(renderer), legend.get_window_extent(renderer)
    assert axes.title.get_text().startswith("Rank shifts of the top-")
    assert not title.overlaps(key) and key.y1 < axes.get_window_extent(renderer).y0  # the key sits below the axes
    frame = fig.bbox
    for artist in [t for t in fig.findobj(Text) if t.get_visible() and t.get_text()] + [legend]:
        box = artist.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, artist


def test_plot_rank_shifts_all_blank(tmp_path):
    rs = RankShifts(
        features=torch.zeros(1, 5, dtype=torch.int64),
        shift=torch.full((1, 5), 100.0),
        blank=torch.ones(1, 5, dtype=torch.bool),
    )
    _check_written(plot_rank_shifts(rs, ["a", "b"], tmp_path / "blank"), tmp_path / "blank")


def _good_rank_shifts() -> RankShifts:
    return rank_shifts(_scores(), k=10)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: plot_nrn_histograms({}, p), "empty"),
        (lambda p: plot_nrn_histograms({"a": np.array([])}, p), "non-empty"),
        (lambda p: plot_nrn_histograms({"a": np.full(4, np.nan)}, p), "all NaN"),
        (lambda p: plot_nrn_histograms({"a": np.array([0.2, 1.5])}, p), r"\[0, 1\]"),
        (lambda p: plot_nrn_histograms({"a": np.array([0.2, 0.5])}, p, bins=0), "bins=0"),
        (lambda p: plot_mas_distributions(np.full((4, 2), 0.5), ["a", "b", "c"], p), "model_names"),
        (lambda p: plot_mas_distributions(np.full(4, 0.5), ["a"], p), "2-D"),
        (lambda p: plot_norm_ratio_vs_cosine(np.full(4, 0.5), np.ones(3), ["shared"] * 4, p), "cosine has 3"),
        (lambda p: plot_norm_ratio_vs_cosine(np.full(4, 0.5), np.ones(4), ["shared"] * 3, p), "categories"),
        (lambda p: plot_norm_ratio_vs_cosine(np.full(2, 0.5), np.ones(2), ["dead"] * 2, p), "no feature"),
        (
            lambda p: plot_norm_ratio_vs_cosine(np.full(2, 0.5), np.ones(2), ["shared"] * 2, p, highlight=[5]),
            "highlight",
        ),
        (lambda p: plot_topk_overlap(np.ones((2, 3)), ["a", "b"], p), "square"),
        (lambda p: plot_topk_overlap(np.ones((2, 2)), ["a"], p), "labels"),
        (lambda p: plot_topk_overlap(np.full((2, 2), 2.0), ["a", "b"], p), r"\[0, 1\]"),
        (lambda p: plot_rank_shifts(_good_rank_shifts(), ["a", "b", "c"], p), "labels has 3"),
        (lambda p: plot_rank_shifts(np.ones((2, 2)), ["a", "b", "c"], p), "RankShifts"),
        (
            lambda p: plot_rank_shifts(
                RankShifts(
                    torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 3), torch.zeros(1, 2, dtype=torch.bool)
                ),
                ["a", "b"],
                p,
            ),
            "blank",
        ),
    ],
)
def test_bad_input_raises_probe_error(tmp_path, call, message):
    with pytest.raises(ProbeError, match=message):
        call(tmp_path / "bad")
    assert not list(tmp_path.iterdir())  # nothing written
