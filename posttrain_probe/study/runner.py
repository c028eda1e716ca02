"""Run a study's stages, resumably: ``run_study(study)`` -> :class:`StudyResult`.

Each finished stage leaves ``<study>/stages/<stage>.json`` with the hash of what decided it (its sections of the
study file, the study settings and its dependencies' hashes), its outputs and its time. A re-run skips a stage
whose hash is unchanged and whose outputs exist; a changed section changes the hash of its stages and of every
stage that depends on them, which run again (their old outputs are removed first). A stage killed midway has
no finished record and runs again from its start. ``<study>/study.json`` names the study the directory holds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain_probe.config_io import config_to_flags, config_to_mapping
from posttrain_probe.errors import ProbeError
from posttrain_probe.steps import STEPS
from posttrain_probe.study.stage import Stage
from posttrain_probe.study.stages import Study

STUDY_FORMAT = "posttrain-probe/study"
STAGE_DIR = "stages"
SKIPPED = "skipped.json"
"""Written into the outputs of a stage that had nothing to work on (its reason)."""


@dataclass
class StageRecord:
    """What a run did with one stage."""

    name: str
    status: str
    """``ran``, ``nothing to do`` (its inputs held nothing to work on; recorded), ``skipped`` (finished before,
    unchanged) or ``planned`` (dry run)."""
    elapsed_s: float = 0.0
    """Seconds this run spent on it (the recorded time of its last run when skipped)."""


@dataclass
class StudyResult:
    """Result of :func:`run_study`: the study directory, what each stage did and where the report is."""

    root: Path
    stages: list[StageRecord] = field(default_factory=list)
    report: Path | None = None
    """``report/report.html`` when the report stage finished."""

    @property
    def elapsed_s(self) -> float:
        """Seconds spent by this run on its stages."""
        return sum(r.elapsed_s for r in self.stages if r.status == "ran")


def stage_hashes(study: Study) -> dict[str, str]:
    """Stage name -> hash (dependencies first)."""
    hashes: dict[str, str] = {}
    for stage in study.stages():
        hashes[stage.name] = study.stage_hash(stage, hashes)
    return hashes


def stage_record_path(study: Study, name: str) -> Path:
    """``<study>/stages/<name>.json``."""
    return study.root / STAGE_DIR / f"{name}.json"


def finished(study: Study, stage: Stage, digest: str) -> bool:
    """True if ``stage`` finished with this hash and its outputs are still there."""
    path = stage_record_path(study, stage.name)
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    return record.get("complete") is True and record.get("hash") == digest and all(p.exists() for p in stage.outputs)


def stage_command(study: Study, stage: Stage, config: Any) -> str:
    """The exact command line of a stage (what a user runs to do the same by hand)."""
    import shlex

    if stage.kind == "train":
        return config.shell()
    if stage.kind in STEPS and STEPS[stage.kind].generated_cli:
        words = ["posttrain-probe", *STEPS[stage.kind].command, *config_to_flags(config)]
        return shlex.join(words)
    if stage.kind == "lm_eval":
        vllm = config.model in ("vllm", "auto") and config.crosscoder is None
        model_args = ",".join(a for a in (config.model_args, config.vllm_args) if a) if vllm else config.model_args
        note = ""
        if vllm and config.model == "auto":
            note = "  # model=auto: vllm where vllm and a GPU are present, else --model probe-hf without the vllm args"
        flags = [
            "--model",
            "vllm" if vllm else "probe-hf",
            "--model_args",
            model_args,
            "--tasks",
            ",".join(config.tasks),
        ]
        flags += ["--output_path", str(config.out), "--batch_size", str(config.batch_size), "--device", config.device]
        flags += ["--log_samples"] if config.log_samples else []
        flags += ["--apply_chat_template"] if config.apply_chat_template else []
        for path in config.include_path:
            flags += ["--include_path", path]
        for name in ("limit", "num_fewshot", "samples"):
            if getattr(config, name) is not None:
                flags += [f"--{name}", str(getattr(config, name))]
        flags += ["--confirm_run_unsafe_code"] if config.confirm_run_unsafe_code else []
        return shlex.join(["posttrain-probe", "lm-eval", *flags]) + note
    source = shlex.quote(study.source)
    if stage.kind == "world":
        return f"posttrain-probe study --config {source} --out {shlex.quote(str(study.root))} --stage world"
    return f"posttrain-probe report {shlex.quote(str(study.root))}"


def check_directory(study: Study) -> None:
    """ProbeError if the study directory holds another study (study.json); writes study.json when new."""
    path = study.root / "study.json"
    identity = study.identity()
    if not path.exists() and study.root.is_dir() and any(study.root.iterdir()):
        raise ProbeError(
            f"{study.root} is not empty and holds no study (no study.json): give an empty or new --out directory"
        )
    if path.exists():
        recorded = json.loads(path.read_text()).get("identity", {})
        if recorded != identity:
            diff = [k for k in identity if recorded.get(k) != identity[k]]
            key = diff[0] if diff else "format"
            raise ProbeError(
                f"study directory {study.root} was made by another study ({key} {recorded.get(key)!r}, this file: "
                f"{identity.get(key)!r}): give another --out, or delete the directory to start over"
            )


def _write_study_json(study: Study) -> None:
    import posttrain_probe

    path = study.root / "study.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": STUDY_FORMAT,
        "format_version": 1,
        "identity": study.identity(),
        "source": study.source,
        "config": study.raw,
        "settings": config_to_mapping(study.settings),
        "models": study.models(),
        "arms": {
            name: {"recipe": arm.recipe, "trainer": arm.trainer, "label": arm.label or name}
            for name, arm in study.arms.items()
        },
        "blocked_arms": study.blocked_arms(),
        "preserve_arms": study.preserve_arms(),
        "tasks": study.tasks(),
        "crosscoders": study.crosscoders() if "crosscoder" in study.raw else {},
        "stores": {m: str(study.store(m)) for group in study.collect_groups().values() for m in group},
        "stages": [s.name for s in study.stages()],
        "posttrain_probe_version": posttrain_probe.__version__,
        "versions": _versions(),
    }
    tmp = path.with_name(f".study.json.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _versions() -> dict[str, str]:
    """Python and package versions of this run (the report shows them)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("posttrain-probe", "torch", "transformers", "trl", "accelerate", "lm-eval", "datasets", "verl"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _remove(paths: tuple[Path, ...]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _execute(study: Study, stage: Stage, config: Any) -> None:
    if stage.kind == "world":
        from posttrain_probe.study.world import build_world

        build_world(config)
    elif stage.kind == "train":
        from posttrain_probe.study.launch import run_launch

        run_launch(config)
    elif stage.kind == "report":
        from posttrain_probe.study.report import build_report

        build_report(study.root, config)
    else:
        STEPS[stage.kind].function(config)


def check_study_tasks(study: Study) -> None:
    """One-line :class:`ProbeError` for a task name of the study's lists that lm-eval does not know, checked before
    any stage runs (a misspelled task would otherwise surface only at the first evaluation, after training). A study
    with a ``world:`` writes its own tasks in its world stage, so only the other studies are checked."""
    if "eval" not in study.raw or study.world is not None:
        return
    from posttrain_probe.eval.runner import check_task_names, make_task_manager

    tasks = [t for group in study.tasks().values() for t in group]
    check_task_names(tasks, make_task_manager(tasks, study.include_path() or None))


def run_study(
    study: Study,
    *,
    stage: str | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> StudyResult:
    """Run every stage of ``study`` that has not finished with its current config (``stage``: that one only,
    its dependencies must have finished). ``dry_run``: print the plan (each stage's command, inputs and
    outputs, and whether it would run) and run nothing. Progress goes to ``echo``."""
    stages = study.stages()
    names = [s.name for s in stages]
    if stage is not None and stage not in names:
        raise ProbeError(f"unknown stage {stage!r}: expected one of {', '.join(names)}")
    check_directory(study)
    hashes = stage_hashes(study)
    result = StudyResult(study.root)
    done = {s.name: finished(study, s, hashes[s.name]) for s in stages}
    selected = [s for s in stages if stage is None or s.name == stage]
    if stage is not None:
        missing = [d for d in selected[0].deps if not done[d]]
        if missing and not dry_run:
            raise ProbeError(
                f"stage {stage} needs stage {missing[0]}, which has not finished with this config: run "
                f"`posttrain-probe study --config {study.source} --stage {missing[0]}` first"
            )
    if dry_run:
        _print_plan(study, selected, done, hashes, echo)
        result.stages = [StageRecord(s.name, "skipped" if done[s.name] else "planned") for s in selected]
        return result

    if any(not done[s.name] for s in selected):
        check_study_tasks(study)
    study.root.mkdir(parents=True, exist_ok=True)
    _write_study_json(study)
    width = len(str(len(selected)))
    for i, st in enumerate(selected, 1):
        prefix = f"[{i:>{width}}/{len(selected)}] {st.name}"
        if done[st.name]:
            record = json.loads(stage_record_path(study, st.name).read_text())
            result.stages.append(StageRecord(st.name, "skipped", record.get("elapsed_s", 0.0)))
            echo(f"{prefix}: done before, skipped")
            continue
        stale = [d for d in st.deps if not done.get(d, False)]
        if stale:  # a dependency failed earlier in this run
            raise ProbeError(f"stage {st.name} needs {stale[0]}, which did not finish")
        record = _run_stage(study, st, hashes[st.name], prefix, echo)
        _write_study_json(study)  # models and stores known so far (snapshots exist once their arm trained)
        done[st.name] = True
        status = "ran" if record["skipped_reason"] is None else "nothing to do"
        result.stages.append(StageRecord(st.name, status, record["elapsed_s"]))
    report = study.root / "report" / "report.html"
    result.report = report if report.exists() else None
    return result


def _run_stage(study: Study, st: Stage, digest: str, prefix: str, echo) -> dict[str, Any]:
    """Run one due stage under its own lock (so `--stage` jobs of one study may run side by side): remove its old
    outputs, run it (or record why it has nothing to do) and write its record last; returns the record."""
    from posttrain_probe.locks import DirectoryLock

    config = st.build()
    with DirectoryLock(study.root / STAGE_DIR / ".locks" / st.name, what=f"stage {st.name}"):
        _remove(st.outputs)
        path = stage_record_path(study, st.name)
        path.unlink(missing_ok=True)
        reason = _dependency_skipped(study, st) or (st.skip_if() if st.skip_if is not None else None)
        started = time.perf_counter()
        if reason is None:
            echo(f"{prefix}: {st.about} ...")
            _execute(study, st, config)
        else:
            echo(f"{prefix}: nothing to do ({reason})")
            for output in st.outputs:  # an empty result, so dependents and the report see why
                output.mkdir(parents=True, exist_ok=True)
                (output / SKIPPED).write_text(json.dumps({"stage": st.name, "reason": reason}, indent=2))
        elapsed = time.perf_counter() - started
        record = {
            "stage": st.name,
            "kind": st.kind,
            "hash": digest,
            "complete": True,
            "skipped_reason": reason,
            "elapsed_s": round(elapsed, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": stage_command(study, st, config),
            "outputs": [str(p) for p in st.outputs],
            "config": _plain_config(config),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str))
        tmp.replace(path)
    if reason is None:
        echo(f"{prefix}: finished in {elapsed:.1f} s")
    return record


def _dependency_skipped(study: Study, stage: Stage) -> str | None:
    """The reason of a dependency that had nothing to do (then neither has this stage; the report always runs)."""
    if stage.kind == "report":
        return None
    for dep in stage.deps:
        path = stage_record_path(study, dep)
        reason = json.loads(path.read_text()).get("skipped_reason") if path.exists() else None
        if reason:
            return f"{dep}: {reason}"
    return None


def _plain_config(config: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return config_to_mapping(config)
    return {"command": config.command}


def _print_plan(study: Study, stages: list[Stage], done: dict[str, bool], hashes: dict[str, str], echo) -> None:
    echo(f"study {study.settings.name!r} in {study.root} ({len(stages)} stages)")
    for stage in stages:
        state = "done" if done[stage.name] else "to run"
        config = stage.build()
        echo(f"\n{stage.name} [{state}] - {stage.about}")
        echo(f"  command: {stage_command(study, stage, config)}")
        outputs = {st.name: st.outputs for st in study.stages()}
        inputs = [f"{d} ({', '.join(str(p) for p in outputs[d])})" for d in stage.deps]
        echo(f"  inputs:  {'; '.join(inputs) or '-'}")
        echo(f"  outputs: {', '.join(str(p) for p in stage.outputs)}")
