"""The on-disk activation store: one model, one site, a fixed token sequence (docs/design.md).

Layout of a store directory::

    manifest.json              format + version, model, layer, d_model, dtype, token count,
                               token fingerprint, shard list (tokens, sha256, data cursor)
    shard-00000.safetensors    acts [n, d] (store dtype), token_ids [n] int32,
                               doc_ids [n] int64, positions [n] int32

Shards are written to a temporary name and renamed; the manifest is rewritten atomically after
each shard, so a killed writer loses at most the shard in flight and resumes from there. A
writer holds the store's lock (:mod:`posttrain_probe.locks`; ``.probe.lock``, per rank in a
distributed write) from opening to :meth:`ActivationStoreWriter.close`. In a
distributed run rank r writes ``shard-rNNN-XXXXX.safetensors`` and ``manifest.rankNNN.json``;
:func:`merge_rank_manifests` (rank 0, after a barrier) joins them into ``manifest.json``.

Only safetensors and JSON are read; every shard is checked against its checksum (xxh3_128; sha256 in version-1 stores) before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from posttrain_probe.activations.manifest import (
    FORMAT,
    IDENTITY_KEYS,
    MANIFEST,
    StoreManifest,
    difference,
    file_checksum,
    manifest_name,
    merged_rank_manifest,
    read_manifest,
    shard_bytes,
    shard_checksum,
    shard_name,
    shard_problem,
    shard_problems,
    write_atomic,
)
from posttrain_probe.activations.shuffle import ActivationSource
from posttrain_probe.dtypes import dtype_name
from posttrain_probe.errors import ProbeError
from posttrain_probe.locks import DirectoryLock, is_lock_file

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def _tokens_digest(token_ids: torch.Tensor, doc_ids: torch.Tensor, positions: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in (token_ids, doc_ids, positions):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


class ActivationStoreWriter:
    """Append activations of one model at one site to a store directory, resumably.

    ``write`` buffers; a shard is flushed once at least ``shard_tokens`` tokens are buffered, cut
    at a ``write`` boundary so that each shard records the caller's data ``cursor`` (e.g. number of
    source batches consumed). Reopening an incomplete store resumes it: ``cursor`` and
    ``n_tokens`` say where it stopped. Reopening with a different layer, width, dtype, model or
    source raises ProbeError rather than mixing data.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        layer: int,
        d_model: int,
        model: Mapping[str, Any] | str,
        dtype: str | torch.dtype = "bfloat16",
        source: Mapping[str, Any] | None = None,
        shard_tokens: int = 65536,
        rank: int = 0,
        world_size: int = 1,
        fsync: bool = False,
    ) -> None:
        if shard_tokens < 1:
            raise ProbeError(f"shard_tokens must be >= 1, got {shard_tokens}")
        if not 0 <= rank < world_size:
            raise ProbeError(f"rank {rank} is outside world_size {world_size}")
        self.path = Path(path)
        self.shard_tokens = int(shard_tokens)
        self.rank, self.world_size, self.fsync = rank, world_size, fsync
        self._torch_dtype = DTYPES[dtype_name(dtype)]
        model_info = {"name": model} if isinstance(model, str) else dict(model)
        if "name" not in model_info:
            raise ProbeError(f"model info must contain a 'name', got {model_info!r}")
        wanted = StoreManifest(
            layer=int(layer),
            d_model=int(d_model),
            dtype=dtype_name(dtype),
            model=model_info,
            source=json.loads(json.dumps(dict(source or {}))),  # normalise to JSON types
            rank=rank,
            world_size=world_size,
        )
        self._manifest_path = self.path / manifest_name(rank, world_size)
        # One writer per store (per rank's files in a distributed write), held until close().
        self._dir_lock = DirectoryLock(self.path, what="activation store", rank=rank)
        self.manifest = self._open(wanted)
        # Activations of the shard being filled go straight into one reusable buffer (no cat).
        self._acts = torch.empty(0, int(d_model), dtype=self._torch_dtype)
        self._buffered = 0
        self._token_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffer_cursor: int | None = None

    # -- opening / resuming -------------------------------------------------------------------
    def _open(self, wanted: StoreManifest) -> StoreManifest:
        if self.path.exists() and not self.path.is_dir():
            raise ProbeError(f"output path {self.path} exists and is not a directory")
        self._dir_lock.acquire()
        try:
            return self._open_locked(wanted)
        except BaseException:
            self._dir_lock.release()
            raise

    def _open_locked(self, wanted: StoreManifest) -> StoreManifest:
        self._check_world_size()
        if self._manifest_path.exists():
            have = StoreManifest.read(self._manifest_path)
            for key in IDENTITY_KEYS:
                there, here = getattr(have, key), getattr(wanted, key)
                if key == "model" and "fingerprint" not in there:  # a store collected before model fingerprints
                    here = {k: v for k, v in here.items() if k != "fingerprint"}
                if there != here:
                    raise ProbeError(
                        f"{self.path} already holds a different activation store: {difference(key, there, here)}; "
                        "choose another output directory or delete that one"
                    )
            manifest = have
        else:
            ours = re.compile(r"^(\.)?(shard-.*\.safetensors|manifest.*\.json)(\.tmp-\d+)?$")
            foreign = [p.name for p in self.path.iterdir() if not ours.match(p.name) and not is_lock_file(p.name)]
            if foreign:
                raise ProbeError(
                    f"output directory {self.path} is not empty and holds no activation store "
                    f"(found {', '.join(sorted(foreign)[:5])}); choose an empty or new directory"
                )
            manifest = wanted
        self._remove_orphans(manifest)
        return manifest

    def verify(self) -> list[str]:
        """Check the flushed shards of this writer (this rank's) against their sha256; returns the problems."""
        return [problem for shard in self.manifest.shards if (problem := shard_problem(self.path, shard)) is not None]

    def _check_world_size(self) -> None:
        """Refuse to mix a single-process store with a distributed one (or other world sizes)."""
        merged = self.path / MANIFEST
        written_by = None
        if merged.exists():
            written_by = StoreManifest.read(merged).world_size
        elif any(self.path.glob("manifest.rank*.json")):
            written_by = StoreManifest.read(next(iter(sorted(self.path.glob("manifest.rank*.json"))))).world_size
        if written_by is not None and written_by != self.world_size:
            raise ProbeError(
                f"{self.path} holds a store written by {written_by} process(es), this run has {self.world_size}: "
                "resume with the same number of processes or choose another output directory"
            )

    def _remove_orphans(self, manifest: StoreManifest) -> None:
        """Delete this rank's temp files and shards that the manifest does not list (killed writes)."""
        listed = {s["file"] for s in manifest.shards}
        prefix = "shard-" if self.world_size == 1 else f"shard-r{self.rank:03d}-"
        for entry in self.path.iterdir():
            name = entry.name
            mine = (
                name.startswith(prefix)
                or name.startswith("." + prefix)
                or name.startswith(f".{self._manifest_path.name}.tmp-")
            )
            if self.world_size == 1 and name.startswith(("shard-r", ".shard-r")):
                mine = False
            if mine and name not in listed:
                entry.unlink(missing_ok=True)

    # -- state ----------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Tokens in flushed shards (what survives a kill)."""
        return self.manifest.n_tokens

    @property
    def cursor(self) -> int:
        """Data cursor of the last flushed shard (0 for an empty store): where a resumed run restarts."""
        return int(self.manifest.shards[-1]["cursor"]) if self.manifest.shards else 0

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    # -- writing --------------------------------------------------------------------------------
    def write(
        self,
        acts: torch.Tensor,
        token_ids: torch.Tensor,
        doc_ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        cursor: int | None = None,
    ) -> None:
        """Append n tokens: ``acts`` [n, d] (any float dtype/device), ``token_ids``/``doc_ids``/``positions`` [n].

        ``cursor`` is the caller's data position after these tokens (kept with the shard).
        """
        if self.manifest.complete:
            raise ProbeError(f"activation store {self.path} is complete; open a new directory to write more")
        if acts.ndim != 2 or acts.shape[1] != self.manifest.d_model:
            raise ProbeError(f"acts must have shape [n, {self.manifest.d_model}], got {tuple(acts.shape)}")
        n = acts.shape[0]
        for name, tensor in (("token_ids", token_ids), ("doc_ids", doc_ids), ("positions", positions)):
            if tensor.shape != (n,):
                raise ProbeError(f"{name} must have shape [{n}], got {tuple(tensor.shape)}")
        if n == 0:
            return
        if self._buffered + n > self._acts.shape[0]:
            # Grow geometrically up to one shard (+ this write); the buffer is then reused for every shard.
            capacity = max(self._buffered + n, min(self.shard_tokens + n, max(2 * self._acts.shape[0], 1 << 17)))
            grown = torch.empty(capacity, self._acts.shape[1], dtype=self._torch_dtype)
            grown[: self._buffered] = self._acts[: self._buffered]
            self._acts = grown
        target = self._acts[self._buffered : self._buffered + n]
        target.copy_(acts.detach())  # dtype conversion and device -> host copy in one step
        low, high = torch.aminmax(target)  # NaN propagates; far cheaper than isfinite().all()
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise ProbeError(f"activations written to {self.path} contain NaN or inf; nothing of this write was kept")
        self._token_parts.append(
            (
                token_ids.detach().to("cpu", torch.int32),
                doc_ids.detach().to("cpu", torch.int64),
                positions.detach().to("cpu", torch.int32),
            )
        )
        self._buffered += n
        self._buffer_cursor = cursor if cursor is not None else (self._buffer_cursor or self.cursor)
        if self._buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Write everything buffered as one shard and update the manifest (no-op when empty)."""
        if not self._buffered:
            return
        token_ids, doc_ids, positions = (torch.cat(parts) for parts in zip(*self._token_parts))
        index = len(self.manifest.shards)
        name = shard_name(index, self.rank, self.world_size)
        final = self.path / name
        tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
        tensors = {
            "acts": self._acts[: self._buffered],
            "token_ids": token_ids,
            "doc_ids": doc_ids,
            "positions": positions,
        }
        try:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "layer": str(self.manifest.layer)})
            if self.fsync:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            algorithm = "sha256" if self.manifest.format_version == 1 else "xxh3_128"  # a resumed v1 store stays v1
            checksum = file_checksum(tmp, algorithm)  # hashed from the page cache the write just filled
            os.replace(tmp, final)
        except (OSError, SafetensorError) as err:
            tmp.unlink(missing_ok=True)
            raise ProbeError(
                f"disk error while writing shard {final}: {err}; the store keeps its {len(self.manifest.shards)} "
                "complete shards and resumes from there"
            ) from err
        shard = {
            "file": name,
            "n_tokens": int(self._buffered),
            algorithm: checksum,
            "tokens_sha256": _tokens_digest(token_ids, doc_ids, positions),
            "cursor": int(self._buffer_cursor if self._buffer_cursor is not None else index + 1),
            "rank": self.rank,
        }
        self.manifest.shards.append(shard)
        try:
            self._write_manifest()
        except ProbeError:
            self.manifest.shards.pop()
            final.unlink(missing_ok=True)
            raise
        self._buffered, self._token_parts, self._buffer_cursor = 0, [], None

    def _write_manifest(self) -> None:
        write_atomic(self._manifest_path, self.manifest.to_json().encode(), fsync=True, what="manifest")

    def truncate(self, cursor: int) -> None:
        """Drop flushed shards whose cursor is beyond ``cursor`` (to re-align paired stores on resume)."""
        if self._buffered:
            raise ProbeError("truncate() needs an empty write buffer; call it right after opening the store")
        keep = [s for s in self.manifest.shards if int(s["cursor"]) <= cursor]
        dropped = self.manifest.shards[len(keep) :]
        if not dropped:
            return
        self.manifest.shards = keep
        self.manifest.complete = False
        self._write_manifest()
        for shard in dropped:
            (self.path / shard["file"]).unlink(missing_ok=True)

    def close(self, *, complete: bool = True) -> None:
        """Flush the buffer; with ``complete=True`` mark the store finished (no further writes).
        Releases the store's lock either way."""
        try:
            self.flush()
            if complete and not self.manifest.complete:
                self.manifest.complete = True
                self._write_manifest()
        finally:
            self.release()

    def release(self) -> None:
        """Give up the store's lock without flushing (after an error; :meth:`close` does it too)."""
        self._dir_lock.release()

    def __enter__(self) -> ActivationStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.release()


