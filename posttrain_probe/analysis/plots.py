"""Publication-style figures of the attribution and dynamics analyses (matplotlib, no pyplot).

One function per figure of the papers; each takes arrays (numpy or torch), an output path stem
(``out/nrn`` or ``out/nrn.png``), writes ``<stem>.png`` and ``<stem>.svg`` side by side and
returns the two paths. Figures are built on ``matplotlib.figure.Figure`` and rendered by the Agg
(PNG) and SVG backends, so no global backend or pyplot state is touched. matplotlib is imported
inside the functions (docs/design.md: imported lazily where used).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from posttrain_probe.errors import ProbeError

# Okabe-Ito colours: distinguishable with colour-vision deficiencies and in greyscale print.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
_CATEGORY_COLOURS = {
    "base-only": "#0072B2",
    "shared": "#A0A0A0",
    "finetune-only": "#E69F00",
}
_CATEGORY_ALIASES = {"fine-tune-only": "finetune-only", "ft-only": "finetune-only", "tuned-only": "finetune-only"}
_DEAD = "dead"
_HIGHLIGHT_COLOUR = "#D62728"
BLANK_COLOUR = "#E4E4E4"
_DPI = 200

_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.8,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.05,
    "svg.fonttype": "none",
}


@contextlib.contextmanager
def plot_style():
    """Context manager: the project's matplotlib rc settings (fonts, colours, SVG text) for every figure."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        yield


def new_figure(width: float, height: float, *, layout: str = "constrained"):
    """A matplotlib Figure of ``width`` x ``height`` inches (no pyplot state).

    ``layout``: "constrained" (default) lays the axes out when the figure is saved; "none" keeps the positions the
    caller gives (``fig.add_axes``), for figures with fixed margins saved by ``save_figure(..., tight=False)``.
    """
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def save_figure(fig, path, *, tight: bool = True) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg``; a .png/.svg suffix on ``path`` is dropped.

    ``tight`` (default) crops to the drawn artists (``savefig.bbox`` of :func:`plot_style`), which costs a layout
    draw per format; ``tight=False`` saves the whole figure as laid out, one draw per format (a figure built with
    ``new_figure(..., layout="none")`` and fixed margins).
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (".png", ".svg") else path
    if not stem.name:
        raise ProbeError(f"output path {str(path)!r} has no file name; expected a path stem like out/nrn")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("png", "svg"):
        out = stem.parent / f"{stem.name}.{ext}"
        # PNG at zlib level 2: 1.7x faster to encode than Pillow's default 6, about 17% larger files
        extra = {"pil_kwargs": {"compress_level": 2}} if ext == "png" else {}
        fig.savefig(out, format=ext, dpi=_DPI, bbox_inches=None if tight else fig.bbox_inches, **extra)
        written.append(out)
        if fig.get_layout_engine() is not None:
            fig.set_layout_engine("none")  # the layout is done: keep it, do not recompute it per format
    return written


def _vector(values, name: str) -> np.ndarray:
    """1-D float array, non-empty."""
    try:
        arr = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ProbeError(f"{name} could not be read as numbers ({exc}); expected a 1-D array") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ProbeError(f"{name} has shape {arr.shape}; expected a non-empty 1-D array [F]")
    return arr


def as_matrix(values, name: str) -> np.ndarray:
    """2-D float array, non-empty."""
    try:
        arr = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ProbeError(f"{name} could not be read as numbers ({exc}); expected a 2-D array") from None
    if arr.ndim != 2 or arr.size == 0:
        raise ProbeError(f"{name} has shape {arr.shape}; expected a non-empty 2-D array")
    return arr


def as_labels(labels, n: int, name: str, what: str) -> list[str]:
    """``labels`` as strings, exactly ``n`` of them (one per ``what``), else ProbeError naming ``name``."""
    labels = [str(x) for x in labels]
    if len(labels) != n:
        raise ProbeError(f"{name} has {len(labels)} entries; expected {n} (one per {what})")
    return labels


def _log_step_histograms(ax, series: Sequence[tuple[str, np.ndarray]], edges: np.ndarray) -> None:
    """Step histograms of several 1-D samples on one log-count axis."""
    for j, (label, values) in enumerate(series):
        counts, _ = np.histogram(values, bins=edges)
        ax.stairs(counts, edges, label=label, color=PALETTE[j % len(PALETTE)], linewidth=1.4)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.7)
    ax.set_xlim(edges[0], edges[-1])
    ax.grid(axis="y", which="major", color="#DDDDDD", linewidth=0.6)
    ax.set_axisbelow(True)


