"""Exclusive writers (posttrain_probe.locks): a second writer into a store, a collect output, a
crosscoder run or a probe run directory fails at once with one line naming the lock file and its
holder; a SIGKILLed holder does not block the next writer; a corrupt store is never kept."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from posttrain_probe.activations import (
    ActivationStore,
    ActivationStoreWriter,
    CollectConfig,
    PairedActivations,
    merge_rank_manifests,
)
from posttrain_probe.activations.collect import collect
from posttrain_probe.callbacks.run_dir import RunDirectory
from posttrain_probe.cli import app
from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig, CrosscoderTrainingConfig, train_crosscoder
from posttrain_probe.errors import ProbeError

D = 8
runner = CliRunner()
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the holders are tiny: no intra-op threads on a shared machine


def _tokens(n: int, start: int = 0):
    ids = torch.arange(start, start + n)
    acts = torch.randn(n, D, generator=torch.Generator().manual_seed(start))
    return acts, ids % 97, ids // 16, ids % 16 + 1


def _one_line(message: str) -> str:
    """The error of a ProbeError's message or of CLI output (progress bars of model loading aside): one line."""
    lines = message.strip().splitlines()
    if any(line.startswith("error: ") for line in lines):
        lines = [line for line in lines if "error" in line]
    assert len(lines) == 1, message
    return lines[0]


def _wait_for(path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the holder exited early ({process.returncode})"
        assert time.monotonic() < deadline, "the holder never took its lock"
        time.sleep(0.02)


def _no_lock_files(root) -> bool:
    return not [p for p in root.rglob(".probe.*")]


# -- activation stores -------------------------------------------------------------------------


def test_second_store_writer_is_refused_and_the_first_store_stays_intact(tmp_path):
    path = tmp_path / "s"
    first = ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64)
    first.write(*_tokens(100), cursor=1)
    with pytest.raises(ProbeError) as error:
        ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64)
    message = _one_line(str(error.value))
    assert (
        f"activation store {path} is being written by another process: {path / '.probe.lock'} is held by pid {os.getpid()} on {socket.gethostname()} since "
        in message
    )
    first.write(*_tokens(100, start=100), cursor=2)
    first.close()
    store = ActivationStore(path)
    assert store.complete and store.n_tokens == 200 and store.verify_all() == []
    assert _no_lock_files(path)  # a finished writer leaves only the store
    ActivationStoreWriter(path, layer=3, d_model=D, model="base").close()  # free again


def test_each_rank_locks_its_own_files(tmp_path):
    path = tmp_path / "s"
    ranks = [
        ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64, rank=r, world_size=2)
        for r in (0, 1)
    ]
    with pytest.raises(ProbeError, match=r"\.probe\.rank001\.lock is held by pid"):
        ActivationStoreWriter(path, layer=3, d_model=D, model="base", rank=1, world_size=2)
    with pytest.raises(ProbeError, match=r"\.probe\.lock is held by pid"):  # rank 0 holds the directory
        ActivationStoreWriter(path, layer=3, d_model=D, model="base")
    for rank, writer in enumerate(ranks):
        writer.write(*_tokens(80, start=100 * rank), cursor=1)
        writer.close()
    merge_rank_manifests(path)
    assert ActivationStore(path).n_tokens == 160 and ActivationStore(path).verify_all() == []
    assert _no_lock_files(path)


_HOLD_STORE = """
import pathlib, sys, time, torch
from posttrain_probe.activations import ActivationStoreWriter
writer = ActivationStoreWriter(sys.argv[1], layer=3, d_model=8, model="base", shard_tokens=64)
for i in range(2):
    ids = torch.arange(64 * i, 64 * (i + 1))
    writer.write(torch.randn(64, 8), ids % 97, ids // 16, ids % 16 + 1, cursor=i + 1)
pathlib.Path(sys.argv[2]).touch()
time.sleep(600)
"""


