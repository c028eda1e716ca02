"""Datasets as token batches: local files, `datasets` names or `synthetic:<name>`, tokenised lazily.

A document is one row of the dataset: its text column, or its chat ``messages`` rendered with the
tokenizer's chat template. Each document becomes one sequence, truncated at ``seq_len`` tokens
and right-padded within its batch; ``doc_ids`` are dataset row indices.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from posttrain_probe.errors import ProbeError

TEXT_COLUMNS = ("text", "messages", "content", "prompt", "question")
_FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class TokenBatch(NamedTuple):
    """One batch of documents as model inputs."""

    input_ids: torch.Tensor
    """[B, T] int64 token ids, right-padded."""
    attention_mask: torch.Tensor
    """[B, T] int64, 1 on real tokens, 0 on padding."""
    doc_ids: torch.Tensor
    """[B] int64 row index of each document in the dataset."""


def load_dataset_spec(
    spec: Any,
    *,
    split: str = "train",
    config_name: str | None = None,
    n_docs: int | None = None,
):
    """A `datasets.Dataset` from a spec: a Dataset, a list of strings, a local file/folder
    (.txt one document per line, .jsonl/.json/.parquet/.csv), a mixture YAML (:func:`load_mixture`), ``synthetic:<name>`` from
    :mod:`posttrain_probe.synthetic`, or a `datasets` hub name with ``config_name``/``split``.
    ``n_docs`` keeps the first n rows. Raises ProbeError for unknown or empty datasets.
    """
    import datasets

    if n_docs is not None and n_docs < 1:  # before reading anything
        raise ProbeError(f"n_docs must be >= 1, got {n_docs}")
    if isinstance(spec, datasets.Dataset):
        dataset = spec
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        if not all(isinstance(text, str) for text in spec):
            raise ProbeError("a list dataset must hold strings (one document each)")
        dataset = datasets.Dataset.from_dict({"text": list(spec)})
    elif isinstance(spec, (str, os.PathLike)):
        dataset = _load_named(str(spec), split=split, config_name=config_name, n_docs=n_docs)
    else:
        raise ProbeError(f"unsupported dataset {spec!r}: expected a datasets.Dataset, a list of str or a spec string")
    if n_docs is not None and n_docs < len(dataset):
        dataset = dataset.select(range(n_docs))
    if len(dataset) == 0:
        raise ProbeError(f"dataset {spec if isinstance(spec, (str, os.PathLike)) else type(spec).__name__} is empty")
    return dataset


def _load_named(spec: str, *, split: str, config_name: str | None, n_docs: int | None):
    import datasets

    if spec.startswith("synthetic:"):
        from posttrain_probe.synthetic import synthetic_dataset

        return synthetic_dataset(spec.split(":", 1)[1], n=n_docs or 512)
    path = Path(spec).expanduser()
    if path.suffix.lower() in MIXTURE_SUFFIXES and path.is_file():
        return load_mixture(path, n_docs=n_docs)
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ProbeError(f"unsupported dataset file {path}: expected one of {', '.join(_FILE_BUILDERS)}")
            size = path.stat().st_size
            if size == 0 or (size < 4096 and not path.read_bytes().strip()):
                raise ProbeError(f"dataset file {path} is empty: expected at least one document")
            if builder == "text":
                lines = [line for line in path.read_text().splitlines() if line.strip()]
                return datasets.Dataset.from_dict({"text": lines})
            if n_docs is not None and path.suffix.lower() == ".jsonl":
                head = _jsonl_rows(path, n_docs)
                if head is not None:
                    return datasets.Dataset.from_list(head)
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            return datasets.load_dataset(str(path), config_name, split=split)
        if spec.startswith((".", "/", "~")) or path.suffix.lower() in _FILE_BUILDERS:
            raise ProbeError(f"dataset file {spec} does not exist")
        return datasets.load_dataset(spec, config_name, split=split)
    except ProbeError:
        raise
    except Exception as err:  # datasets raises many types (hub, network, schema)
        raise ProbeError(
            f"cannot load dataset {spec!r} (config {config_name!r}, split {split!r}): {type(err).__name__}: {err}. "
            "Expected a local .txt/.jsonl/.json/.parquet/.csv file, a `datasets` name, or synthetic:<name>"
        ) from err


def load_rows(
    spec: Any, *, split: str = "train", config_name: str | None = None, n_docs: int | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of :func:`load_dataset_spec` (same arguments, same errors) as Python dicts, and the column names.

    The rows are what ``Dataset.to_list()`` gives (a dataset with a format or transform of its own is iterated, so
    the rows are the ones it yields), except for the first ``n_docs`` rows of a local ``.jsonl`` file: those are
    read straight into dicts, with no Arrow table in between, so their values are the JSON values as written. The
    columns are the first row's keys, as ``Dataset.from_list`` takes them (a later row's missing key is None, its
    extra keys are dropped); nested objects keep their own keys (Arrow would give each the keys of all, missing
    ones None), and a column may mix types (Arrow refuses str with int).
    """
    if n_docs is not None and n_docs >= 1 and isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if path.suffix.lower() == ".jsonl" and path.is_file():
            rows = _jsonl_rows(path, n_docs)
            if rows is not None:
                return rows, list(rows[0])
    data = load_dataset_spec(spec, split=split, config_name=config_name, n_docs=n_docs)
    # Dataset.to_list converts in one pass; iterating formats each row on its own (8x slower)
    rows = data.to_list() if data.format["type"] is None else list(data)
    return rows, list(data.column_names)


