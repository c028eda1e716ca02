"""The feature monitor (docs/monitor.md): core figures against hand-written references, split-then-sum,
and FeatureMonitorCallback in real TRL SFTTrainer runs (offline equality with the run's activation
stores, resume, bad input, early stop).

The references compute codes, reconstructions and NormRatio categories token by token and feature by
feature from the crosscoder's weights, independently of ``posttrain_probe.analysis.monitor``.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _distributed import finished_before_exit_abort, torchrun
from _probe_helpers import read_store
from transformers.trainer_callback import PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from posttrain_probe.analysis.monitor import (
    MonitorFigures,
    MonitorSums,
    category_masks,
    figures_from_sums,
    monitor_figures,
    monitor_sums,
    read_monitor_log,
    suppressed_features,
)
from posttrain_probe.callbacks import FeatureMonitorCallback, MonitorArguments, ProbeArguments, add_probe_callbacks
from posttrain_probe.callbacks.run_dir import step_name
from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder
from posttrain_probe.errors import ProbeError
from posttrain_probe.model_identity import model_fingerprint
from posttrain_probe.synthetic import arithmetic_dataset
from posttrain_probe.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = 1
STEPS = [0, 2, 4, 6, 8, 10]  # monitor_every 2 over max_steps 10, and the base at step 0


# ---------------------------------------------------------------------------------------------
# crosscoders and references
# ---------------------------------------------------------------------------------------------


def random_crosscoder(
    names=("base", "sft"), d=16, n_features=24, *, layer=LAYER, seed=0, scale=0.5, dtype=torch.float64
):
    """Random untied weights; b_enc centred so about half of the features fire; the fine-tuned slot's
    decoder norms spread over [0, 2] x the base's, so that every NormRatio category is populated."""
    cc = Crosscoder(CrosscoderConfig(model_names=list(names), d_model=d, n_features=n_features, layer=layer))
    gen = torch.Generator().manual_seed(seed)
    n = len(names)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(n, d, n_features, generator=gen) / d**0.5)
        cc.W_dec.copy_(torch.randn(n_features, n, d, generator=gen) * 0.3)
        if n > 1:
            cc.W_dec[:, 1] *= torch.linspace(0, 2, n_features)[torch.randperm(n_features, generator=gen)][:, None]
        cc.b_enc.copy_(torch.randn(n_features, generator=gen) * 0.3)
        cc.b_dec.copy_(torch.randn(n, d, generator=gen) * 0.1)
        cc.scales.fill_(scale)
    return cc.to(dtype).eval()


def reference_figures(cc, base_acts, live_acts, *, slot=0, finetuned=None, suppress_fraction=0.5, top_k=10) -> dict:
    """The figures with loops over tokens and features, from the crosscoder's weight tensors."""
    W_enc, b_enc, W_dec, b_dec = (t.detach().double() for t in (cc.W_enc, cc.b_enc, cc.W_dec, cc.b_dec))
    s = float(cc.scales[slot])
    n_features = W_enc.shape[-1]

    def code(a):
        return torch.clamp(W_enc[slot].T @ (a.double() * s) + b_enc, min=0)

    def mean_codes(acts):
        total = torch.zeros(n_features, dtype=torch.float64)
        for a in acts:
            total += code(a)
        return total / len(acts)

    base_mean, live_mean = mean_codes(base_acts), mean_codes(live_acts)
    change = [float(live_mean[i] - base_mean[i]) for i in range(n_features)]
    active = [i for i in range(n_features) if base_mean[i] > 0]
    suppressed = [i for i in active if live_mean[i] < suppress_fraction * base_mean[i]]
    centre = live_acts.double().mean(0)
    error = sum(float(((a.double() - (W_dec[:, slot].T @ code(a) + b_dec[slot]) / s) ** 2).sum()) for a in live_acts)
    variance = sum(float(((a.double() - centre) ** 2).sum()) for a in live_acts)
    categories = {}
    if finetuned is not None:
        norms = [[float(W_dec[i, m].norm()) for m in range(W_dec.shape[1])] for i in range(n_features)]
        top = max(max(row) for row in norms)
        members = {"base-only": [], "shared": [], "finetune-only": []}
        for i, row in enumerate(norms):
            ratio = ((row[slot] - row[finetuned]) / top + 1) / 2
            members["base-only" if ratio > 0.6 else "finetune-only" if ratio < 0.4 else "shared"].append(i)
        categories = {k: sum(change[i] for i in v) / len(v) if v else math.nan for k, v in members.items()}
    order = sorted(range(n_features), key=lambda i: (-abs(change[i]), i))[:top_k]
    return {
        "mean_change": sum(change) / n_features,
        "category_change": categories,
        "n_active": len(active),
        "suppressed": suppressed,
        "fvu": error / variance,
        "top_features": order,
        "top_changes": [change[i] for i in order],
    }


