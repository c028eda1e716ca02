"""Exclusive writers: an OS-level lock on every directory a step writes.

A writer takes ``<dir>/.probe.lock`` with ``flock`` (the ``filelock`` package) before it touches
the directory and keeps it until it is done; a second writer fails at once with a one-line
:class:`~posttrain_probe.errors.ProbeError` naming the lock file and its holder (pid, host, start
time and command, read from ``<dir>/.probe.lock.holder``). The kernel drops the lock when the
holding process dies, so a killed run never blocks the next one; its stale lock and holder files
are simply taken over. A writer that finishes removes both files (while still holding the lock).
In a multi-process run the main process locks the directory and every other rank that writes
there locks its own files (``.probe.rankNNN.lock``), so each process of a second run fails on its own.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from posttrain_probe.errors import ProbeError

LOCK_FILE = ".probe.lock"
HOLDER_SUFFIX = ".holder"
_F = TypeVar("_F", bound=Callable[..., Any])


def lock_name(rank: int = 0) -> str:
    """``.probe.lock`` for the main process (rank 0), ``.probe.rankNNN.lock`` for rank NNN > 0."""
    return LOCK_FILE if rank == 0 else f".probe.rank{rank:03d}.lock"


def is_lock_file(name: str) -> bool:
    """True for the lock and holder files this module leaves in a directory."""
    return name.startswith(".probe.") and (
        name.endswith(".lock") or name.endswith(".lock" + HOLDER_SUFFIX) or ".lock.holder.tmp-" in name
    )


class _Replaced(Exception):
    """The lock file was unlinked or replaced between open and flock."""


def _check_current(path: Path, fd: int) -> None:
    """Refuse a lock won on a file that a releasing holder has just unlinked (see DirectoryLock.release)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        raise _Replaced from None
    if not os.path.samestat(current, os.fstat(fd)):
        raise _Replaced


class DirectoryLock:
    """An exclusive, non-blocking lock on ``directory`` (created if missing) for one writer.

    ``what`` names the directory in the error message ("activation store", "crosscoder run", ...).
    Use as a context manager or call :meth:`acquire` / :meth:`release`; the lock is also dropped
    when the object is garbage collected and, by the kernel, when the process exits.
    """

    def __init__(self, directory: str | os.PathLike, *, what: str, rank: int = 0) -> None:
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / lock_name(rank)
        self.holder_path = self.path.with_name(self.path.name + HOLDER_SUFFIX)
        self._lock = None
        self._created = False
        self._pid = os.getpid()

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def acquire(self) -> DirectoryLock:
        """Take the lock or raise ProbeError naming its holder; no-op when this object holds it."""
        if self.held:
            return self
        from filelock import FileLock, Timeout

        if self.directory.exists() and not self.directory.is_dir():
            raise ProbeError(f"output path {self.directory} exists and is not a directory")
        try:
            # A holder that releases unlinks the lock file (and the directory, if it created it and it
            # is empty): lock the file that is there now, in the directory that is there now.
            for _ in range(10):
                created = not self.directory.exists()
                self.directory.mkdir(parents=True, exist_ok=True)
                lock = FileLock(
                    self.path,
                    blocking=False,
                    thread_local=False,
                    on_acquired=functools.partial(_check_current, self.path),
                )
                try:
                    lock.acquire()
                    break
                except (_Replaced, FileNotFoundError):
                    continue
            else:
                raise Timeout(str(self.path))
        except Timeout:
            raise ProbeError(
                f"{self.what} {self.directory} is being written by another process: {self.path} is held by "
                f"{self._describe_holder()}; wait for it to finish or stop it, then run again"
            ) from None
        except OSError as err:
            raise ProbeError(
                f"{self.what} {self.directory} is not writable: cannot create its lock file {self.path}: {err}"
            ) from err
        self._lock, self._created, self._pid = lock, created, os.getpid()
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv).replace("\n", " ")[:200],
        }
        tmp = self.holder_path.with_name(f"{self.holder_path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(holder))
            os.replace(tmp, self.holder_path)
        except OSError:
            tmp.unlink(missing_ok=True)  # the lock itself holds; only the message would be poorer
        return self

    def release(self) -> None:
        """Drop the lock. The lock and holder files are removed first (and the directory, when the
        lock created it and nothing was written), so the directory is left as it would be without
        locking. No-op when not held."""
        if os.getpid() != self._pid or not self.held:  # a forked child never releases its parent's lock
            self._lock = None
            return
        for path in (self.holder_path, self.path):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        if self._created:
            try:
                self.directory.rmdir()  # only succeeds when empty: a refused run leaves nothing behind
            except OSError:
                pass
        self._lock.release(force=True)
        self._lock = None

    def _describe_holder(self) -> str:
        try:
            info: dict[str, Any] = json.loads(self.holder_path.read_text())
            holder = f"pid {info['pid']} on {info['host']} since {info['started']}"
            if info["pid"] == os.getpid() and info["host"] == socket.gethostname():
                return f"{holder} (this process: an earlier writer here did not finish, e.g. a Trainer whose train() raised; release it or restart)"
            return f"{holder} ({info.get('command') or 'unknown command'})"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not recorded itself yet"

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


def main_process_holds(argument: str, *, what: str) -> Callable[[_F], _F]:
    """Decorator: the main process (accelerate's ``PartialState``) holds the lock of the directory
    passed as ``argument`` for the whole call; other processes run unlocked (they do not write there)."""

    def decorate(function: _F) -> _F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            import torch
            from accelerate import PartialState

            if not PartialState(cpu=not torch.cuda.is_available()).is_main_process:
                return function(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with DirectoryLock(bound.arguments[argument], what=what):
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
