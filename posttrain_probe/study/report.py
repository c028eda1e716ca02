"""The study's report: ``build_report(study_dir, config)`` -> ``report/report.html`` (one self-contained file) and
``report/report.md``, from what the stages wrote (any subset: a section whose stage has not run says so).

Contents, in order: a plain reading of what the run shows and cannot show; accuracy of every model on the
in-domain, general and held-out tasks (paper R table 1 shape, with document counts) and the transfer of each
paradigm; NRN histograms per paradigm; MAS of the three-model crosscoder; checkpoint dynamics (top-k overlap and
rank shifts); NormRatio vs decoder cosine; generalization features per task and their overlap; intervention
delta tables (paper R tables 2-5 shape, held-out task marked); Fisher rho and the steering effect; leakage of each
blocked and preserving arm; the feature monitor's curves over training steps (when an arm wrote
``probe/monitor.jsonl``); feature cards (scores + top-activating probe-set contexts); stage timings, configs and
versions.
"""

from __future__ import annotations

import csv
import json
import math
import platform
from pathlib import Path
from typing import Any

from posttrain_probe.study.report_render import Report
from posttrain_probe.study.settings import ReportConfig

REPORT_DIR = "report"
MAX_GENERALIZATION_CARDS = 50
"""A card for every feature of S, up to this many (the strongest first)."""


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def _skipped(folder: Path) -> str | None:
    """The reason a stage had nothing to do (``skipped.json`` in its output), or None."""
    data = _json(folder / "skipped.json")
    return data.get("reason") if data else None


def _accuracy(eval_dir: Path) -> dict[str, tuple[float, int | None]]:
    """task -> (accuracy in %, documents) from an lm-eval run of the study."""
    data = _json(eval_dir / "lm_eval.json")
    if data is None:
        return {}
    counts: dict[str, int] = {}
    results_file = data.get("results_file")
    if results_file and Path(results_file).exists():
        for task, n in (json.loads(Path(results_file).read_text()).get("n-samples") or {}).items():
            counts[task] = int(n.get("effective", n.get("original", 0)))
    out = {}
    for task, metrics in data["results"].items():
        value = next((v for k, v in metrics.items() if k.split(",")[0] in ("acc", "exact_match") and _number(v)), None)
        if value is not None:
            out[task] = (100.0 * float(value), counts.get(task))
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_report(root: str | Path, config: ReportConfig | None = None) -> Path:
    """Write ``<root>/report/report.html`` and ``report.md`` for the study in ``root``; returns the HTML path."""
    root = Path(root)
    config = config or ReportConfig()
    info = _json(root / "study.json") or {}
    name = info.get("identity", {}).get("name", root.name)
    tasks = info.get("tasks", {"in_domain": [], "general": [], "held_out": []})
    arms = info.get("arms", {})
    blocked = info.get("blocked_arms", {})
    preserved = info.get("preserve_arms", {})
    settings = info.get("settings", {})
    sft, rl = settings.get("sft_arm", "sft"), settings.get("rl_arm", "rl")
    labels = {"base": "base", **{a: v.get("label") or a for a, v in arms.items()}}
    labels.update({a: f"SFT, {c} blocked" for a, c in blocked.items()})
    labels.update({a: f"SFT, {c} preserved" for a, c in preserved.items()})

    report = Report(f"posttrain-probe study: {name}")
    report.note(_reading(root, info, tasks, labels, sft, rl), title="Reading this report")
    _accuracy_section(report, root, tasks, labels)
    _attribution_section(report, root, arms, sft, rl)
    _generalization_section(report, root, tasks)
    _fisher_section(report, root)
    _leakage_section(report, root, blocked, preserved, info)
    _monitor_section(report, root, labels)
    _cards_section(report, root, info, config, sft, rl)
    _provenance_section(report, root, info)
    html, _ = report.write(root / REPORT_DIR)
    return Path(html)