def assert_figures_close(got: MonitorFigures, want: MonitorFigures | dict, *, rtol=1e-9, atol=1e-12, top=True):
    """``got`` equals ``want`` (figures, or a reference dict) to float tolerance; NaN/None equal each other."""
    want = want if isinstance(want, dict) else want.to_json()

    def close(a, b) -> bool:
        missing = lambda v: v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731
        return missing(a) and missing(b) or (not missing(b) and a == pytest.approx(b, rel=rtol, abs=atol))

    assert close(got.mean_change, want["mean_change"]), (got.mean_change, want["mean_change"])
    assert got.category_change.keys() == want["category_change"].keys()
    for name, value in want["category_change"].items():
        assert close(got.category_change[name], value), (name, got.category_change[name], value)
    assert got.n_active == want["n_active"]
    n_suppressed = want.get("n_suppressed", len(want.get("suppressed", [])))
    assert got.n_suppressed == n_suppressed
    assert close(got.fvu, want["fvu"]), (got.fvu, want["fvu"])
    if top:
        assert got.top_features == want["top_features"]
        assert got.top_changes == pytest.approx(want["top_changes"], rel=rtol, abs=atol)


# ---------------------------------------------------------------------------------------------
# core figures
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("base",), ("base", "sft")])
def test_core_figures_match_a_hand_written_reference(names):
    cc = random_crosscoder(names, seed=1)
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(40, 16, generator=gen, dtype=torch.float64) * 2 + 0.5
    live = base * 0.8 + torch.randn(40, 16, generator=gen, dtype=torch.float64) * 0.7
    got = monitor_figures(cc, base, live, model="base", suppress_fraction=0.6, top_k=7)
    want = reference_figures(cc, base, live, finetuned=1 if len(names) == 2 else None, suppress_fraction=0.6, top_k=7)
    assert got.n_tokens == 40 and len(got.top_features) == 7
    assert_figures_close(got, want)
    assert 0 < got.n_suppressed < got.n_active  # the case is not trivial
    if len(names) == 2:
        assert all(not math.isnan(v) for v in got.category_change.values())  # every category populated
    else:
        assert got.category_change == {}
    # the suppressed set itself, and the figures' JSON round trip
    mask = suppressed_features(monitor_sums(cc, base), monitor_sums(cc, live), suppress_fraction=0.6)
    assert mask.nonzero().flatten().tolist() == want["suppressed"]
    assert MonitorFigures.from_json(json.loads(json.dumps(got.to_json()))) == got
    logs = got.to_log()
    assert logs["monitor/fvu"] == got.fvu and logs["monitor/top1/feature"] == got.top_features[0]
    assert ("monitor/change/shared" in logs) == (len(names) == 2)


def planted_crosscoder(n_models: int) -> tuple[Crosscoder, torch.Tensor]:
    """8 features on orthonormal directions q_i of R^16, tied encoder (W_enc = q_i), no biases, scale 1:
    f_i(a) = relu(q_i . a). Decoder norms (base, sft): 0-2 base-only, 3-5 shared, 6-7 finetune-only."""
    q = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64))[0]
    names = ["base", "sft"][:n_models]
    cc = Crosscoder(CrosscoderConfig(model_names=names, d_model=16, n_features=8, layer=LAYER)).double()
    norms = [(1.0, 0.0)] * 3 + [(1.0, 1.0)] * 3 + [(0.1, 1.0)] * 2
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0] = q[:, :8]
        for i, pair in enumerate(norms):
            for m in range(n_models):
                cc.W_dec[i, m] = q[:, i] * pair[m]
        cc.b_enc.zero_()
        cc.b_dec.zero_()
        cc.scales.fill_(1.0)
    return cc.eval(), q


