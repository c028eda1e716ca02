"""`posttrain-probe study` / `demo` / `report` (issue 13): the whole study end to end on the embedded CPU world,
resumed after a kill, a changed section re-running only its stages, the plan of the Qwen3-4B study file without
loading a model, and bad input (one line, exit 2, nothing finished lost)."""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from posttrain_probe.errors import ProbeError
from posttrain_probe.study.demo import demo_config
from posttrain_probe.study.stages import Study, read_study_file

REPO = Path(__file__).resolve().parents[1]
QWEN = REPO / "recipes" / "configs" / "qwen3-4b-base" / "study.yaml"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "posttrain_probe", *args],
        cwd=cwd,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _records(root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((root / "stages").glob("*.json"))}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """`demo --quick` from an empty directory, killed in the middle of the collect stage, then resumed."""
    cwd = tmp_path_factory.mktemp("demo")
    out = cwd / "study"
    command = [sys.executable, "-m", "posttrain_probe", "demo", "--quick", "--out", str(out)]
    started = time.perf_counter()
    first = subprocess.Popen(
        command, cwd=cwd, env={**os.environ, **OFFLINE}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    killed_in = None
    lines = []
    for line in first.stdout:  # kill it as soon as the first crosscoder stage has started
        lines.append(line)
        if "crosscoder-base-sft: crosscoder of" in line:
            killed_in = "crosscoder-base-sft"
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=60)
    assert killed_in is not None, "".join(lines)[-3000:]
    before = _records(out)
    resumed = _cli("demo", "--quick", "--out", str(out), cwd=cwd)
    elapsed = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    return {"out": out, "cwd": cwd, "before": before, "killed_in": killed_in, "resumed": resumed}, elapsed, peak_kb


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_resumes_after_a_kill(quick_demo):
    run, elapsed, peak_kb = quick_demo
    out, before, resumed = run["out"], run["before"], run["resumed"]
    print(f"demo --quick (killed once, resumed): {elapsed:.1f} s, peak child RSS {peak_kb / 1024:.0f} MiB")
    assert peak_kb < 4 * 1024 * 1024, f"peak memory {peak_kb / 1024:.0f} MiB: the demo must stay under 4 GB"
    study = Study.load(demo_config(quick=True), out=out)
    names = [s.name for s in study.stages()]
    records = _records(out)
    assert set(records) == set(names), f"stages without a record: {set(names) - set(records)}"
    assert all(r["complete"] for r in records.values())
    # Finished before the kill: not run again (same record, same finish time); the killed stage ran again.
    assert before and run["killed_in"] not in before
    for name, record in before.items():
        assert records[name]["finished"] == record["finished"], name
        assert f"{name}: done before, skipped" in resumed.stdout
    assert f"{run['killed_in']}: finished in" in resumed.stdout
    # Per-stage progress, the timing table, and the report path printed last.
    assert "stage timings" in resumed.stdout
    assert resumed.stdout.strip().splitlines()[-1] == f"report: {out / 'report' / 'report.html'}"

    # Every artifact exists and is well-formed.
    world = json.loads((out / "world" / "world.json").read_text())
    assert Path(world["base_model"]).is_dir() and Path(world["train_file"]).exists()
    for model in ("base", "sft", "rl", "sft_kl", "blocked-shared"):
        results = json.loads((out / "eval" / model / "lm_eval.json").read_text())["results"]
        assert set(results) >= {"world_arithmetic", "world_colours", "world_numbers"}, model
    for arm in ("sft", "rl", "sft_kl"):
        assert (out / "train" / arm / "config.json").exists()
        assert len(list((out / "train" / arm / "probe" / "snapshots").glob("step-*"))) == 5, arm
    for name in ("base-sft", "base-rl", "base-sft_kl", "base-sft-rl", "steps-sft", "steps-rl"):
        status = json.loads((out / "crosscoders" / name / "training_status.json").read_text())
        assert status["complete"], name
    for name in ("base-sft", "base-rl", "base-sft-rl"):
        summary = json.loads((out / "analysis" / name / "summary.json").read_text())
        assert summary["n_features"] == 128 and list((out / "analysis" / name).glob("*.png")), name
    for arm in ("sft", "rl"):
        assert json.loads((out / "dynamics" / arm / "dynamics.json").read_text())["k"] == 10
    assert "tasks" in json.loads((out / "critical" / "critical.json").read_text())
    assert (out / "fisher" / "summary.json").exists() and (out / "fisher" / "fisher_features.json").exists()
    for stage in ("generalization", "intervene-zero-rl", "intervene-set-base", "steer"):
        # either the step's result or the recorded reason it had nothing to work on (|G_t| = 0, empty S)
        record = records[stage]
        folder = Path(record["outputs"][0])
        assert record["skipped_reason"] or any(folder.glob("*.json")), stage
        if record["skipped_reason"]:
            assert json.loads((folder / "skipped.json").read_text())["reason"] == record["skipped_reason"]
    assert json.loads((out / "leakage" / "blocked-shared" / "leakage.json").read_text())["n_tokens"] > 0

    html, md = out / "report" / "report.html", out / "report" / "report.md"
    text = md.read_text()
    for heading in ("Accuracy", "crosscoder attribution", "Generalization", "Fisher", "leakage", "Feature cards"):
        assert heading in text, heading
    fisher = json.loads((out / "fisher" / "summary.json").read_text())["fisher"]
    assert fisher["n_selected"] > 0  # the report states the count the step selected
    assert f"Fisher-selected reasoning features: {fisher['n_selected']} of 128 (selected on sft)." in text
    assert "http://" not in html.read_text() and "https://" not in html.read_text()
    assert html.read_text().count("<mark") >= 4, "feature cards show top-activating contexts, peak token marked"
    for figure in (out / "report" / "figures").glob("*.png"):
        assert f"figures/{figure.name}" in text