def _reading(root: Path, info: dict, tasks: dict, labels: dict[str, str], sft: str, rl: str) -> str:
    """What this run shows, in its own numbers, and what it cannot show."""
    parts = []
    transfer = {row.model: row for row in _transfer(root, tasks, labels)}
    for model in (sft, rl):
        if model in transfer and transfer[model].gain:
            text = ", ".join(f"{g.replace('_', '-')} {v:+.1f} pp" for g, v in transfer[model].gain.items())
            parts.append(f"{labels.get(model, model)} against the base: {text}.")
    for model in (sft, rl):
        summary = _json(root / "analysis" / f"base-{model}" / "summary.json") or {}
        counts = (summary.get("models") or {}).get(model)
        if counts:
            cats = counts.get("categories", {})
            parts.append(
                f"base-vs-{model} crosscoder: {cats.get('finetune-only', 0)} finetune-only, {cats.get('shared', 0)} shared, "
                f"{cats.get('base-only', 0)} base-only live features."
            )
    gen = _json(root / "generalization" / "generalization.json")
    if gen:
        parts.append(f"Generalization features S: {(gen.get('intersection') or {}).get('n_features', 0)}.")
    zero = _json(root / "intervene" / f"zero-{rl}" / "effects.json")
    if zero:
        deltas = [r["delta_pp"] for r in zero.get("rows", []) if r.get("delta_pp") is not None]
        if deltas:
            parts.append(
                f"Zeroing S in {rl} changes its accuracy on G_t by {sum(deltas) / len(deltas):+.1f} pp on average."
            )
    measured = " ".join(parts) if parts else "No stage with results has finished yet."
    scale = (
        "This is a study of tiny synthetic models (the demo): it exercises every step of the method and is no "
        "evidence about 4B models; the papers' claims need the real-model study file."
        if (info.get("config") or {}).get("world") is not None
        else "The models and data are the study file's; the papers' settings are in SPEC sec. 10."
    )
    return (
        f"{measured} {scale} Differences of a few documents are noise at these task sizes; the control rows of the "
        "intervention tables say how large a change random feature sets of the same size produce."
    )


def _transfer(root: Path, tasks: dict, labels: dict[str, str]) -> list:
    """:func:`~posttrain_probe.eval.transferability.transferability` of the evaluated models against the base
    ([] before the base is evaluated)."""
    from posttrain_probe.eval.transferability import transferability

    accs = {m: {t: v for t, (v, _) in _accuracy(root / "eval" / m).items()} for m in labels}
    accs = {m: a for m, a in accs.items() if a}
    if "base" not in accs:
        return []
    return transferability(accs, {g: tasks.get(g, []) for g in ("in_domain", "general", "held_out")})


def _accuracy_section(report: Report, root: Path, tasks: dict, labels: dict[str, str]) -> None:
    report.heading("Accuracy: base and every post-trained model")
    order = [*tasks.get("in_domain", []), *tasks.get("general", []), *tasks.get("held_out", [])]
    kinds = {t: "in-domain" for t in tasks.get("in_domain", [])}
    kinds.update({t: "general" for t in tasks.get("general", [])})
    kinds.update({t: "held out" for t in tasks.get("held_out", [])})
    accs = {model: _accuracy(root / "eval" / model) for model in labels}
    accs = {m: a for m, a in accs.items() if a}
    if not accs:
        report.paragraph("No evaluation has run yet (stages eval-*).")
        return

    def cell(acc: dict, task: str) -> str | None:
        if task not in acc:
            return None
        value, n = acc[task]
        return f"{value:.1f} ({round(value * n / 100)}/{n})" if n else f"{value:.1f}"

    rows = [[labels[model], *(cell(acc, t) for t in order)] for model, acc in accs.items()]
    columns = ["model", *(f"{t} ({kinds[t]})" for t in order)]
    report.table(columns, rows, caption="Accuracy in % (correct / documents), lm-eval; paper R table 1 shape.")
    if "base" in accs:
        groups = ("in_domain", "general", "held_out")
        rows = []
        for row in _transfer(root, tasks, labels):
            cells = [row.gain.get(g) for g in groups]
            rows.append([labels[row.model], *cells, row.index.get("general"), row.index.get("held_out")])
        report.table(
            [
                "model",
                "in-domain gain (pp)",
                "general gain (pp)",
                "held-out gain (pp)",
                "transferability: general (%)",
                "transferability: held out (%)",
            ],
            rows,
            caption="Transfer against the base: mean accuracy change per task group in percentage points, and the "
            "transferability index 100 x (mean relative gain on the group) / (mean relative gain in-domain): 100 = "
            "the gains carry over in proportion, below 0 = general ability lost while the in-domain skill grew; "
            "empty where the model did not gain in-domain (docs/methods.md sec. 13).",
        )