@pytest.mark.parametrize("n_models", [1, 2])
def test_planted_suppression_is_reported_exactly(n_models):
    """Live = base with its component along the directions of features S removed: exactly S is
    suppressed, S are the most changed features, each by minus its base mean, the rest do not move."""
    cc, q = planted_crosscoder(n_models)
    gen = torch.Generator().manual_seed(4)
    coefficients = torch.rand(50, 8, generator=gen, dtype=torch.float64) + 0.5  # every feature active
    base = coefficients @ q[:, :8].T + torch.randn(50, 8, generator=gen, dtype=torch.float64) @ q[:, 8:].T
    S = [1, 4, 6]
    live = base - (base @ q[:, S]) @ q[:, S].T
    got = monitor_figures(cc, base, live)
    mask = suppressed_features(monitor_sums(cc, base), monitor_sums(cc, live))
    assert mask.nonzero().flatten().tolist() == S
    assert (got.n_active, got.n_suppressed, got.suppressed_fraction) == (8, 3, 3 / 8)
    assert sorted(got.top_features[:3]) == S
    base_mean = coefficients.mean(0)
    for feature, change in zip(got.top_features[:3], got.top_changes[:3]):
        assert change == pytest.approx(-float(base_mean[feature]), abs=1e-12)
    assert max(abs(c) for c in got.top_changes[3:]) < 1e-12
    assert got.mean_change == pytest.approx(-float(base_mean[S].sum()) / 8, abs=1e-12)
    if n_models == 2:
        want = {
            "base-only": -float(base_mean[1]) / 3,
            "shared": -float(base_mean[4]) / 3,
            "finetune-only": -float(base_mean[6]) / 2,
        }
        assert got.category_change == pytest.approx(want, abs=1e-12)
    else:
        assert got.category_change == {}
        with pytest.raises(ProbeError, match="need a crosscoder of two models") as error:
            monitor_figures(cc, base, live, categories=["shared"])
        assert "\n" not in str(error.value)
    # the base against itself: nothing moved
    same = monitor_figures(cc, base, base)
    assert same.n_suppressed == 0 and same.mean_change == 0 and set(same.top_changes) == {0.0}


@pytest.mark.parametrize("names", [("base",), ("base", "sft")])
def test_split_then_sum_equals_one_process(names):
    """Sums over a probe set split over 'ranks' (uneven, interleaved), added as an all-reduce would
    (through their flat vectors), give the one-process figures."""
    cc = random_crosscoder(names, seed=5)
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(37, 16, generator=gen, dtype=torch.float64) + 0.3
    live = base + torch.randn(37, 16, generator=gen, dtype=torch.float64) * 0.5
    one = monitor_figures(cc, base, live, top_k=24)
    for parts in ([slice(0, 5), slice(5, 21), slice(21, 37)], [slice(0, 37, 2), slice(1, 37, 2)]):

        def reduced(acts, parts=parts):
            flats = [monitor_sums(cc, acts[p], model="base").flat() for p in parts]
            return MonitorSums.from_flat(torch.stack(flats).sum(0), cc.config.n_features)

        split = figures_from_sums(reduced(base), reduced(live), masks=category_masks(cc), top_k=24)
        assert_figures_close(split, one, rtol=1e-12, atol=1e-13)
    # chunking inside monitor_sums is a split too
    chunked = figures_from_sums(
        monitor_sums(cc, base, chunk_tokens=4), monitor_sums(cc, live, chunk_tokens=4), masks=None, top_k=24
    )
    assert chunked.fvu == pytest.approx(one.fvu, rel=1e-12) and chunked.top_features == one.top_features


