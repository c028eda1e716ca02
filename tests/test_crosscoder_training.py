"""train_crosscoder (docs/methods.md sec. 3): outputs, exact resume, output-directory policy, bad data and
two-process data parallelism, on small fp32 activation stores written to tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _distributed import free_port

from posttrain_probe.activations import ActivationStoreWriter, PairedActivations
from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig, CrosscoderTrainingConfig, train_crosscoder
from posttrain_probe.errors import ProbeError

D = 16
NAMES = ["base", "ft"]


def synthetic_acts(n_tokens: int, n_models: int = 2, d: int = D, n_dirs: int = 24, seed: int = 0) -> torch.Tensor:
    """[n, N, d] sparse sums of random directions (shared coefficients, per-model directions and norms)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_models, n_dirs, d, generator=g), dim=-1)
    active = torch.rand(n_tokens, n_dirs, generator=g) < 0.1
    coeff = torch.rand(n_tokens, n_dirs, generator=g) * 3 * active
    acts = torch.einsum("tk,mkd->tmd", coeff, dirs) + 0.02 * torch.randn(n_tokens, n_models, d, generator=g)
    return acts * torch.arange(1, n_models + 1, dtype=torch.float32)[None, :, None] * 4  # models differ in scale


def write_stores(root, acts: torch.Tensor, names=NAMES, shard_tokens: int = 1024, layer: int = 2) -> PairedActivations:
    """One fp32 store per model over the same tokens, paired."""
    n = acts.shape[0]
    paths = {}
    for m, name in enumerate(names):
        paths[name] = root / name
        writer = ActivationStoreWriter(
            paths[name], layer=layer, d_model=acts.shape[2], model=name, dtype="float32", shard_tokens=shard_tokens
        )
        for start in range(0, n, 256):
            ids = torch.arange(start, min(start + 256, n))
            writer.write(acts[ids, m], ids % 101, ids // 64, ids % 64 + 1, cursor=start // 256 + 1)
        writer.close()
    return PairedActivations(paths)


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> PairedActivations:
    return write_stores(tmp_path_factory.mktemp("stores"), synthetic_acts(4096))


def small_config(**kw) -> CrosscoderTrainingConfig:
    defaults = dict(batch_size=256, lr=1e-3, log_every=2, checkpoint_every=4, seed=0)
    return CrosscoderTrainingConfig(**{**defaults, **kw})


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


# -- one run: files, metrics, loss going down, reload ---------------------------------------------
def test_train_writes_run_files_and_learns(paired, tmp_path):
    out = tmp_path / "run"
    cfg = small_config(n_tokens=4096 * 4, lr=5e-3, checkpoint_every=16)  # 64 steps, four passes over the store
    model = train_crosscoder(paired, CrosscoderConfig(n_features=64), cfg, out, progress=False)
    for name in ("config.json", "model.safetensors", "training_config.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    latest = json.loads((out / "trainer_state" / "latest.json").read_text())
    assert latest["step"] == 64 and (out / "trainer_state" / latest["dir"]).is_dir()
    # model config filled from the data
    assert model.model_names == NAMES and model.config.d_model == D and model.config.layer == 2
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["training"]["lr"] == 5e-3 and saved["crosscoder"]["model_names"] == NAMES
    # scales estimated on the data: the 2nd model is ~2x larger, so its scale is ~half
    assert 0.3 < float(model.scales[1] / model.scales[0]) < 0.7

    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(2, 65, 2))
    keys = {"step", "tokens", "loss", "mse", "sparsity", "l0", "fvu", "dead_fraction", "lr", "l1_coefficient"}
    for r in records:
        assert keys <= set(r), keys - set(r)
        assert r["tokens"] == r["step"] * 256
        assert isinstance(r["fvu"], list) and len(r["fvu"]) == 2
        assert 0 <= r["dead_fraction"] <= 1 and r["l0"] > 0
        assert r["loss"] == pytest.approx(
            r["mse"] + r["l1_coefficient"] * r["sparsity"], rel=0.3
        )  # λ changes within a log window
    # schedules: λ warmed up (5% of 64 steps = 3.2) then 2.0; lr 5e-3 then decaying over the last 20%
    assert records[0]["l1_coefficient"] == pytest.approx(2.0 * 1 / 3.2)
    assert all(r["l1_coefficient"] == 2.0 for r in records[2:])
    assert records[10]["lr"] == 5e-3 and records[-1]["lr"] < records[-3]["lr"] < 5e-3
    # it learns: loss, mse and FVU fall; features get sparser
    assert records[-1]["loss"] < 0.7 * records[1]["loss"]
    assert records[-1]["mse"] < 0.4 * records[1]["mse"]
    assert all(f < 0.35 for f in records[-1]["fvu"]) and all(f > 0.9 for f in records[0]["fvu"])
    assert records[-1]["l0"] < records[1]["l0"]

    loaded = Crosscoder.from_pretrained(out)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = next(paired.iter_batches(64, shuffle=False))
    assert torch.equal(loaded.encode(x), model.encode(x))


# -- resume: the same result as an uninterrupted run ------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
def test_resume_is_exact(paired, tmp_path, activation):
    cc_cfg = CrosscoderConfig(n_features=64, activation=activation, k=4)
    steps = 12
    cfg = dict(n_tokens=256 * steps, dead_after_tokens=512)  # features die quickly: AuxK and counters matter
    a = train_crosscoder(paired, cc_cfg, small_config(**cfg), tmp_path / "a", progress=False)
    b_dir = tmp_path / "b"
    train_crosscoder(paired, cc_cfg, small_config(**cfg, max_steps_per_run=steps // 2), b_dir, progress=False)
    assert json.loads((b_dir / "trainer_state" / "latest.json").read_text())["step"] == steps // 2
    assert read_metrics(b_dir)[-1]["step"] == steps // 2
    b = train_crosscoder(paired, cc_cfg, small_config(**cfg), b_dir, resume=True, progress=False)
    assert json.loads((b_dir / "trainer_state" / "latest.json").read_text())["step"] == steps
    for name, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], tensor), name
    if activation == "batchtopk":
        assert a.threshold.item() > 0
    metrics_a, metrics_b = without_timing(read_metrics(tmp_path / "a")), without_timing(read_metrics(b_dir))
    assert [r["step"] for r in metrics_b] == [r["step"] for r in metrics_a] == list(range(2, steps + 1, 2))
    assert metrics_b == metrics_a
    # the saved crosscoders are the same too
    ra, rb = Crosscoder.from_pretrained(tmp_path / "a"), Crosscoder.from_pretrained(b_dir)
    for name, tensor in ra.state_dict().items():
        assert torch.equal(rb.state_dict()[name], tensor), name
    # resuming a finished run trains no more steps and changes nothing
    c = train_crosscoder(paired, cc_cfg, small_config(**cfg), b_dir, resume=True, progress=False)
    assert torch.equal(c.W_dec, a.W_dec)
    assert len(read_metrics(b_dir)) == len(metrics_a)
    # interrupted twice, off the log grid (5 + 4 + 3 steps): the same weights
    d_dir = tmp_path / "d"
    for max_steps, resume in ((5, False), (4, True), (None, True)):  # resume needs a run to continue
        d = train_crosscoder(
            paired, cc_cfg, small_config(**cfg, max_steps_per_run=max_steps), d_dir, resume=resume, progress=False
        )
    for name, tensor in a.state_dict().items():
        assert torch.equal(d.state_dict()[name], tensor), name
    assert [r["step"] for r in read_metrics(d_dir)] == [2, 4, 5, 6, 8, 9, 10, 12]


class Killed(Exception):
    """Stands in for the job being killed."""


class DyingSource:
    """Wraps a source; its training stream (epochs=None) raises :class:`Killed` before batch ``at``."""

    def __init__(self, source, at: int) -> None:
        self.source, self.at = source, at

    def __getattr__(self, name):
        return getattr(self.source, name)

    def iter_batches(self, *args, epochs=1, **kwargs):
        for i, x in enumerate(self.source.iter_batches(*args, epochs=epochs, **kwargs)):
            if epochs is None and i == self.at:
                raise Killed
            yield x


def test_resume_after_a_kill_between_checkpoints(paired, tmp_path):
    """A job killed after a log step but before the next checkpoint resumes from the checkpoint;
    the weights come out exact and metrics.jsonl must not hold the re-trained steps twice.

    Fails with posttrain_probe/crosscoder/train.py as of this writing (metrics part only): the
    resumed run appends to metrics.jsonl without dropping the lines logged after the checkpoint,
    so steps [2, 4, 6, 6, 8, 10, 12] are recorded.
    """
    cc_cfg = CrosscoderConfig(n_features=32)
    cfg = small_config(n_tokens=256 * 12, checkpoint_every=4)
    a = train_crosscoder(paired, cc_cfg, cfg, tmp_path / "a", progress=False)
    with pytest.raises(Killed):
        train_crosscoder(DyingSource(paired, at=7), cc_cfg, cfg, tmp_path / "b", progress=False)  # dies in step 8
    assert json.loads((tmp_path / "b" / "trainer_state" / "latest.json").read_text())["step"] == 4
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [2, 4, 6]
    b = train_crosscoder(paired, cc_cfg, cfg, tmp_path / "b", resume=True, progress=False)
    for name, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], tensor), name
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [2, 4, 6, 8, 10, 12]
    assert without_timing(read_metrics(tmp_path / "b")) == without_timing(read_metrics(tmp_path / "a"))


