"""Paired capture, the collect step, LiveActivations and the `collect` / `store info` CLI."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from posttrain_probe import ProbeError
from posttrain_probe.activations import (
    ActivationStore,
    CollectConfig,
    CollectResult,
    LiveActivations,
    PairedActivations,
    capture_batch,
    select_tokens,
)
from posttrain_probe.activations.capture import outlier_mask
from posttrain_probe.activations.collect import collect
from posttrain_probe.activations.live_config import LiveConfig
from posttrain_probe.cli import app
from posttrain_probe.data import load_dataset_spec, token_batches
from posttrain_probe.synthetic import arithmetic_dataset
from posttrain_probe.testing import tiny_model, tiny_tokenizer

LAYER = 2
runner = CliRunner()


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _reference(models, dataset, tokenizer, layer, seq_len, batch_size):
    """Independent reference: full forwards with output_hidden_states, kept tokens by hand."""
    rows = []
    for batch in token_batches(load_dataset_spec(dataset), tokenizer, seq_len=seq_len, batch_size=batch_size):
        with torch.no_grad():
            hidden = [
                m(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True).hidden_states[layer]
                for m in models
            ]
        for b in range(batch.input_ids.shape[0]):
            for t in range(1, int(batch.attention_mask[b].sum())):  # right padding: real tokens are 0..len-1
                if batch.input_ids[b, t] != tokenizer.bos_token_id:
                    rows.append(torch.stack([h[b, t] for h in hidden]))
    return torch.stack(rows)


def test_select_tokens_drops_first_position_bos_and_padding():
    ids = torch.tensor([[1, 5, 6, 1, 7], [1, 8, 9, 0, 0], [0, 0, 4, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    keep = select_tokens(ids, mask, bos_token_id=1)
    expected = torch.tensor([[0, 1, 1, 0, 1], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(keep, expected)


def test_outlier_mask_is_joint_over_models():
    acts = torch.ones(10, 2, 4)
    acts[3, 1] *= 100  # an attention-sink-like token in the second model only
    keep = outlier_mask(acts, 10.0)
    assert keep.tolist() == [i != 3 for i in range(10)]
    with pytest.raises(ProbeError, match="outlier factor"):
        outlier_mask(acts, 0)


def test_paired_capture_of_two_different_models(tiny_pair, tokenizer):
    base, tuned = _load(tiny_pair["base"]), _load(tiny_pair["tuned"])
    batch = next(token_batches(arithmetic_dataset(8), tokenizer, seq_len=48, batch_size=8))
    got = capture_batch([base, tuned], batch, [1, LAYER], bos_token_id=tokenizer.bos_token_id)
    keep = select_tokens(batch.input_ids, batch.attention_mask, bos_token_id=tokenizer.bos_token_id)
    assert got.acts[LAYER].shape == (int(keep.sum()), 2, 64)
    for i, model in enumerate((base, tuned)):
        with torch.no_grad():
            hidden = model(
                batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
            ).hidden_states
        for layer in (1, LAYER):
            torch.testing.assert_close(got.acts[layer][:, i], hidden[layer][keep])
    assert torch.equal(got.token_ids, batch.input_ids[keep])
    assert (got.positions >= 1).all()
    relative = (got.acts[LAYER][:, 1] - got.acts[LAYER][:, 0]).norm() / got.acts[LAYER][:, 0].norm()
    assert relative > 1e-3  # the tuned model really differs


def test_collect_writes_paired_stores_equal_to_full_forwards(tiny_pair, tmp_path, tokenizer):
    out = tmp_path / "acts"
    config = CollectConfig(
        model=[f"base={tiny_pair['base']}", f"tuned={tiny_pair['tuned']}"],
        dataset="arithmetic",
        out=out,
        layer=[LAYER],
        seq_len=48,
        batch_size=4,
        max_tokens=None,
        dtype="fp32",
        shard_tokens=100,
    )
    result = collect(config, dataset=arithmetic_dataset(24), progress=False)
    paths = result.stores
    assert set(paths) == {"base", "tuned"} and paths["base"][LAYER] == out / "base" / f"layer{LAYER}"
    stores = {name: ActivationStore(p[LAYER]) for name, p in paths.items()}
    assert stores["base"].token_fingerprint == stores["tuned"].token_fingerprint
    assert stores["base"].manifest.model["architecture"] == "Qwen3ForCausalLM"
    reference = _reference(
        [_load(tiny_pair["base"]), _load(tiny_pair["tuned"])], arithmetic_dataset(24), tokenizer, LAYER, 48, 4
    )
    pairs = PairedActivations.from_directory(out)
    got = torch.cat(list(pairs.iter_batches(10_000, shuffle=False)))
    assert got.shape == reference.shape
    torch.testing.assert_close(got, reference)
    index = json.loads((out / "collect.json").read_text())
    assert index["layers"] == [LAYER] and list(index["models"]) == ["base", "tuned"]


def test_collect_max_tokens_bf16_and_models_given_as_objects(tmp_path, tokenizer):
    models = {"a": tiny_model("llama", seed=1), "b": tiny_model("llama", seed=2)}
    config = CollectConfig(
        model=[], dataset="synthetic:mcq", out=tmp_path / "o", layer=[0, 3], seq_len=32, max_tokens=500
    )
    paths = collect(config, models=models, tokenizer=tokenizer, progress=False).stores
    for layer in (0, 3):
        store = ActivationStore(paths["a"][layer])
        assert store.n_tokens == 500 and store.dtype == torch.bfloat16 and store.complete
    assert PairedActivations.from_directory(tmp_path / "o", layer=3, models=["b", "a"]).model_names == ["b", "a"]
    with pytest.raises(ProbeError, match=r"layer 1 was not collected.*\[0, 3\]"):
        PairedActivations.from_directory(tmp_path / "o", layer=1)
    with pytest.raises(ProbeError, match="pass layer="):
        PairedActivations.from_directory(tmp_path / "o")


def test_live_activations_match_the_stores(tiny_pair, tmp_path):
    models = {"base": tiny_pair["base"], "tuned": tiny_pair["tuned"]}
    data = arithmetic_dataset(16)
    config = CollectConfig(
        model=[f"{n}={p}" for n, p in models.items()],
        dataset="arithmetic",
        out=tmp_path / "o",
        layer=[LAYER],
        seq_len=40,
        batch_size=4,
        max_tokens=None,
        dtype="fp32",
    )
    collect(config, dataset=data, progress=False)
    stored = torch.cat(list(PairedActivations.from_directory(tmp_path / "o").iter_batches(4096, shuffle=False)))
    live = LiveActivations(models, data, layer=LAYER, config=LiveConfig(seq_len=40, forward_batch_size=4))
    assert live.model_names == ["base", "tuned"] and live.d_model == 64
    unshuffled = torch.cat(list(live.chunks()))
    torch.testing.assert_close(unshuffled, stored)
    shuffled = list(live.iter_batches(64, shuffle=True, seed=0, buffer_tokens=200))
    assert all(b.shape == (64, 2, 64) for b in shuffled[:-1])
    got = torch.cat(shuffled)
    assert got.shape == stored.shape and not torch.equal(got, stored)
    key = lambda x: x[:, 0, 0] * 1e3 + x[:, 0, 1]  # noqa: E731
    torch.testing.assert_close(got[key(got).argsort()], stored[key(stored).argsort()])
    limited = torch.cat(
        list(LiveActivations(models, data, layer=LAYER, config=LiveConfig(seq_len=40, max_tokens=100)).iter_batches(30))
    )
    assert limited.shape == (100, 2, 64)


def _collect(model, layer, out):
    return collect(CollectConfig(model=model, dataset="synthetic:arithmetic", out=out, layer=layer), progress=False)


def test_refuses_models_with_other_hidden_size_or_tokenizer(tiny_pair, tmp_path):
    small = tiny_model("qwen3", hidden_size=32)
    small.save_pretrained(tmp_path / "small")
    tiny_tokenizer().save_pretrained(tmp_path / "small")
    with pytest.raises(ProbeError, match=r"'base' \(hidden size 64\) and 'small' \(hidden size 32\)"):
        _collect([f"base={tiny_pair['base']}", f"small={tmp_path / 'small'}"], [1], tmp_path / "o")
    shutil.copytree(tiny_pair["tuned"], tmp_path / "other_tok")
    tok = tiny_tokenizer()
    tok.add_tokens(["<|think|>"])
    tok.save_pretrained(tmp_path / "other_tok")
    with pytest.raises(ProbeError, match="models 'base' and 'odd' have different tokenizers"):
        _collect([f"base={tiny_pair['base']}", f"odd={tmp_path / 'other_tok'}"], [1], tmp_path / "o")
    with pytest.raises(ProbeError, match="model 'base': layer 4 is out of range.*0 <= layer <= 3"):
        _collect([f"base={tiny_pair['base']}"], [4], tmp_path / "o")
    with pytest.raises(ProbeError, match="model path .*nowhere. does not exist"):
        _collect([f"base={tmp_path / 'nowhere'}"], [1], tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing written before the inputs were checked


def test_cli_collect_and_store_info_end_to_end(tiny_pair, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": row["text"]}) for row in arithmetic_dataset(20)))
    args = [
        "collect",
        "--model",
        f"base={tiny_pair['base']}",
        "--model",
        f"tuned={tiny_pair['tuned']}",
        "--dataset",
        str(data),
        "--layer",
        "1",
        "--layer",
        "3",
        "--out",
        str(tmp_path / "acts"),
        "--seq-len",
        "32",
        "--max-tokens",
        "400",
        "--dtype",
        "bf16",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"tuned layer 3: {tmp_path / 'acts' / 'tuned' / 'layer3'}" in result.output
    info = runner.invoke(app, ["store", "info", str(tmp_path / "acts"), "--json"])
    assert info.exit_code == 0, info.output
    rows = json.loads(info.output)
    assert len(rows) == 4 and {r["model"] for r in rows} == {"base", "tuned"} and {r["layer"] for r in rows} == {1, 3}
    assert all(
        r["n_tokens"] == 400 and r["checksums"] == "ok" and r["complete"] and r["dtype"] == "bfloat16" for r in rows
    )
    assert len({r["token_fingerprint"] for r in rows}) == 1
    table = runner.invoke(app, ["store", "info", str(tmp_path / "acts" / "base" / "layer1")])
    assert table.exit_code == 0 and "base" in table.output and "ok" in table.output
    # running the same command again is a no-op on a complete collection
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    # a corrupted shard turns `store info` red with exit code 1
    shard = tmp_path / "acts" / "base" / "layer1" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")
    bad = runner.invoke(app, ["store", "info", str(tmp_path / "acts" / "base")])
    assert bad.exit_code == 1 and "corrupted" in bad.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "base"], "expected NAME=PATH"),
        (["--model", "base=/no/such/model"], "model path '/no/such/model' does not exist"),
        (["--model", "base={base}", "--layer", "9"], "layer 9 is out of range"),
        (["--model", "base={base}", "--dataset", "{empty}"], "is empty"),
        (["--model", "base={base}", "--dataset", "missing.jsonl"], "dataset file missing.jsonl does not exist"),
        (["--model", "base={base}", "--dataset", "synthetic:poems"], "poems"),
        (["--model", "base={base}", "--dtype", "int4"], "unsupported activation dtype 'int4'"),
        (["--model", "base={base}", "--seq-len", "1"], "seq_len must be >= 2"),
    ],
)
def test_cli_bad_input_gets_a_clear_message(tiny_pair, tmp_path, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = ["collect", "--out", str(tmp_path / "o"), "--max-tokens", "50", "--seq-len", "16"]
    if "--dataset" not in extra:
        args += ["--dataset", "synthetic:arithmetic"]
    args += [a.format(base=tiny_pair["base"], empty=empty) for a in extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cli_refuses_an_output_directory_with_a_different_store(tiny_pair, tmp_path):
    common = [
        "collect",
        "--model",
        f"base={tiny_pair['base']}",
        "--dataset",
        "synthetic:arithmetic",
        "--out",
        str(tmp_path / "o"),
        "--layer",
        "1",
    ]
    assert runner.invoke(app, [*common, "--seq-len", "16", "--max-tokens", "100"]).exit_code == 0
    before = (tmp_path / "o" / "base" / "layer1" / "manifest.json").read_text()
    result = runner.invoke(app, [*common, "--seq-len", "32", "--max-tokens", "100"])
    assert result.exit_code == 2 and "already holds a different activation store: source" in result.output
    assert (tmp_path / "o" / "base" / "layer1" / "manifest.json").read_text() == before


_KILLABLE = """
import sys
from posttrain_probe.activations import CollectConfig
from posttrain_probe.activations.collect import collect
collect(CollectConfig(model=[f"base={sys.argv[1]}", f"tuned={sys.argv[2]}"], dataset="synthetic:arithmetic", out=sys.argv[3], layer=[2],
                      seq_len=64, batch_size=2, max_tokens=3000, shard_tokens=150, n_docs=512), progress=False)