def plot_nrn_histograms(
    nrn_by_model: Mapping[str, object], path, bins: int = 50, title: str | None = None
) -> list[Path]:
    """NRN histograms of several tuned models against one base (paper R sec. 5.1, fig. 1).

    ``nrn_by_model`` maps a tuned model's name to its NRN per feature [F] (unitless, in [0, 1];
    0 = base-only, 0.5 = shared, 1 = tuned-only; docs/methods.md sec. 4). NaN (dead) features are excluded
    and the legend gives each model's count of live features. Step histograms with ``bins`` equal
    bins over [0, 1] on one log-count axis. Writes ``<path>.png`` and ``<path>.svg``; returns both.
    """
    if not isinstance(nrn_by_model, Mapping) or not nrn_by_model:
        raise ProbeError("nrn_by_model is empty; expected a mapping model name -> NRN array [F]")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ProbeError(f"bins={bins!r} is invalid; expected a positive integer")
    series = []
    for name, values in nrn_by_model.items():
        arr = _vector(values, f"nrn_by_model[{name!r}]")
        live = arr[~np.isnan(arr)]
        if live.size == 0:
            raise ProbeError(f"nrn_by_model[{name!r}] is all NaN; expected at least one live feature")
        if live.min() < 0 or live.max() > 1:
            raise ProbeError(
                f"nrn_by_model[{name!r}] has values in [{live.min():.3g}, {live.max():.3g}]; expected NRN in [0, 1]"
            )
        series.append((f"{name} (n={live.size:,})", live))
    with plot_style():
        fig = new_figure(5.2, 3.4)
        ax = fig.add_subplot()
        _log_step_histograms(ax, series, np.linspace(0.0, 1.0, int(bins) + 1))
        ax.axvline(0.5, color="#666666", linestyle=":", linewidth=0.9)
        ax.set_xlabel("NRN against base  (0 = base-only, 0.5 = shared, 1 = tuned-only)")
        ax.set_ylabel("features (log scale)")
        ax.set_title(title if title is not None else "Relative decoder norm (NRN) per feature")
        ax.legend(frameon=False, loc="upper right")
        return save_figure(fig, path)