def _attribution_section(report: Report, root: Path, arms: dict, sft: str, rl: str) -> None:
    report.heading("What changed inside: crosscoder attribution")
    analysis = root / "analysis"
    if not analysis.is_dir():
        report.paragraph("No crosscoder analysis yet (stages analyze-*).")
        return
    rows = []
    for folder in sorted(p for p in analysis.iterdir() if p.is_dir()):
        summary = _json(folder / "summary.json") or {}
        for model, counts in (summary.get("models") or {}).items():
            cats = counts.get("categories", {})
            rows.append(
                [
                    folder.name,
                    model,
                    counts.get("n"),
                    cats.get("base-only"),
                    cats.get("shared"),
                    cats.get("finetune-only"),
                    counts.get("nrn_mean"),
                ]
            )
    if rows:
        report.table(
            ["crosscoder", "model vs base", "live features", "base-only", "shared", "finetune-only", "mean NRN"],
            rows,
            caption="NormRatio categories (paper S) and NRN (paper R) of every crosscoder's live features.",
        )
    for arm in (sft, rl):
        for png in _pngs(analysis / f"base-{arm}"):
            if "nrn" in png.stem or "norm_ratio" in png.stem or "cosine" in png.stem:
                report.figure(png, caption=f"base vs {arm}: {png.stem.replace('_', ' ')}")
    three = analysis / f"base-{sft}-{rl}"
    for png in _pngs(three):
        if "nrn" in png.stem:
            report.figure(
                png, caption=f"NRN of {sft} and {rl} against the base in one crosscoder (base / {sft} / {rl})"
            )
        elif "mas" in png.stem:
            report.figure(png, caption=f"MAS of the three-model crosscoder base / {sft} / {rl}")
    dynamics = root / "dynamics"
    if dynamics.is_dir():
        report.heading("Checkpoint dynamics", level=3)
        for arm_dir in sorted(p for p in dynamics.iterdir() if p.is_dir()):
            data = _json(arm_dir / "dynamics.json") or {}
            if data.get("mean_adjacent_overlap") is not None:
                report.paragraph(
                    f"{arm_dir.name}: mean top-{data.get('k')} overlap of consecutive checkpoints "
                    f"{data['mean_adjacent_overlap']:.3f}."
                )
            for png in _pngs(arm_dir):
                report.figure(png, caption=f"{arm_dir.name}: {png.stem.replace('_', ' ')}")


def _effects_rows(effects: dict) -> list[list[Any]]:
    rows = []
    for row in effects.get("rows", []):
        rows.append(
            [
                row["task"] + (" (held out)" if row.get("held_out") else ""),
                row.get("n_critical"),
                row.get("acc_before_nominal"),
                row.get("acc_after"),
                row.get("delta_pp"),
                row.get("controls_mean_pp"),
                row.get("outside_controls"),
                row.get("full_acc_before"),
                row.get("full_acc_after"),
            ]
        )
    return rows


EFFECT_COLUMNS = [
    "task",
    "|G_t|",
    "acc before (%)",
    "acc after (%)",
    "delta (pp)",
    "controls mean (pp)",
    "outside controls",
    "full task before (%)",
    "full task after (%)",
]