@pytest.mark.slow
def test_report_opens_in_headless_chromium(quick_demo, tmp_path):
    from posttrain_probe.study.report_check import check_in_browser, find_chromium

    if find_chromium() is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed (.ci/run installs it)")
    run, _, _ = quick_demo
    html = run["out"] / "report" / "report.html"
    n_figures = len(list((run["out"] / "report" / "figures").glob("*.png")))
    check = check_in_browser(html, tmp_path / "report.png")
    assert check.problems() == []
    assert len(check.images) == n_figures >= 8
    assert check.screenshot_size[1] >= check.images_bottom


@pytest.mark.slow
def test_changed_section_reruns_only_its_stages(quick_demo, tmp_path):
    run, _, _ = quick_demo
    out = run["out"]
    before = _records(out)
    config = read_study_file(demo_config(quick=True))
    config["dynamics"]["k"] = 5
    changed = tmp_path / "study.yaml"
    changed.write_text(yaml.safe_dump(config))
    result = _cli("study", "--config", str(changed), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    after = _records(out)
    rerun = {name for name in after if after[name]["finished"] != before[name]["finished"]}
    assert rerun == {"dynamics-sft", "dynamics-rl", "report"}
    assert json.loads((out / "dynamics" / "sft" / "dynamics.json").read_text())["k"] == 5

    # `report DIR` rebuilds the report from the directory alone.
    (out / "report" / "report.html").unlink()
    rebuilt = _cli("report", str(out), cwd=tmp_path)
    assert rebuilt.returncode == 0 and (out / "report" / "report.html").exists(), rebuilt.stderr


def test_dry_run_of_the_qwen3_study_prints_the_plan_without_loading_a_model(tmp_path):
    code = (
        "import sys; from posttrain_probe.cli import app; "
        f"sys.argv = ['posttrain-probe', 'study', '--config', {str(QWEN)!r}, '--out', {str(tmp_path / 'q')!r}, '--dry-run']\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'lm_eval') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    study = Study.load(QWEN, out=tmp_path / "q")
    for stage in study.stages():
        assert f"\n{stage.name} [to run]" in result.stdout
    assert result.stdout.count("  command: ") == len(study.stages()) == 43  # data, 4 collect groups, the preserving arm
    assert "accelerate launch --config_file" in result.stdout and "-m posttrain_probe.recipes.grpo" in result.stdout
    assert "--model_name_or_path Qwen/Qwen3-4B-Base" in result.stdout
    assert "posttrain-probe crosscoder train --model base=Qwen/Qwen3-4B-Base" in result.stdout  # live: no stores read
    assert "--n-tokens 400000000" in result.stdout
    assert not (tmp_path / "q").exists(), "a dry run writes nothing"


@pytest.mark.parametrize("model", ["qwen3-4b-base", "qwen2.5-7b", "llama-3.1-8b"])
def test_paper_study_files_wire_the_data_stage_suites_vllm_and_live_crosscoders(model, tmp_path):
    """Each real-model study file plans every stage with the papers' values: the data stage's teacher traces feed
    the SFT arms (sft.jsonl) and GRPO (rl.jsonl) with the columns it writes, evaluations run the shipped suites on
    vLLM where they can, the crosscoders train live on 400M tokens of the mixed text."""
    path = REPO / "recipes" / "configs" / model / "study.yaml"
    study = Study.load(path, out=tmp_path / "s")
    stages = {stage.name: stage for stage in study.stages()}
    for stage in stages.values():  # every config and command builds, without a model or a download
        stage.build()
    data = stages["data"].build()
    assert data.out == tmp_path / "s" / "data" and data.n_tries >= 1 and data.teacher == "Qwen/Qwen3-32B"
    assert Path(data.problems).is_file() and data.source_column == "source"
    for arm, recipe in (("sft", "sft"), ("rl", "grpo"), ("sft_kl", "sft_kl"), ("blocked-shared", "sft_blocked")):
        stage = stages[f"train-{arm}"]
        assert "data" in stage.deps
        command = stage.build().command
        flag = {f: command[command.index(f) + 1] for f in ("--dataset_name", "--question_column", "--output_dir")}
        expected = "rl.jsonl" if recipe == "grpo" else "sft.jsonl"
        assert flag["--dataset_name"] == str(tmp_path / "s" / "data" / expected), arm
        assert (
            flag["--question_column"] == "question"
            and "--correct_column" not in command
            and "--dataset_config" not in command
        )
    rl = stages["train-rl"].build().command
    assert rl[rl.index("--num_generations") + 1] == "8" and rl[rl.index("--use_vllm") + 1] == "true"
    evals = stages["eval-base"].build()
    assert evals.model == "auto" and evals.tasks[:3] == ["pr_math500", "pr_aime24", "pr_aime25"]
    from posttrain_probe.study.runner import stage_command

    command = stage_command(study, stages["eval-base"], evals)  # what the dry run prints and the record keeps
    assert "--model vllm" in command and "data_parallel_size=8" in command and "--apply_chat_template" in command
    assert command.endswith(
        "# model=auto: vllm where vllm and a GPU are present, else --model probe-hf without the vllm args"
    )
    zero = stages[f"intervene-zero-{study.settings.rl_arm}"].build()
    assert zero.model_args.startswith("dtype=bfloat16")  # interventions: probe-hf (InterveneConfig has no vllm)
    crosscoder = stages["crosscoder-base-sft-rl"].build()
    assert crosscoder.training.n_tokens == 400_000_000 and Path(crosscoder.dataset).name == "reasoning-general-mix.yaml"
    assert "eval-base" in stages and "data" not in stages["eval-base"].deps
    import importlib

    for name in ("train-sft", "train-rl", "train-sft_kl", "train-blocked-shared"):  # the recipes take every option
        launch = stages[name].build()
        parser = importlib.import_module(f"posttrain_probe.recipes.{launch.recipe}").make_parser()
        parser.parse_args_and_config([*launch.argv, "--bf16", "false", "--use_cpu", "true"])


def test_data_section_and_study_dataset_exclude_each_other(tmp_path):
    config = yaml.safe_load(QWEN.read_text())
    config["study"]["dataset"] = "open-r1/OpenR1-Math-220k"
    path = QWEN.parent / "_both_data_test.yaml"
    try:
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(ProbeError, match="has a data: section and study.dataset='open-r1/OpenR1-Math-220k'"):
            Study.load(path, out=tmp_path / "s")
    finally:
        path.unlink()


def _quick(tmp_path: Path, **changes) -> Path:
    """The quick demo's study file with ``section__field=value`` (or ``section=value``, None: removed) changed."""
    config = read_study_file(demo_config(quick=True))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            config.setdefault(section, {})[field] = value
        elif value is None:
            del config[section]
        else:
            config[section] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"colect": {}}, "unknown section 'colect'"),
        ({"collect__max_tokenz": 5}, "unknown key 'max_tokenz' in"),
        ({"collect__layer": [3]}, "sets layer=[3], but the study wires [2]"),
        ({"crosscoder": {"crosscoder": {"layer": 1}}}, "sets crosscoder.layer=1, but the study wires 2"),
        ({"study__layer": -1}, "study.layer=-1: expected a layer index >= 0"),
        ({"study__launcher": "slurm"}, "study.launcher='slurm': expected one of"),
        ({"arms": {"sft": {"recipe": "dpo"}}}, "arm recipe 'dpo': expected one of"),
        ({"eval": None}, "section critical of"),
        ({"world__n_train": 0}, "n_train=0: expected an int >= 1"),
        ({"study__rl_arm": "sft"}, "study.rl_arm='sft' names an arm of recipe 'sft': expected a grpo arm"),
        ({"study__rl_arm": "ppo"}, "needs the arm 'ppo' (study.rl_arm); arms are sft, rl, sft_kl"),
        ({"generalization__model": ["rl=elsewhere"]}, "sets model=['rl=elsewhere'], but the study wires"),
        ({"crosscoder": None}, "needs section crosscoder (its inputs come from it)"),
        ({"preserve": {"features": "everything"}}, "preserve.features='everything': expected one of shared"),
        ({"preserve": {"coefficient": -1}}, "preserve.coefficient=-1: expected a finite number >= 0"),
        (
            {"preserve": {"args": {"preserve_coefficient": 2.0}}},
            "sets preserve_coefficient=2.0, but the study wires 1.0",
        ),
        ({"preserve": {}, "blocked": None, "analyze": None}, "section preserve of"),
        ({"blocked": None}, "section leakage of"),
        ({"monitor": {"every": 0}}, "monitor.every=0: expected an integer >= 1"),
        ({"monitor": {}, "blocked": None, "leakage": None}, "section monitor of"),
        ({"monitor": {"every": 5}, "blocked": {"args": {"monitor_every": 9}}}, "sets monitor_every=9, but the study"),
    ],
)
def test_bad_study_files_fail_with_one_line(tmp_path, changes, message):
    import re

    path = _quick(tmp_path, **changes)
    with pytest.raises(ProbeError, match=re.escape(message)) as err:
        for stage in Study.load(path, out=tmp_path / "s").stages():
            stage.build()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s").exists()