def test_a_sigkilled_holder_does_not_block_the_next_writer(tmp_path):
    path, started = tmp_path / "s", tmp_path / "started"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_STORE, str(path), str(started)], env=_ENV)
    try:
        _wait_for(started, holder)
        with pytest.raises(ProbeError, match=f"held by pid {holder.pid} on {socket.gethostname()}"):
            ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (path / ".probe.lock").exists()  # left behind by the killed process, but no longer locked
    writer = ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64)
    assert writer.cursor == 2 and writer.n_tokens == 128  # resumes what the killed writer flushed
    assert f'"pid": {os.getpid()}' in (path / ".probe.lock.holder").read_text()
    writer.write(*_tokens(64, start=128), cursor=3)
    writer.close()
    store = ActivationStore(path)
    assert store.complete and store.n_tokens == 192 and store.verify_all() == []
    assert _no_lock_files(path)


# -- collect -----------------------------------------------------------------------------------

_HELD_COLLECT = """
import pathlib, sys, time
from posttrain_probe.activations import collect as collect_module
capture = collect_module._capture_into
def held(*args, **kwargs):  # every lock taken, nothing captured yet
    pathlib.Path(sys.argv[4]).touch()
    while not pathlib.Path(sys.argv[5]).exists():
        time.sleep(0.02)
    return capture(*args, **kwargs)
collect_module._capture_into = held
collect_module.collect(collect_module.CollectConfig(model=[f"base={sys.argv[1]}", f"tuned={sys.argv[2]}"], dataset="synthetic:arithmetic",
                      out=sys.argv[3], layer=[1], seq_len=16, max_tokens=200, shard_tokens=64), progress=False)
"""


def _collect_args(tiny_pair, out) -> list[str]:
    return ["collect", "--model", f"base={tiny_pair['base']}", "--model", f"tuned={tiny_pair['tuned']}", "--dataset", "synthetic:arithmetic",
            "--layer", "1", "--out", str(out), "--seq-len", "16", "--max-tokens", "200", "--shard-tokens", "64"]  # fmt: skip


@contextlib.contextmanager
def _held_by(tmp_path, script: str, *args):
    """Run ``script`` in a subprocess that holds its lock until the block ends; it must then finish cleanly."""
    started, go = tmp_path / "started", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", script, *map(str, args), str(started), str(go)], env=_ENV)
    try:
        _wait_for(started, first)
        yield first
        go.touch()
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_second_collect_into_the_same_out_is_refused(tiny_pair, tmp_path):
    out = tmp_path / "acts"
    with _held_by(tmp_path, _HELD_COLLECT, tiny_pair["base"], tiny_pair["tuned"], out) as first:
        second = runner.invoke(app, _collect_args(tiny_pair, out))
        assert second.exit_code == 2, second.output
        line = _one_line(second.output)
        assert (
            f"collect output {out} is being written by another process: {out / '.probe.lock'} is held by pid {first.pid}"
            in line
        )
    for name in ("base", "tuned"):
        store = ActivationStore(out / name / "layer1")
        assert store.complete and store.n_tokens == 200 and store.verify_all() == []
    assert _no_lock_files(out)


