"""Activation store: round trip, atomicity and resume, checksums, pairing, shuffling, ranks."""

from __future__ import annotations

import json
import os

import pytest
import torch

from posttrain_probe import ProbeError
from posttrain_probe.activations import ActivationStore, ActivationStoreWriter, PairedActivations, merge_rank_manifests
from posttrain_probe.activations.shuffle import shuffled_batches
from posttrain_probe.locks import is_lock_file

D = 8


def _tokens(n: int, start: int = 0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, D, generator=generator)
    token_ids = torch.arange(start, start + n) % 97
    doc_ids = torch.arange(start, start + n) // 10
    positions = torch.arange(start, start + n) % 10 + 1
    return acts, token_ids, doc_ids, positions


def _write(path, n_writes=10, per_write=30, shard_tokens=64, model="base", dtype="bfloat16", seed=0, **kw):
    writer = ActivationStoreWriter(
        path, layer=3, d_model=D, model=model, dtype=dtype, shard_tokens=shard_tokens, source={"dataset": "x"}, **kw
    )
    written = []
    for i in range(n_writes):
        batch = _tokens(per_write, start=i * per_write, seed=seed * 1000 + i)
        writer.write(*batch, cursor=i + 1)
        written.append(batch)
    writer.close()
    return writer, [torch.cat(c) for c in zip(*written)]


def test_round_trip_keeps_values_metadata_and_order(tmp_path):
    _, (acts, token_ids, doc_ids, positions) = _write(tmp_path / "s", dtype="float32")
    store = ActivationStore(tmp_path / "s")
    assert store.complete and store.n_tokens == 300 and store.layer == 3 and store.d_model == D
    assert store.model_name == "base" and store.dtype == torch.float32
    # shards are cut at write boundaries once >= shard_tokens tokens are buffered: 3 writes of 30
    assert [s["n_tokens"] for s in store.manifest.shards] == [90, 90, 90, 30]
    assert [s["cursor"] for s in store.manifest.shards] == [3, 6, 9, 10]
    shards = [store.load_shard(i) for i in range(store.n_shards)]
    torch.testing.assert_close(torch.cat([s["acts"] for s in shards]), acts, rtol=0, atol=0)
    assert torch.equal(torch.cat([s["token_ids"] for s in shards]).long(), token_ids)
    assert torch.equal(torch.cat([s["doc_ids"] for s in shards]), doc_ids)
    assert torch.equal(torch.cat([s["positions"] for s in shards]).long(), positions)
    batches = list(store.iter_batches(64, shuffle=False))
    torch.testing.assert_close(torch.cat(batches), acts)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format"] == "posttrain-probe/activation-store" and manifest["format_version"] == 2
    assert manifest["n_tokens"] == 300 and manifest["token_fingerprint"] == store.token_fingerprint
    assert all(len(s["xxh3_128"]) == 32 for s in manifest["shards"]) and manifest["format_version"] == 2


def test_bf16_default_rounds_like_torch(tmp_path):
    _, (acts, *_rest) = _write(tmp_path / "s")
    store = ActivationStore(tmp_path / "s")
    assert store.dtype == torch.bfloat16
    got = torch.cat(list(store.iter_batches(1000, shuffle=False)))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, acts.bfloat16().float(), rtol=0, atol=0)


def test_shuffled_reader_yields_every_token_once_per_epoch(tmp_path):
    _write(tmp_path / "s", dtype="float32", n_writes=13, per_write=17)
    store = ActivationStore(tmp_path / "s")
    reference = torch.cat([store.load_shard(i)["acts"] for i in range(store.n_shards)])
    for batch_size, buffer in [(50, 64), (7, 1000), (221, 10)]:
        batches = list(store.iter_batches(batch_size, shuffle=True, seed=1, buffer_tokens=buffer))
        assert all(b.shape == (batch_size, D) for b in batches[:-1])
        got = torch.cat(batches)
        assert got.shape == reference.shape
        assert not torch.equal(got, reference)  # really shuffled
        # same multiset of rows: sort rows lexicographically by their values
        assert torch.equal(_sorted_rows(got), _sorted_rows(reference))
    two_epochs = torch.cat(list(store.iter_batches(64, epochs=2, seed=3)))
    assert two_epochs.shape[0] == 2 * reference.shape[0]
    assert torch.equal(_sorted_rows(two_epochs), _sorted_rows(torch.cat([reference, reference])))
    dropped = list(store.iter_batches(64, drop_last=True))
    assert all(b.shape[0] == 64 for b in dropped) and len(dropped) == reference.shape[0] // 64


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    keys = x[:, 0] * 1e6 + x[:, 1]
    return x[keys.argsort()]