def plot_mas_distributions(
    mas, model_names: Sequence[str], path, bins: int = 50, title: str | None = None
) -> list[Path]:
    """Distribution of the model attribution score of every model (paper R sec. 6, fig. 3).

    ``mas`` [F, N] (unitless; row i sums to 1 over the N models, docs/methods.md sec. 4), ``model_names``
    the N model names in column order. Rows with NaN (dead features) are excluded. Overlaid step
    histograms over [0, 1] on a log-count axis, with the uniform value 1/N marked; the legend gives
    how many features each model wins (argmax MAS). Writes ``<path>.png`` and ``<path>.svg``.
    """
    arr = as_matrix(mas, "mas")
    names = as_labels(model_names, arr.shape[1], "model_names", "MAS column")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ProbeError(f"bins={bins!r} is invalid; expected a positive integer")
    live = arr[~np.isnan(arr).any(axis=1)]
    if live.shape[0] == 0:
        raise ProbeError("mas has no row without NaN; expected at least one live feature")
    if live.min() < 0 or live.max() > 1:
        raise ProbeError(f"mas has values in [{live.min():.3g}, {live.max():.3g}]; expected MAS in [0, 1]")
    wins = np.bincount(live.argmax(axis=1), minlength=len(names))
    series = [(f"{n} (argmax: {w:,})", live[:, m]) for m, (n, w) in enumerate(zip(names, wins))]
    with plot_style():
        fig = new_figure(5.2, 3.4)
        ax = fig.add_subplot()
        _log_step_histograms(ax, series, np.linspace(0.0, 1.0, int(bins) + 1))
        uniform = 1.0 / len(names)
        ax.axvline(uniform, color="#666666", linestyle=":", linewidth=0.9)
        ax.annotate(
            f"1/N = {uniform:.2g}",
            xy=(uniform, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=7,
            color="#555555",
        )
        ax.set_xlabel("model attribution score (MAS)")
        ax.set_ylabel("features (log scale)")
        ax.set_title(title if title is not None else f"MAS distribution per model ({live.shape[0]:,} live features)")
        ax.legend(frameon=False, loc="upper right")
        return save_figure(fig, path)


def plot_norm_ratio_vs_cosine(
    norm_ratio,
    cosine,
    categories: Sequence[str],
    path,
    *,
    highlight=None,
    highlight_label: str = "highlighted",
    title: str | None = None,
) -> list[Path]:
    """Decoder cosine against NormRatio per feature, coloured by category (paper S sec. 3.2, fig. 1).

    ``norm_ratio`` [F] (S eq. 2, unitless in [0, 1]; near 1 = base-only, near 0 = fine-tune-only),
    ``cosine`` [F] (cosine of the base and fine-tuned decoder rows, in [-1, 1]), ``categories``
    [F] labels from the NormRatio categorisation ("base-only", "shared", "finetune-only"; "dead"
    and NaN points are left out; other labels get their own colour). Dashed lines mark the category
    bands at 0.4 and 0.6 (docs/methods.md sec. 4). ``highlight``: optional feature indices drawn on top in
    red (the paper's top-50 reasoning features), named ``highlight_label`` in the legend.
    Writes ``<path>.png`` and ``<path>.svg`` (points rasterised inside the SVG); returns both.
    """
    x = _vector(norm_ratio, "norm_ratio")
    y = _vector(cosine, "cosine")
    if y.size != x.size:
        raise ProbeError(f"cosine has {y.size} entries but norm_ratio has {x.size}; expected one per feature")
    cats = as_labels(categories, x.size, "categories", "feature")
    cats = np.array([_CATEGORY_ALIASES.get(c.strip().lower(), c.strip().lower()) for c in cats])
    keep = (cats != _DEAD) & ~np.isnan(x) & ~np.isnan(y)
    if not keep.any():
        raise ProbeError("no feature left to plot after dropping 'dead' and NaN points; expected live features")
    hi = None
    if highlight is not None:
        hi = np.asarray(highlight.detach().cpu() if hasattr(highlight, "detach") else highlight).reshape(-1)
        if hi.size and (not np.issubdtype(hi.dtype, np.integer) or hi.min() < 0 or hi.max() >= x.size):
            raise ProbeError(f"highlight has entries outside [0, F={x.size}); expected feature indices")
    present = list(dict.fromkeys(cats[keep]))
    known = [c for c in _CATEGORY_COLOURS if c in present]
    others = sorted(c for c in present if c not in _CATEGORY_COLOURS)
    with plot_style():
        fig = new_figure(5.2, 3.8)
        ax = fig.add_subplot()
        spare = [c for c in PALETTE if c not in _CATEGORY_COLOURS.values()]
        colours = {**_CATEGORY_COLOURS, **{c: spare[j % len(spare)] for j, c in enumerate(others)}}
        for cat in ["shared", *[c for c in known if c != "shared"], *others]:
            if cat not in present:
                continue
            sel = keep & (cats == cat)
            colour = colours[cat]
            ax.scatter(
                x[sel],
                y[sel],
                s=5,
                color=colour,
                alpha=0.55 if cat == "shared" else 0.8,
                linewidths=0,
                rasterized=True,
                label=f"{cat} ({int(sel.sum()):,})",
            )
        if hi is not None and hi.size:
            ax.scatter(
                x[hi],
                y[hi],
                s=16,
                color=_HIGHLIGHT_COLOUR,
                edgecolors="black",
                linewidths=0.4,
                zorder=5,
                label=f"{highlight_label} ({hi.size})",
            )
        for edge in (0.4, 0.6):
            ax.axvline(edge, color="#444444", linestyle="--", linewidth=0.8)
        ax.axhline(0.0, color="#BBBBBB", linewidth=0.6, zorder=0)
        for centre, text in ((0.2, "fine-tune-only"), (0.5, "shared"), (0.8, "base-only")):
            ax.text(
                centre,
                1.01,
                text,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=7.5,
                color="#555555",
            )
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("NormRatio  (0 = fine-tune-only, 1 = base-only)")
        ax.set_ylabel("decoder cosine (base vs fine-tuned)")
        if title is not None:
            ax.set_title(title, pad=14)
        ax.legend(frameon=True, framealpha=0.9, edgecolor="none", loc="lower left", markerscale=2.0)
        return save_figure(fig, path)


def plot_topk_overlap(matrix, labels: Sequence[str], path, title: str | None = None) -> list[Path]:
    """Heatmap of the top-k overlap between checkpoints, values annotated (paper R sec. 5.2, fig. 2).

    ``matrix`` [C, C] overlap fractions in [0, 1] (from ``dynamics.topk_overlap``), ``labels`` the C
    checkpoint names in training order. Writes ``<path>.png`` and ``<path>.svg``; returns both.
    """
    m = as_matrix(matrix, "matrix")
    if m.shape[0] != m.shape[1]:
        raise ProbeError(f"matrix has shape {m.shape}; expected a square [C, C] overlap matrix")
    names = as_labels(labels, m.shape[0], "labels", "checkpoint")
    if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise ProbeError("matrix has values outside [0, 1] or non-finite; expected overlap fractions")
    c = m.shape[0]
    side = min(max(2.4 + 0.55 * c, 3.2), 9.0)
    with plot_style():
        fig = new_figure(side + 0.9, side)
        ax = fig.add_subplot()
        im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        fontsize = 8 if c <= 10 else 6 if c <= 16 else 0
        if fontsize:
            for i in range(c):
                for j in range(c):
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        color="white" if m[i, j] > 0.6 else "#222222",
                    )
        ax.set_xticks(
            range(c),
            names,
            rotation=45 if max(map(len, names)) > 4 else 0,
            ha="right" if max(map(len, names)) > 4 else "center",
        )
        ax.set_yticks(range(c), names)
        ax.set_xlabel("checkpoint")
        ax.set_ylabel("checkpoint")
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.tick_params(length=0)
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cbar.set_label(r"top-k overlap  $|T_c \cap T_{c'}|\,/\,k$")
        cbar.outline.set_visible(False)
        ax.set_title(title if title is not None else "Overlap of top-k features across checkpoints")
        return save_figure(fig, path)