def _jsonl_rows(path: Path, n_docs: int) -> list[dict[str, Any]] | None:
    """The first ``n_docs`` rows of a JSON Lines file, reading only those lines (a 10 GB file with ``--max-docs 50``
    is not converted whole), with the first row's keys in every row; None when a row is not a JSON object or there is
    none (``datasets`` reads the file then)."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if len(rows) >= n_docs:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ProbeError(
                    f"dataset file {path} line {number} is not valid JSON ({err}): expected one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                return None
            rows.append(row)
    if not rows:
        return None
    if not rows[0]:
        raise ProbeError(
            f"dataset file {path}: its first row is {{}}: expected JSON objects with the document's columns"
        )
    columns = list(rows[0])
    return [row if list(row) == columns else {k: row.get(k) for k in columns} for row in rows]


MIXTURE_SUFFIXES = (".yaml", ".yml")
"""A dataset spec that is a YAML file names a mixture (:func:`load_mixture`)."""


def load_mixture(path: str | os.PathLike, *, n_docs: int | None = None):
    """A mixture of datasets from a YAML file -> one ``datasets.Dataset`` with a ``source`` column (the source's
    ``name``, default its dataset spec). ``n_docs`` caps the rows read per source.

    * ``strategy: interleave`` (default): documents of each source drawn at random by ``weight`` (seeded) until the
      first source runs out; weights are shares of documents, not tokens (reasoning traces are longer than most
      web pages). ``strategy: concatenate``: every row of every source, in order (weights unused).
    * Each source keeps one text column as ``text`` (``column``, default the first of TEXT_COLUMNS), or several
      renamed columns (``columns: {new name: its column}``, e.g. a problem set's problem and gold answer).

    File format (relative local paths are relative to the YAML's folder)::

        seed: 0
        mixture:
          - {dataset: open-thoughts/OpenThoughts-114k, config: metadata, column: deepseek_reasoning, weight: 0.5}
          - {dataset: HuggingFaceFW/fineweb-edu, config: sample-10BT, column: text, weight: 0.5, name: web}
    """
    import datasets
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ProbeError(f"dataset mixture {path}: not valid YAML ({err})") from None
    entries = data.get("mixture") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ProbeError(f"dataset mixture {path}: expected a mapping with a non-empty list `mixture:` of sources")
    strategy = data.get("strategy", "interleave")
    if strategy not in ("interleave", "concatenate"):
        raise ProbeError(f"dataset mixture {path}: strategy={strategy!r}: expected interleave or concatenate")
    parts, weights = [], []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "dataset" not in entry:
            raise ProbeError(
                f"dataset mixture {path}, source {index}: expected a mapping with dataset: (and column, weight)"
            )
        unknown = sorted(set(entry) - {"dataset", "config", "split", "column", "columns", "weight", "name"})
        if unknown:
            raise ProbeError(
                f"dataset mixture {path}, source {index}: unknown key {unknown[0]!r}: expected dataset, config, split, column(s), weight, name"
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ProbeError(f"dataset mixture {path}, source {index}: weight={weight!r}: expected a number > 0")
        spec = str(entry["dataset"])
        local = Path(spec).expanduser()
        if not local.is_absolute() and (path.parent / local).exists():
            spec = str(path.parent / local)
        dataset = load_dataset_spec(
            spec, split=entry.get("split", "train"), config_name=entry.get("config"), n_docs=n_docs
        )
        if isinstance(entry.get("columns"), dict) and entry["columns"]:
            renames = {str(new): str(old) for new, old in entry["columns"].items()}
        else:
            renames = {"text": text_column(dataset, entry.get("column"))}
        missing = [old for old in renames.values() if old not in dataset.column_names]
        if missing:
            raise ProbeError(
                f"dataset mixture {path}, source {index}: column {missing[0]!r} is not in the dataset: expected one of {dataset.column_names}"
            )
        dataset = dataset.select_columns(list(renames.values()))
        dataset = dataset.rename_columns({old: new for new, old in renames.items() if old != new})
        name = str(entry.get("name") or entry["dataset"])
        parts.append(dataset.add_column("source", [name] * len(dataset)))
        weights.append(float(weight))
    if len(parts) == 1:
        return parts[0]
    if strategy == "concatenate":
        return datasets.concatenate_datasets(parts)
    total = sum(weights)
    return datasets.interleave_datasets(
        parts,
        probabilities=[w / total for w in weights],
        seed=int(data.get("seed", 0)),
        stopping_strategy="first_exhausted",
    )


def text_column(dataset, column: str | None = None) -> str:
    """The column holding documents: ``column`` if given, else the first of TEXT_COLUMNS present."""
    names = list(dataset.column_names)
    if column is not None:
        if column not in names:
            raise ProbeError(f"column {column!r} is not in the dataset: expected one of {names}")
        return column
    for candidate in TEXT_COLUMNS:
        if candidate in names:
            return candidate
    raise ProbeError(f"no text column found among {names}: pass column= (expected one of {list(TEXT_COLUMNS)})")


def render_document(value: Any, tokenizer) -> str:
    """A document as text: strings as they are, chat message lists through the chat template."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(value, tokenize=False)
        return "\n".join(str(m["content"]) for m in value)
    raise ProbeError(f"cannot turn a {type(value).__name__} into a document: expected str or a list of chat messages")


def dataset_fingerprint(dataset, column: str | None = None, *, n_rows: int = 256) -> str:
    """sha256 of the row count and the first ``n_rows`` documents: tells datasets apart cheaply.

    Used to refuse resuming a store with other data (in-memory datasets have no stable
    fingerprint of their own).
    """
    import hashlib
    import json

    column = text_column(dataset, column)
    digest = hashlib.sha256(f"{len(dataset)}\n".encode())
    digest.update(json.dumps(dataset[:n_rows][column], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], int)


def n_batches(dataset, batch_size: int) -> int:
    """Number of batches :func:`token_batches` yields for ``dataset``."""
    return math.ceil(len(dataset) / batch_size)


def token_batches(
    dataset,
    tokenizer,
    *,
    column: str | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    start_batch: int = 0,
    step: int = 1,
) -> Iterator[TokenBatch]:
    """Tokenise ``dataset`` lazily into :class:`TokenBatch` es of ``batch_size`` documents.

    Plain text gets the tokenizer's special tokens (e.g. BOS); chat messages are rendered with
    the chat template, which carries its own; a column of token-id lists is used as it is. Yields batches ``start_batch, start_batch + step,
    ...`` (resume; one rank's share), tokenising only those.
    """
    if seq_len < 2:
        raise ProbeError(f"seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ProbeError(f"batch_size must be >= 1, got {batch_size}")
    column = text_column(dataset, column)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for index in range(start_batch, n_batches(dataset, batch_size), step):
        start = index * batch_size
        values = dataset[start : start + batch_size][column]
        if values and _is_token_ids(values[0]):  # already tokenised (e.g. a Trainer's processed dataset)
            encoded = [list(ids)[:seq_len] for ids in values]
        else:
            chat = bool(values) and not isinstance(values[0], str)
            texts = [render_document(value, tokenizer) for value in values]
            encoded = tokenizer(texts, truncation=True, max_length=seq_len, add_special_tokens=not chat)["input_ids"]
        width = max(1, max(len(ids) for ids in encoded))
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        yield TokenBatch(input_ids, attention_mask, torch.arange(start, start + len(encoded), dtype=torch.long))