def test_core_bad_input():
    cc = random_crosscoder(("base",))
    acts = torch.randn(5, 16, dtype=torch.float64)
    for call, message in [
        (lambda: monitor_figures(cc, acts, acts[:4]), "differ in shape"),
        (lambda: monitor_figures(cc, acts[:, :8], acts[:, :8]), r"\[tokens, 16\]"),
        (lambda: monitor_figures(cc, acts, acts, suppress_fraction=0), r"suppress_fraction must be in \(0, 1\]"),
        (lambda: monitor_figures(cc, acts, acts, top_k=-1), "top_k"),
        (lambda: monitor_figures(cc, acts, acts, model="rl"), "'rl' is not in this crosscoder"),
        (lambda: monitor_figures(cc, acts, acts, categories=["weird"]), "unknown monitor categories"),
        (lambda: figures_from_sums(monitor_sums(cc, acts), monitor_sums(cc, acts[:3])), "5 and 3 probe tokens"),
    ]:
        with pytest.raises(ProbeError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    three = random_crosscoder(("base", "sft", "rl"))
    with pytest.raises(ProbeError, match="name the fine-tuned one"):
        monitor_figures(three, acts, acts, categories=["shared"])
    assert monitor_figures(three, acts, acts).category_change == {}  # no categories unless asked
    assert monitor_figures(three, acts, acts, finetuned="rl").category_change.keys() == {
        "base-only",
        "shared",
        "finetune-only",
    }


# ---------------------------------------------------------------------------------------------
# FeatureMonitorCallback in SFTTrainer runs
# ---------------------------------------------------------------------------------------------

_CHAT = arithmetic_dataset(48, seed=0).select_columns(["messages"])


def probe_args(**overrides) -> ProbeArguments:
    values = dict(
        probe_n_docs=8,
        probe_seq_len=48,
        probe_batch_size=3,
        probe_layers=[LAYER],
        probe_dtype="float32",
        probe_save_snapshots=False,
        probe_snapshot_steps=2,
    )
    return ProbeArguments(**(values | overrides))


def sft_trainer(out, **overrides) -> SFTTrainer:
    config = dict(
        output_dir=str(out),
        max_steps=10,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=64,
        seed=0,
        disable_tqdm=True,
        bf16=False,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=tiny_model("qwen3"),
        args=SFTConfig(**(config | overrides)),
        train_dataset=_CHAT,
        processing_class=tiny_tokenizer(),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


@functools.lru_cache(maxsize=1)
def _site_crosscoder() -> Crosscoder:
    model = tiny_model("qwen3")
    tokenizer = tiny_tokenizer()
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in arithmetic_dataset(32, seed=99)["messages"]]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        acts = model(**batch, output_hidden_states=True).hidden_states[LAYER][batch.attention_mask.bool()]
    mean = acts.mean(0)
    pcs = torch.linalg.svd(acts - mean, full_matrices=False)[2][:24]  # [24, 64] top principal directions
    scale = 64**0.5 / float(acts.norm(dim=-1).mean())
    cc = Crosscoder(CrosscoderConfig(model_names=["base", "sft"], d_model=64, n_features=48, layer=LAYER))
    directions = torch.cat([pcs, -pcs])  # [48, 64]: feature j and j + 24 read +/- the projection on pc j
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0] = directions.T
        cc.b_enc.copy_(-(directions @ mean) * scale)
        cc.W_dec[:, 0] = directions
        cc.W_dec[:, 1] = (
            directions
            * torch.linspace(0, 2, 48)[torch.randperm(48, generator=torch.Generator().manual_seed(7))][:, None]
        )
        cc.b_dec.copy_(mean * scale)
        cc.scales.fill_(scale)
    return cc.eval()


def site_crosscoder() -> Crosscoder:
    """A float32 crosscoder (base, sft) at LAYER of the tiny model: base branch = ReLU pairs on the top 24
    principal directions of its activations (it reconstructs their projection: FVU well below 1); sft
    decoder norms spread over [0, 2] x the base's, so that every NormRatio category is populated."""
    return copy.deepcopy(_site_crosscoder())