def _generalization_section(report: Report, root: Path, tasks: dict) -> None:
    report.heading("Generalization features and interventions (paper R)")
    critical = _json(root / "critical" / "critical.json")
    if critical is not None:
        rows = [
            [task, e.get("n_docs"), e.get("n_base_correct"), e.get("n_rl_correct"), e.get("n_critical")]
            for task, e in sorted((critical.get("tasks") or {}).items())
        ]
        report.table(
            ["task", "documents", "base correct", "RL correct", "|G_t| (base wrong, RL right)"],
            rows,
            caption="Generalization-critical samples per task.",
        )
    gen = _json(root / "generalization" / "generalization.json")
    reason = _skipped(root / "generalization")
    if reason is not None:
        report.note(f"Generalization features and interventions were not computed: {reason}.", title="Nothing to test")
        return
    if gen is None:
        report.paragraph("No generalization features yet (stage generalization).")
    else:
        per_task = gen.get("per_task") or gen.get("tasks") or {}
        rows = [[t, v.get("n_critical"), v.get("n_selected")] for t, v in per_task.items() if isinstance(v, dict)]
        report.table(["task", "|G_t|", "|S_t| (features)"], rows, caption="Generalization features per task.")
        intersection = gen.get("intersection") or {}
        if intersection:
            over = ", ".join(intersection.get("over_tasks", []))
            report.paragraph(f"S, the features in the S_t of every task ({over}): {intersection.get('n_features')}.")
        for png in _pngs(root / "generalization"):
            report.figure(png, caption="Overlap of the per-task feature sets S_t (paper R fig. 4)")
    for label, title in (("zero", "zeroed in the RL model"), ("set-base", "set in the base model")):
        for folder in sorted((root / "intervene").glob(f"{label}*")) if (root / "intervene").is_dir() else []:
            effects = _json(folder / "effects.json")
            if effects is not None:
                report.table(
                    EFFECT_COLUMNS,
                    _effects_rows(effects),
                    caption=f"Generalization features {title} ({folder.name}): accuracy on G_t (paper R tables 2-5).",
                )


def _fisher_section(report: Report, root: Path) -> None:
    report.heading("Reasoning features: Fisher ratio and steering (paper S)")
    summary = _json(root / "fisher" / "summary.json")
    if summary is None:
        report.paragraph("No Fisher features yet (stage fisher).")
    else:
        fisher = summary.get("fisher") if isinstance(summary.get("fisher"), dict) else {}
        n = fisher.get("n_selected")
        report.paragraph(
            f"Fisher-selected reasoning features: {n} of {fisher.get('n_features')} (selected on {fisher.get('model')})."
            if isinstance(n, int)
            else "Fisher-selected reasoning features: see fisher/summary.json."
        )
        for png in _pngs(root / "fisher"):
            report.figure(
                png,
                caption="rho per document: the fraction of its reasoning / solution tokens on which a selected Fisher"
                " feature fires, per model (paper S figs. 4-6)",
            )
    effects = _json(root / "intervene" / "steer-base" / "effects.json")
    if effects is not None:
        report.table(EFFECT_COLUMNS, _effects_rows(effects), caption="Steering the Fisher features in the base model.")


def _leakage_section(
    report: Report, root: Path, blocked: dict[str, str], preserved: dict[str, str], info: dict
) -> None:
    if preserved:
        report.heading("Gradient blocking, feature preservation and leakage (paper S)")
    else:
        report.heading("Gradient blocking and leakage (paper S)")
    config = info.get("config") or {}
    mode = (config.get("blocked") or {}).get("mode", "sae")
    coefficient = (config.get("preserve") or {}).get("coefficient", 1.0)
    methods = {arm: f"gradient blocking ({mode})" for arm in blocked}
    methods.update({arm: f"preservation (lambda {coefficient})" for arm in preserved})
    categories = {**blocked, **preserved}
    rows = []
    for arm, category in categories.items():
        data = _json(root / "leakage" / arm / "leakage.json")
        if data is None:
            continue
        change = data.get("relative_change", {})
        rows.append(
            [
                arm,
                methods[arm],
                category,
                (change.get("protected") or {}).get("median"),
                (change.get("unprotected") or {}).get("median"),
                change.get("median_ratio_protected_to_unprotected"),
            ]
        )
    if not rows:
        what = "blocked or preserving arm" if preserved else "blocked arm"
        report.paragraph(f"No {what} has finished its leakage stage yet.")
        return
    report.table(
        ["arm", "method", "protected", "median change protected", "median change unprotected", "ratio"],
        rows,
        caption="Relative activation change base -> trained arm of the protected vs the other features (lower ratio: "
        "less leakage); gradient blocking detaches the protected features' part of the residual stream, preservation "
        "penalises their change in the loss (docs/preserve.md).",
    )
    for arm in categories:
        for png in _pngs(root / "leakage" / arm):
            report.figure(png, caption=f"{arm}: relative change per feature")


