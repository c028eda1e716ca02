"""The result of ``features fisher`` (:class:`FisherReport`): feature sets, tables, summary and the rho figure.

:meth:`FisherReport.write` puts it in a directory (``fisher_features.json``, ``reasonscore_features.json``,
``features.<csv|parquet>``, ``rho.<csv|parquet>``, ``summary.json``, ``rho.png``/``.svg``) and
:meth:`FisherReport.read` reads it back from the same files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain_probe.analysis.fisher_config import TABLE_FORMATS
from posttrain_probe.analysis.fisher_stats import EPSILON, FisherSelection, SegmentStats, fisher_importance_ratio
from posttrain_probe.analysis.jsonable import json_safe
from posttrain_probe.analysis.reasonscore import ReasonScoreResult
from posttrain_probe.analysis.segments import SEGMENTS
from posttrain_probe.errors import ProbeError


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _distribution(values: np.ndarray) -> dict[str, Any]:
    values = _finite(values)
    if values.size == 0:
        return {"n_docs": 0}
    q = np.quantile(values, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "n_docs": int(values.size), "mean": float(values.mean()), "std": float(values.std()), "median": float(q[2]),
        "q10": float(q[0]), "q25": float(q[1]), "q75": float(q[3]), "q90": float(q[4]),
        "fraction_zero": float((values == 0).mean()), "fraction_one": float((values == 1).mean()),
    }  # fmt: skip


DEGENERATE_RHO = 0.99
"""rho at or above this on every document of both segments means the selection fires everywhere."""


def _auc(a: np.ndarray, b: np.ndarray) -> float:
    """P(rho_reasoning > rho_solution) + 0.5 P(equal) over document pairs (Mann-Whitney AUC)."""
    a, b = _finite(a), _finite(b)
    if a.size == 0 or b.size == 0:
        return math.nan
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([a, b]))
    return float((ranks[: a.size].sum() - a.size * (a.size + 1) / 2) / (a.size * b.size))


@dataclass
class FisherReport:
    """Everything :func:`~posttrain_probe.analysis.fisher.features_fisher` found; :meth:`write` puts it on disk,
    :meth:`read` reads it back."""

    settings: dict[str, Any]
    """Inputs: crosscoder, models and branches, layer, dataset, segment format, limits."""
    select_model: str
    """Model the features were selected on."""
    selection: FisherSelection
    """The selected features and the ratio of every feature."""
    stats: dict[str, SegmentStats]
    """Per model (in the order given): segment statistics, rho included."""
    documents: dict[str, int]
    """Document counts: n_docs, with_reasoning, with_solution, cut_by_seq_len."""
    reasonscore: ReasonScoreResult | None = None
    """The ReasonScore baseline on the select model (None when switched off)."""
    crosscoder: Any = field(default=None, repr=False)
    """The crosscoder object (its fingerprint goes into the feature sets when it has no directory)."""
    table_format: str = "csv"
    """Format of the tables :meth:`write` writes: csv or parquet."""

    @property
    def features(self) -> list[int]:
        """The selected features, best first."""
        return self.selection.features

    def table(self):
        """One row per feature (``pyarrow.Table``): E_r, E_s, ratio, frequencies, flags, ranks, ReasonScore, and
        E_r/E_s/ratio of every other model through its branch."""
        import pyarrow as pa

        stats = self.stats[self.select_model]
        mean_sq, freq = stats.mean_sq.numpy(), stats.frequency.numpy()
        n_features = mean_sq.shape[1]
        rank = np.full(n_features, -1)
        rank[self.selection.features] = np.arange(1, len(self.selection.features) + 1)
        columns: dict[str, Any] = {
            "feature": pa.array(np.arange(n_features, dtype=np.int64)),
            "e_reasoning": pa.array(mean_sq[0], pa.float64()),
            "e_solution": pa.array(mean_sq[1], pa.float64()),
            "importance_ratio": pa.array(self.selection.ratio.numpy(), pa.float64()),
            "freq_reasoning": pa.array(freq[0], pa.float64()),
            "freq_solution": pa.array(freq[1], pa.float64()),
            "live": pa.array(self.selection.live.numpy(), pa.bool_()),
            "candidate": pa.array(self.selection.candidates.numpy(), pa.bool_()),
            "selected": pa.array(rank > 0, pa.bool_()),
            "fisher_rank": pa.array([int(r) if r > 0 else None for r in rank], pa.int64()),
        }
        if self.reasonscore is not None:
            order = torch.sort(self.reasonscore.score, descending=True, stable=True).indices.numpy()
            rs_rank = np.empty(n_features, dtype=np.int64)
            rs_rank[order] = np.arange(1, n_features + 1)
            columns["reasonscore"] = pa.array(self.reasonscore.score.numpy(), pa.float64())
            columns["reasonscore_entropy"] = pa.array(self.reasonscore.entropy.numpy(), pa.float64())
            columns["reasonscore_rank"] = pa.array(rs_rank)
        for name, other in self.stats.items():
            if name == self.select_model:
                continue
            other_sq = other.mean_sq
            columns[f"e_reasoning_{name}"] = pa.array(other_sq[0].numpy(), pa.float64())
            columns[f"e_solution_{name}"] = pa.array(other_sq[1].numpy(), pa.float64())
            columns[f"importance_ratio_{name}"] = pa.array(
                fisher_importance_ratio(other_sq[0], other_sq[1]).numpy(), pa.float64()
            )
        return pa.table(columns)

    def rho_table(self):
        """One row per (model, document): segment token counts and rho (``pyarrow.Table``; null: no segment)."""
        import pyarrow as pa

        names, docs, n_r, n_s, rho_r, rho_s = [], [], [], [], [], []
        for name, stats in self.stats.items():
            rho = stats.rho.numpy()
            n = rho.shape[0]
            names += [name] * n
            docs.append(np.arange(n))
            n_r.append(stats.doc_tokens[:, 0].numpy())
            n_s.append(stats.doc_tokens[:, 1].numpy())
            rho_r += [None if math.isnan(v) else float(v) for v in rho[:, 0]]
            rho_s += [None if math.isnan(v) else float(v) for v in rho[:, 1]]
        return pa.table({
            "model": pa.array(names, pa.string()), "doc": pa.array(np.concatenate(docs)),
            "n_reasoning_tokens": pa.array(np.concatenate(n_r)), "n_solution_tokens": pa.array(np.concatenate(n_s)),
            "rho_reasoning": pa.array(rho_r, pa.float64()), "rho_solution": pa.array(rho_s, pa.float64()),
        })  # fmt: skip

    def rho_summary(self) -> dict[str, Any]:
        """Per model: distribution of rho over documents for each segment, and how well the two separate."""
        out = {}
        for name, stats in self.stats.items():
            rho = stats.rho.numpy()
            r, s = rho[:, 0], rho[:, 1]
            fr, fs = _finite(r), _finite(s)
            out[name] = {
                "reasoning": _distribution(r),
                "solution": _distribution(s),
                "separation": {
                    "mean_difference": float(fr.mean() - fs.mean()) if fr.size and fs.size else math.nan,
                    "auc_reasoning_above_solution": _auc(r, s),
                },
            }
            if fr.size and fs.size and min(fr.min(), fs.min()) >= DEGENERATE_RHO:
                out[name]["warning"] = (
                    f"rho >= {DEGENERATE_RHO} on every document of both segments: the selected features fire on almost every "
                    "token, so rho cannot separate reasoning from solution; the crosscoder is probably undertrained or not "
                    "sparse (see the warnings in its training_status.json)"
                )
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: settings, documents, the selection and the rho statistics (NaN -> null)."""
        stats = self.stats[self.select_model]
        mean_sq, sel = stats.mean_sq, self.selection
        out: dict[str, Any] = {
            "format": "posttrain-probe/fisher-features",
            "format_version": 1,
            "settings": self.settings,
            "documents": {**self.documents, "tokens": {seg: int(stats.n_tokens[j]) for j, seg in enumerate(SEGMENTS)}},
            "fisher": {
                "definition": "ImportanceRatio(j) = E_reasoning[f_j^2] / max(E_solution[f_j^2], 1e-8) (paper S eq. 1); candidates: live and E_reasoning >= floor; top-k by ratio",
                "model": self.select_model,
                "epsilon": EPSILON,
                "floor": sel.floor,
                "floor_quantile": sel.floor_quantile,
                "n_features": int(sel.ratio.numel()),
                "n_live": int(sel.live.sum()),
                "n_candidates": int(sel.candidates.sum()),
                "k": sel.k,
                "n_selected": len(sel.features),
                "selected": [
                    {
                        "feature": f,
                        "rank": r + 1,
                        "importance_ratio": float(sel.ratio[f]),
                        "e_reasoning": float(mean_sq[0, f]),
                        "e_solution": float(mean_sq[1, f]),
                    }
                    for r, f in enumerate(sel.features)
                ],
            },
            "rho": {
                "definition": "rho(x) = fraction of a segment's tokens on which some selected feature fires (paper S eq. 14), per document; documents without the segment are left out",
                "models": self.rho_summary(),
            },
        }
        if len(sel.features) < sel.k:
            out["fisher"]["note"] = (
                f"only {len(sel.features)} candidates passed the magnitude floor, fewer than k={sel.k}"
            )
        if self.reasonscore is not None:
            k = len(sel.features)
            part = self.reasonscore.summary(k)
            overlap = len(set(part["top_features"]) & set(sel.features))
            out["reasonscore"] = {
                **part,
                "model": self.select_model,
                "overlap_with_fisher": overlap,
                "overlap_fraction": overlap / k if k else math.nan,
            }
        return json_safe(out)

    def write(self, out_dir: str | os.PathLike) -> dict[str, Any]:
        """Write the feature sets, tables, summary and figure into ``out_dir``; returns the file paths.

        Files: ``fisher_features.json`` (feature set: provenance method, model, dataset, floor, k, layer, ...),
        ``reasonscore_features.json`` (the ReasonScore top-k, same size, for comparison), ``features.<fmt>``
        (:meth:`table`), ``rho.<fmt>`` (:meth:`rho_table`), ``summary.json``, ``rho.png``/``rho.svg``
        (``<fmt>``: :attr:`table_format`).
        """
        from posttrain_probe.analysis.feature_sets import write_feature_set
        from posttrain_probe.analysis.features import write_table

        table_format = self.table_format
        if table_format not in TABLE_FORMATS:
            raise ProbeError(f"table format {table_format!r}: expected csv or parquet")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sel, s = self.selection, self.settings
        provenance = {
            "model": self.select_model, "branch": s["branches"][self.select_model], "crosscoder_kind": s["kind"],
            "dataset": s["dataset"], "segment_format": s["segment_format"]["format"], "layer": s["layer"], "k": sel.k,
            "n_docs": self.documents["n_docs"],
        }  # fmt: skip
        files: dict[str, Any] = {}
        source = s["crosscoder"] if s["crosscoder"] is not None else self.crosscoder
        files["feature_set"] = str(write_feature_set(
            out / "fisher_features.json", sel.features, crosscoder=source, method="fisher-importance-ratio",
            floor=sel.floor, floor_quantile=sel.floor_quantile, ranked=sel.features, **provenance,
        ))  # fmt: skip
        if self.reasonscore is not None:
            top = self.reasonscore.top(len(sel.features))
            files["reasonscore_feature_set"] = str(write_feature_set(
                out / "reasonscore_features.json", top, crosscoder=source, method="reasonscore",
                alpha=self.reasonscore.alpha, window=list(self.reasonscore.window), ranked=top, **provenance,
            ))  # fmt: skip
        files["table"] = str(write_table(self.table(), out / f"features.{table_format}"))
        files["rho_table"] = str(write_table(self.rho_table(), out / f"rho.{table_format}"))
        rho = {name: (st.rho[:, 0].numpy(), st.rho[:, 1].numpy()) for name, st in self.stats.items()}
        files["figures"] = [
            str(p)
            for p in plot_rho_distributions(
                rho, out / "rho", title_suffix=f"{len(sel.features)} Fisher features of {self.select_model}"
            )
        ]
        files["summary"] = str(out / "summary.json")
        (out / "summary.json").write_text(json.dumps({**self.summary(), "files": files}, indent=2))
        return files

    @classmethod
    def read(cls, out_dir: str | os.PathLike) -> FisherReport:
        """The report :meth:`write` put in ``out_dir``, from ``summary.json`` and the two tables.

        What the files hold comes back: settings, documents, the selection, every model's segment sums and per
        document rho, the ReasonScore of every feature. Not on disk, hence None: the active counts of the models
        other than the select model and the ReasonScore window means; ``crosscoder`` is None.
        """
        out = Path(out_dir)
        try:
            summary = json.loads((out / "summary.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ProbeError(f"cannot read the Fisher report in {out}: {err}") from err
        table_format = Path(summary["files"]["table"]).suffix.lstrip(".")
        table, rho = (_read_table(out / f"{name}.{table_format}") for name in ("features", "rho"))
        fisher, docs = summary["fisher"], summary["documents"]
        select = fisher["model"]
        selection = FisherSelection(
            [row["feature"] for row in fisher["selected"]], _column(table, "importance_ratio"), _column(table, "live", torch.bool),
            _column(table, "candidate", torch.bool), fisher["floor"], fisher["floor_quantile"], fisher["k"],
        )  # fmt: skip
        stats = {}
        for name in dict.fromkeys(rho.column("model").to_pylist()):
            rows = np.asarray(rho.column("model").to_pylist()) == name
            doc_tokens = torch.stack(
                [torch.tensor(rho.column(c).to_numpy()[rows]) for c in ("n_reasoning_tokens", "n_solution_tokens")], 1
            ).long()
            values = torch.stack([_column(rho, c)[torch.as_tensor(rows)] for c in ("rho_reasoning", "rho_solution")], 1)
            n_tokens = doc_tokens.sum(0) if name != select else torch.tensor([docs["tokens"][s] for s in SEGMENTS])
            suffix = "" if name == select else f"_{name}"
            mean_sq = torch.stack([_column(table, f"e_{s}{suffix}") for s in SEGMENTS])
            scale = n_tokens.clamp_min(1).double()[:, None]
            active = None
            if name == select:
                active = (torch.stack([_column(table, f"freq_{s}") for s in SEGMENTS]) * scale).round().long()
            hits = (values.nan_to_num(0.0) * doc_tokens.double()).round()
            stats[name] = SegmentStats(n_tokens, mean_sq * scale, active, doc_tokens, hits, docs["cut_by_seq_len"])
        reasonscore = None
        if "reasonscore" in summary:
            part = summary["reasonscore"]
            reasonscore = ReasonScoreResult(
                score=_column(table, "reasonscore"), entropy=_column(table, "reasonscore_entropy"), mean_in=None, mean_out=None,
                word_means=None, words=list(part["words"]), word_tokens=list(part["words"].values()), n_in=part["n_tokens_in_windows"],
                n_out=part["n_tokens_outside"], alpha=part["alpha"], window=(part["window"]["before"], part["window"]["after"]),
                decoder_norm_weighted=part["decoder_norm_weighted"],
            )  # fmt: skip
        documents = {key: value for key, value in docs.items() if key != "tokens"}
        return cls(summary["settings"], select, selection, stats, documents, reasonscore, None, table_format)


def _read_table(path: Path):
    """A table :func:`~posttrain_probe.analysis.features.write_table` wrote (``pyarrow.Table``)."""
    if not path.exists():
        raise ProbeError(f"{path} is missing: expected the table of a Fisher report")
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path)
    import pyarrow.csv

    return pyarrow.csv.read_csv(path)


def _column(table, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One column as a CPU tensor (null -> NaN for floats)."""
    values = table.column(name).to_numpy(zero_copy_only=False)
    if dtype == torch.bool:
        return torch.tensor(values.astype(bool))
    return torch.tensor(np.asarray(values, dtype=np.float64), dtype=dtype)


_RHO_PANEL = (3.1, 2.0)
"""Width (at least: see _RHO_MIN_WIDTH) and height of one panel of the rho figure (inches)."""
_RHO_MARGINS = {
    "left": 0.62,
    "right": 0.15,
    "bottom": 0.55,
    "gap": 0.25,
    "titles": 0.46,
    "legend": 0.26,
    "suptitle": 0.3,
}
"""Fixed margins of the rho figure (inches): the axes' tick labels and x label below, two title lines per panel,
the legend row and the optional figure title above. Fixed, so the figure needs no layout pass when it is saved."""
_RHO_MIN_WIDTH = 4.8
"""Minimum width of the rho figure (inches): one panel widens to it."""


def _elided(name: str, limit: int) -> str:
    """``name`` with its middle replaced by an ellipsis so that it has ``limit`` characters (unchanged if shorter)."""
    return name if len(name) <= limit else f"{name[: limit // 2 - 1]}…{name[-(limit - limit // 2) :]}"


def _fit_title(ax, name: str, max_width: float, renderer) -> None:
    """Title ``ax`` with ``name``, its middle elided until the title renders within ``max_width`` display pixels
    (measured only for names long enough to need it)."""
    title = ax.set_title(name, pad=16)
    limit = len(name)
    while limit > 8 and len(name) > 16 and title.get_window_extent(renderer).width > max_width:
        limit -= max(1, limit // 8)
        title.set_text(_elided(name, limit))


def plot_rho_distributions(
    rho_by_model: Mapping[str, tuple[Any, Any]], path, *, bins: int = 20, title_suffix: str | None = None
) -> list[Path]:
    """Histograms of rho for reasoning vs solution segments, one panel per model (paper S figs. 4-6).

    ``rho_by_model`` maps a model name to ``(rho_reasoning [n_docs], rho_solution [n_docs])`` (unitless, in
    [0, 1]; NaN = the document has no such segment, left out). Bars give the fraction of documents per bin
    (``bins`` equal bins over [0, 1]) on one y scale for all panels; dotted lines mark the means, which each
    panel's second title line gives. The margins are fixed (:data:`_RHO_MARGINS`), so saving draws each format
    once. Writes ``<path>.png`` and ``<path>.svg``.
    """
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D

    from posttrain_probe.analysis.plots import PALETTE, new_figure, plot_style, save_figure

    if not rho_by_model:
        raise ProbeError("rho_by_model is empty: expected model name -> (rho_reasoning, rho_solution)")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ProbeError(f"bins={bins!r}: expected a positive integer")
    edges = np.linspace(0.0, 1.0, bins + 1)
    colours = {"reasoning": PALETTE[1], "solution": PALETTE[0]}  # paper: reasoning red, solution blue
    values = {
        name: {seg: _finite(np.asarray(v, dtype=np.float64).reshape(-1)) for seg, v in zip(SEGMENTS, pair)}
        for name, pair in rho_by_model.items()
    }
    fractions = {
        name: {seg: np.histogram(np.clip(v, 0.0, 1.0), bins=edges)[0] / v.size for seg, v in segs.items() if v.size}
        for name, segs in values.items()
    }
    top = max((f.max() for segs in fractions.values() for f in segs.values()), default=0.0)
    m, n = _RHO_MARGINS, len(values)
    panel_h = _RHO_PANEL[1]  # panels widen to fill the minimum width, which the legend and x label need
    panel_w = max(_RHO_PANEL[0], (_RHO_MIN_WIDTH - m["left"] - m["right"] - (n - 1) * m["gap"]) / n)
    above = m["titles"] + m["legend"] + (m["suptitle"] if title_suffix else 0.0)
    width = m["left"] + n * panel_w + (n - 1) * m["gap"] + m["right"]
    height = m["bottom"] + panel_h + above
    with plot_style():
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        fig = new_figure(width, height, layout="none")
        renderer = FigureCanvasAgg(fig).get_renderer()  # measures the titles that may not fit their panel
        for i, (name, segs) in enumerate(values.items()):
            x0 = m["left"] + i * (panel_w + m["gap"])
            ax = fig.add_axes((x0 / width, m["bottom"] / height, panel_w / width, panel_h / height))
            means = []
            for segment, v in segs.items():
                if not v.size:
                    means.append(f"{segment} –")
                    continue
                colour = colours[segment]  # one artist: the filled steps with their outline
                ax.stairs(
                    fractions[name][segment], edges, fill=True, facecolor=to_rgba(colour, 0.3), edgecolor=colour,
                    linewidth=1.3,
                )  # fmt: skip
                ax.axvline(float(v.mean()), color=colour, linestyle=":", linewidth=1.0)
                means.append(f"{segment} {v.mean():.2f}")
            ax.set_xlim(0.0, 1.0)
            ax.set_ylim(0.0, max(top, 1e-3) * 1.08)
            ax.set_xticks(np.linspace(0.0, 1.0, 6), [f"{t:.1f}" for t in np.linspace(0.0, 1.0, 6)])
            _fit_title(ax, name, panel_w * fig.dpi, renderer)
            ax.text(
                0.5, 1.02, "mean ρ: " + ", ".join(means), transform=ax.transAxes, ha="center", va="bottom", fontsize=8
            )
            ax.grid(axis="y", color="#DDDDDD", linewidth=0.6)
            ax.set_axisbelow(True)
            if i:
                ax.tick_params(labelleft=False)
            else:
                ax.set_ylabel("fraction of documents")
        centre = (m["left"] + (n * panel_w + (n - 1) * m["gap"]) / 2) / width
        fig.text(
            centre,
            0.08 / height,
            "ρ: fraction of tokens with a selected feature active",
            ha="center",
            va="bottom",
        )
        counts = {seg: {v[seg].size for v in values.values()} for seg in SEGMENTS}
        handles = [Line2D([], [], color=colours[seg], linewidth=1.3) for seg in SEGMENTS]
        labels = [seg + (f" (n={counts[seg].pop():,} docs)" if len(counts[seg]) == 1 else "") for seg in SEGMENTS]
        legend_y = (m["bottom"] + panel_h + m["titles"] + m["legend"]) / height
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(centre, legend_y), ncol=2, frameon=False)
        if title_suffix:
            fig.suptitle(f"Distribution of ρ per model ({title_suffix})", fontsize=10, y=1.0 - 0.06 / height, va="top")
        return save_figure(fig, path, tight=False)
