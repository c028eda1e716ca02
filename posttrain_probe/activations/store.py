"""The on-disk activation store: one model, one site, a fixed token sequence (DESIGN.md).

Layout of a store directory::

    manifest.json              format + version, model, layer, d_model, dtype, token count,
                               token fingerprint, shard list (tokens, sha256, data cursor)
    shard-00000.safetensors    acts [n, d] (store dtype), token_ids [n] int32,
                               doc_ids [n] int64, positions [n] int32

Shards are written to a temporary name and renamed; the manifest is rewritten atomically after
each shard, so a killed writer loses at most the shard in flight and resumes from there. In a
distributed run rank r writes ``shard-rNNN-XXXXX.safetensors`` and ``manifest.rankNNN.json``;
:func:`merge_rank_manifests` (rank 0, after a barrier) joins them into ``manifest.json``.

Only safetensors and JSON are read; every shard is checked against its sha256 before use.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from posttrain_probe.activations.shuffle import ActivationSource
from posttrain_probe.errors import ProbeError

FORMAT = "posttrain-probe/activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
# Keys that must agree between a store on disk and a writer that wants to append to it.
_IDENTITY_KEYS = ("layer", "d_model", "dtype", "model", "source")


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical store dtype name ('bfloat16', 'float16', 'float32') for a string or torch dtype."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
    else:
        name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
        if name in DTYPES:
            return name
    raise ProbeError(f"unsupported activation dtype {dtype!r}: expected one of bf16, fp16, fp32")


def _shard_name(index: int, rank: int, world_size: int) -> str:
    if world_size == 1:
        return f"shard-{index:05d}.safetensors"
    return f"shard-r{rank:03d}-{index:05d}.safetensors"


def _manifest_name(rank: int, world_size: int) -> str:
    return MANIFEST if world_size == 1 else f"manifest.rank{rank:03d}.json"


def _tokens_digest(token_ids: torch.Tensor, doc_ids: torch.Tensor, positions: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in (token_ids, doc_ids, positions):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def token_fingerprint(shards: list[dict[str, Any]]) -> str:
    """sha256 over the token digests of the shards, in order (token ids, doc ids, positions, boundaries)."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"{shard['n_tokens']}:{shard['tokens_sha256']}\n".encode())
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes, *, fsync: bool, what: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ProbeError(f"disk error while writing {what} {path}: {err}") from err


