"""`callbacks/` ships as `posttrain_probe.callbacks`, in a wheel and in the editable install."""

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


@pytest.mark.slow
def test_wheel_ships_callbacks_as_a_subpackage(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "-q"],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("posttrain_probe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "posttrain_probe/callbacks/__init__.py" in names
    assert "posttrain_probe/activations/store.py" in names
    assert not any(name.startswith(("callbacks/", "tests/", "benchmarks/")) for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "posttrain-probe = posttrain_probe.cli:app" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # Import from the unpacked wheel alone, away from the repository.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", "import posttrain_probe.callbacks as c, posttrain_probe.activations; print(c.__file__)"],
        check=True, cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert Path(out.stdout.strip()) == site / "posttrain_probe" / "callbacks" / "__init__.py"


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "posttrain_probe.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"posttrain-probe {posttrain_probe.__version__}"


def test_core_never_imports_integrations():
    """posttrain_probe must not import callbacks/, TRL or verl (DESIGN.md: one-way dependencies)."""
    code = (
        "import sys, posttrain_probe, posttrain_probe.activations, posttrain_probe.cli, posttrain_probe.testing\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in {'trl', 'verl', 'lm_eval', 'matplotlib'} or m.startswith('posttrain_probe.callbacks')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
