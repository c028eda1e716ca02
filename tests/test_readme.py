"""README.md's code blocks run as written: every ```bash and ```python block, in order, on a CPU.

How the blocks are run (``test_readme_runs``):

- Each ```bash block is split into commands (one per line; a line ending in ``\\`` continues on the
  next; blank and comment-only lines are dropped). Each command runs with ``bash -c`` under
  ``set -eo pipefail``. Each ```python block runs as one script with this interpreter.
- Everything runs in order in one temporary directory (cwd = the tmp dir), so the ``demo/...``
  paths that one block writes are what later blocks read, and nothing is written into the
  repository. ``PATH`` starts with this interpreter's ``bin/`` directory, so the ``posttrain-probe``
  and ``accelerate`` of the environment under test are the ones found. The hub is switched off
  (``HF_HUB_OFFLINE=1`` and friends): nothing may need the network.
- Repository files: a command word starting with ``recipes/`` (the recipe scripts and their YAML
  configs) is made absolute (``<repo>/recipes/...``); the command still runs in the tmp dir, so
  what it writes (e.g. the tiny SFT recipe's ``output_dir: runs/tiny/sft``) lands there.

Which commands are skipped (``skip_reason``, first rule that matches; the rest must run and pass):

1. ``pip install ...``: installs packages (the environment under test is already installed).
2. ``pytest``: the test command itself (``.ci/run`` runs it).
3. ``verl`` (``python -m verl...``, ``bash recipes/verl/...``): needs verl, Ray and GPUs.
4. ``--config_file``: an accelerate config for several GPUs / DeepSpeed (``recipes/accelerate/``).
5. ``accelerate launch`` without ``--cpu``, or with ``--num_processes`` above 1: needs GPUs.
6. A hub model name (Qwen, Llama, Mistral, Gemma, case-insensitive, also in config paths such as
   ``recipes/configs/qwen3-4b-base/``): a real model download and a GPU.
7. Placeholders: ``...``, ``<run>``-style angle brackets, or a ``runs/`` path (outputs of earlier
   GPU training runs that the demo does not make).

A ```python block is skipped as a whole when it contains ``...`` (placeholder code such as
``SFTTrainer(model=..., ...)``). ``test_readme_rules`` (fast) checks the rules' outcome on the
current README: the demo commands the README promises are among those that run.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_HUB_MODEL = re.compile(r"qwen|llama|mistral|gemma", re.IGNORECASE)


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, body, line number of the opening fence)`` of every ```bash / ```python block."""
    blocks = []
    for match in _FENCE.finditer(text):
        lang = match.group(1)
        if lang in ("bash", "python"):
            blocks.append((lang, match.group(2), text.count("\n", 0, match.start()) + 1))
    return blocks


def bash_commands(body: str) -> list[str]:
    """One string per command of a bash block: continuation lines joined, comment-only lines dropped."""
    commands, current = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            commands.append(current.strip())
        current = ""
    if current.strip():
        commands.append(current.strip())
    return commands


def skip_reason(command: str) -> str | None:
    """Why a README bash command is not run here (module docstring, rules 1-7), or None: it runs."""
    if re.search(r"\bpip install\b", command):
        return "installs packages"
    if re.search(r"\bpytest\b", command):
        return "the test command itself"
    if re.search(r"\bverl\b", command):
        return "needs verl, Ray and GPUs"
    if "--config_file" in command:
        return "multi-GPU accelerate config"
    if re.search(r"\baccelerate launch\b", command):
        n_proc = re.search(r"--num_processes[ =](\d+)", command)
        if "--cpu" not in command or (n_proc and int(n_proc.group(1)) > 1):
            return "accelerate launch on GPUs"
    if _HUB_MODEL.search(command):
        return "real hub model"
    if "..." in command or re.search(r"<\w+>", command) or re.search(r"(^|[\s=])runs/", command):
        return "placeholder (needs earlier GPU runs)"
    return None


def python_skip_reason(body: str) -> str | None:
    """Why a README python block is not run here, or None."""
    return "placeholder code (...)" if "..." in body else None


def absolute_repo_paths(command: str) -> str:
    """``recipes/...`` command words -> ``<repo>/recipes/...`` (the command runs in a tmp dir)."""
    return re.sub(r"(^|(?<=[\s=]))recipes/", f"{REPO}/recipes/", command)