def test_shuffled_batches_keeps_tuples_aligned():
    ids = torch.arange(100)
    chunks = [(ids[i : i + 9], ids[i : i + 9] * 2) for i in range(0, 100, 9)]
    out = list(shuffled_batches(chunks, 16, buffer_tokens=20, seed=0))
    a, b = (torch.cat(parts) for parts in zip(*out))
    assert torch.equal(b, a * 2) and torch.equal(a.sort().values, ids)


def test_corrupted_shard_is_detected(tmp_path):
    _write(tmp_path / "s")
    shard = tmp_path / "s" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = ActivationStore(tmp_path / "s")
    problems = store.verify_all()
    assert len(problems) == 1 and "shard-00001.safetensors is corrupted" in problems[0]
    store.load_shard(0)
    with pytest.raises(ProbeError, match="shard-00001.safetensors is corrupted"):
        store.load_shard(1)
    with pytest.raises(ProbeError, match="corrupted"):
        list(store.iter_batches(16))
    (tmp_path / "s" / "shard-00002.safetensors").unlink()
    assert any("shard-00002.safetensors is missing" in p for p in ActivationStore(tmp_path / "s").verify_all())


def test_paired_reader_zips_models_and_refuses_other_tokens(tmp_path):
    _, (base_acts, *_r) = _write(tmp_path / "base", dtype="float32", seed=0, model="base")
    _, (sft_acts, *_r) = _write(tmp_path / "sft", dtype="float32", seed=1, model="sft")
    pairs = PairedActivations({"base": tmp_path / "base", "sft": tmp_path / "sft"})
    assert pairs.model_names == ["base", "sft"] and pairs.n_tokens == 300
    stacked = torch.cat(list(pairs.iter_batches(32, shuffle=True, seed=5)))
    assert stacked.shape == (300, 2, D)
    # the same token of both models stays together through the shuffle
    row_of = {tuple(r.tolist()): i for i, r in enumerate(base_acts)}
    index = torch.tensor([row_of[tuple(r.tolist())] for r in stacked[:, 0]])
    torch.testing.assert_close(stacked[:, 1], sft_acts[index], rtol=0, atol=0)

    # other tokens (token ids shifted) -> refused, naming both stores
    writer = ActivationStoreWriter(
        tmp_path / "other", layer=3, d_model=D, model="rl", shard_tokens=64, source={"dataset": "x"}
    )
    for i in range(10):
        acts, token_ids, doc_ids, positions = _tokens(30, start=i * 30)
        writer.write(acts, token_ids + 1, doc_ids, positions, cursor=i + 1)
    writer.close()
    with pytest.raises(ProbeError, match="'base'.*'rl'.*different tokens"):
        PairedActivations({"base": tmp_path / "base", "rl": tmp_path / "other"})
    # same tokens, other shard boundaries -> refused too (fingerprint covers boundaries)
    _write(tmp_path / "reshard", shard_tokens=200, model="x")
    with pytest.raises(ProbeError, match="different tokens"):
        PairedActivations({"base": tmp_path / "base", "x": tmp_path / "reshard"})


def test_reopening_resumes_and_different_store_is_refused(tmp_path):
    path = tmp_path / "s"
    writer = ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64, source={"dataset": "x"})
    for i in range(5):
        writer.write(*_tokens(30, start=i * 30), cursor=i + 1)
    # killed here: 4th/5th write still buffered, never flushed
    assert writer.n_tokens == 90 and writer.cursor == 3
    del writer
    resumed = ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64, source={"dataset": "x"})
    assert resumed.cursor == 3 and resumed.n_tokens == 90 and not resumed.complete
    for i in range(resumed.cursor, 10):
        resumed.write(*_tokens(30, start=i * 30, seed=i), cursor=i + 1)
    resumed.close()
    assert ActivationStore(path).n_tokens == 300
    for key, value in [("layer", 4), ("d_model", D + 1), ("dtype", "float32"), ("model", "sft")]:
        kwargs = dict(layer=3, d_model=D, model="base", dtype="bfloat16", source={"dataset": "x"})
        kwargs[key] = value
        with pytest.raises(ProbeError, match=f"already holds a different activation store: {key}"):
            ActivationStoreWriter(path, **kwargs)
    with pytest.raises(ProbeError, match="source"):
        ActivationStoreWriter(path, layer=3, d_model=D, model="base", source={"dataset": "y"})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ProbeError, match="not empty and holds no activation store"):
        ActivationStoreWriter(tmp_path / "other", layer=3, d_model=D, model="base")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(ProbeError, match="complete"):
        ActivationStoreWriter(path, layer=3, d_model=D, model="base", source={"dataset": "x"}).write(*_tokens(3))