def test_cli_errors_are_one_line_and_lose_nothing(tmp_path):
    config = _quick(tmp_path)
    out = tmp_path / "s"
    unknown = _cli("study", "--config", str(config), "--out", str(out), "--stage", "trian-sft", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown stage 'trian-sft': expected one of world, train-sft" in unknown.stderr
    missing = _cli("study", "--config", str(config), "--out", str(out), "--stage", "analyze-base-sft", cwd=tmp_path)
    assert missing.returncode == 2
    assert "stage analyze-base-sft needs stage crosscoder-base-sft, which has not finished" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    # A non-empty directory that holds no study: refused, nothing removed.
    (tmp_path / "busy" / "train").mkdir(parents=True)
    (tmp_path / "busy" / "train" / "keep.txt").write_text("x")
    busy = _cli("study", "--config", str(config), "--out", str(tmp_path / "busy"), cwd=tmp_path)
    assert busy.returncode == 2 and "is not empty and holds no study (no study.json)" in busy.stderr
    assert (tmp_path / "busy" / "train" / "keep.txt").read_text() == "x"

    # A directory holding another study: refused, its finished records untouched.
    (out / "stages").mkdir(parents=True)
    (out / "study.json").write_text(json.dumps({"identity": {"name": "other", "base_model": None, "layer": 2}}))
    (out / "stages" / "world.json").write_text(json.dumps({"complete": True, "hash": "x"}))
    other = _cli("study", "--config", str(config), "--out", str(out), cwd=tmp_path)
    assert other.returncode == 2
    assert f"study directory {out} was made by another study (name 'other', this file: 'demo-quick')" in other.stderr
    assert json.loads((out / "stages" / "world.json").read_text()) == {"complete": True, "hash": "x"}


def test_recipe_config_files_and_wired_keys(tmp_path):
    study = Study.load(QWEN, out=tmp_path / "q")
    sft = next(s for s in study.stages() if s.name == "train-sft").build()
    # the recipe's YAML (sft.yaml next to the study file) minus the wired keys, then the study's wiring
    assert sft.command[sft.command.index("--output_dir") + 1] == str(tmp_path / "q" / "train" / "sft")
    assert sft.command[sft.command.index("--learning_rate") + 1] == "5e-05"
    assert sft.command.count("--output_dir") == 1
    blocked = next(s for s in study.stages() if s.name == "train-blocked-base-only").build()
    # the live features of the category, as analyze wrote them (what the skip check and leakage read too)
    features = tmp_path / "q" / "analysis" / "base-sft" / "feature_sets" / "sft_base-only.json"
    assert blocked.command[blocked.command.index("--block_features") + 1] == str(features)
    leakage = next(s for s in study.stages() if s.name == "leakage-blocked-base-only").build()
    assert str(leakage.features) == str(features)
    bad = yaml.safe_load(QWEN.read_text())
    bad["arms"]["sft"]["args"] = {"output_dir": "elsewhere"}
    path = QWEN.parent / "_bad_study_test.yaml"
    try:
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ProbeError, match="arm sft of .* sets output_dir='elsewhere', but the study wires"):
            next(s for s in Study.load(path, out=tmp_path / "q").stages() if s.name == "train-sft").build()
    finally:
        path.unlink()