def monitor_args(**overrides) -> MonitorArguments:
    return MonitorArguments(**(dict(monitor_every=2, monitor_top_k=5) | overrides))


def log_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "monitor.jsonl").read_text().splitlines()]


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    """10 SFT steps with the probe callbacks (activation stores every 2 steps) and the monitor (every 2 steps)."""
    out = tmp_path_factory.mktemp("monitored")
    trainer = sft_trainer(out)
    monitor = FeatureMonitorCallback(trainer, monitor_args(), probe_args(), crosscoder=site_crosscoder())
    trainer.add_callback(monitor)  # before the probe callbacks: it still shares their run (one directory lock)
    add_probe_callbacks(trainer, probe_args())
    trainer.train()
    return trainer, monitor, out / "probe"


def test_monitor_figures_equal_offline_figures_of_the_activation_stores(monitored_run):
    trainer, monitor, run = monitored_run
    lines = log_lines(run)
    assert [line["step"] for line in lines] == STEPS
    logged = read_monitor_log(run / "monitor.jsonl")
    base = read_store(run / "activations" / step_name(0) / f"layer{LAYER}")[1]["acts"]
    assert base.dtype == torch.float32 and base.shape[0] > 100
    for step in STEPS:
        live = read_store(run / "activations" / step_name(step) / f"layer{LAYER}")[1]["acts"]
        offline = monitor_figures(site_crosscoder(), base, live, top_k=5)
        assert_figures_close(logged[step], offline, rtol=1e-5, atol=1e-7)
        assert logged[step] == monitor.history[step]
    assert logged[0].mean_change == 0 and logged[0].n_suppressed == 0
    assert (
        logged[0].fvu < 0.5 and logged[10].fvu > logged[0].fvu
    )  # training moved the activations out of the dictionary
    # report_to: the same figures in the log history, at their steps; the loss is logged at every step
    history = trainer.state.log_history
    assert [e["step"] for e in history if "monitor/fvu" in e] == STEPS
    assert all(e["monitor/fvu"] == pytest.approx(logged[e["step"]].fvu) for e in history if "monitor/fvu" in e)
    assert len([e for e in history if "loss" in e]) == 10
    assert (run / "monitor_base.safetensors").exists()


def test_monitor_leaves_training_unchanged(monitored_run, tmp_path):
    trainer, _, _ = monitored_run
    plain = sft_trainer(tmp_path)
    plain.train()
    loss = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert loss(trainer) == loss(plain)