def test_orphans_of_a_killed_writer_are_removed(tmp_path):
    path = tmp_path / "s"
    _write(path, n_writes=4)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["complete"] = False
    (path / "manifest.json").write_text(json.dumps(manifest))
    # killed after the shard rename but before the manifest update, and during a temp write
    (path / "shard-00002.safetensors").write_bytes(b"partial")
    (path / ".shard-00003.safetensors.tmp-1234").write_bytes(b"partial")
    (path / ".manifest.json.tmp-1234").write_text("{")
    writer = ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64, source={"dataset": "x"})
    names = ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    assert sorted(p.name for p in path.iterdir()) == [
        ".probe.lock",
        ".probe.lock.holder",
        *names,
    ]  # the open writer's lock
    writer.write(*_tokens(70), cursor=5)
    writer.close()
    assert not list(path.glob(".probe.lock*"))  # released and removed on close
    assert ActivationStore(path).verify_all() == []


def test_disk_error_leaves_no_half_written_manifest(tmp_path, monkeypatch):
    path = tmp_path / "s"
    writer = ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64, source={"dataset": "x"})
    writer.write(*_tokens(70), cursor=1)
    before = (path / "manifest.json").read_text()
    real_replace = os.replace

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(ProbeError, match="disk error while writing shard.*No space left"):
        writer.write(*_tokens(70, start=70), cursor=2)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (path / "manifest.json").read_text() == before
    assert sorted(p.name for p in path.iterdir() if not is_lock_file(p.name)) == [
        "manifest.json",
        "shard-00000.safetensors",
    ]
    store = ActivationStore(path)
    assert store.n_tokens == 70 and store.verify_all() == []


def test_each_rank_writes_its_own_shards_and_rank0_merges(tmp_path):
    path = tmp_path / "s"
    per_rank = []
    for rank in range(2):
        writer = ActivationStoreWriter(
            path,
            layer=3,
            d_model=D,
            model="base",
            dtype="float32",
            shard_tokens=40,
            rank=rank,
            world_size=2,
            source={"dataset": "x"},
        )
        acts = []
        for i in range(3):
            batch = _tokens(25, start=1000 * rank + 25 * i, seed=10 * rank + i)
            writer.write(*batch, cursor=i + 1)
            acts.append(batch[0])
        if rank == 0:
            writer.close()
        else:
            writer.flush()  # rank 1 has not finished yet
        per_rank.append(torch.cat(acts))
    with pytest.raises(ProbeError, match=r"ranks \[1\] have not finished"):
        merge_rank_manifests(path)
    writer.close()
    names = sorted(p.name for p in path.iterdir())
    assert "shard-r000-00000.safetensors" in names and "shard-r001-00000.safetensors" in names
    assert "manifest.rank000.json" in names and "manifest.rank001.json" in names
    # readable before the merge (merged in memory) and after it
    assert ActivationStore(path).n_tokens == 150
    merged = merge_rank_manifests(path)
    assert merged.world_size == 2 and merged.complete
    store = ActivationStore(path)
    got = torch.cat([store.load_shard(i)["acts"] for i in range(store.n_shards)])
    torch.testing.assert_close(got, torch.cat(per_rank), rtol=0, atol=0)