# -- output directory policy ---------------------------------------------------------------------
def test_out_dir_policy(paired, tmp_path):
    cc_cfg = CrosscoderConfig(n_features=32)
    cfg = small_config(n_tokens=256 * 2)
    out = tmp_path / "run"
    first = train_crosscoder(paired, cc_cfg, cfg, out, progress=False)
    with pytest.raises(ProbeError) as info:
        train_crosscoder(paired, cc_cfg, cfg, out, progress=False)
    assert "--resume" in str(info.value) and "--overwrite" in str(info.value)
    # overwrite replaces the run: a fresh metrics file, a new model (other seed)
    second = train_crosscoder(
        paired, cc_cfg, small_config(n_tokens=256 * 2, seed=1), out, overwrite=True, progress=False
    )
    assert [r["step"] for r in read_metrics(out)] == [2]
    assert not torch.equal(first.W_dec, second.W_dec)
    assert torch.equal(Crosscoder.from_pretrained(out).W_dec, second.W_dec)
    # a non-empty directory that is not a run is refused, even with overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(ProbeError, match="notes.txt"):
            train_crosscoder(paired, cc_cfg, cfg, other, progress=False, **flags)
    assert (other / "notes.txt").read_text() == "mine"
    # an empty directory is fine
    (tmp_path / "empty").mkdir()
    train_crosscoder(paired, cc_cfg, cfg, tmp_path / "empty", progress=False)
    # resuming with a changed setting is refused, naming it
    part = tmp_path / "part"
    train_crosscoder(paired, cc_cfg, small_config(n_tokens=256 * 4, max_steps_per_run=2), part, progress=False)
    with pytest.raises(ProbeError, match=r"cannot resume.*\blr\b"):
        train_crosscoder(paired, cc_cfg, small_config(n_tokens=256 * 4, lr=2e-3), part, resume=True, progress=False)
    with pytest.raises(ProbeError, match="n_features"):
        train_crosscoder(
            paired, CrosscoderConfig(n_features=48), small_config(n_tokens=256 * 4), part, resume=True, progress=False
        )
    # ... but bookkeeping settings may change
    train_crosscoder(paired, cc_cfg, small_config(n_tokens=256 * 4, log_every=1), part, resume=True, progress=False)
    assert json.loads((part / "trainer_state" / "latest.json").read_text())["step"] == 4