def test_resume_continues_the_monitor_log_without_gaps_or_duplicates(monitored_run, tmp_path):
    """Interrupted at step 6 (checkpoint at 4), resumed: lines 0..4 kept, 6 replaced, 8 and 10 added;
    the figures are the uninterrupted run's. The monitor runs alone here (its own probe run)."""
    _, uninterrupted, _ = monitored_run
    out = tmp_path / "out"
    interrupted = sft_trainer(out, save_strategy="steps", save_steps=4)
    interrupted.add_callback(
        FeatureMonitorCallback(interrupted, monitor_args(), probe_args(), crosscoder=site_crosscoder())
    )
    interrupted.add_callback(StopAt(6))
    interrupted.train()
    run = out / "probe"
    first = log_lines(run)
    assert [line["step"] for line in first] == [0, 2, 4, 6]
    with open(run / "monitor.jsonl", "a") as handle:
        handle.write('{"step": 8, "n_tok')  # a line a killed process left half-written

    resumed = sft_trainer(out, save_strategy="steps", save_steps=4)
    monitor = FeatureMonitorCallback(resumed, monitor_args(), probe_args(), crosscoder=site_crosscoder())
    resumed.add_callback(monitor)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 10 and sorted(monitor.history) == [6, 8, 10]
    lines = log_lines(run)
    assert [line["step"] for line in lines] == STEPS
    assert lines[:3] == first[:3]  # kept as written
    logged = read_monitor_log(run / "monitor.jsonl")
    for step in STEPS:
        assert_figures_close(logged[step], uninterrupted.history[step], rtol=1e-5, atol=1e-7)

    # resuming with another crosscoder, or without the saved base sums: one-line errors before training
    other = FeatureMonitorCallback(
        sft_trainer(out),
        monitor_args(),
        probe_args(),
        crosscoder=random_crosscoder(("base", "sft"), d=64, n_features=48, seed=8, dtype=torch.float32),
    )
    trainer = other.trainer
    trainer.add_callback(other)
    with pytest.raises(ProbeError, match=r"base sums of another monitor \(crosscoder differ\)") as error:
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-8"))
    assert "\n" not in str(error.value) and trainer.state.global_step == 8
    (run / "monitor_base.safetensors").unlink()
    trainer = sft_trainer(out)
    trainer.add_callback(FeatureMonitorCallback(trainer, monitor_args(), probe_args(), crosscoder=site_crosscoder()))
    with pytest.raises(ProbeError, match="monitor_base.safetensors is missing"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-8"))
    assert [line["step"] for line in log_lines(run)] == STEPS


def _bad_setups():
    """(name, MonitorArguments overrides, crosscoder factory taking the model, message)."""
    sae = lambda model: random_crosscoder(("base",), d=64, n_features=16, dtype=torch.float32)  # noqa: E731

    def other_model(model):
        cc = site_crosscoder()
        cc.config.model_fingerprints = [model_fingerprint(tiny_model("qwen3", seed=1)), None]
        return cc

    return [
        ("other site", {"monitor_layer": 2}, lambda m: site_crosscoder(), "trained at layer 1, the feature monitor asked for layer 2"),
        ("other width", {}, lambda m: random_crosscoder(d=32, dtype=torch.float32), "d_model 32, the model's hidden size is 64"),
        ("other base model", {}, other_model, r"crosscoder slot 'base' was trained on .* \(weights differ.*; pass --monitor_allow_model_mismatch to override$"),
        ("category of an SAE", {"monitor_categories": ["shared"]}, sae, "need a crosscoder of two models"),
        ("no layer", {}, lambda m: Crosscoder(CrosscoderConfig(model_names=["base"], d_model=64, n_features=8)), "does not record its layer"),
        ("layer out of range", {"monitor_layer": 7}, lambda m: Crosscoder(CrosscoderConfig(model_names=["base"], d_model=64, n_features=8)), "out of range"),
        ("other branch", {"monitor_model": "rl"}, lambda m: site_crosscoder(), r"'rl' is not in this crosscoder"),
    ]  # fmt: skip


@pytest.mark.parametrize("name, overrides, make, message", _bad_setups(), ids=[s[0] for s in _bad_setups()])
def test_bad_input_is_a_one_line_error_before_training(tmp_path, name, overrides, make, message):
    trainer = sft_trainer(tmp_path)
    with pytest.raises(ProbeError, match=message) as error:
        FeatureMonitorCallback(trainer, monitor_args(**overrides), crosscoder=make(trainer.model))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "probe").exists() and trainer.state.global_step == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"monitor_every": 0}, "monitor_every must be >= 1"),
        ({"monitor_categories": ["weird"]}, "not among"),
        ({"monitor_suppress_fraction": 1.5}, "monitor_suppress_fraction"),
        ({"monitor_max_suppressed": 2.0}, "monitor_max_suppressed must be in"),
        ({"monitor_stop_on_alert": True}, "needs a threshold"),
        ({"monitor_norm_ratio_scale": "max"}, "monitor_norm_ratio_scale"),
    ],
)
def test_bad_monitor_arguments(overrides, message):
    with pytest.raises(ProbeError, match=message) as error:
        MonitorArguments(**overrides)
    assert "\n" not in str(error.value)


def test_model_mismatch_can_be_allowed(tmp_path):
    trainer = sft_trainer(tmp_path)
    cc = site_crosscoder()
    cc.config.model_fingerprints = [model_fingerprint(tiny_model("qwen3", seed=1)), None]
    monitor = FeatureMonitorCallback(trainer, monitor_args(monitor_allow_model_mismatch=True), crosscoder=cc)
    assert "weights differ" in monitor.model_mismatch
    cc.config.model_fingerprints = [model_fingerprint(tiny_model("qwen3", seed=0)), None]
    assert FeatureMonitorCallback(trainer, monitor_args(), crosscoder=cc).model_mismatch is None
    with pytest.raises(ProbeError, match="needs a crosscoder"):
        FeatureMonitorCallback(trainer, monitor_args())


