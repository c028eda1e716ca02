"""Launch a training arm the way a user launches it: ``accelerate launch`` (with the study's accelerate /
DeepSpeed config), ``torchrun``, ``python -m``, verl's ``main_ppo`` with ``+probe=on``, or, for one CPU process,
inside the study's own process (the same recipe ``cli(argv)``, without a new interpreter's import time).

Nothing here schedules jobs: a command runs where the study runs, so the same study file drives one CPU or a
multi-GPU node (``study --stage train-sft`` inside a cluster job)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain_probe.errors import ProbeError


@dataclass
class Launch:
    """One training run: its full command line and, for the in-process launcher, the recipe and its argv."""

    command: list[str]
    """The exact command (``accelerate launch ... -m posttrain_probe.recipes.sft --flag value ...``)."""
    recipe: str | None = None
    """``posttrain_probe.recipes.<recipe>`` (TRL arms)."""
    argv: list[str] = field(default_factory=list)
    """The recipe's own arguments (after the module)."""
    inprocess: bool = False
    """Run ``recipe.cli(argv)`` in this process instead of ``command``."""
    log: Path | None = None
    """Where a subprocess's output goes (``<arm>/train.log``)."""

    def shell(self) -> str:
        """The command as one shell line."""
        return shlex.join(self.command)


def recipe_flags(args: dict[str, Any]) -> list[str]:
    """Recipe options (YAML keys of a TrlParser recipe) -> its flags: ``--key value``, a list as ``--key v1 v2``,
    a bool as ``--key true|false``; None is left out (the recipe's default)."""
    flags: list[str] = []
    for key, value in args.items():
        if value is None:
            continue
        flag = "--" + str(key)
        if isinstance(value, bool):
            flags += [flag, "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            flags += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            raise ProbeError(f"recipe option {key}: a mapping cannot be a flag; give it as a string")
        else:
            flags += [flag, str(value)]
    return flags


def trl_launch(
    recipe: str,
    args: dict[str, Any],
    *,
    launcher: str,
    accelerate_config: str | None,
    num_processes: int,
    log: Path,
) -> Launch:
    """The command that trains ``posttrain_probe.recipes.<recipe>`` with ``args`` under ``launcher``."""
    module = f"posttrain_probe.recipes.{recipe}"
    argv = recipe_flags(args)
    if launcher == "accelerate":
        if accelerate_config:
            head = ["accelerate", "launch", "--config_file", accelerate_config]
        else:
            head = ["accelerate", "launch", "--num_processes", str(num_processes), "--num_machines", "1"]
            head += ["--mixed_precision", "no", "--dynamo_backend", "no"]
            if _cpu_only(args):
                head.append("--cpu")
        command = [*head, "-m", module, *argv]
    elif launcher == "torchrun":
        command = ["torchrun", "--nproc_per_node", str(num_processes), "-m", module, *argv]
    else:
        command = [sys.executable, "-m", module, *argv]
    return Launch(command, recipe=recipe, argv=argv, inprocess=launcher == "inprocess", log=log)


def _cpu_only(args: dict[str, Any]) -> bool:
    return bool(args.get("use_cpu")) or os.environ.get("CUDA_VISIBLE_DEVICES") == ""


def verl_launch(overrides: dict[str, Any], *, base_model: str, out: Path, layer: int, log: Path) -> Launch:
    """verl GRPO with the probe: ``python -m verl.trainer.main_ppo KEY=VALUE ... +probe=on probe.layers=[L]``."""
    wired = {
        "actor_rollout_ref.model.path": base_model,
        "trainer.default_local_dir": str(out),
    }
    if "data.train_files" not in overrides:
        raise ProbeError(
            "a verl arm needs data.train_files (parquet of the same prompts as the other arms) in its args"
        )
    clash = [k for k in wired if k in overrides and str(overrides[k]) != wired[k]]
    if clash:
        raise ProbeError(f"verl arm sets {clash[0]}={overrides[clash[0]]!r}, but the study wires {wired[clash[0]]!r}")
    items = {"algorithm.adv_estimator": "grpo", **overrides, **wired}
    command = [sys.executable, "-m", "verl.trainer.main_ppo", *(f"{k}={v}" for k, v in items.items())]
    command += ["+probe=on", f"probe.layers=[{layer}]"]
    return Launch(command, log=log)


def environment_scripts() -> list[Path]:
    """The folders holding this Python environment's console scripts (``accelerate``, ``torchrun``): sysconfig's
    ``scripts`` path, then the folder of ``sys.executable`` (absolute; none when the interpreter is unknown)."""
    import sysconfig

    folders = [sysconfig.get_path("scripts")] + ([str(Path(sys.executable).parent)] if sys.executable else [])
    unique: list[Path] = []
    for folder in folders:
        path = Path(folder).absolute() if folder else None
        if path is not None and path not in unique:
            unique.append(path)
    return unique


def launcher_program(program: str) -> str:
    """The executable that runs ``program`` (``accelerate``, ``torchrun``, a path): a bare name is taken from the
    environment running this process first (:func:`environment_scripts`, so that training runs with the same
    packages even when that environment is not activated or another one's launcher comes first on PATH), then
    from PATH. ProbeError naming both places when neither has it, or when a path is not an executable file."""
    if not program:
        raise ProbeError("the study's launcher is empty: expected accelerate, torchrun or an executable's path")
    if os.sep in program or (os.altsep and os.altsep in program):
        if not (Path(program).is_file() and os.access(program, os.X_OK)):
            raise ProbeError(f"launcher {program!r} is not an executable file")
        return program
    folders = environment_scripts()
    for folder in folders:
        for name in (program, program + ".exe") if os.name == "nt" else (program,):
            candidate = folder / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which(program)
    if found is None:
        where = ", ".join(str(f) for f in folders) or "no folder: sys.executable is unknown"
        raise ProbeError(
            f"{program!r} (the study's launcher) is neither in this Python's environment ({where}) nor on PATH: "
            "install it into this environment (pip install accelerate) or choose another launcher"
        )
    return found


def launch_path(path: str) -> str:
    """PATH for a training subprocess: this environment's scripts folders (:func:`environment_scripts`) first, as if
    it were activated (DeepSpeed's op builds run ``ninja``, ...), then ``path``'s other entries in their order."""
    first = [str(folder) for folder in environment_scripts()]
    rest = [entry for entry in path.split(os.pathsep) if entry and entry not in first]
    return os.pathsep.join([*first, *rest])


def run_launch(launch: Launch) -> None:
    """Run a training launch to completion; ProbeError (with the log's tail) if it fails."""
    if launch.inprocess:
        import importlib

        module = importlib.import_module(f"posttrain_probe.recipes.{launch.recipe}")
        try:
            module.cli(launch.argv)
        except SystemExit as exit:
            if exit.code not in (0, None):
                raise ProbeError(f"training failed (exit {exit.code}): {launch.shell()}") from None
        return
    assert launch.log is not None
    command = [launcher_program(launch.command[0]), *launch.command[1:]]
    launch.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PATH": launch_path(os.environ.get("PATH", ""))}
    with open(launch.log, "w") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise ProbeError(
            f"training failed (exit {code}): {_first_error(launch.log)} (command and full log: {launch.log})"
        )


def _first_error(log: Path) -> str:
    """The line of a failed run's log that says what went wrong: the recipe's ``error: ...`` line, else the last
    exception line, else the last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:"):
            return line
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and not head.startswith("subprocess."):
            return line
    return lines[-1] if lines else "no output"