def test_a_corrupt_store_is_refused_with_the_command_that_fixes_it(tiny_pair, tmp_path, monkeypatch):
    out = tmp_path / "acts"
    args = _collect_args(tiny_pair, out)
    assert runner.invoke(app, args).exit_code == 0
    bad = out / "base" / "layer1"
    original = torch.cat(list(ActivationStore(bad).iter_batches(10_000, shuffle=False)))
    fingerprint = ActivationStore(bad).token_fingerprint
    shard = bad / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    with pytest.raises(ProbeError) as error:  # the Python API
        collect(CollectConfig(model=[f"base={tiny_pair['base']}", f"tuned={tiny_pair['tuned']}"], dataset="synthetic:arithmetic", out=out,
                              layer=[1], seq_len=16, max_tokens=200, shard_tokens=64), progress=False)  # fmt: skip
    assert f"activation store {bad} is corrupt (shard-00001.safetensors is corrupted" in _one_line(str(error.value))
    assert f"rm -rf {bad}, then run the same collect call again" in str(error.value)

    monkeypatch.setattr(sys, "argv", ["posttrain-probe", *args])  # the CLI names its own command line
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    line = _one_line(refused.output)
    fix = f"rm -rf {shlex.quote(str(bad))} && {shlex.join(['posttrain-probe', *args])}"
    assert line.endswith(fix), line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # nothing changed, nothing lost

    shutil.rmtree(bad)  # the fix, as the message says
    assert runner.invoke(app, args).exit_code == 0
    for name in ("base", "tuned"):
        store = ActivationStore(out / name / "layer1")
        assert store.complete and store.n_tokens == 200 and store.verify_all() == []
    again = ActivationStore(bad)
    assert again.token_fingerprint == fingerprint
    assert torch.equal(torch.cat(list(again.iter_batches(10_000, shuffle=False))), original)


# -- crosscoder training -----------------------------------------------------------------------

_HELD_TRAINING = """
import pathlib, sys, time
from posttrain_probe.activations import PairedActivations
from posttrain_probe.crosscoder import CrosscoderConfig, CrosscoderTrainingConfig, train_crosscoder
from posttrain_probe.crosscoder import train as train_module
prepare = train_module._prepare_out_dir
def held(*args, **kwargs):  # the run's lock taken, nothing written yet
    pathlib.Path(sys.argv[3]).touch()
    while not pathlib.Path(sys.argv[4]).exists():
        time.sleep(0.02)
    return prepare(*args, **kwargs)
train_module._prepare_out_dir = held
source = PairedActivations({"base": sys.argv[1] + "/base", "ft": sys.argv[1] + "/ft"})
train_crosscoder(source, CrosscoderConfig(n_features=16), CrosscoderTrainingConfig(batch_size=64, log_every=2, checkpoint_every=2), sys.argv[2], progress=False)
"""


def test_second_crosscoder_training_into_the_same_out_is_refused(tmp_path):
    stores = tmp_path / "stores"
    for name in ("base", "ft"):
        with ActivationStoreWriter(
            stores / name, layer=1, d_model=D, model=name, dtype="float32", shard_tokens=128
        ) as writer:
            writer.write(*_tokens(256), cursor=1)
    out = tmp_path / "cc"
    with _held_by(tmp_path, _HELD_TRAINING, stores, out) as first:
        source = PairedActivations({"base": stores / "base", "ft": stores / "ft"})
        with pytest.raises(ProbeError) as error:
            train_crosscoder(
                source, CrosscoderConfig(n_features=16), CrosscoderTrainingConfig(batch_size=64), out, progress=False
            )
        line = _one_line(str(error.value))
        assert (
            f"crosscoder run {out} is being written by another process: {out / '.probe.lock'} is held by pid {first.pid}"
            in line
        )
    assert Crosscoder.from_pretrained(out).config.model_names == ["base", "ft"]
    assert _no_lock_files(out)


# -- the callbacks' run directory --------------------------------------------------------------


def test_second_run_into_a_probe_run_directory_is_refused(tmp_path):
    identity = {"base_model": "tiny", "paradigm": "sft", "layers": [1], "probe_fingerprint": None, "schedule": [2, 4]}
    first = RunDirectory(tmp_path / "run", is_main=True)
    first.open(identity, resume_step=0)
    second = RunDirectory(tmp_path / "run", is_main=True)
    with pytest.raises(
        ProbeError,
        match=rf"probe run directory {tmp_path / 'run'} is being written by another process: .*held by pid {os.getpid()}",
    ):
        second.open(identity, resume_step=2)
    first.close()
    second.open(identity, resume_step=2)  # the run continues once the first writer is done
    second.close()
    assert _no_lock_files(tmp_path / "run") and (tmp_path / "run" / "probe.json").exists()
