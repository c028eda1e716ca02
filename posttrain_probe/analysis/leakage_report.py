"""The result of ``leakage`` (:class:`LeakageReport`): ``leakage.json``, ``features.csv`` and ``leakage.png``/``.svg``.

:meth:`LeakageReport.write` puts it in a directory, :meth:`LeakageReport.read` reads it back from the same files.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain_probe.analysis.jsonable import json_safe
from posttrain_probe.analysis.leakage_crosscoder import CrosscoderLeakage
from posttrain_probe.analysis.leakage_shift import FeatureShift, group_stats, ratio_or_nan
from posttrain_probe.errors import ProbeError


@dataclass
class LeakageReport:
    """Result of :func:`~posttrain_probe.analysis.leakage.leakage`: the activation shift of every feature, and
    optionally part 2; :meth:`write` puts it on disk, :meth:`read` reads it back."""

    features: list[int]
    """Protected feature indices (sorted)."""
    shift: FeatureShift
    """Per-feature sums over the compared tokens."""
    settings: dict[str, Any] = field(default_factory=dict)
    """What was compared: crosscoder, branch, layer, models, dataset, token budget."""
    crosscoder: CrosscoderLeakage | None = None
    """Part 2 (a base-vs-blocked crosscoder), if asked for."""

    @property
    def protected_mask(self) -> torch.Tensor:
        """[F] bool: protected features."""
        mask = torch.zeros(self.shift.base_sum.numel(), dtype=torch.bool)
        mask[torch.as_tensor(self.features, dtype=torch.long)] = True
        return mask

    @property
    def relative_change(self) -> torch.Tensor:
        """[F] relative change of every feature's activation, base -> blocked (NaN: never fires on base)."""
        return self.shift.relative_change

    def summary(self) -> dict[str, Any]:
        """JSON-ready: relative change of protected vs unprotected features (and part 2, if any)."""
        protected = group_stats(self.shift, self.protected_mask)
        unprotected = group_stats(self.shift, ~self.protected_mask)
        out: dict[str, Any] = {
            "n_tokens": self.shift.n_tokens,
            "relative_change": {
                "definition": "per feature: sum_x |f_i(blocked) - f_i(base)| / sum_x f_i(base), per-source codes of one crosscoder branch on the same tokens; median/mean over features active on base; pooled = summed over the group's features",
                "protected": protected,
                "unprotected": unprotected,
                "median_ratio_protected_to_unprotected": ratio_or_nan(protected["median"], unprotected["median"]),
                "pooled_ratio_protected_to_unprotected": ratio_or_nan(protected["pooled"], unprotected["pooled"]),
            },
        }
        if self.crosscoder is not None:
            out["crosscoder"] = self.crosscoder.summary()
        return out

    def to_dict(self) -> dict[str, Any]:
        """Settings, summary and the protected feature list, JSON-ready (NaN -> null)."""
        return json_safe(
            {
                "format": "posttrain-probe/leakage",
                "format_version": 1,
                "settings": self.settings,
                **self.summary(),
                "protected_features": self.features,
            }
        )

    def write(self, out_dir: str | os.PathLike) -> dict[str, Any]:
        """Write ``leakage.json``, ``features.csv`` (one row per feature) and ``leakage.png``/``.svg``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, Any] = {"report": str(out / "leakage.json"), "table": str(out / "features.csv")}
        self._write_csv(out / "features.csv")
        files["figures"] = [str(p) for p in plot_leakage(self, out / "leakage")]
        (out / "leakage.json").write_text(json.dumps({**self.to_dict(), "files": files}, indent=2))
        return files

    @classmethod
    def read(cls, out_dir: str | os.PathLike) -> LeakageReport:
        """The report :meth:`write` put in ``out_dir``, from ``leakage.json`` and ``features.csv``.

        The per-feature sums come back from the table's means and frequencies, which hold 6 significant digits.
        Part 2 comes back with the protected features' matches; the NormRatio of the other features of the
        base-vs-blocked crosscoder is not on disk (NaN), its bands are those ``leakage.json`` records.
        """
        from posttrain_probe.analysis.dynamics import FeatureMatching, MatchQuality

        out = Path(out_dir)
        try:
            data = json.loads((out / "leakage.json").read_text())
            with open(out / "features.csv", newline="") as handle:
                rows = list(csv.DictReader(handle))
        except (OSError, json.JSONDecodeError) as err:
            raise ProbeError(f"cannot read the leakage report in {out}: {err}") from err

        def column(name: str) -> torch.Tensor:
            return torch.tensor([float(r[name]) if r[name] != "" else math.nan for r in rows], dtype=torch.float64)

        n = data["n_tokens"]
        base_sum, blocked_sum = column("base_mean") * max(n, 1), column("blocked_mean") * max(n, 1)
        change = torch.where(base_sum > 0, column("relative_change") * base_sum, blocked_sum)  # f_base = 0: |f_blocked|
        active = [(column(f"{name}_frequency") * max(n, 1)).round().long() for name in ("base", "blocked")]
        shift = FeatureShift(n, base_sum, blocked_sum, change, *active)
        part = None
        if "crosscoder" in data:
            info = data["crosscoder"]
            protected = [r for r in rows if r["protected"] == "1"]
            perm = torch.tensor(
                [int(r["matched_feature"]) if r["matched_feature"] != "" else -1 for r in protected], dtype=torch.long
            )
            cosine = torch.tensor(
                [float(r["match_cosine"]) if r["match_cosine"] != "" else math.nan for r in protected]
            )
            norm_ratio = torch.full((info["n_features"],), math.nan, dtype=torch.float64)
            for p, r in zip(perm.tolist(), protected):
                if p >= 0 and r["matched_norm_ratio"] != "":
                    norm_ratio[p] = float(r["matched_norm_ratio"])
            part = CrosscoderLeakage(
                features=[int(r["feature"]) for r in protected], matching=FeatureMatching(perm, cosine, MatchQuality(**info["matching"]["quality"])),
                method=info["matching"]["method"], norm_ratio=norm_ratio, model_names=info["models"], base=info["base"],
                blocked=info["blocked"], path=info["path"], all_features=info["all_features"],
            )  # fmt: skip
        return cls(data["protected_features"], shift, data["settings"], part)

    def _write_csv(self, path: Path) -> None:
        shift, n = self.shift, max(self.shift.n_tokens, 1)
        rel = shift.relative_change.tolist()
        protected = self.protected_mask.tolist()
        columns = [
            "feature",
            "protected",
            "base_mean",
            "blocked_mean",
            "base_frequency",
            "blocked_frequency",
            "relative_change",
        ]
        part2: dict[int, tuple] = {}
        if self.crosscoder is not None:
            columns += ["matched_feature", "match_cosine", "matched_norm_ratio", "matched_category"]
            cc = self.crosscoder
            for f, p, cos, nr, cat in zip(
                cc.features,
                cc.matching.perm.tolist(),
                cc.matching.cosine.tolist(),
                cc.protected_norm_ratio.tolist(),
                cc.protected_categories,
            ):
                part2[f] = (p, cos, nr, cat)

        def number(x: float) -> str:
            return "" if not math.isfinite(x) else f"{x:.6g}"

        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for i in range(shift.base_sum.numel()):
                row = [
                    i,
                    int(protected[i]),
                    number(float(shift.base_sum[i]) / n),
                    number(float(shift.blocked_sum[i]) / n),
                    number(int(shift.base_active[i]) / n),
                    number(int(shift.blocked_active[i]) / n),
                    number(rel[i]),
                ]
                if self.crosscoder is not None:
                    p, cos, nr, cat = part2.get(i, (None, math.nan, math.nan, ""))
                    row += ["" if p is None or p < 0 else p, number(cos), number(nr), cat]
                writer.writerow(row)


_LEGEND_HEADROOM = 1.45
"""Top of the leakage figure's y axes over its tallest bar: the band above the bars holds the legend."""