"""


@pytest.mark.slow
def test_killed_collect_resumes_to_the_same_stores(tiny_pair, tmp_path):
    argv = [sys.executable, "-c", _KILLABLE, str(tiny_pair["base"]), str(tiny_pair["tuned"])]
    subprocess.run([*argv, str(tmp_path / "reference")], check=True)
    process = subprocess.Popen([*argv, str(tmp_path / "killed")])
    manifest = tmp_path / "killed" / "tuned" / "layer2" / "manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = {n: ActivationStore(tmp_path / "killed" / n / "layer2") for n in ("base", "tuned")}
    assert not killed["base"].complete and killed["base"].n_tokens < 3000
    assert all(store.verify_all() == [] for store in killed.values())  # only whole shards are listed
    subprocess.run([*argv, str(tmp_path / "killed")], check=True)  # same command again: resumes
    for name in ("base", "tuned"):
        resumed, reference = (
            ActivationStore(tmp_path / "killed" / name / "layer2"),
            ActivationStore(tmp_path / "reference" / name / "layer2"),
        )
        assert resumed.complete and resumed.n_tokens == reference.n_tokens == 3000
        assert resumed.token_fingerprint == reference.token_fingerprint
        torch.testing.assert_close(
            torch.cat(list(resumed.iter_batches(10_000, shuffle=False))),
            torch.cat(list(reference.iter_batches(10_000, shuffle=False))),
            rtol=0,
            atol=0,
        )


@pytest.mark.slow
def test_two_process_collect_writes_per_rank_shards(tiny_pair, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank writes its own shards, rank 0 merges."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = [
        "--model",
        f"base={tiny_pair['base']}",
        "--model",
        f"tuned={tiny_pair['tuned']}",
        "--dataset",
        "synthetic:arithmetic",
        "--n-docs",
        "24",
        "--batch-size",
        "4",
        "--layer",
        "2",
        "--seq-len",
        "32",
        "--max-tokens",
        "0",
        "--dtype",
        "fp32",
        "--shard-tokens",
        "50",
    ]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
    ]
    subprocess.run([*launcher, "-m", "posttrain_probe", "collect", *common, "--out", str(tmp_path / "ddp")], check=True)
    assert runner.invoke(app, ["collect", *common, "--out", str(tmp_path / "one")]).exit_code == 0
    store_dir = tmp_path / "ddp" / "base" / "layer2"
    names = {p.name for p in store_dir.iterdir()}
    assert {"manifest.json", "manifest.rank000.json", "manifest.rank001.json"} <= names
    assert any(n.startswith("shard-r001-") for n in names) and any(n.startswith("shard-r000-") for n in names)
    pairs = PairedActivations.from_directory(tmp_path / "ddp")
    single = ActivationStore(tmp_path / "one" / "base" / "layer2")
    assert pairs.n_tokens == single.n_tokens

    def by_token(store):
        shards = [store.load_shard(i) for i in range(store.n_shards)]
        keys = torch.cat([s["doc_ids"] * 1000 + s["positions"] for s in shards])
        return torch.cat([s["acts"] for s in shards])[keys.argsort()], keys.sort().values

    got, got_keys = by_token(pairs.stores["base"])
    want, want_keys = by_token(single)
    assert torch.equal(got_keys, want_keys)
    torch.testing.assert_close(got, want)


def test_resuming_with_other_data_is_refused(tiny_pair, tmp_path):
    config = CollectConfig(
        model=[f"base={tiny_pair['base']}"],
        dataset="arithmetic",
        out=tmp_path / "o",
        layer=[1],
        seq_len=16,
        max_tokens=50,
    )
    collect(config, dataset=arithmetic_dataset(8, seed=0), progress=False)
    with pytest.raises(ProbeError, match="already holds a different activation store: source"):
        collect(config, dataset=arithmetic_dataset(8, seed=1), progress=False)


def test_bad_layer_values_fail_before_loading(tmp_path):
    for layers in ([-1], [2.5], [True]):
        with pytest.raises(ProbeError, match="are not sites"):
            _collect([f"base={tmp_path / 'nowhere'}"], layers, tmp_path / "o")


def test_live_activations_split_batches_across_ranks(tiny_pair):
    models = {"base": tiny_pair["base"]}
    data = arithmetic_dataset(12)
    reading = LiveConfig(seq_len=24, forward_batch_size=2)
    whole = torch.cat(list(LiveActivations(models, data, layer=1, config=reading).chunks()))
    parts = [
        list(LiveActivations(models, data, layer=1, config=reading, rank=r, world_size=2).chunks()) for r in (0, 1)
    ]
    interleaved = [chunk for pair in zip(*parts) for chunk in pair]
    torch.testing.assert_close(torch.cat(interleaved), whole)
    with pytest.raises(ProbeError, match="rank 2 is outside world_size 2"):
        LiveActivations(models, data, layer=1, rank=2, world_size=2)


def test_collect_result_reads_back_and_config_from_yaml_equals_flags(tiny_pair, tmp_path, monkeypatch):
    import posttrain_probe.activations.collect as collect_module
    from posttrain_probe.config_io import load_config

    config = CollectConfig(
        model=[f"base={tiny_pair['base']}"],
        dataset="synthetic:arithmetic",
        out=tmp_path / "o",
        layer=[1, 2],
        seq_len=16,
        max_tokens=40,
    )
    result = collect(config, progress=False)
    assert result.layers == [1, 2] and result.n_tokens() == {"base": {1: 40, 2: 40}}
    assert CollectResult.read(tmp_path / "o") == result
    assert (
        result.write(tmp_path / "o") == {"collect": tmp_path / "o" / "collect.json"}
        and CollectResult.read(tmp_path / "o") == result
    )

    seen = []
    monkeypatch.setattr(
        collect_module, "collect", lambda config: seen.append(config) or CollectResult(config.out, {}, {})
    )
    file = tmp_path / "collect.yaml"
    file.write_text(
        "model:\n  base: models/base\n  sft: models/sft\ndataset: synthetic:arithmetic\nout: runs/acts\nlayer: [1, 3]\ndtype: fp32\nmax_tokens: 0\n"
    )
    flags = [
        "--model",
        "base=models/base",
        "--model",
        "sft=models/sft",
        "--dataset",
        "synthetic:arithmetic",
        "--out",
        "runs/acts",
        "--layer",
        "1",
        "--layer",
        "3",
        "--dtype",
        "fp32",
        "--max-tokens",
        "0",
    ]
    for args in (["collect", *flags], ["collect", "--config", str(file)]):
        outcome = runner.invoke(app, args)
        assert outcome.exit_code == 0, outcome.output
    assert seen[0] == seen[1] == load_config(CollectConfig, file)
    assert (
        seen[0].model == ["base=models/base", "sft=models/sft"]
        and seen[0].max_tokens is None
        and seen[0].dtype == "float32"
    )
