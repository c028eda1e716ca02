"""The probe run directory and its manifest ``<run>/probe.json`` (docs/design.md "Data on disk").

<run>/probe.json                        base model, paradigm, sites, probe-set fingerprint, snapshots
<run>/snapshots/step-000120/            HF save_pretrained layout (safetensors + tokenizer)
<run>/activations/step-000120/layer<L>/ activation store; step-000000 is the base model
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from posttrain_probe.errors import ProbeError
from posttrain_probe.locks import DirectoryLock

RUN_FORMAT = "posttrain-probe/run"
RUN_FORMAT_VERSION = 1
MANIFEST = "probe.json"
# What must agree between a run directory on disk and the run that writes into it.
_IDENTITY = ("base_model", "paradigm", "layers", "probe_fingerprint", "schedule")


def step_name(step: int) -> str:
    """``step-000120`` for step 120."""
    return f"step-{step:06d}"


class RunDirectory:
    """Reads and atomically rewrites ``probe.json``; only the main process writes, holding the
    directory's lock (:mod:`posttrain_probe.locks`) from :meth:`open` to :meth:`close`."""

    def __init__(self, path: str | os.PathLike, *, is_main: bool) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self.manifest: dict[str, Any] = {}
        self._lock = DirectoryLock(self.path, what="probe run directory")

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def snapshot_dir(self, step: int) -> Path:
        return self.path / "snapshots" / step_name(step)

    def activations_dir(self, step: int, layer: int) -> Path:
        return self.path / "activations" / step_name(step) / f"layer{layer}"

    def open(self, identity: dict[str, Any], *, resume_step: int) -> None:
        """Start or continue the run (main process only; other ranks call :meth:`load` after it).

        Refuses a directory that holds another run, or this run when not resuming
        (``resume_step`` = the Trainer's global step, 0 for a fresh run). On resume, what the
        interrupted run wrote after ``resume_step`` is dropped: those steps are taken again.
        Takes the directory's lock first: a second run writing into it fails at once.
        """
        self.lock()
        try:
            self._open(identity, resume_step=resume_step)
        except BaseException:
            self.close()
            raise

    def lock(self) -> None:
        """Take (or keep) the directory's lock; ProbeError naming the holder if another process has it."""
        if self.is_main:
            self._lock.acquire()

    def close(self) -> None:
        """Release the directory's lock (the end of training; idempotent)."""
        self._lock.release()

    def _open(self, identity: dict[str, Any], *, resume_step: int) -> None:
        if self.manifest_path.exists():
            try:
                existing = json.loads(self.manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ProbeError(f"cannot read the run manifest {self.manifest_path}: {err}") from err
            differs = [key for key in _IDENTITY if key in identity and existing.get(key) != identity[key]]
            if differs:
                raise ProbeError(
                    f"probe run directory {self.path} holds another run ({', '.join(differs)} differ); "
                    "choose another probe_run_dir"
                )
            if resume_step == 0:
                raise ProbeError(
                    f"probe run directory {self.path} already holds this run's snapshots: resume the Trainer "
                    "from a checkpoint (resume_from_checkpoint) or choose another probe_run_dir"
                )
            self.manifest = existing
            self._drop_after(resume_step)
            return
        self.manifest = {
            "format": RUN_FORMAT,
            "format_version": RUN_FORMAT_VERSION,
            **identity,
            "snapshots": [],
            "activations": [],
        }
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ProbeError(f"probe run directory {self.path} is not writable: {err}") from err
        self._write()

    def load(self) -> None:
        """Read the manifest the main process wrote (other ranks, after a barrier)."""
        self.manifest = json.loads(self.manifest_path.read_text())

    def _drop_after(self, step: int) -> None:
        for kind, folder in (("snapshots", "snapshots"), ("activations", "activations")):
            for entry in [e for e in self.manifest.get(kind, []) if e["step"] > step]:
                shutil.rmtree(self.path / folder / step_name(entry["step"]), ignore_errors=True)
            self.manifest[kind] = [e for e in self.manifest.get(kind, []) if e["step"] <= step]
        self._write()

    def steps_done(self, kind: str) -> set[int]:
        """Steps already recorded under ``kind`` ('snapshots' or 'activations')."""
        return {int(entry["step"]) for entry in self.manifest.get(kind, [])}

    def record(self, kind: str, entry: dict[str, Any]) -> None:
        """Add (or replace) the entry of ``entry['step']`` under ``kind`` and rewrite the manifest."""
        entries = [e for e in self.manifest.setdefault(kind, []) if e["step"] != entry["step"]]
        entries.append({**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.manifest[kind] = sorted(entries, key=lambda e: e["step"])
        if self.is_main:
            self._write()

    def _write(self) -> None:
        tmp = self.path / f".{MANIFEST}.tmp-{os.getpid()}"
        try:
            tmp.write_text(json.dumps(self.manifest, indent=2))
            os.replace(tmp, self.manifest_path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise ProbeError(f"cannot write the run manifest {self.manifest_path}: {err}") from err