MONITOR_LOG = Path("probe") / "monitor.jsonl"
"""Where the feature monitor of a training arm writes its figures, under ``<study>/train/<arm>/``."""


def _monitor_section(report: Report, root: Path, labels: dict[str, str]) -> None:
    """The feature monitor's figures over training steps, per arm that wrote ``probe/monitor.jsonl``: one figure
    (suppressed fraction, drift FVU, change overall and per NormRatio category) and the last step's figures.
    Nothing when no arm was monitored."""
    paths = {arm: root / "train" / arm / MONITOR_LOG for arm in labels if arm != "base"}
    paths = {arm: path for arm, path in paths.items() if path.exists()}
    if not paths:
        return
    from posttrain_probe.analysis.monitor import monitor_categories, plot_monitor_curves, read_monitor_log
    from posttrain_probe.errors import ProbeError

    report.heading("During training: the feature monitor")
    logs, unreadable = {}, []
    for arm, path in paths.items():
        try:
            log = read_monitor_log(path)
        except (ProbeError, ValueError, KeyError, TypeError):  # e.g. a line cut short by a killed run
            unreadable.append(f"{arm} ({path})")
            continue
        if log:
            logs[labels[arm]] = log
    if unreadable:
        report.paragraph(f"Unreadable monitor logs: {', '.join(unreadable)}.")
    if not logs:
        return
    written = plot_monitor_curves(logs, root / REPORT_DIR / "monitor" / "monitor")
    report.figure(
        written[0],
        caption="The feature monitor over training steps, per arm: of the base-active features, the fraction whose "
        "mean code fell below monitor_suppress_fraction (default 0.5) of the base's; the base branch's FVU on the live "
        "activations (drift out of the base dictionary; step 0 is the base's own); the mean change of the codes "
        "(code units), over all features and per NormRatio category (docs/monitor.md).",
    )
    categories = monitor_categories(logs)
    rows = []
    for label, log in logs.items():
        step = max(log)
        figures = log[step]
        top = ", ".join(f"{f} ({c:+.3g})" for f, c in list(zip(figures.top_features, figures.top_changes))[:3])
        rows.append(
            [
                label,
                step,
                _finite(figures.suppressed_fraction),
                _finite(figures.fvu),
                _finite(figures.mean_change),
                *(_finite(figures.category_change.get(c, math.nan)) for c in categories),
                top or None,
            ]
        )
    report.table(
        [
            "model",
            "last step",
            "suppressed fraction",
            "FVU (drift)",
            "mean change",
            *(f"change {c}" for c in categories),
            "most changed features (change)",
        ],
        rows,
        caption="The monitor's figures at each arm's last monitored step (changes in code units of the crosscoder's "
        "base branch; - where a category has no feature).",
    )


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _cards_section(report: Report, root: Path, info: dict, config: ReportConfig, sft: str, rl: str) -> None:
    """Feature cards: generalization features (base-vs-RL crosscoder) and the top features of each NormRatio
    category (base-vs-SFT), each with its scores and its top-activating contexts from the collected tokens."""
    report.heading("Feature cards")
    groups: list[tuple[str, str, str, list[int], dict[int, dict[str, str]]]] = []
    gen_scores = {int(r["feature"]): r for r in _read_csv(root / "generalization" / "scores.csv") if "feature" in r}
    gen_set = _json(root / "generalization" / "generalization_features.json")
    if gen_set is not None and gen_scores:
        score_cols = [c for c in next(iter(gen_scores.values())) if c.startswith("score_")]
        ranked = sorted(gen_set["features"], key=lambda f: -max(float(gen_scores[f][c] or 0) for c in score_cols))
        groups.append(("generalization feature", f"base-{rl}", rl, ranked[:MAX_GENERALIZATION_CARDS], gen_scores))
    table = _read_csv(root / "analysis" / f"base-{sft}" / "features.csv")
    if table:
        rows = {int(r["feature"]): r for r in table}
        for category in ("finetune-only", "shared", "base-only"):
            members = [f for f, r in rows.items() if r.get(f"category_{sft}") == category and r.get("dead") != "True"]
            key = f"norm_ratio_{sft}"
            reverse = category != "base-only"
            members.sort(key=lambda f: float(rows[f][key]) if rows[f][key] not in ("", "nan") else 0.0, reverse=reverse)
            model = "base" if category == "base-only" else sft
            groups.append((f"{category} feature", f"base-{sft}", model, members[: config.n_cards], rows))
    if not groups:
        report.paragraph("No features to show yet (stages generalization and analyze).")
        return
    tokenizer = _tokenizer(info)
    for kind, crosscoder, model, features, scores in groups:
        contexts = _contexts(root, info, crosscoder, model, features, config)
        for feature in features:
            row = scores.get(feature, {})
            shown = {k: v for k, v in row.items() if k != "feature" and v not in ("", None)}
            rendered = []
            if tokenizer is not None:
                from posttrain_probe.analysis.top_contexts import render_tokens

                for ctx in contexts.get(feature, []):
                    rendered.append((render_tokens(tokenizer, ctx), ctx.highlight, ctx.activation))
            report.card(f"{kind} {feature} ({crosscoder}; top contexts in {model})", _rounded(shown), contexts=rendered)