def readme_steps() -> list[dict]:
    """Every README command / python block in order: ``kind``, ``code``, ``line``, ``skip``."""
    steps = []
    for lang, body, line in code_blocks(README.read_text(encoding="utf-8")):
        if lang == "python":
            steps.append({"kind": "python", "code": body, "line": line, "skip": python_skip_reason(body)})
        else:
            for command in bash_commands(body):
                steps.append({"kind": "bash", "code": command, "line": line, "skip": skip_reason(command)})
    return steps


def _runnable(steps: list[dict]) -> list[str]:
    return [s["code"] for s in steps if s["skip"] is None]


def test_readme_rules():
    """The skip rules leave the README's CPU demo runnable, in an order that works."""
    steps = readme_steps()
    run = _runnable(steps)
    skipped = {s["code"]: s["skip"] for s in steps if s["skip"] is not None}
    assert all(s["skip"] is None or s["skip"] for s in steps)

    def first(pattern: str) -> int:
        hits = [i for i, code in enumerate(run) if re.search(pattern, code)]
        assert hits, f"no runnable README command matches {pattern!r}"
        return hits[0]

    # the demo commands the README promises all run
    for pattern in (
        r"testing make-models demo/models",
        r"accelerate launch --num_processes 1 --cpu recipes/sft\.py",
        r"crosscoder train --acts demo/acts",
        r"posttrain-probe analyze",
        r"posttrain-probe dynamics",
        r"features generalization",
        r"posttrain-probe intervene",
        r"features fisher",
        r"features=3;17;42",
    ):
        first(pattern)
    # critical needs both lm-eval runs before it; dynamics needs its crosscoder
    assert first(r"pretrained=demo/models/tuned --tasks") < first(r"posttrain-probe critical")
    assert first(r"crosscoder train --acts demo/ckpt-acts") < first(r"posttrain-probe dynamics")
    # shell metacharacters in --model_args are quoted
    assert "'" in run[first(r"features=3;17;42")]
    # nothing that needs a GPU, the hub or the network is run
    assert not any(_HUB_MODEL.search(code) or "pip install" in code for code in run)
    assert any("zero3.yaml" in code for code in skipped)
    # install: the CPU wheel index line comes before the plain project install
    text = README.read_text(encoding="utf-8")
    cpu = text.index("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    assert cpu < text.index('pip install -e ".[trl]"\n```')
    # the methods and design are the repository's own pages
    assert (
        "SPEC" + ".md" not in text and "DESIGN" + ".md" not in text
    )  # the specification files the repository does not ship
    for page in ("docs/methods.md", "docs/design.md"):
        assert page in text and (REPO / page).is_file()


@pytest.mark.slow
def test_readme_runs(tmp_path):
    """Run every non-skipped README block in order in ``tmp_path`` (rules in the module docstring)."""
    bin_dir = pathlib.Path(sys.executable).parent
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MPLBACKEND="Agg",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PYTHONPATH", None)
    log = []
    for index, step in enumerate(readme_steps()):
        if step["skip"] is not None:
            log.append(f"skip  README:{step['line']}  ({step['skip']})  {step['code'].splitlines()[0][:100]}")
            continue
        if step["kind"] == "python":
            script = tmp_path / f"readme_block_{index:02d}.py"
            script.write_text(step["code"], encoding="utf-8")
            argv = [sys.executable, str(script)]
        else:
            argv = ["bash", "-c", "set -eo pipefail\n" + absolute_repo_paths(step["code"])]
        start = time.monotonic()
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        seconds = time.monotonic() - start
        log.append(f"ran   README:{step['line']}  {seconds:5.1f}s  {step['code'].splitlines()[0][:100]}")
        if proc.returncode != 0:
            pytest.fail(
                f"README.md line {step['line']}: exit {proc.returncode}\n{step['code']}\n"
                f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-5000:]}\n"
                "--- steps so far\n" + "\n".join(log)
            )
    print("\n".join(log))
    assert (tmp_path / "demo" / "dynamics" / "dynamics.json").is_file()
    assert (tmp_path / "demo" / "zero-rl" / "effects.json").is_file()
    assert (tmp_path / "runs" / "tiny" / "sft" / "probe" / "probe.json").is_file()