@dataclass
class StoreManifest:
    """The content of ``manifest.json`` (see the module docstring); JSON-serialisable."""

    layer: int
    """Site: residual stream entering decoder block `layer` (SPEC sec. 1)."""
    d_model: int
    """Width of the stored activations."""
    dtype: str
    """Storage dtype of `acts`: bfloat16, float16 or float32."""
    model: dict[str, Any]
    """Model identity: at least `name`; `path` and `architecture` when known."""
    source: dict[str, Any] = field(default_factory=dict)
    """How the tokens were produced (dataset, seq_len, exclusions, tokenizer fingerprint, ...)."""
    shards: list[dict[str, Any]] = field(default_factory=list)
    """Per shard: file, n_tokens, sha256 (file bytes), tokens_sha256, cursor, rank."""
    complete: bool = False
    """True once the writer closed normally; an incomplete store can be resumed."""
    rank: int = 0
    """Writing rank (rank manifests) or 0 (merged/single-process)."""
    world_size: int = 1
    """Number of ranks that wrote shards into this directory."""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def n_tokens(self) -> int:
        return sum(int(s["n_tokens"]) for s in self.shards)

    @property
    def token_fingerprint(self) -> str:
        return token_fingerprint(self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["n_tokens"] = self.n_tokens
        data["token_fingerprint"] = self.token_fingerprint
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> StoreManifest:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ProbeError(f"cannot read activation-store manifest {path}: {err}") from err
        if data.get("format") != FORMAT:
            raise ProbeError(f"{path} is not an activation-store manifest (format {data.get('format')!r}, expected {FORMAT!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ProbeError(
                f"{path} has store format version {data.get('format_version')}, this posttrain-probe reads version {FORMAT_VERSION}"
            )
        data.pop("n_tokens", None)
        data.pop("token_fingerprint", None)
        return cls(**data)


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
        self._manifest_path = self.path / _manifest_name(rank, world_size)
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
        self.path.mkdir(parents=True, exist_ok=True)
        self._check_world_size()
        if self._manifest_path.exists():
            have = StoreManifest.read(self._manifest_path)
            for key in _IDENTITY_KEYS:
                if getattr(have, key) != getattr(wanted, key):
                    raise ProbeError(
                        f"{self.path} already holds a different activation store: {key} is "
                        f"{getattr(have, key)!r} there, {getattr(wanted, key)!r} here; "
                        "choose another output directory or delete that one"
                    )
            manifest = have
        else:
            ours = re.compile(r"^(\.)?(shard-.*\.safetensors|manifest.*\.json)(\.tmp-\d+)?$")
            foreign = [p.name for p in self.path.iterdir() if not ours.match(p.name)]
            if foreign:
                raise ProbeError(
                    f"output directory {self.path} is not empty and holds no activation store "
                    f"(found {', '.join(sorted(foreign)[:5])}); choose an empty or new directory"
                )
            manifest = wanted
        self._remove_orphans(manifest)
        return manifest

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
            mine = name.startswith(prefix) or name.startswith("." + prefix) or name.startswith(f".{self._manifest_path.name}.tmp-")
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
            (token_ids.detach().to("cpu", torch.int32), doc_ids.detach().to("cpu", torch.int64), positions.detach().to("cpu", torch.int32))
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
        name = _shard_name(index, self.rank, self.world_size)
        final = self.path / name
        tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
        tensors = {"acts": self._acts[: self._buffered], "token_ids": token_ids, "doc_ids": doc_ids, "positions": positions}
        try:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "layer": str(self.manifest.layer)})
            if self.fsync:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            sha = _sha256_file(tmp)  # hashed from the page cache the write just filled
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
            "sha256": sha,
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
        _write_atomic(self._manifest_path, self.manifest.to_json().encode(), fsync=True, what="manifest")

    def truncate(self, cursor: int) -> None:
        """Drop flushed shards whose cursor is beyond ``cursor`` (to re-align paired stores on resume)."""
        if self._buffered:
            raise ProbeError("truncate() needs an empty write buffer; call it right after opening the store")
        keep = [s for s in self.manifest.shards if int(s["cursor"]) <= cursor]
        dropped = self.manifest.shards[len(keep):]
        if not dropped:
            return
        self.manifest.shards = keep
        self.manifest.complete = False
        self._write_manifest()
        for shard in dropped:
            (self.path / shard["file"]).unlink(missing_ok=True)

    def close(self, *, complete: bool = True) -> None:
        """Flush the buffer; with ``complete=True`` mark the store finished (no further writes)."""
        self.flush()
        if complete and not self.manifest.complete:
            self.manifest.complete = True
            self._write_manifest()

    def __enter__(self) -> ActivationStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def merge_rank_manifests(path: str | os.PathLike) -> StoreManifest:
    """Join the per-rank manifests of a distributed write into ``manifest.json`` (call on one rank).

    Requires every rank's manifest to be present and complete. Shards are ordered by rank, then
    index. Returns the merged manifest.
    """
    path = Path(path)
    merged = _merged_rank_manifest(path)
    _write_atomic(path / MANIFEST, merged.to_json().encode(), fsync=True, what="manifest")
    return merged