# -- bad data ------------------------------------------------------------------------------------
def test_model_names_or_width_that_differ_from_the_data_are_refused(paired, tmp_path):
    with pytest.raises(ProbeError) as info:
        train_crosscoder(
            paired, CrosscoderConfig(model_names=["base", "rl"]), small_config(), tmp_path / "x", progress=False
        )
    assert "['base', 'rl']" in str(info.value) and "['base', 'ft']" in str(info.value)
    with pytest.raises(ProbeError, match="d_model 8.*16"):
        train_crosscoder(paired, CrosscoderConfig(d_model=8), small_config(), tmp_path / "x", progress=False)
    with pytest.raises(ProbeError, match="layer 7.*layer 2"):
        train_crosscoder(paired, CrosscoderConfig(layer=7), small_config(), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


class NaNSource:
    """In-memory paired source whose training stream (epochs=None) has NaN in model ``bad`` from batch ``at`` on
    (its one-pass scale-estimation stream is finite)."""

    model_names = NAMES
    d_model = D
    layer = 2

    def __init__(self, acts: torch.Tensor, at: int, bad: int = 1) -> None:
        self.acts, self.at, self.bad = acts, at, bad
        self.n_tokens = acts.shape[0]

    def iter_batches(self, batch_size, *, shuffle=True, seed=0, epochs=1, buffer_tokens=None, drop_last=False):
        i = 0
        while True:
            stop = self.n_tokens - batch_size + 1 if drop_last or epochs is None else self.n_tokens
            for start in range(0, stop, batch_size):
                x = self.acts[start : start + batch_size].clone()
                if epochs is None and i == self.at:
                    x[3, self.bad, 5] = float("nan")
                yield x
                i += 1
            if epochs is not None:
                return


def test_nan_in_the_data_names_the_step_and_the_model(tmp_path):
    source = NaNSource(synthetic_acts(2048), at=3)
    cfg = small_config(n_tokens=2048, log_every=1)
    with pytest.raises(ProbeError) as info:
        train_crosscoder(source, CrosscoderConfig(n_features=32), cfg, tmp_path / "run", progress=False)
    message = str(info.value)
    assert "step 4" in message and "activations of ft" in message and "base" not in message
    # the finite steps before were logged
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_nan_in_the_data_names_the_model_between_log_steps(tmp_path):
    """A NaN batch that is not the one of a log step still has to be blamed on the data of its model.

    Fails with posttrain_probe/crosscoder/train.py as of this writing: the non-finite check runs
    only at log steps and inspects only that step's batch, so with log_every=4 and NaN in step 2
    the weights are NaN from step 2 on, and at step 4 the message says "although the current
    batch is finite (diverged: lower the lr?)".
    """
    source = NaNSource(synthetic_acts(2048), at=1)
    cfg = small_config(n_tokens=2048, log_every=4)
    with pytest.raises(ProbeError) as info:
        train_crosscoder(source, CrosscoderConfig(n_features=32), cfg, tmp_path / "run", progress=False)
    message = str(info.value)
    assert "ft" in message and "lower the lr" not in message
    assert "step 2" in message or "step 4" in message


# -- two-process data parallel -------------------------------------------------------------------
SCRIPT = """
import sys
from posttrain_probe.activations import PairedActivations
from posttrain_probe.crosscoder import CrosscoderConfig, CrosscoderTrainingConfig, train_crosscoder

stores, out = sys.argv[1], sys.argv[2]
source = PairedActivations({{"base": stores + "/base", "ft": stores + "/ft"}})
cfg = CrosscoderTrainingConfig(**{cfg!r})
train_crosscoder(source, CrosscoderConfig(n_features=64), cfg, out, progress=False)
from posttrain_probe.process_group import end_process_group
end_process_group()  # gloo's threads could abort the exit otherwise (process_group.py)
"""


@pytest.mark.slow
def test_two_process_data_parallel_matches_single_process(tmp_path):
    stores = tmp_path / "stores"
    paired = write_stores(stores, synthetic_acts(4096, seed=3))
    cfg = dict(n_tokens=256 * 16, batch_size=256, lr=1e-3, log_every=2, checkpoint_every=8, seed=0)
    single = train_crosscoder(
        paired, CrosscoderConfig(n_features=64), CrosscoderTrainingConfig(**cfg), tmp_path / "single", progress=False
    )
    script = tmp_path / "train_ddp.py"
    script.write_text(textwrap.dedent(SCRIPT.format(cfg=cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), str(stores), str(tmp_path / "ddp"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    single_records, ddp_records = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    # rank 0 alone writes: one line per log step
    assert [r["step"] for r in ddp_records] == [r["step"] for r in single_records] == list(range(2, 17, 2))
    # Each rank trains on its half of every global batch and DDP averages the gradients, so the run
    # computes the same function as the single process; only float summation order differs (the
    # all-reduce adds two half-batch means instead of one full-batch mean), hence a tolerance.
    for s, p in zip(single_records, ddp_records):
        for key in ("loss", "mse", "sparsity", "l0"):
            assert p[key] == pytest.approx(s[key], rel=1e-4, abs=1e-6), (s["step"], key)
        assert p["tokens"] == s["tokens"] and p["lr"] == s["lr"] and p["l1_coefficient"] == s["l1_coefficient"]
        assert p["dead_fraction"] == s["dead_fraction"]
        # FVU is a ratio per batch: the DDP record is the mean of the two half-batch FVUs, close but not equal
        assert p["fvu"] == pytest.approx(s["fvu"], rel=0.05)
    # ... and they do differ somewhere: each rank really trained on half of the batch
    assert any(p["fvu"] != s["fvu"] for s, p in zip(single_records, ddp_records))
    ddp_model = Crosscoder.from_pretrained(tmp_path / "ddp")
    torch.testing.assert_close(ddp_model.scales, single.scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(ddp_model.W_dec, single.W_dec, rtol=1e-3, atol=1e-5)
    assert json.loads((tmp_path / "ddp" / "trainer_state" / "latest.json").read_text())["step"] == 16


# -- the step: crosscoder_train(CrosscoderTrainConfig) -> CrosscoderRun ------------------------------
def test_crosscoder_train_step_returns_the_run_it_reads_back(paired, tmp_path):
    from posttrain_probe.crosscoder import CrosscoderRun, CrosscoderTrainConfig, crosscoder_train

    stores = [str(store.path) for store in paired.stores.values()]
    config = CrosscoderTrainConfig(
        acts=stores,
        out=tmp_path / "run",
        crosscoder=CrosscoderConfig(n_features=32),
        training=small_config(n_tokens=1024),
    )
    run = crosscoder_train(config, progress=False)
    assert run.complete and run.step == run.total_steps == 4 and run.tokens == 1024 and run.out == tmp_path / "run"
    assert (
        run.config.model_names == NAMES and run.config.n_features == 32 and run.warnings
    )  # 4 steps: "only 4 optimizer steps"
    assert CrosscoderRun.read(tmp_path / "run") == run
    run.write(tmp_path / "run")
    assert CrosscoderRun.read(tmp_path / "run") == run
    with pytest.raises(ProbeError, match="give the training data once"):
        crosscoder_train(config, source=paired)


def test_crosscoder_train_config_from_yaml_sections_equals_flags(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import posttrain_probe.crosscoder.run as run_module
    from posttrain_probe.cli import app
    from posttrain_probe.config_io import load_config
    from posttrain_probe.crosscoder import CrosscoderRun, CrosscoderTrainConfig

    seen = []

    def fake(config):
        seen.append(config)
        return CrosscoderRun(config.out, 1, 1, 256, True, None, CrosscoderConfig())

    monkeypatch.setattr(run_module, "crosscoder_train", fake)
    file = tmp_path / "cc.yaml"
    file.write_text(
        "acts: [a, b]\nout: runs/cc\nresume: true\ncrosscoder:\n  layer: 3\n  n_features: 64\n  model_names: [base, ft]\n"
        "training:\n  batch_size: 128\n  lr: 0.002\n  report_to: [tensorboard]\n"
    )
    flags = [
        "--acts",
        "a",
        "--acts",
        "b",
        "--out",
        "runs/cc",
        "--resume",
        "--layer",
        "3",
        "--n-features",
        "64",
        "--model-names",
        "base",
        "--model-names",
        "ft",
        "--batch-size",
        "128",
        "--lr",
        "0.002",
        "--report-to",
        "tensorboard",
    ]
    runner = CliRunner()
    for args in (["crosscoder", "train", *flags], ["crosscoder", "train", "--config", str(file)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    from_yaml = load_config(CrosscoderTrainConfig, file)
    assert seen[0] == seen[1] == from_yaml
    assert from_yaml.crosscoder.n_features == 64 and from_yaml.training.lr == 0.002 and from_yaml.resume