def plot_leakage(report: LeakageReport, path) -> list[Path]:
    """Figure of a leakage report: (a) distribution of the relative change of protected vs unprotected features
    (features active on base; log axis, floor 1e-4); (b) with part 2, the NormRatio histogram of the new
    base-vs-blocked crosscoder, all live features vs the matches of protected features (paper S figs. 10-12).
    Writes ``<path>.png`` and ``<path>.svg``; returns both."""
    from posttrain_probe.analysis.plots import PALETTE, new_figure, plot_style, save_figure

    rel = report.relative_change.numpy()
    mask = report.protected_mask.numpy()
    floor = 1e-4
    groups = [("protected", rel[mask]), ("unprotected", rel[~mask])]
    groups = [(name, np.clip(v[~np.isnan(v)], floor, None)) for name, v in groups]
    present = [g for g in groups if g[1].size]
    panels = 2 if report.crosscoder is not None else 1
    with plot_style():
        fig = new_figure(5.0 * panels, 3.4)
        axes = fig.subplots(1, panels, squeeze=False)[0]
        ax = axes[0]
        tallest = 0.0
        if present:
            low = max(floor, 0.8 * min(float(v.min()) for _, v in present))
            top = max(float(v.max()) for _, v in present)
            edges = np.logspace(math.log10(low), math.log10(max(top * 1.05, low * 10)), 26)
            for j, (name, values) in enumerate(present):
                colour = PALETTE[j]
                weights = np.full(values.size, 1.0 / values.size)
                counts, _ = np.histogram(values, bins=edges, weights=weights)
                tallest = max(tallest, float(counts.max()))
                median = float(np.median(values))
                ax.stairs(
                    counts, edges, color=colour, linewidth=1.4, label=f"{name} (n={values.size:,}, median {median:.3g})"
                )
                ax.axvline(median, color=colour, linestyle=":", linewidth=1.0)
            ax.set_xscale("log")
            ax.set_ylim(0.0, tallest * _LEGEND_HEADROOM)  # the legend sits in the band above the tallest bar
            ax.legend(frameon=True, framealpha=0.9, edgecolor="none", loc="upper left")
        ax.set_xlabel("relative change of activation, base -> blocked")
        ax.set_ylabel("fraction of features")
        ax.set_title("How much features moved under blocking")
        if report.crosscoder is not None:
            cc = report.crosscoder
            ax = axes[1]
            edges = np.linspace(0.0, 1.0, 41)
            all_nr = cc.norm_ratio.double().numpy()
            tallest = 1.0
            prot_nr = cc.protected_norm_ratio.double().numpy()
            for j, (name, values) in enumerate((("all features", all_nr), ("matched protected", prot_nr))):
                values = values[~np.isnan(values)]
                counts, _ = np.histogram(values, bins=edges)
                tallest = max(tallest, float(counts.max(initial=0)))
                ax.stairs(counts, edges, color=PALETTE[j + 2], linewidth=1.4, label=f"{name} (n={values.size:,})")
            ax.set_yscale("log")
            ax.set_ylim(0.7, tallest * (tallest / 0.7) ** (_LEGEND_HEADROOM - 1.0))  # the same band, in log units
            for edge in (0.4, 0.6):
                ax.axvline(edge, color="#444444", linestyle="--", linewidth=0.8)
            ax.set_xlim(0.0, 1.0)
            ax.set_xlabel(f"NormRatio {cc.base} vs {cc.blocked}  (0 = {cc.blocked}-only, 1 = {cc.base}-only)")
            ax.set_ylabel("features (log scale)")
            ax.set_title("Base-vs-blocked crosscoder")
            ax.legend(frameon=False, loc="upper left")
        return save_figure(fig, path)
