"""`callbacks/` ships as `posttrain_probe.callbacks`, and `callbacks/verl/hydra_plugins/` as Hydra's
`hydra_plugins` namespace package, in a wheel and in the editable install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import posttrain_probe

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_maps_callbacks_folder():
    import posttrain_probe.callbacks as callbacks

    assert Path(callbacks.__file__).resolve() == REPO / "callbacks" / "__init__.py"
    assert Path(posttrain_probe.__file__).resolve() == REPO / "posttrain_probe" / "__init__.py"


def test_editable_install_shows_the_hydra_plugin_to_hydra():
    """Hydra finds plugins by walking ``hydra_plugins.__path__`` with pkgutil; a namespace that the
    editable install only maps through its import hook would hide ours (the PEP 660 pitfall)."""
    import pkgutil

    import hydra_plugins

    found = {m.name: m for m in pkgutil.walk_packages(hydra_plugins.__path__, "hydra_plugins.")}
    assert "hydra_plugins.posttrain_probe" in found
    assert (
        Path(found["hydra_plugins.posttrain_probe"].module_finder.path).resolve()
        == REPO / "callbacks" / "verl" / "hydra_plugins"
    )
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    names = [f"{p.__module__}.{p.__name__}" for p in Plugins.instance().discover(SearchPathPlugin)]
    assert "hydra_plugins.posttrain_probe.PosttrainProbeSearchPathPlugin" in names


@pytest.mark.slow
def test_wheel_ships_callbacks_as_a_subpackage(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            "-q",
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("posttrain_probe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "posttrain_probe/callbacks/__init__.py" in names
    assert "posttrain_probe/activations/store.py" in names
    assert "hydra_plugins/posttrain_probe/__init__.py" in names and "hydra_plugins/__init__.py" not in names
    assert {
        "posttrain_probe/callbacks/verl/config/probe/on.yaml",
        "posttrain_probe/callbacks/verl/config/probe/on_ckpt.yaml",
    } <= set(names)
    assert not any(
        name.startswith(("callbacks/", "tests/", "benchmarks/")) or "callbacks/verl/hydra_plugins" in name
        for name in names
    )
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "posttrain-probe = posttrain_probe.cli:app" in entry_points
    assert "[verl.plugins]\nposttrain_probe = posttrain_probe.callbacks.verl.verl_plugin" in entry_points
    # Import from the unpacked wheel alone, away from the repository.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", "import posttrain_probe.callbacks as c, posttrain_probe.activations; print(c.__file__)"],
        check=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert Path(out.stdout.strip()) == site / "posttrain_probe" / "callbacks" / "__init__.py"


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "posttrain_probe.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"posttrain-probe {posttrain_probe.__version__}"


def test_core_never_imports_integrations():
    """posttrain_probe must not import callbacks/, TRL or verl (docs/design.md: one-way dependencies)."""
    code = (
        "import sys, posttrain_probe, posttrain_probe.activations, posttrain_probe.cli, posttrain_probe.testing\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in {'trl', 'verl', 'lm_eval', 'matplotlib'} or m.startswith('posttrain_probe.callbacks')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_wheel_install_exposes_the_hydra_plugin(tmp_path):
    """From the unpacked wheel alone (``python -S``: no .pth, so no editable install; the venv's
    site-packages only for hydra), Hydra composes verl's config with ``+probe=on``."""
    pytest.importorskip("verl")
    import importlib.util
    import sysconfig

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            "-q",
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("posttrain_probe-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    verl_config = Path(next(iter(importlib.util.find_spec("verl").submodule_search_locations))) / "trainer" / "config"
    code = (
        "import sys, hydra_plugins.posttrain_probe as plugin\n"
        "from importlib.metadata import entry_points\n"
        "from hydra import compose, initialize_config_dir\n"
        f"with initialize_config_dir(config_dir={str(verl_config)!r}, version_base=None):\n"
        "    cfg = compose(config_name='ppo_trainer', overrides=['+probe=on', 'probe.layers=[4]'])\n"
        "print(plugin.__file__); print(plugin.config_dir()); print(cfg.trainer.v1.trainer_mode, list(cfg.probe.layers))\n"
        "print([e.value for e in entry_points(group='verl.plugins') if e.name == 'posttrain_probe'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True, text=True
    )
    plugin_file, config_dir, composed, entry = out.stdout.strip().splitlines()[-4:]
    assert Path(plugin_file) == site / "hydra_plugins" / "posttrain_probe" / "__init__.py"
    assert Path(config_dir) == site / "posttrain_probe" / "callbacks" / "verl" / "config"
    assert composed == "probe [4]"
    assert "posttrain_probe.callbacks.verl.verl_plugin" in entry