def test_bad_writes_are_refused(tmp_path):
    writer = ActivationStoreWriter(tmp_path / "s", layer=3, d_model=D, model="base")
    acts, token_ids, doc_ids, positions = _tokens(4)
    with pytest.raises(ProbeError, match=r"shape \[n, 8\]"):
        writer.write(acts[:, :5], token_ids, doc_ids, positions)
    with pytest.raises(ProbeError, match="token_ids must have shape"):
        writer.write(acts, token_ids[:3], doc_ids, positions)
    acts[1, 2] = float("nan")
    with pytest.raises(ProbeError, match="NaN"):
        writer.write(acts, token_ids, doc_ids, positions)
    with pytest.raises(ProbeError, match="unsupported activation dtype 'int8'"):
        ActivationStoreWriter(tmp_path / "t", layer=3, d_model=D, model="base", dtype="int8")
    with pytest.raises(ProbeError, match="does not exist"):
        ActivationStore(tmp_path / "missing")


def test_shards_stream_into_plain_safetensors_files(tmp_path):
    """Activations go to the shard's temporary file as they are written; the finished shard is an ordinary
    safetensors file (the store's metadata, the four tensors, the header padded to a multiple of 8 bytes)."""
    import struct

    from safetensors import safe_open

    path = tmp_path / "s"
    writer = ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64, source={"dataset": "x"})
    acts, token_ids, doc_ids, positions = _tokens(40)
    writer.write(acts, token_ids, doc_ids, positions, cursor=1)
    (in_flight,) = path.glob(".shard-00000.safetensors.tmp-*")
    assert in_flight.stat().st_size > 40 * D * 2  # the activations are on disk before the shard is cut
    writer.close()
    assert not list(path.glob(".shard-*"))
    shard = path / "shard-00000.safetensors"
    header_len = struct.unpack("<Q", shard.read_bytes()[:8])[0]
    assert header_len % 8 == 0
    with safe_open(str(shard), framework="pt") as handle:
        assert handle.metadata() == {"format": "posttrain-probe/activation-store", "layer": "3", "values": "finite"}
        assert sorted(handle.keys()) == ["acts", "doc_ids", "positions", "token_ids"]
        torch.testing.assert_close(handle.get_tensor("acts"), acts.bfloat16(), rtol=0, atol=0)
        assert handle.get_tensor("doc_ids").dtype == torch.int64 and torch.equal(handle.get_tensor("doc_ids"), doc_ids)
        assert handle.get_tensor("token_ids").dtype == torch.int32
        assert torch.equal(handle.get_tensor("positions").long(), positions)


def test_refused_write_leaves_the_shard_in_flight_intact(tmp_path):
    """A write with NaN/inf is cut off the shard file again, whether its activations were written as given (CPU,
    store dtype) or converted first; the writes around it make the shard."""
    path = tmp_path / "s"
    writer = ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64, source={"dataset": "x"})
    good = [_tokens(30, start=0, seed=1), _tokens(30, start=30, seed=2), _tokens(30, start=60, seed=3)]
    first = _tokens(30, seed=8)
    first[0][0, 0] = float("-inf")
    with pytest.raises(ProbeError, match="NaN or inf"):  # the shard's first write: its file is left empty
        writer.write(*first, cursor=1)
    writer.write(good[0][0].bfloat16(), *good[0][1:], cursor=1)  # written as given
    for bad_value, dtype in ((float("nan"), torch.bfloat16), (float("inf"), torch.float32)):
        bad = _tokens(30, start=30, seed=9)
        bad[0][7, 3] = bad_value
        with pytest.raises(ProbeError, match="NaN or inf; nothing of this write was kept"):
            writer.write(bad[0].to(dtype), *bad[1:], cursor=2)
    writer.write(*good[1], cursor=2)  # converted from float32
    writer.write(good[2][0].bfloat16(), *good[2][1:], cursor=3)
    writer.close()
    store = ActivationStore(path)
    assert store.verify_all() == [] and [s["n_tokens"] for s in store.manifest.shards] == [90]
    shard = store.load_shard(0)
    torch.testing.assert_close(shard["acts"], torch.cat([g[0] for g in good]).bfloat16(), rtol=0, atol=0)
    assert torch.equal(shard["token_ids"].long(), torch.cat([g[1] for g in good]))