def merge_rank_manifests(path: str | os.PathLike) -> StoreManifest:
    """Join the per-rank manifests of a distributed write into ``manifest.json`` (call on one rank).

    Requires every rank's manifest to be present and complete. Shards are ordered by rank, then
    index. Returns the merged manifest.
    """
    path = Path(path)
    merged = merged_rank_manifest(path)
    write_atomic(path / MANIFEST, merged.to_json().encode(), fsync=True, what="manifest")
    return merged


class ActivationStore(ActivationSource):
    """Read an activation store directory: metadata, verified shards and shuffled batches.

    Every shard is checked against the manifest's sha256 the first time this object loads it
    (``verify=False`` skips that). Activations come back in raw model units;
    :meth:`iter_batches` serves shuffled [batch, d] batches.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.verify = verify
        self._verified: set[int] = set()
        self._values_checked: set[int] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, model={self.model_name!r}, layer={self.layer}, "
            f"n_tokens={self.n_tokens}, d_model={self.d_model}, dtype={self.manifest.dtype})"
        )

    @property
    def model_name(self) -> str:
        return str(self.manifest.model["name"])

    @property
    def layer(self) -> int:
        return self.manifest.layer

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest.dtype]

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    @property
    def n_shards(self) -> int:
        return len(self.manifest.shards)

    @property
    def token_fingerprint(self) -> str:
        return self.manifest.token_fingerprint

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    @property
    def nbytes(self) -> int:
        """Bytes of shard files on disk."""
        return shard_bytes(self.path, self.manifest)

    def check_shard(self, index: int) -> str | None:
        """None if shard ``index`` exists and matches its sha256, else a description of the problem."""
        return shard_problem(self.path, self.manifest.shards[index])

    def verify_all(self) -> list[str]:
        """Check every shard; returns the list of problems (empty when the store is intact)."""
        return shard_problems(self.path, self.manifest)

    def load_shard(self, index: int) -> dict[str, torch.Tensor]:
        """Shard ``index`` as ``{"acts": [n, d] store dtype, "token_ids", "doc_ids", "positions": [n]}``."""
        if not 0 <= index < self.n_shards:
            raise ProbeError(f"shard index {index} out of range: store {self.path} has {self.n_shards} shards")
        shard = self.manifest.shards[index]
        file = self.path / shard["file"]
        try:
            if self.verify and index not in self._verified:
                algorithm, expected = shard_checksum(shard)
                actual = file_checksum(file, algorithm)
                if actual != expected:
                    raise ProbeError(
                        f"shard {file} is corrupted: its {algorithm} is {actual}, the manifest says {expected}; "
                        f"re-collect this store: delete {self.path} and run the same collect command again"
                    )
                with self._lock:
                    self._verified.add(index)
            tensors = load_file(file)
        except (OSError, SafetensorError) as err:
            raise ProbeError(f"cannot read shard {file}: {err}") from err
        if tensors["acts"].shape != (shard["n_tokens"], self.d_model):
            raise ProbeError(
                f"shard {file} holds acts {tuple(tensors['acts'].shape)}, manifest says [{shard['n_tokens']}, {self.d_model}]"
            )
        if index not in self._values_checked:
            problem = _nonfinite_problem(tensors["acts"], file)
            if problem is not None:
                raise ProbeError(
                    f"{problem}: the activations are unusable; re-collect this store (delete {self.path} and run the same collect command again)"
                )
            with self._lock:
                self._values_checked.add(index)
        return tensors

    def check_values(self) -> list[str]:
        """Read every shard and find non-finite activations (NaN/inf); returns the problems (empty when clean).

        Consumers check each shard once, when they first read it (:meth:`load_shard` raises); this
        reads the whole store at once (``posttrain-probe store info --check-values``).
        """
        problems = []
        for shard in self.manifest.shards:
            file = self.path / shard["file"]
            try:
                problem = _nonfinite_problem(load_file(file)["acts"], file)
            except (OSError, SafetensorError, KeyError) as err:
                problem = f"cannot read shard {file}: {err}"
            if problem is not None:
                problems.append(problem)
        return problems

    def chunks(self, *, shuffle: bool, seed: int, epochs: int | None) -> Iterator[torch.Tensor]:
        """Shards' activations [n, d] (store dtype), in a new random order per epoch with ``shuffle``."""
        return shard_chunks(
            lambda i: self.load_shard(i)["acts"], self.n_shards, shuffle=shuffle, seed=seed, epochs=epochs
        )