def test_settings_categories_match_the_analysis():
    from posttrain_probe.analysis.feature_sets import CATEGORY_NAMES
    from posttrain_probe.study.settings import CATEGORIES

    assert CATEGORIES == CATEGORY_NAMES


def test_wheel_ships_the_demo_and_the_recipes(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import zipfile

    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "posttrain_probe/study/configs/demo.yaml",
        "posttrain_probe/study/configs/demo_quick.yaml",
        "posttrain_probe/recipes/sft.py",
        "posttrain_probe/recipes/grpo.py",
        "posttrain_probe/recipes/sft_kl.py",
        "posttrain_probe/recipes/sft_blocked.py",
        "posttrain_probe/recipes/configs/qwen3-4b-base/study.yaml",
        "posttrain_probe/recipes/accelerate/zero3.yaml",
    ):
        assert name in names, name

    # Installed from the wheel alone (shadowing the checkout), in an empty directory: the demo's plan and the
    # recipes it launches come from the installed package.
    site, empty = tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)]
    assert subprocess.run(install, capture_output=True, text=True, timeout=300).returncode == 0
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import posttrain_probe.study.demo as d; print(d.demo_config(True))"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    plan = subprocess.run(
        [sys.executable, "-m", "posttrain_probe", "demo", "--quick", "--dry-run"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert plan.returncode == 0 and "-m posttrain_probe.recipes.grpo" in plan.stdout, plan.stderr
    assert "train-rl [to run]" in plan.stdout and "report [to run]" in plan.stdout
    recipe = subprocess.run(
        [sys.executable, "-m", "posttrain_probe.recipes.grpo", "--help"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert recipe.returncode == 0 and "--rewards" in recipe.stdout
    assert list(empty.iterdir()) == [], "a dry run writes nothing"


@pytest.mark.slow
def test_accelerate_launcher_runs_a_shipped_recipe_from_an_empty_directory(tmp_path, monkeypatch):
    """The default launcher: `accelerate launch ... --cpu -m posttrain_probe.recipes.sft --flag value ...`."""
    from posttrain_probe.study.launch import run_launch, trl_launch

    monkeypatch.chdir(tmp_path)
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    # the environment is not activated: its accelerate is found next to this Python, not on PATH
    monkeypatch.setenv(
        "PATH",
        os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != Path(sys.executable).parent),
    )
    args = yaml.safe_load((REPO / "recipes" / "configs" / "tiny" / "sft.yaml").read_text())
    args.update(output_dir=str(tmp_path / "sft"), max_steps=2, probe_snapshot_steps=1)
    launch = trl_launch(
        "sft", args, launcher="accelerate", accelerate_config=None, num_processes=1, log=tmp_path / "log"
    )
    assert launch.command[:2] == ["accelerate", "launch"] and "--cpu" in launch.command
    run_launch(launch)
    ran = shlex.join([str(Path(sys.executable).parent.absolute() / "accelerate"), "launch"])
    assert (tmp_path / "log").read_text().startswith(f"$ {ran} ")
    assert (tmp_path / "sft" / "config.json").exists()
    assert len(list((tmp_path / "sft" / "probe" / "snapshots").glob("step-*"))) == 2
    # a failed launch (python launcher: the same error path, without accelerate's start-up) is one line
    bad = trl_launch(
        "sft", {**args, "max_stepz": 1}, launcher="python", accelerate_config=None, num_processes=1, log=tmp_path / "l2"
    )
    with pytest.raises(
        ProbeError, match=r"training failed \(exit 2\): error: .*max_stepz.* \(command and full log: "
    ) as err:
        run_launch(bad)
    assert "\n" not in str(err.value)


def test_launch_path_puts_the_running_environment_first(tmp_path, monkeypatch):
    """The arm's PATH starts with this environment's scripts folder even when PATH already holds it behind another
    environment's folder; the other entries keep their order, empty entries are dropped."""
    from posttrain_probe.study.launch import environment_scripts, launch_path

    monkeypatch.setattr(sys, "executable", str(tmp_path / "env" / "bin" / "python"))
    mine = [str(folder) for folder in environment_scripts()]
    assert str(tmp_path / "env" / "bin") in mine
    other = str(tmp_path / "other" / "bin")
    path = os.pathsep.join([other, mine[-1], "", "/usr/bin"])
    assert launch_path(path).split(os.pathsep) == [*mine, other, "/usr/bin"]
    assert launch_path("").split(os.pathsep) == mine


def test_launcher_program_prefers_the_running_environment_then_path(tmp_path, monkeypatch):
    """A bare launcher name resolves next to sys.executable first (an environment that is not activated, or
    another one's launcher earlier on PATH), then on PATH; a missing one is a one-line error naming both."""
    from posttrain_probe.study.launch import launcher_program

    def executable(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
        return path

    env_bin, other_bin = tmp_path / "env" / "bin", tmp_path / "other" / "bin"
    python = executable(env_bin / "python")
    mine, theirs = executable(env_bin / "tool"), executable(other_bin / "tool")
    only_theirs = executable(other_bin / "elsewhere")
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("PATH", str(other_bin))
    assert launcher_program("tool") == str(mine) != str(theirs)
    assert launcher_program("elsewhere") == str(only_theirs)
    assert launcher_program(str(theirs)) == str(theirs)  # a path is used as given
    with pytest.raises(
        ProbeError,
        match=r"'nowhere' \(the study's launcher\) is neither in this Python's environment \(.*bin.*\) nor on PATH",
    ) as err:
        launcher_program("nowhere")
    assert "\n" not in str(err.value)
    for not_executable in (tmp_path / "missing" / "accelerate", tmp_path / "env", env_bin / "plain"):
        if not_executable.name == "plain":
            not_executable.write_text("no x bit")
        with pytest.raises(ProbeError, match=r"launcher '.*' is not an executable file"):
            launcher_program(str(not_executable))
    with pytest.raises(ProbeError, match="the study's launcher is empty"):
        launcher_program("")


def test_extends_merges_sections_key_by_key(tmp_path):
    quick = read_study_file(demo_config(quick=True))
    full = read_study_file(demo_config(quick=False))
    assert quick["arms"]["sft"]["args"]["max_steps"] == 10 and full["arms"]["sft"]["args"]["max_steps"] == 40
    assert quick["arms"]["sft"]["args"]["learning_rate"] == full["arms"]["sft"]["args"]["learning_rate"]
    assert quick["study"]["layer"] == full["study"]["layer"] and "extends" not in quick
    # a chain from another folder keeps the extended file's recipe paths
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {QWEN}\nstudy:\n  name: mine\n")
    study = Study.load(child, out=tmp_path / "s")
    assert study.settings.name == "mine" and study.arm_args["sft"]["learning_rate"] == 5.0e-5
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ProbeError, match="extends it back: expected a chain without a loop"):
        read_study_file(loop)
    missing = tmp_path / "missing.yaml"
    missing.write_text("extends: nowhere.yaml\n")
    with pytest.raises(ProbeError, match="extends 'nowhere.yaml', which is not a file"):
        read_study_file(missing)


def test_misspelled_task_stops_the_study_before_any_stage(tmp_path):
    """A task name lm-eval does not know fails at the start (one line, nothing written), not after training."""
    from posttrain_probe.study.runner import run_study

    config = yaml.safe_load(QWEN.read_text())
    config["study"]["general_tasks"] = ["pr_openbookqa_gen", "pr_sciq_gne"]
    path = QWEN.parent / "_task_typo_test.yaml"
    try:
        path.write_text(yaml.safe_dump(config))
        study = Study.load(path, out=tmp_path / "s")
        with pytest.raises(ProbeError, match=r"unknown lm-eval task 'pr_sciq_gne' \(did you mean pr_sciq_gen") as err:
            run_study(study, echo=lambda line: None)
    finally:
        path.unlink()
    assert "\n" not in str(err.value) and not (tmp_path / "s").exists()


def test_stage_hashes_do_not_depend_on_the_working_directory_but_on_data_file_contents(tmp_path, monkeypatch):
    """The study file names its mixture files relative to itself: loading it from another directory gives the same
    hashes (nothing re-runs), while an edited mixture file re-runs the stages that read it, and what follows."""
    from posttrain_probe.study.runner import stage_hashes

    first = stage_hashes(Study.load(QWEN, out=tmp_path / "s"))
    monkeypatch.chdir(QWEN.parent)
    second = stage_hashes(Study.load(Path("study.yaml"), out=tmp_path / "s"))
    assert first == second
    copy = tmp_path / "study"
    copy.mkdir()
    (copy / "data").mkdir()
    config = yaml.safe_load(QWEN.read_text())
    for name in ("sft", "grpo", "sft_kl", "sft_blocked_shared"):
        (copy / f"{name}.yaml").write_text((QWEN.parent / f"{name}.yaml").read_text())
    config["data"]["problems"] = "data/math-47k.yaml"
    config["collect"]["dataset"] = "data/mix.yaml"
    config["study"]["accelerate_config"] = str(REPO / "recipes" / "accelerate" / "zero3.yaml")
    mix = (REPO / "recipes" / "configs" / "data" / "reasoning-general-mix.yaml").read_text()
    (copy / "data" / "math-47k.yaml").write_text((REPO / "recipes" / "configs" / "data" / "math-47k.yaml").read_text())
    (copy / "data" / "mix.yaml").write_text(mix)
    (copy / "study.yaml").write_text(yaml.safe_dump(config))
    before = stage_hashes(Study.load(copy / "study.yaml", out=tmp_path / "c"))
    (copy / "data" / "mix.yaml").write_text(mix.replace("weight: 0.8", "weight: 0.7"))
    after = stage_hashes(Study.load(copy / "study.yaml", out=tmp_path / "c"))
    changed = {name for name in before if before[name] != after[name]}
    assert "collect-base" in changed and "crosscoder-base-sft-rl" in changed
    assert not changed & {"data", "train-sft", "train-rl", "eval-base"}


def test_data_stage_needs_explicit_datasets_for_collect(tmp_path):
    config = yaml.safe_load(QWEN.read_text())
    del config["collect"]["dataset"]
    path = QWEN.parent / "_no_collect_dataset_test.yaml"
    try:
        path.write_text(yaml.safe_dump(config))
        study = Study.load(path, out=tmp_path / "s")
        with pytest.raises(
            ProbeError, match="section collect of .* has no dataset: with a data: section, give collect.dataset"
        ):
            next(s for s in study.stages() if s.name == "collect-base").build()
    finally:
        path.unlink()


def _argv_values(argv: list[str], *flags: str) -> dict[str, str]:
    return {flag: argv[argv.index(flag) + 1] for flag in flags}


def _parsed(launch, *types: type) -> list:
    """The recipe's dataclasses of ``types`` as its own parser reads the stage's argv (the recipe takes every option)."""
    import importlib

    parser = importlib.import_module(f"posttrain_probe.recipes.{launch.recipe}").make_parser()
    parsed = parser.parse_args_and_config(launch.argv)
    return [next(p for p in parsed if isinstance(p, t)) for t in types]


def test_preserve_arm_trains_after_the_base_sft_analysis_and_the_monitor_watches_it(tmp_path):
    """preserve: adds train-, eval- and leakage-preserve-<category>, wired like the blocked arms (the base-sft crosscoder,
    the category's feature set of its analysis); monitor: without a crosscoder watches the blocked and preserving arms,
    which train after base-sft exists, and no other arm."""
    from posttrain_probe.callbacks import MonitorArguments
    from posttrain_probe.callbacks.preserve import PreserveArguments

    path = _quick(tmp_path, preserve={"coefficient": 0.5}, monitor={"every": 5})
    study = Study.load(path, out=tmp_path / "s")
    stages = {stage.name: stage for stage in study.stages()}
    root, arm = tmp_path / "s", "preserve-base-only"
    crosscoder = root / "crosscoders" / "base-sft"
    features = root / "analysis" / "base-sft" / "feature_sets" / "sft_base-only.json"
    assert study.preserve_arms() == {arm: "base-only"} and study.models()[arm] == str(root / "train" / arm)
    assert stages[f"train-{arm}"].deps == ("analyze-base-sft", "world")
    assert stages[f"eval-{arm}"].deps == ("world", f"train-{arm}")
    assert stages[f"leakage-{arm}"].deps == (f"train-{arm}",)
    assert {f"train-{arm}", f"eval-{arm}", f"leakage-{arm}"} <= set(stages["report"].deps)
    names = list(stages)
    assert names.index(f"train-{arm}") > names.index("leakage-blocked-finetune-only")

    launch = stages[f"train-{arm}"].build()
    assert launch.recipe == "sft_preserve" and launch.inprocess
    preserve, monitor = _parsed(launch, PreserveArguments, MonitorArguments)
    assert preserve.preserve_crosscoder == str(crosscoder) and preserve.preserve_features == str(features)
    assert (preserve.preserve_model, preserve.preserve_base, preserve.preserve_finetuned) == ("base", "base", "sft")
    assert preserve.preserve_coefficient == 0.5
    assert monitor.monitor_crosscoder == str(crosscoder) and monitor.monitor_every == 5
    sft = stages["train-sft"].build()  # the SFT arm's options, the study's wiring
    values = _argv_values(launch.argv, "--max_steps", "--learning_rate", "--output_dir")
    assert values == {
        **_argv_values(sft.argv, "--max_steps", "--learning_rate"),
        "--output_dir": str(root / "train" / arm),
    }

    leakage = stages[f"leakage-{arm}"].build()
    assert (str(leakage.blocked), str(leakage.features), str(leakage.crosscoder)) == (
        str(root / "train" / arm),
        str(features),
        str(crosscoder),
    )
    assert (leakage.model_name, leakage.finetuned) == ("base", "sft")

    # the monitor: the blocked and preserving arms, not the arms that train before the crosscoder exists
    (blocking_monitor,) = _parsed(stages["train-blocked-shared"].build(), MonitorArguments)
    assert blocking_monitor.monitor_crosscoder == str(crosscoder) and blocking_monitor.monitor_every == 5
    for name in ("train-sft", "train-rl", "train-sft_kl"):
        assert not any(a.startswith("--monitor_") for a in stages[name].build().argv), name
    assert "feature monitor on" in stages["train-blocked-shared"].about

    # the preserving arm's own result decides its hash; the monitor re-runs the arms it watches only
    from posttrain_probe.study.runner import stage_hashes

    plain = stage_hashes(Study.load(_quick(tmp_path, preserve={"coefficient": 0.5}), out=root))
    hashes = stage_hashes(study)
    assert plain["train-sft"] == hashes["train-sft"] and plain["collect-sft"] == hashes["collect-sft"]
    assert (
        plain["train-blocked-shared"] != hashes["train-blocked-shared"]
        and plain[f"train-{arm}"] != hashes[f"train-{arm}"]
    )
    other = stage_hashes(Study.load(_quick(tmp_path, preserve={"coefficient": 0.25}), out=root))
    assert (
        other[f"train-{arm}"] != plain[f"train-{arm}"]
        and other["train-blocked-shared"] == plain["train-blocked-shared"]
    )


def test_monitor_crosscoder_given_watches_every_arm(tmp_path):
    """monitor.crosscoder (a crosscoder trained beforehand, relative to the study file): every arm, verl ones through
    probe.monitor.*; arms of a study without a monitor: section keep their hashes."""
    from posttrain_probe.callbacks import MonitorArguments

    (tmp_path / "cc").mkdir()
    arms = read_study_file(demo_config(quick=True))["arms"]
    arms["rl_verl"] = {"recipe": "grpo", "trainer": "verl", "args": {"data.train_files": "rl.parquet"}}
    study = Study.load(_quick(tmp_path, arms=arms, monitor={"crosscoder": "cc", "every": 7}), out=tmp_path / "s")
    stages = {stage.name: stage for stage in study.stages()}
    for name in ("train-sft", "train-rl", "train-sft_kl", "train-blocked-shared"):
        (monitor,) = _parsed(stages[name].build(), MonitorArguments)
        assert (monitor.monitor_crosscoder, monitor.monitor_every) == (str(tmp_path / "cc"), 7), name
    verl = stages["train-rl_verl"].build().command
    assert f"probe.monitor.crosscoder={tmp_path / 'cc'}" in verl and "probe.monitor.every=7" in verl
    assert verl.index("+probe=on") > verl.index("probe.monitor.every=7")  # Hydra applies the group first either way


def test_demo_monitors_and_preserves_and_the_quick_demo_leaves_both_out(tmp_path):
    """The full demo has the preserving arm and the monitor; --quick drops them (preserve: false, monitor: false) to
    keep its time budget, and plans as before."""
    full = {stage.name: stage for stage in Study.load(demo_config(quick=False), out=tmp_path / "f").stages()}
    assert {"train-preserve-base-only", "eval-preserve-base-only", "leakage-preserve-base-only"} <= set(full)
    assert "--monitor_crosscoder" in full["train-preserve-base-only"].build().argv
    assert "--monitor_crosscoder" in full["train-blocked-shared"].build().argv
    quick = Study.load(demo_config(quick=True), out=tmp_path / "q")
    assert quick.preserve is None and quick.monitor is None and "preserve" not in quick.raw
    assert not [s.name for s in quick.stages() if "preserve" in s.name]
    assert len(quick.stages()) == len(full) - 3


def test_paper_study_file_takes_a_preserve_section_with_its_recipe_config(tmp_path):
    """A preserve: section with the Qwen3-4B-Base recipe YAML: its own preserve_* keys give way to the study's wiring,
    its other options stay, and the recipe parses the command."""
    from posttrain_probe.callbacks.preserve import PreserveArguments

    config = QWEN.parent / "sft_preserve_base_only.yaml"
    child = tmp_path / "study.yaml"
    child.write_text(f"extends: {QWEN}\npreserve:\n  config: {config}\n")
    study = Study.load(child, out=tmp_path / "q")
    stages = {stage.name: stage for stage in study.stages()}
    launch = stages["train-preserve-base-only"].build()
    assert launch.command[:4] == [
        "accelerate",
        "launch",
        "--config_file",
        str(REPO / "recipes" / "accelerate" / "zero3.yaml"),
    ]
    features = tmp_path / "q" / "analysis" / "base-sft" / "feature_sets" / "sft_base-only.json"
    values = _argv_values(
        launch.argv, "--preserve_crosscoder", "--preserve_features", "--learning_rate", "--dataset_name"
    )
    assert values == {
        "--preserve_crosscoder": str(tmp_path / "q" / "crosscoders" / "base-sft"),
        "--preserve_features": str(features),
        "--learning_rate": "5e-05",
        "--dataset_name": str(tmp_path / "q" / "data" / "sft.jsonl"),
    }
    assert launch.argv.count("--preserve_crosscoder") == 1 and "runs/qwen3-4b-base" not in " ".join(launch.argv)
    launch.argv += ["--bf16", "false", "--use_cpu", "true"]
    (preserve,) = _parsed(launch, PreserveArguments)
    assert preserve.preserve_features == str(features) and preserve.preserve_coefficient == 1.0
    assert stages["leakage-preserve-base-only"].build().blocked == str(tmp_path / "q" / "train" / "preserve-base-only")


def _monitor_log(path: Path, steps: dict[int, float]) -> None:
    """A monitor.jsonl as the feature monitor writes it: step -> suppressed fraction (the other figures follow it)."""
    from posttrain_probe.analysis.monitor import MonitorFigures

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step, suppressed in steps.items():
        figures = MonitorFigures(
            n_tokens=100,
            mean_change=-suppressed / 10,
            category_change={"base-only": -suppressed / 5, "shared": 0.0, "finetune-only": float("nan")},
            n_active=50,
            n_suppressed=round(50 * suppressed),
            suppressed_fraction=suppressed,
            fvu=0.1 + suppressed,
            top_features=[7, 3, 11],
            top_changes=[-0.5, 0.25, -0.125],
        )
        lines.append(json.dumps({"step": step, **figures.to_json(), "seconds": 0.01}))
    path.write_text("\n".join(lines) + "\n")


def test_report_shows_the_preserving_arm_and_the_monitor_curves(tmp_path):
    """A study directory with a preserving arm's evaluation and leakage and two arms' monitor.jsonl (planted): the
    accuracy table has its row, the leakage table its row next to the blocked arm's, and the monitor section one
    figure (png + svg) and a row per monitored arm at its last step; without a monitor log, no monitor section."""
    from posttrain_probe.study.report import build_report

    root = tmp_path / "study"
    root.mkdir()
    info = {
        "identity": {"name": "planted"},
        "tasks": {"in_domain": ["t_in"], "general": ["t_gen"], "held_out": []},
        "arms": {"sft": {"recipe": "sft", "trainer": "trl", "label": "SFT"}},
        "blocked_arms": {"blocked-shared": "shared"},
        "preserve_arms": {"preserve-base-only": "base-only"},
        "settings": {"sft_arm": "sft", "rl_arm": "rl", "layer": 2},
        "config": {"preserve": {"coefficient": 0.5}},
        "stages": [],
    }
    (root / "study.json").write_text(json.dumps(info))
    for model, acc in (("base", 0.25), ("sft", 0.5), ("blocked-shared", 0.375), ("preserve-base-only", 0.625)):
        (root / "eval" / model).mkdir(parents=True)
        results = {"t_in": {"acc,none": acc}, "t_gen": {"acc,none": acc - 0.125}}
        (root / "eval" / model / "lm_eval.json").write_text(json.dumps({"results": results}))
    for arm, protected in (("blocked-shared", 0.5), ("preserve-base-only", 0.0625)):
        (root / "leakage" / arm).mkdir(parents=True)
        change = {"protected": {"median": protected}, "unprotected": {"median": 0.25}}
        change["median_ratio_protected_to_unprotected"] = protected / 0.25
        (root / "leakage" / arm / "leakage.json").write_text(json.dumps({"relative_change": change}))
    _monitor_log(root / "train" / "preserve-base-only" / "probe" / "monitor.jsonl", {0: 0.0, 5: 0.0625, 10: 0.125})
    _monitor_log(root / "train" / "blocked-shared" / "probe" / "monitor.jsonl", {0: 0.0, 5: 0.25, 10: 0.375})

    html = build_report(root)
    md = (root / "report" / "report.md").read_text()
    assert "| SFT, base-only preserved | 62.5 | 50.0 |" in md
    assert "| preserve-base-only | preservation (lambda 0.5) | base-only | 0.0625 | 0.25 | 0.25 |" in md
    assert "| blocked-shared | gradient blocking (sae) | shared | 0.5 | 0.25 | 2 |" in md
    assert "## During training: the feature monitor" in md
    figure = next(n for n in (root / "report" / "figures").iterdir() if "feature-monitor" in n.name)
    assert f"figures/{figure.name}" in md and figure.stat().st_size > 10_000
    assert {p.name for p in (root / "report" / "monitor").iterdir()} == {"monitor.png", "monitor.svg"}
    header = "| model | last step | suppressed fraction | FVU (drift) | mean change | change base-only | change shared"
    assert header in md and "change finetune-only" not in md  # a category without a number at any step: no column
    row = "| SFT, base-only preserved | 10 | 0.125 | 0.225 | -0.0125 | -0.025 | 0 | 7 (-0.5), 3 (+0.25), 11 (-0.125) |"
    assert row in md
    assert "| SFT, shared blocked | 10 | 0.375 | 0.475 | -0.0375 | -0.075 | 0 |" in md
    page = html.read_text()
    assert page.count("<img") == len(list((root / "report" / "figures").glob("*.png")))

    # a log cut short by a killed run is named, the others still drawn; no log at all: no section
    log = root / "train" / "blocked-shared" / "probe" / "monitor.jsonl"
    log.write_text(log.read_text() + '{"step": 15, "n_tok')
    build_report(root)
    md = (root / "report" / "report.md").read_text()
    assert "Unreadable monitor logs: blocked-shared" in md and "| SFT, base-only preserved | 10 |" in md
    for arm in ("blocked-shared", "preserve-base-only"):
        (root / "train" / arm / "probe" / "monitor.jsonl").unlink()
    build_report(root)
    assert "feature monitor" not in (root / "report" / "report.md").read_text()
