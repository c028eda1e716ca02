"""The on-disk activation store: one model, one site, a fixed token sequence (docs/design.md).

Layout of a store directory::

    manifest.json              format + version, model, layer, d_model, dtype, token count,
                               token fingerprint, shard list (tokens, xxh3_128, data cursor)
    shard-00000.safetensors    acts [n, d] (store dtype), token_ids [n] int32,
                               doc_ids [n] int64, positions [n] int32; metadata format,
                               layer, values: finite (see shard_metadata)

A shard's activations stream into its file as they are written (no shard-sized buffer in memory): the writer
reserves the header's space, appends each write's ``acts`` after it, and at the cut appends the token tensors and
fills in the header (a plain safetensors file; its header padded with spaces, as the format allows). Shards are
written to a temporary name and renamed; the manifest is rewritten atomically after
each shard, so a killed writer loses at most the shard in flight and resumes from there. A
writer holds the store's lock (:mod:`posttrain_probe.locks`; ``.probe.lock``, per rank in a
distributed write) from opening to :meth:`ActivationStoreWriter.close`. In a
distributed run rank r writes ``shard-rNNN-XXXXX.safetensors`` and ``manifest.rankNNN.json``;
:func:`merge_rank_manifests` (rank 0, after a barrier) joins them into ``manifest.json``.

Only safetensors and JSON are read; every shard is checked against its checksum (xxh3_128; sha256 in version-1 stores)
before use, and its activations for NaN/inf unless the checksum vouches for the writer's own check.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

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


def shard_metadata(layer: int) -> dict[str, str]:
    """The safetensors metadata of each shard the writer makes: the format, the layer, and ``values: finite``.

    The writer refuses non-finite activations, so a shard that carries the mark and matches its checksum holds the
    bytes that were checked: a verified read skips the second look (shards of other tools, or of older writers, lack
    the mark and are checked when read)."""
    return {"format": FORMAT, "layer": str(layer), "values": "finite"}


_SAFETENSORS_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.int64: "I64",
}
_TOKEN_TENSORS = (("doc_ids", torch.int64), ("positions", torch.int32), ("token_ids", torch.int32))
"""A shard's token tensors in file order, after ``acts`` (int64 first: aligned whenever acts' bytes are a multiple of 8)."""


def _shard_header(n_tokens: int | None, d_model: int, dtype: torch.dtype, metadata: Mapping[str, str]) -> bytes:
    """The JSON header of a shard of ``n_tokens`` (safetensors format; tensors in file order, unpadded).

    ``n_tokens=None`` gives the longest header a shard can have (every number 20 digits): the space a writer reserves
    before it knows where the shard will be cut."""
    widest = 10**19
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor_dtype, shape in (
        ("acts", dtype, [n_tokens, d_model]),
        *((k, t, [n_tokens]) for k, t in _TOKEN_TENSORS),
    ):
        end = offset + (0 if n_tokens is None else math.prod(shape) * tensor_dtype.itemsize)
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor_dtype],
            "shape": [widest if n_tokens is None else size for size in shape],
            "data_offsets": [widest, widest] if n_tokens is None else [offset, end],
        }
        offset = end
    return json.dumps(header, separators=(",", ":")).encode()


def _write_all(handle: Any, data: torch.Tensor | bytes) -> None:
    """Write bytes, or a contiguous CPU tensor's bytes (no copy), at an unbuffered file's position."""
    view = memoryview(data.reshape(-1).view(torch.uint8).numpy() if isinstance(data, torch.Tensor) else data)
    while view:
        view = view[handle.write(view) :]


def _on_thread(function: Callable[..., Any], *args: Any) -> Future:
    """Start ``function(*args)`` on a new thread; its result or exception comes from the returned future.

    For the store's I/O and hashing, which release the GIL: file writes, xxhash and hashlib on large buffers."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as err:  # handed to the caller by future.result()
            future.set_exception(err)

    threading.Thread(target=run, name="activation-store-io", daemon=True).start()
    return future