def _nonfinite_problem(acts: torch.Tensor, file: Path) -> str | None:
    """None when every activation of a shard is finite, else a one-line description (count, first token row).

    One reduction pass decides (NaN and +-inf propagate to aminmax's extremes: ~50x cheaper than
    ``isfinite().all()`` on a bf16 shard); the elementwise pass runs only to describe a bad shard."""
    if acts.numel() == 0:
        return None
    low, high = torch.aminmax(acts)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return None
    finite = torch.isfinite(acts)
    bad_rows = (~finite).any(dim=1)
    first = int(bad_rows.nonzero()[0, 0])
    return f"shard {file} holds {int((~finite).sum())} non-finite activations (NaN/inf) in {int(bad_rows.sum())} of {acts.shape[0]} tokens, first at row {first}"


def shard_chunks(
    load: Callable[[int], torch.Tensor],
    n_shards: int,
    *,
    shuffle: bool,
    seed: int,
    epochs: int | None,
    prefetch: int = 2,
) -> Iterator[torch.Tensor]:
    """``load(i)`` for every shard, in a new random order per epoch with ``shuffle``, loading
    (reading + verifying) up to ``prefetch`` shards ahead on threads while one is consumed."""
    from concurrent.futures import ThreadPoolExecutor

    if n_shards == 0:
        raise ProbeError("the activation store holds no tokens")

    def order() -> Iterator[int]:
        epoch = 0
        while epochs is None or epoch < epochs:
            if shuffle:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                yield from torch.randperm(n_shards, generator=generator).tolist()
            else:
                yield from range(n_shards)
            epoch += 1

    # Two shards in flight: reading and sha256 release the GIL, so they overlap with the consumer.
    with ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="shard-prefetch") as pool:
        pending: deque = deque()
        for index in order():
            pending.append(pool.submit(load, index))
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