def test_alert_warns_saves_and_stops(tmp_path, caplog):
    trainer = sft_trainer(tmp_path, max_steps=6)
    args = monitor_args(monitor_max_fvu=0.0, monitor_stop_on_alert=True)
    trainer.add_callback(FeatureMonitorCallback(trainer, args, probe_args(), crosscoder=site_crosscoder()))
    with caplog.at_level(logging.WARNING, logger="posttrain_probe.callbacks.feature_monitor"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert (tmp_path / "checkpoint-2").is_dir()
    assert [line["step"] for line in log_lines(tmp_path / "probe")] == [0, 2]
    assert any(
        "feature monitor at step 2: FVU" in r.getMessage() and "stopping" in r.getMessage() for r in caplog.records
    )


# ---------------------------------------------------------------------------------------------
# two processes (DDP, gloo): the same figures as one process
# ---------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from trl import SFTConfig, SFTTrainer
    from posttrain_probe.callbacks import FeatureMonitorCallback, MonitorArguments, ProbeArguments
    from posttrain_probe.crosscoder.model import Crosscoder
    from posttrain_probe.process_group import end_process_group
    from posttrain_probe.synthetic import arithmetic_dataset
    from posttrain_probe.testing import tiny_model, tiny_tokenizer

    out, per_device = sys.argv[1], int(sys.argv[2])
    config = SFTConfig(
        output_dir=out, max_steps=2, per_device_train_batch_size=per_device, learning_rate=3e-3, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, max_length=64, seed=0, disable_tqdm=True, bf16=False,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=tiny_model("qwen3"), args=config, train_dataset=arithmetic_dataset(48, seed=0).select_columns(["messages"]),
                         processing_class=tiny_tokenizer())
    probe = ProbeArguments(probe_n_docs=10, probe_seq_len=48, probe_batch_size=2, probe_layers=[1], probe_save_snapshots=False,
                           probe_stream_activations=False)
    monitor = FeatureMonitorCallback(trainer, MonitorArguments(monitor_every=1, monitor_top_k=5), probe,
                                     crosscoder=Crosscoder.from_pretrained(sys.argv[3]))
    trainer.add_callback(monitor)
    trainer.train()
    open(f"{out}/exit-rank{trainer.args.process_index}", "w").close()  # this rank's work is done
    del trainer, monitor  # their DDP wrapper holds the group: freed before it is destroyed (process_group.py)
    end_process_group()  # gloo's threads could abort the exit otherwise (process_group.py)
    """
)


@pytest.mark.slow
def test_two_process_figures_equal_one_process(tmp_path):
    """10 probe documents in 5 batches of 2: rank 0 encodes 3, rank 1 encodes 2 and a padding round."""
    cc_dir = tmp_path / "cc"
    site_crosscoder().save_pretrained(cc_dir)
    script = tmp_path / "monitor_ddp.py"
    script.write_text(DDP_SCRIPT)
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), "4", str(cc_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr[-4000:]
    two = torchrun(script, str(tmp_path / "two"), "2", str(cc_dir), nproc=2)
    assert two.returncode == 0 or finished_before_exit_abort(two, tmp_path / "two", 2), two.stderr[-4000:]
    a = read_monitor_log(tmp_path / "one" / "probe" / "monitor.jsonl")
    b = read_monitor_log(tmp_path / "two" / "probe" / "monitor.jsonl")
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for name, world in (("one", 1), ("two", 2)):
        assert json.loads((tmp_path / name / "probe" / "probe.json").read_text())["world_size"] == world
    assert_figures_close(b[0], a[0], rtol=1e-6, atol=1e-8)  # the base model: only the split differs
    for step in (1, 2):  # DDP training (gradients all-reduced) agrees with one process to float tolerance
        assert_figures_close(b[step], a[step], rtol=1e-4, atol=1e-6, top=False)
