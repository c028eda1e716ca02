"""Collect paired activation stores of N models: ``out_dir/<name>/layer<L>/`` (resumable)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from posttrain_probe.activations.capture import capture_batch
from posttrain_probe.activations.config import CollectConfig
from posttrain_probe.activations.manifest import read_manifest, write_atomic
from posttrain_probe.activations.paired import COLLECT_INDEX
from posttrain_probe.activations.store import ActivationStoreWriter, merge_rank_manifests
from posttrain_probe.data import dataset_fingerprint, load_dataset_spec, token_batches
from posttrain_probe.errors import ProbeError
from posttrain_probe.layers import (
    architecture_name,
    decoder_blocks,
    default_layer,
    hidden_size,
    unwrap_model,
    validate_layer,
)
from posttrain_probe.locks import DirectoryLock
from posttrain_probe.model_identity import model_fingerprint
from posttrain_probe.models import (
    check_same_hidden_size,
    check_same_tokenizer,
    load_causal_lm,
    load_tokenizer,
    parse_model_specs,
    resolve_device,
    tokenizer_fingerprint,
)


class CollectResult(NamedTuple):
    """What :func:`collect` wrote: one activation store per model and layer under ``out``."""

    out: Path
    """The collect output directory (``collect.json`` and ``<name>/layer<L>/``)."""
    stores: dict[str, dict[int, Path]]
    """Store directory per model name and layer: ``out/<name>/layer<L>``."""
    index: dict[str, Any]
    """The content of ``collect.json``: models (name -> path, None for in-memory models), layers, source, config."""

    @property
    def layers(self) -> list[int]:
        """The collected sites."""
        return list(self.index["layers"])

    def n_tokens(self) -> dict[str, dict[int, int]]:
        """Kept tokens per model and layer, from the stores' manifests."""
        return {
            name: {layer: read_manifest(path).n_tokens for layer, path in per_layer.items()}
            for name, per_layer in self.stores.items()
        }

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``collect.json`` into ``out`` (the stores are written while collecting); returns ``{"collect": path}``."""
        path = Path(out) / COLLECT_INDEX
        write_atomic(path, json.dumps(self.index, indent=2).encode(), fsync=True, what="collect index")
        return {"collect": path}

    @classmethod
    def read(cls, out: str | os.PathLike) -> CollectResult:
        """The result of the collect run in ``out``, from its ``collect.json``."""
        out = Path(out)
        if not (out / COLLECT_INDEX).exists():
            raise ProbeError(f"{out} is not a collect output directory: {COLLECT_INDEX} is missing")
        index = json.loads((out / COLLECT_INDEX).read_text())
        stores = {name: {layer: out / name / f"layer{layer}" for layer in index["layers"]} for name in index["models"]}
        return cls(out, stores, index)


def collect(
    config: CollectConfig,
    *,
    models: Mapping[str, nn.Module] | None = None,
    dataset: Any = None,
    tokenizer=None,
    progress: bool = True,
) -> CollectResult:
    """Run paired truncated forwards of the models over the dataset and write one store per model and layer.

    The models are ``config.model`` (``NAME=PATH``: a local directory or hub name) followed by
    ``models``, already loaded models by name (pass ``tokenizer`` too, or models whose
    ``name_or_path`` holds one). The dataset is ``config.dataset``, or ``dataset``: anything
    :func:`~posttrain_probe.data.load_dataset_spec` takes (e.g. a ``datasets.Dataset``). Sites are
    ``config.layer`` (residual stream entering block L; empty: n_layers // 2).

    Writes ``out/<name>/layer<L>/`` and ``out/collect.json``; an interrupted run resumes when
    called again with the same arguments. Launched with several processes (``torchrun`` /
    ``accelerate launch``; accelerate's ``PartialState`` reads the launch environment) each rank
    takes every world_size-th batch on its own device and writes its own shards; rank 0 merges the
    manifests at the end.
    """
    specs: dict[str, str | nn.Module] = dict(parse_model_specs(config.model))
    twice = sorted(set(specs) & set(models or {}))
    if twice:
        raise ProbeError(f"models {twice} are given both as config.model and as models=: give each model once")
    specs.update(models or {})
    if not specs:
        raise ProbeError("collect needs at least one model: --model NAME=PATH (or models={name: model})")
    bad = [name for name in specs if not name or "/" in name or name.startswith(".")]
    if bad:
        raise ProbeError(
            f"model names {bad} cannot be used as directory names: expected plain names like base, sft, rl"
        )
    from accelerate import PartialState

    # cpu=True lets accelerate set up gloo for multi-process runs on machines without a GPU.
    state = PartialState(cpu=config.device == "cpu" or not torch.cuda.is_available())
    device = resolve_device(config.device) if config.device is not None else state.device
    # The main process holds the output directory (collect.json, merges) for the whole run.
    with contextlib.ExitStack() as held:
        if state.process_index == 0:
            held.enter_context(DirectoryLock(config.out, what="collect output"))
        tokenizer, loaded = _load_models(specs, tokenizer, config.layer, config, device)
        layers = _checked_layers(loaded, config.layer)
        data = load_dataset_spec(
            config.dataset if dataset is None else dataset,
            split=config.split,
            config_name=config.dataset_config,
            n_docs=config.n_docs,
        )
        source = _source_info(config, dataset, data, tokenizer, list(loaded), state.num_processes)
        writers = _open_writers(config, specs, loaded, layers, source, state, held)
        index = {
            "models": {n: None if isinstance(specs[n], nn.Module) else str(specs[n]) for n in loaded},
            "layers": layers,
            "source": source,
            "config": {k: v for k, v in asdict(config).items() if k not in _STEP_FIELDS},
        }
        result = CollectResult(
            config.out,
            {name: {layer: config.out / name / f"layer{layer}" for layer in layers} for name in loaded},
            index,
        )
        if state.process_index == 0:
            result.write(config.out)
        if not all(w.complete for w in writers.values()):
            _capture_into(
                writers, loaded, data, tokenizer, layers, config, state.process_index, state.num_processes, progress
            )
        if state.num_processes > 1:
            state.wait_for_everyone()
            if state.process_index == 0:
                for store in sorted({w.path for w in writers.values()}):
                    merge_rank_manifests(store)
            state.wait_for_everyone()
        return result


_STEP_FIELDS = ("model", "dataset", "out", "layer")
"""CollectConfig fields recorded elsewhere in collect.json (models, layers, source), not under ``config``."""


def _checked_layers(loaded: dict[str, nn.Module], layers: Sequence[int]) -> list[int]:
    """The sites to capture (default n_layers // 2 of the first model), checked against every model."""
    wanted = sorted(set(layers)) if layers else [default_layer(next(iter(loaded.values())))]
    for name, model in loaded.items():
        for layer in wanted:
            try:
                validate_layer(model, layer)
            except ProbeError as err:
                raise ProbeError(f"model {name!r}: {err}") from None
    return wanted


def _source_info(config: CollectConfig, dataset: Any, data, tokenizer, names: list[str], world: int) -> dict[str, Any]:
    """How the tokens are produced: the ``source`` of every store's manifest and of collect.json."""
    given = config.dataset if dataset is None else dataset
    dataset_name = given if isinstance(given, (str, os.PathLike)) else f"<{type(given).__name__} of {len(data)} rows>"
    return {
        "dataset": str(dataset_name),
        "dataset_sample_sha256": dataset_fingerprint(data, config.column),
        "split": config.split,
        "dataset_config": config.dataset_config,
        "column": config.column,
        "n_docs": len(data),
        "seq_len": config.seq_len,
        "batch_size": config.batch_size,
        "max_tokens": config.max_tokens,
        "outlier_factor": config.outlier_factor,
        "excluded": ["padding", "first position", "bos"],
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "paired_models": names,
        "world_size": world,
    }


def _open_writers(
    config: CollectConfig, specs, loaded, layers: list[int], source: dict[str, Any], state, held: contextlib.ExitStack
) -> dict[tuple[str, int], ActivationStoreWriter]:
    """One writer per model and layer (each locks this rank's files of its store until released)."""
    d_model = hidden_size(next(iter(loaded.values())))
    writers: dict[tuple[str, int], ActivationStoreWriter] = {}
    for name in loaded:
        for layer in layers:
            writers[name, layer] = ActivationStoreWriter(
                config.out / name / f"layer{layer}",
                layer=layer,
                d_model=d_model,
                model=_model_info(name, specs[name], loaded[name]),
                dtype=config.dtype,
                source=source,
                shard_tokens=config.shard_tokens,
                rank=state.process_index,
                world_size=state.num_processes,
            )
            held.callback(writers[name, layer].release)
    _refuse_corrupt(writers, state.num_processes)
    return writers


def _refuse_corrupt(writers: dict[tuple[str, int], ActivationStoreWriter], world: int) -> None:
    """Raise ProbeError (on every rank) if a shard already on disk fails its sha256: a collect run
    never keeps, nor resumes from, a store whose data cannot be trusted."""
    problems = [(str(writer.path), problem) for writer in writers.values() for problem in writer.verify()]
    if world > 1:
        from accelerate.utils import gather_object

        problems = gather_object(problems)
    if not problems:
        return
    bad = sorted({path for path, _ in problems})
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    remove = f"rm -rf {' '.join(shlex.quote(path) for path in bad)}"
    rerun = _rerun_command()
    raise ProbeError(
        f"activation store {problems[0][0]} is corrupt ({problems[0][1]}{more}); remove the bad store and collect again: "
        + (f"{remove} && {rerun}" if rerun else f"{remove}, then run the same collect call again")
    )


def _rerun_command() -> str | None:
    """This process's command line when it is ``posttrain-probe collect``, else None."""
    argv = list(sys.argv)
    if "collect" not in argv[1:2]:
        return None
    program = Path(argv[0]).name
    prefix = ["python", "-m", "posttrain_probe"] if program == "__main__.py" else [program]
    return shlex.join(prefix + argv[1:])


def _load_models(
    models: Mapping[str, str | os.PathLike | nn.Module],
    tokenizer,
    layers: Sequence[int] | None,
    cfg: CollectConfig,
    device: torch.device,
) -> tuple[Any, dict[str, nn.Module]]:
    """Tokenizer and loaded models; tokenizers and hidden sizes are checked before the next model loads."""
    tokenizers = {name: load_tokenizer(m) for name, m in models.items() if not isinstance(m, nn.Module)}
    if tokenizer is None:
        if tokenizers:
            tokenizer = next(iter(tokenizers.values()))
        else:
            source = getattr(unwrap_model(next(iter(models.values()))), "name_or_path", "")
            if not source:
                raise ProbeError("models were given as objects: pass tokenizer= as well")
            tokenizer = load_tokenizer(source)
    if tokenizers:
        check_same_tokenizer(tokenizers if len(tokenizers) == len(models) else {"tokenizer=": tokenizer, **tokenizers})
    keep = max(layers) if layers else None
    for name, model in models.items():  # a layer out of range is refused before any weights load
        if layers and not isinstance(model, nn.Module):
            n_layers = _config_num_layers(model)
            bad = [layer for layer in layers if n_layers is not None and layer >= n_layers]
            if bad:
                raise ProbeError(
                    f"model {name!r}: layer {bad[0]} is out of range for {model} with {n_layers} decoder blocks: "
                    f"expected 0 <= layer <= {n_layers - 1} (layer L = residual stream entering block L)"
                )
    loaded: dict[str, nn.Module] = {}
    for name, model in models.items():
        if isinstance(model, nn.Module):
            loaded[name] = model
        else:
            loaded[name] = load_causal_lm(model, dtype=cfg.model_dtype, device=device, keep_layers=keep)
        check_same_hidden_size({n: hidden_size(m) for n, m in loaded.items()})
    return tokenizer, loaded


def _config_num_layers(path: str | os.PathLike) -> int | None:
    """Decoder blocks of the model at ``path`` from its config alone (None when the config does not say)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        return None  # load_causal_lm reports it
    config = getattr(config, "text_config", None) or config
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)


def _capture_into(
    writers: dict[tuple[str, int], ActivationStoreWriter],
    models: dict[str, nn.Module],
    data,
    tokenizer,
    layers: list[int],
    cfg: CollectConfig,
    rank: int,
    world: int,
    progress: bool,
) -> None:
    """The collect loop of one rank: resume at the stores' common cursor, capture, write, close."""
    from tqdm.auto import tqdm

    cursor = min(w.cursor for w in writers.values())  # every store restarts where the last one stopped
    for writer in writers.values():
        writer.truncate(cursor)
    budget = None if cfg.max_tokens is None else cfg.max_tokens // world + (rank < cfg.max_tokens % world)
    written = next(iter(writers.values())).n_tokens
    slot = {name: i for i, name in enumerate(models)}
    was_training = {name: unwrap_model(m).training for name, m in models.items()}
    for model in models.values():
        model.eval()
    # This rank's batches: rank, rank + world, ... from the first one at or after the cursor.
    first_batch = cursor + (rank - cursor) % world
    batches = token_batches(
        data,
        tokenizer,
        column=cfg.column,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        start_batch=first_batch,
        step=world,
    )
    desc = f"collect {','.join(models)} @ layer {','.join(map(str, layers))}"
    bar = tqdm(total=budget, initial=written, unit="tok", desc=desc, disable=not progress or rank != 0)
    try:
        for index, batch in zip(range(first_batch, 1 << 62, world), batches):
            if budget is not None and written >= budget:
                break
            captured = capture_batch(
                list(models.values()),
                batch,
                layers,
                bos_token_id=tokenizer.bos_token_id,
                outlier_factor=cfg.outlier_factor,
                max_tokens=None if budget is None else budget - written,
            )
            for (name, layer), writer in writers.items():
                writer.write(
                    captured.acts[layer][:, slot[name]],
                    captured.token_ids,
                    captured.doc_ids,
                    captured.positions,
                    cursor=index + 1,
                )
            written += captured.token_ids.numel()
            bar.update(captured.token_ids.numel())
    finally:
        bar.close()
        for name, model in models.items():
            model.train(was_training[name])
    if written == 0 and world == 1:
        raise ProbeError("the dataset gave no tokens to keep (after dropping the first position, BOS and padding)")
    for writer in writers.values():
        writer.close()


def _model_info(name: str, spec: Any, model: nn.Module) -> dict[str, Any]:
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    return {
        "name": name,
        "path": None if isinstance(spec, nn.Module) else str(spec),
        "architecture": architecture_name(inner),
        "n_layers": getattr(config, "num_hidden_layers", None) or len(decoder_blocks(inner)),
        "fingerprint": model_fingerprint(inner),
    }
