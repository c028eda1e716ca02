"""The activation store's metadata on disk: manifest.json, shard names, checksums (torch-free).

What :mod:`posttrain_probe.activations.store` writes and reads besides the tensors themselves, kept
free of torch so that ``posttrain-probe store info`` (checksums, counts, identity) starts at once.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain_probe.errors import ProbeError

FORMAT = "posttrain-probe/activation-store"
FORMAT_VERSION = 2
"""Version 2: each shard's file checksum is ``xxh3_128`` (xxHash3, 128 bit; ~10x faster than sha256 on one core, so a
verified read keeps up with the disk). Version 1 stores (``sha256`` per shard) are still read and resumed as written."""
READ_VERSIONS = (1, 2)
CHECKSUMS = ("xxh3_128", "sha256")
"""Shard checksum keys, by preference: a shard carries one of them."""
MANIFEST = "manifest.json"
# Keys that must agree between a store on disk and a writer that wants to append to it.
IDENTITY_KEYS = ("layer", "d_model", "dtype", "model", "source")


def difference(key: str, there: Any, here: Any) -> str:
    """``key is X there, Y here`` for the first differing entry (dotted path into nested dicts)."""
    while isinstance(there, Mapping) and isinstance(here, Mapping):
        differing = [k for k in sorted(set(there) | set(here), key=str) if there.get(k) != here.get(k)]
        if not differing:
            break
        key, there, here = f"{key}.{differing[0]}", there.get(differing[0]), here.get(differing[0])
    return f"{key} is {there!r} there, {here!r} here"


def shard_name(index: int, rank: int, world_size: int) -> str:
    if world_size == 1:
        return f"shard-{index:05d}.safetensors"
    return f"shard-r{rank:03d}-{index:05d}.safetensors"


def manifest_name(rank: int, world_size: int) -> str:
    return MANIFEST if world_size == 1 else f"manifest.rank{rank:03d}.json"


def token_fingerprint(shards: list[dict[str, Any]]) -> str:
    """sha256 over the token digests of the shards, in order (token ids, doc ids, positions, boundaries)."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"{shard['n_tokens']}:{shard['tokens_sha256']}\n".encode())
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes, *, fsync: bool, what: str) -> None:
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
    """Site: residual stream entering decoder block `layer` (docs/methods.md sec. 1)."""
    d_model: int
    """Width of the stored activations."""
    dtype: str
    """Storage dtype of `acts`: bfloat16, float16 or float32."""
    model: dict[str, Any]
    """Model identity: at least `name`; `path` and `architecture` when known."""
    source: dict[str, Any] = field(default_factory=dict)
    """How the tokens were produced (dataset, seq_len, exclusions, tokenizer fingerprint, ...)."""
    shards: list[dict[str, Any]] = field(default_factory=list)
    """Per shard: file, n_tokens, xxh3_128 (file bytes; sha256 in version-1 stores), tokens_sha256, cursor, rank."""
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
            raise ProbeError(
                f"{path} is not an activation-store manifest (format {data.get('format')!r}, expected {FORMAT!r})"
            )
        if data.get("format_version") not in READ_VERSIONS:
            raise ProbeError(
                f"{path} has store format version {data.get('format_version')}, this posttrain-probe reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}"
            )
        data.pop("n_tokens", None)
        data.pop("token_fingerprint", None)
        return cls(**data)


def merged_rank_manifest(path: Path) -> StoreManifest:
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
        for key in IDENTITY_KEYS:
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
        format_version=min(part.format_version for part in parts),  # version-1 ranks keep sha256 entries
    )


def file_checksum(path: Path, algorithm: str = "xxh3_128") -> str:
    """Hex checksum of a file's bytes (read through mmap, from the page cache when it is there): ``xxh3_128`` (format
    version 2) or ``sha256`` (version 1)."""
    if algorithm == "xxh3_128":
        import xxhash

        digest = xxhash.xxh3_128()
    elif algorithm == "sha256":
        digest = hashlib.sha256()
    else:
        raise ProbeError(f"unknown shard checksum {algorithm!r}: expected one of {', '.join(CHECKSUMS)}")
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size:
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                digest.update(view)
    return digest.hexdigest()


def shard_checksum(shard: Mapping[str, Any]) -> tuple[str, str]:
    """``(algorithm, expected hex)`` of a manifest's shard entry (xxh3_128, or sha256 in a version-1 store)."""
    for algorithm in CHECKSUMS:
        if algorithm in shard:
            return algorithm, str(shard[algorithm])
    raise ProbeError(f"shard entry {shard.get('file')!r} has no checksum: expected one of {', '.join(CHECKSUMS)}")


def shard_problem(path: Path, shard: Mapping[str, Any]) -> str | None:
    """None if ``shard``'s file exists under ``path`` and matches its checksum, else what is wrong."""
    file = path / shard["file"]
    if not file.exists():
        return f"{shard['file']} is missing"
    algorithm, expected = shard_checksum(shard)
    actual = file_checksum(file, algorithm)
    if actual != expected:
        return f"{shard['file']} is corrupted: {algorithm} {actual[:12]}..., manifest says {expected[:12]}..."
    return None


def read_manifest(path: str | os.PathLike) -> StoreManifest:
    """The manifest of the store directory ``path``: ``manifest.json``, or its finished rank manifests merged."""
    path = Path(path)
    if not path.is_dir():
        raise ProbeError(f"activation store {path} does not exist (expected a directory with {MANIFEST})")
    manifest_path = path / MANIFEST
    return StoreManifest.read(manifest_path) if manifest_path.exists() else merged_rank_manifest(path)


def shard_problems(path: str | os.PathLike, manifest: StoreManifest) -> list[str]:
    """Every shard of the store at ``path`` checked against its checksum: the problems (empty when intact)."""
    return [problem for shard in manifest.shards if (problem := shard_problem(Path(path), shard)) is not None]


def shard_bytes(path: str | os.PathLike, manifest: StoreManifest) -> int:
    """Bytes of the store's shard files on disk."""
    return sum((Path(path) / s["file"]).stat().st_size for s in manifest.shards if (Path(path) / s["file"]).exists())