def plot_rank_shifts(shifts, labels: Sequence[str], path, title: str | None = None) -> list[Path]:
    """Heatmap of rank shifts of the top-k features between consecutive checkpoints (paper R B.1, figs. 8-11).

    ``shifts``: a ``dynamics.RankShifts`` (``shift`` [C-1, k] in ranks, ``blank`` [C-1, k] bool);
    ``labels`` the C checkpoint names in training order. Row c is the transition c -> c+1, column j
    the j-th best feature of T_c. Colour: |rank shift| on a symmetric-log scale (linear below 1, so
    0 is representable); blanks (features that leave the top-k) are grey cells with an 'x', and the
    number of blanks per transition is written at the right. Writes ``<path>.png`` and ``<path>.svg``.
    """
    import matplotlib
    from matplotlib.colors import SymLogNorm
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    try:
        shift = as_matrix(shifts.shift, "shifts.shift")
        blank = np.asarray(shifts.blank.detach().cpu() if hasattr(shifts.blank, "detach") else shifts.blank)
    except AttributeError:
        raise ProbeError(f"shifts is a {type(shifts).__name__}; expected a RankShifts with .shift and .blank") from None
    if blank.shape != shift.shape:
        raise ProbeError(f"shifts.blank has shape {blank.shape} but shifts.shift has {shift.shape}; expected equal")
    blank = blank.astype(bool)
    n_rows, k = shift.shape
    names = as_labels(labels, n_rows + 1, "labels", "checkpoint (C = rows of shifts.shift + 1)")
    if np.isnan(shift).any() or shift.min() < 0:
        raise ProbeError("shifts.shift has NaN or negative entries; expected absolute rank shifts >= 0")
    rows = [f"{names[c]} → {names[c + 1]}" for c in range(n_rows)]
    data = np.ma.masked_array(shift, mask=blank)
    vmax = max(float(shift[~blank].max()) if (~blank).any() else 1.0, 10.0)
    cmap = matplotlib.colormaps["YlOrRd"].with_extremes(bad=BLANK_COLOUR)
    width = min(max(3.0 + 0.16 * k, 6.5), 16.0)
    height = 1.7 + 0.42 * n_rows
    with plot_style():
        fig = new_figure(width, height)
        ax = fig.add_subplot()
        im = ax.imshow(
            data,
            cmap=cmap,
            norm=SymLogNorm(linthresh=1.0, linscale=0.6, vmin=0.0, vmax=vmax, base=10),
            aspect="auto",
            interpolation="nearest",
        )
        bi, bj = np.nonzero(blank)
        ax.scatter(bj, bi, marker="x", s=min(22.0, 900.0 / max(k, 1)), color="#555555", linewidths=0.9)
        step = 1 if k <= 20 else 5 if k <= 60 else 10 * int(np.ceil(k / 100))
        positions = sorted({0, *range(step - 1, k, step)})
        ax.set_xticks(positions, [str(j + 1) for j in positions])
        ax.set_yticks(range(n_rows), rows)
        ax.set_xticks(np.arange(-0.5, k, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
        ax.tick_params(axis="y", length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        counts = ax.secondary_yaxis("right")
        counts.set_yticks(range(n_rows), [f"{int(blank[c].sum())}/{k} blank" for c in range(n_rows)])
        counts.tick_params(length=0, labelsize=7.5, labelcolor="#444444")
        counts.spines["right"].set_visible(False)
        ax.set_xlabel("position in the top-k of the earlier checkpoint (1 = highest score)")
        cbar = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.01)
        cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        cbar.set_label("|rank shift| (symlog)")
        cbar.outline.set_visible(False)
        handle = Line2D(
            [],
            [],
            marker="x",
            linestyle="none",
            color="#555555",
            markerfacecolor=BLANK_COLOUR,
            markersize=6,
            label="blank: left the top-k",
        )
        # the key below the x label, where the layout gives it its own row (above the axes it ran into the title)
        fig.legend(handles=[handle], loc="outside lower right", frameon=False)
        ax.set_title(title if title is not None else f"Rank shifts of the top-{k} features between checkpoints")
        return save_figure(fig, path)