def test_verified_shards_of_the_writer_skip_the_value_check_others_do_not(tmp_path, monkeypatch):
    """A shard the writer marked (it refused non-finite values) and whose checksum matches needs no second look; an
    unverified read, or a shard without the mark (another tool's, rewritten with its checksum updated), is checked."""
    from safetensors.torch import load_file, save_file

    from posttrain_probe.activations import store as store_module
    from posttrain_probe.activations.manifest import file_checksum

    _write(tmp_path / "s", n_writes=4)
    looked = []
    real = store_module._nonfinite_problem
    monkeypatch.setattr(
        store_module, "_nonfinite_problem", lambda acts, file: looked.append(file.name) or real(acts, file)
    )
    ActivationStore(tmp_path / "s").load_shard(0)
    assert looked == []
    ActivationStore(tmp_path / "s", verify=False).load_shard(0)
    assert looked == ["shard-00000.safetensors"]
    shard = tmp_path / "s" / "shard-00001.safetensors"
    tensors = load_file(shard)
    tensors["acts"][2, 3] = float("nan")
    save_file(tensors, shard)  # no mark: not the writer's
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["shards"][1]["xxh3_128"] = file_checksum(shard)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ProbeError, match="1 non-finite activations.*re-collect"):
        ActivationStore(tmp_path / "s").load_shard(1)


def test_disk_error_while_streaming_stops_the_writer_until_reopened(tmp_path, monkeypatch):
    """The shard in flight is lost with a disk error: the writer refuses to go on (which would leave a gap), and a
    reopened writer resumes after the last complete shard."""
    from posttrain_probe.activations import store as store_module

    path = tmp_path / "s"
    writer = ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64, source={"dataset": "x"})
    for i in range(3):
        writer.write(*_tokens(30, start=i * 30), cursor=i + 1)  # shard 0: 90 tokens
    writer.write(*_tokens(30, start=90), cursor=4)  # in flight

    def full_disk(handle, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "_write_all", full_disk)
    with pytest.raises(ProbeError, match="disk error while writing shard .*shard-00001.safetensors.*1 complete shards"):
        writer.write(*_tokens(30, start=120), cursor=5)
    monkeypatch.undo()
    assert not list(path.glob(".shard-*"))
    with pytest.raises(ProbeError, match=r"lost the shard being written.*reopen the store to resume.*cursor 3"):
        writer.write(*_tokens(30, start=120), cursor=5)
    with pytest.raises(ProbeError, match="lost the shard being written"):
        writer.close()
    assert not list(path.glob(".probe.lock*"))  # released all the same
    resumed = ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64, source={"dataset": "x"})
    assert resumed.cursor == 3 and resumed.n_tokens == 90
    for i in range(resumed.cursor, 6):
        resumed.write(*_tokens(30, start=i * 30), cursor=i + 1)
    resumed.close()
    store = ActivationStore(path)
    assert store.verify_all() == [] and store.n_tokens == 180
    assert torch.equal(torch.cat([store.load_shard(i)["doc_ids"] for i in range(2)]), torch.arange(180) // 10)


def test_version_1_stores_with_sha256_are_read_verified_and_resumed(tmp_path):
    """A store written before format version 2 (sha256 per shard) still reads, verifies and catches corruption, and a
    resumed write adds sha256 shards, so its manifest stays one format."""
    import hashlib
    import json

    path = tmp_path / "v1"
    writer = ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64, source={"dataset": "x"})
    for i in range(3):
        writer.write(*_tokens(30, start=i * 30), cursor=i + 1)
    del writer  # killed: 2 of its writes flushed as one shard, the rest buffered
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 1
    for shard in manifest["shards"]:
        del shard["xxh3_128"]
        shard["sha256"] = hashlib.sha256((path / shard["file"]).read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    resumed = ActivationStoreWriter(path, layer=3, d_model=D, model="base", shard_tokens=64, source={"dataset": "x"})
    for i in range(resumed.cursor, 6):
        resumed.write(*_tokens(30, start=i * 30), cursor=i + 1)
    resumed.close()
    after = json.loads((path / "manifest.json").read_text())
    assert after["format_version"] == 1 and all("sha256" in s and "xxh3_128" not in s for s in after["shards"])
    store = ActivationStore(path)
    assert store.verify_all() == [] and store.n_tokens == 180 and store.load_shard(0)["acts"].shape[1] == D
    first = path / after["shards"][0]["file"]
    data = bytearray(first.read_bytes())
    data[-1] ^= 1
    first.write_bytes(bytes(data))
    assert "is corrupted: sha256" in ActivationStore(path, verify=False).verify_all()[0]