def _tokens_digest(token_ids: torch.Tensor, doc_ids: torch.Tensor, positions: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in (token_ids, doc_ids, positions):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


class ActivationStoreWriter:
    """Append activations of one model at one site to a store directory, resumably.

    ``write`` appends to the shard being written (its activations go straight to the shard's temporary file, its
    tokens are kept); a shard is flushed once it holds at least ``shard_tokens`` tokens, cut
    at a ``write`` boundary so that each shard records the caller's data ``cursor`` (e.g. number of
    source batches consumed). Reopening an incomplete store resumes it: ``cursor`` and
    ``n_tokens`` say where it stopped. Reopening with a different layer, width, dtype, model or
    source raises ProbeError rather than mixing data.

    ``fsync=True`` makes each shard, then the manifest that lists it, durable before the writer goes on (a power
    loss then loses at most the shard in flight). By default files reach the disk at the kernel's pace, as a plain
    ``save_file`` does: a killed writer still loses at most the shard in flight (the renames are ordered), a power
    loss may lose more. (On ext4 an fsync also waits for a journal commit, which first writes out other files'
    dirty data: seconds per shard while gigabytes are being written.)
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
        self._metadata = shard_metadata(self.manifest.layer)
        # JSON bytes reserved for the header at the start of each shard file (a multiple of 8: aligned data).
        widest = len(_shard_header(None, self.manifest.d_model, self._torch_dtype, self._metadata))
        self._header_space = widest + -widest % 8
        # The shard being written: its temporary file (acts appended after the header space) and its tokens.
        self._shard_file: Any = None
        self._shard_tmp: Path | None = None
        self._buffered = 0
        self._token_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffer_cursor: int | None = None
        self._staging = torch.empty(0, self.manifest.d_model, dtype=self._torch_dtype)  # for acts needing a copy
        self._lost: str | None = None  # set when a disk error lost the shard being written

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
        """Check the flushed shards of this writer (this rank's) against their checksums; returns the problems."""
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
        self._refuse_after_loss()
        data = acts.detach()
        if data.device.type != "cpu" or data.dtype != self._torch_dtype or not data.is_contiguous():
            if self._staging.shape[0] < n:
                self._staging = torch.empty(n, self.manifest.d_model, dtype=self._torch_dtype)
            data = self._staging[:n]
            data.copy_(acts.detach())  # dtype conversion and device -> host copy in one step
        tokens = (
            token_ids.detach().to("cpu", torch.int32),
            doc_ids.detach().to("cpu", torch.int64),
            positions.detach().to("cpu", torch.int32),
        )
        try:
            if self._shard_file is None:
                self._shard_tmp = self._shard_paths()[1]
                self._shard_file = open(self._shard_tmp, "wb", buffering=0)  # closed by flush or release
                self._shard_file.seek(8 + self._header_space)
            start = self._shard_file.tell()
            # The file write (the kernel's copy into the page cache, GIL released) runs on a thread while this one
            # checks the values; non-finite values are cut off the file again.
            writing = _on_thread(_write_all, self._shard_file, data)
            try:
                low, high = torch.aminmax(data)  # NaN propagates; far cheaper than isfinite().all()
            finally:
                writing.exception()  # the write has finished, whatever happened here
            writing.result()
            if not (torch.isfinite(low) and torch.isfinite(high)):
                self._shard_file.seek(start)
                self._shard_file.truncate()
                raise ProbeError(
                    f"activations written to {self.path} contain NaN or inf; nothing of this write was kept"
                )
        except OSError as err:
            self._lose_shard(err)
        self._token_parts.append(tokens)
        self._buffered += n
        self._buffer_cursor = cursor if cursor is not None else (self._buffer_cursor or self.cursor)
        if self._buffered >= self.shard_tokens:
            self.flush()

    def _shard_paths(self) -> tuple[Path, Path]:
        """(final path, temporary path) of the shard being written."""
        final = self.path / shard_name(len(self.manifest.shards), self.rank, self.world_size)
        return final, final.with_name(f".{final.name}.tmp-{os.getpid()}")

    def _discard_shard(self) -> None:
        """Close and delete the temporary file of the shard being written, and forget its tokens."""
        if self._shard_file is not None:
            self._shard_file.close()
            self._shard_file = None
        if self._shard_tmp is not None:
            self._shard_tmp.unlink(missing_ok=True)
            self._shard_tmp = None
        self._buffered, self._token_parts, self._buffer_cursor = 0, [], None

    def _lose_shard(self, err: BaseException) -> None:
        """A disk error while writing the shard in flight: drop it and refuse further writes (reopen to resume)."""
        final = self._shard_paths()[0]
        self._discard_shard()
        self._lost = f"disk error while writing shard {final}: {err}"
        raise ProbeError(
            f"{self._lost}; the store keeps its {len(self.manifest.shards)} complete shards and resumes from there"
        ) from err

    def _refuse_after_loss(self) -> None:
        if self._lost is not None:
            raise ProbeError(
                f"activation store {self.path} lost the shard being written ({self._lost}); reopen the store to "
                f"resume from its {len(self.manifest.shards)} complete shards (cursor {self.cursor})"
            )

    def flush(self) -> None:
        """Write everything buffered as one shard and update the manifest (no-op when empty)."""
        if not self._buffered:
            return
        self._refuse_after_loss()
        token_ids, doc_ids, positions = (torch.cat(parts) for parts in zip(*self._token_parts))
        index = len(self.manifest.shards)
        final, tmp = self._shard_paths()[0], self._shard_tmp
        header = _shard_header(self._buffered, self.manifest.d_model, self._torch_dtype, self._metadata)
        algorithm = "sha256" if self.manifest.format_version == 1 else "xxh3_128"  # a resumed v1 store stays v1
        try:
            tokens = {"doc_ids": doc_ids, "positions": positions, "token_ids": token_ids}
            for name, _ in _TOKEN_TENSORS:
                _write_all(self._shard_file, tokens[name])
            self._shard_file.seek(0)
            _write_all(self._shard_file, struct.pack("<Q", self._header_space) + header.ljust(self._header_space))
            if self.fsync:
                os.fsync(self._shard_file.fileno())
            self._shard_file.close()
            self._shard_file = None
            checksum = file_checksum(tmp, algorithm)  # hashed from the page cache the writes just filled
            os.replace(tmp, final)
            self._shard_tmp = None
        except OSError as err:
            self._lose_shard(err)
        shard = {
            "file": final.name,
            "n_tokens": int(self._buffered),
            algorithm: checksum,
            "tokens_sha256": _tokens_digest(token_ids, doc_ids, positions),
            "cursor": int(self._buffer_cursor if self._buffer_cursor is not None else index + 1),
            "rank": self.rank,
        }
        self.manifest.shards.append(shard)
        try:
            self._write_manifest()
        except ProbeError as err:
            self.manifest.shards.pop()
            final.unlink(missing_ok=True)
            self._discard_shard()
            self._lost = str(err)
            raise
        self._buffered, self._token_parts, self._buffer_cursor = 0, [], None

    def _write_manifest(self) -> None:
        write_atomic(self._manifest_path, self.manifest.to_json().encode(), fsync=self.fsync, what="manifest")

    def truncate(self, cursor: int) -> None:
        """Drop flushed shards whose cursor is beyond ``cursor`` (to re-align paired stores on resume)."""
        if self._buffered:
            raise ProbeError("truncate() needs an empty write buffer; call it right after opening the store")
        self._discard_shard()  # the empty file a refused first write may have left open
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
            self._refuse_after_loss()  # never mark a store with a lost shard complete
            self.flush()
            if complete and not self.manifest.complete:
                self.manifest.complete = True
                self._write_manifest()
        finally:
            self.release()

    def release(self) -> None:
        """Give up the store's lock without flushing (after an error; :meth:`close` does it too): the shard being
        written, if any, is deleted (a reopened writer resumes after the last flushed shard)."""
        try:
            self._discard_shard()
        finally:
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

    Every shard is checked against the manifest's checksum the first time this object loads it
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
        """None if shard ``index`` exists and matches its checksum, else a description of the problem."""
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
            with safe_open(str(file), framework="pt") as handle:
                checked_when_written = (handle.metadata() or {}).get("values") == "finite"
                tensors = handle.get_tensors()
        except (OSError, SafetensorError) as err:
            raise ProbeError(f"cannot read shard {file}: {err}") from err
        if tensors["acts"].shape != (shard["n_tokens"], self.d_model):
            raise ProbeError(
                f"shard {file} holds acts {tuple(tensors['acts'].shape)}, manifest says [{shard['n_tokens']}, {self.d_model}]"
            )
        if index not in self._values_checked:
            # Verified bytes of a writer that refused non-finite values need no second look (shard_metadata).
            if not (self.verify and checked_when_written):
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

    # Two shards in flight: reading and hashing release the GIL, so they overlap with the consumer.
    with ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="shard-prefetch") as pool:
        pending: deque = deque()
        for index in order():
            pending.append(pool.submit(load, index))
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