def _merged_rank_manifest(path: Path) -> StoreManifest:
    ranks = sorted(path.glob("manifest.rank*.json"))
    if not ranks:
        raise ProbeError(f"{path} holds no activation store: no {MANIFEST} and no rank manifests")
    parts = [StoreManifest.read(p) for p in ranks]
    world = parts[0].world_size
    present = sorted(p.rank for p in parts)
    if present != list(range(world)):
        raise ProbeError(f"{path}: rank manifests for ranks {present} found, expected ranks 0..{world - 1}")
    unfinished = [p.rank for p in parts if not p.complete]
    if unfinished:
        raise ProbeError(f"{path}: ranks {unfinished} have not finished writing (their manifests are incomplete)")
    first = parts[0]
    for part in parts[1:]:
        for key in _IDENTITY_KEYS:
            if getattr(part, key) != getattr(first, key):
                raise ProbeError(f"{path}: rank {part.rank} wrote a different {key} than rank 0")
    return StoreManifest(
        layer=first.layer,
        d_model=first.d_model,
        dtype=first.dtype,
        model=first.model,
        source=first.source,
        shards=[s for part in sorted(parts, key=lambda p: p.rank) for s in part.shards],
        complete=True,
        rank=0,
        world_size=world,
    )


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return hashlib.sha256(b"").hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return hashlib.sha256(view).hexdigest()


class ActivationStore(ActivationSource):
    """Read an activation store directory: metadata, verified shards and shuffled batches.

    Every shard is checked against the manifest's sha256 the first time this object loads it
    (``verify=False`` skips that). Activations come back in raw model units;
    :meth:`iter_batches` serves shuffled [batch, d] batches.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ProbeError(f"activation store {self.path} does not exist (expected a directory with {MANIFEST})")
        manifest_path = self.path / MANIFEST
        self.manifest = StoreManifest.read(manifest_path) if manifest_path.exists() else _merged_rank_manifest(self.path)
        self.verify = verify
        self._verified: set[int] = set()
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
        return sum((self.path / s["file"]).stat().st_size for s in self.manifest.shards if (self.path / s["file"]).exists())

    def check_shard(self, index: int) -> str | None:
        """None if shard ``index`` exists and matches its sha256, else a description of the problem."""
        shard = self.manifest.shards[index]
        file = self.path / shard["file"]
        if not file.exists():
            return f"{shard['file']} is missing"
        actual = _sha256_file(file)
        if actual != shard["sha256"]:
            return f"{shard['file']} is corrupted: sha256 {actual[:12]}..., manifest says {shard['sha256'][:12]}..."
        return None

    def verify_all(self) -> list[str]:
        """Check every shard; returns the list of problems (empty when the store is intact)."""
        return [problem for i in range(self.n_shards) if (problem := self.check_shard(i)) is not None]

    def load_shard(self, index: int) -> dict[str, torch.Tensor]:
        """Shard ``index`` as ``{"acts": [n, d] store dtype, "token_ids", "doc_ids", "positions": [n]}``."""
        if not 0 <= index < self.n_shards:
            raise ProbeError(f"shard index {index} out of range: store {self.path} has {self.n_shards} shards")
        shard = self.manifest.shards[index]
        file = self.path / shard["file"]
        try:
            if self.verify and index not in self._verified:
                actual = _sha256_file(file)
                if actual != shard["sha256"]:
                    raise ProbeError(
                        f"shard {file} is corrupted: its sha256 is {actual}, the manifest says {shard['sha256']}; "
                        "re-collect this store"
                    )
                with self._lock:
                    self._verified.add(index)
            tensors = load_file(file)
        except (OSError, SafetensorError) as err:
            raise ProbeError(f"cannot read shard {file}: {err}") from err
        if tensors["acts"].shape != (shard["n_tokens"], self.d_model):
            raise ProbeError(f"shard {file} holds acts {tuple(tensors['acts'].shape)}, manifest says [{shard['n_tokens']}, {self.d_model}]")
        return tensors

    def chunks(self, *, shuffle: bool, seed: int, epochs: int | None) -> Iterator[torch.Tensor]:
        """Shards' activations [n, d] (store dtype), in a new random order per epoch with ``shuffle``."""
        return shard_chunks(lambda i: self.load_shard(i)["acts"], self.n_shards, shuffle=shuffle, seed=seed, epochs=epochs)

def shard_chunks(
    load: Callable[[int], torch.Tensor], n_shards: int, *, shuffle: bool, seed: int, epochs: int | None, prefetch: int = 2
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