def _rounded(row: dict[str, str]) -> list[tuple[str, Any]]:
    out = []
    for key, value in list(row.items())[:10]:
        try:
            out.append((key, float(value)))
        except ValueError:
            out.append((key, value))
    return out


def _tokenizer(info: dict):
    base = (info.get("models") or {}).get("base")
    if base is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError):
        return None


def _probe_store(root: Path, info: dict, model: str) -> Path | None:
    """The probe set's activation store of ``model`` as the training callbacks wrote it: an arm's last step, the
    base at step 0 of any arm's run (the same probe set in every arm)."""
    layer = (info.get("settings") or {}).get("layer")
    arms = list(info.get("arms") or {})
    run = model if model in arms else (arms[0] if arms else None)
    steps = sorted((root / "train" / run / "probe" / "activations").glob("step-*")) if run else []
    if not steps:
        return None
    store = (steps[-1] if model in arms else steps[0]) / f"layer{layer}"
    return store if store.is_dir() else None


def _contexts(root: Path, info: dict, crosscoder: str, model: str, features: list[int], config: ReportConfig) -> dict:
    """Top-activating contexts of ``features`` in ``model``'s branch: from the probe set (the callbacks' store),
    else from the collected tokens; {} when neither store is there."""
    cc = root / "crosscoders" / crosscoder
    stores = [_probe_store(root, info, model), Path((info.get("stores") or {}).get(model, root / "acts" / model))]
    if not features or not cc.is_dir():
        return {}
    from posttrain_probe.analysis.top_contexts import top_contexts
    from posttrain_probe.errors import ProbeError

    for store in stores:
        if store is None or not store.is_dir():
            continue
        try:
            found = top_contexts(
                str(cc), str(store), features, model_name=model, k=config.n_contexts, window=config.window
            )
        except ProbeError:  # e.g. the last probe step is not the saved model: the collected tokens instead
            continue
        if any(found.values()):
            return found
    return {}


def _provenance_section(report: Report, root: Path, info: dict) -> None:
    report.heading("Stages, configs and versions")
    rows = []
    for name in info.get("stages", []):
        record = _json(root / "stages" / f"{name}.json")
        rows.append([name, "done" if record else "not run", record.get("elapsed_s") if record else None])
    if rows:
        report.table(["stage", "status", "seconds"], rows, caption="Stages of the study and their last run time.")
    versions = info.get("versions") or {"python": platform.python_version()}
    report.table(["package", "version"], sorted(versions.items()), caption="Versions of the last run of the study.")
    import yaml

    report.paragraph("The study file:")
    report.code(yaml.safe_dump(info.get("config", {}), sort_keys=False))
    commands = []
    for name in info.get("stages", []):
        record = _json(root / "stages" / f"{name}.json")
        if record and record.get("command"):
            commands.append(
                f"# {name}" + (f" (nothing to do: {record['skipped_reason']})" if record.get("skipped_reason") else "")
            )
            commands.append(record["command"])
    if commands:
        report.paragraph("The exact command of every stage (each stage's full config is in stages/<stage>.json):")
        report.code("\n".join(commands))
