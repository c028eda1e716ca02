"""Collect paired activation stores of N models: ``out_dir/<name>/layer<L>/`` (resumable)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain_probe.activations.capture import capture_batch
from posttrain_probe.activations.config import CollectConfig
from posttrain_probe.activations.paired import COLLECT_INDEX
from posttrain_probe.activations.manifest import write_atomic
from posttrain_probe.activations.store import ActivationStoreWriter, merge_rank_manifests
from posttrain_probe.data import dataset_fingerprint, load_dataset_spec, token_batches
from posttrain_probe.errors import ProbeError
from posttrain_probe.locks import DirectoryLock
from posttrain_probe.layers import decoder_blocks, default_layer, hidden_size, unwrap_model, validate_layer
from posttrain_probe.model_identity import model_fingerprint
from posttrain_probe.models import check_same_hidden_size, check_same_tokenizer, load_causal_lm, load_tokenizer, resolve_device, tokenizer_fingerprint


def collect_activations(
    models: Mapping[str, str | os.PathLike | nn.Module],
    dataset: Any,
    layers: Sequence[int] | int | None,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    config: CollectConfig | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, dict[int, Path]]:
    """Run paired truncated forwards of ``models`` over ``dataset`` and write one store per model and layer.

    ``models`` maps names to model paths/hub names or loaded models (then pass ``tokenizer`` or
    models whose ``name_or_path`` holds one). ``dataset`` is anything
    :func:`~posttrain_probe.data.load_dataset_spec` takes. ``layers`` are sites (residual stream
    entering block L; None: n_layers // 2). ``config``/``overrides``: :class:`CollectConfig`.

    Writes ``out_dir/<name>/layer<L>/`` and ``out_dir/collect.json``; an interrupted run resumes
    when called again with the same arguments. Launched with several processes (``torchrun`` /
    ``accelerate launch``; accelerate's ``PartialState`` reads the launch environment) each rank
    takes every world_size-th batch on its own device and writes its own shards; rank 0 merges the
    manifests at the end. Returns ``{name: {layer: store_path}}``.
    """
    cfg = replace(config or CollectConfig(), **overrides)
    if isinstance(layers, int):
        layers = [layers]
    if not models:
        raise ProbeError("collect needs at least one model: models={name: path_or_model}")
    bad_layers = [layer for layer in layers or [] if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0]
    if bad_layers:
        raise ProbeError(f"layers {bad_layers} are not sites: expected integers >= 0 (residual stream entering block L)")
    bad = [name for name in models if not name or "/" in name or name.startswith(".")]
    if bad:
        raise ProbeError(f"model names {bad} cannot be used as directory names: expected plain names like base, sft, rl")
    from accelerate import PartialState

    out_dir = Path(out_dir)

    # cpu=True lets accelerate set up gloo for multi-process runs on machines without a GPU.
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    device = resolve_device(cfg.device) if cfg.device is not None else state.device

    # The main process holds the output directory (collect.json, merges) for the whole run.
    with contextlib.ExitStack() as held:
        if rank == 0:
            held.enter_context(DirectoryLock(out_dir, what="collect output"))
        tokenizer, loaded = _load_models(models, tokenizer, layers, cfg, device)
        first = next(iter(loaded.values()))
        wanted_layers = sorted(set(layers)) if layers else [default_layer(first)]
        for name, model in loaded.items():
            for layer in wanted_layers:
                try:
                    validate_layer(model, layer)
                except ProbeError as err:
                    raise ProbeError(f"model {name!r}: {err}") from None

        data = load_dataset_spec(dataset, split=cfg.split, config_name=cfg.dataset_config, n_docs=cfg.n_docs)
        dataset_name = dataset if isinstance(dataset, (str, os.PathLike)) else f"<{type(dataset).__name__} of {len(data)} rows>"
        source = {
            "dataset": str(dataset_name),
            "dataset_sample_sha256": dataset_fingerprint(data, cfg.column),
            "split": cfg.split,
            "dataset_config": cfg.dataset_config,
            "column": cfg.column,
            "n_docs": len(data),
            "seq_len": cfg.seq_len,
            "batch_size": cfg.batch_size,
            "max_tokens": cfg.max_tokens,
            "outlier_factor": cfg.outlier_factor,
            "excluded": ["padding", "first position", "bos"],
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "paired_models": list(loaded),
            "world_size": world,
        }
        d_model = hidden_size(first)
        writers: dict[tuple[str, int], ActivationStoreWriter] = {}
        for name in loaded:
            for layer in wanted_layers:
                writers[name, layer] = ActivationStoreWriter(  # locks the store (this rank's files) until closed
                    out_dir / name / f"layer{layer}",
                    layer=layer,
                    d_model=d_model,
                    model=_model_info(name, models[name], loaded[name]),
                    dtype=cfg.dtype,
                    source=source,
                    shard_tokens=cfg.shard_tokens,
                    rank=rank,
                    world_size=world,
                )
                held.callback(writers[name, layer].release)
        _refuse_corrupt(writers, world)
        paths = {name: {layer: out_dir / name / f"layer{layer}" for layer in wanted_layers} for name in loaded}
        if rank == 0:
            index = {"models": {n: str(models[n]) if not isinstance(models[n], nn.Module) else None for n in loaded}, "layers": wanted_layers, "source": source, "config": asdict(cfg)}
            write_atomic(out_dir / COLLECT_INDEX, json.dumps(index, indent=2).encode(), fsync=True, what="collect index")

        if not all(w.complete for w in writers.values()):
            _capture_into(writers, loaded, data, tokenizer, wanted_layers, cfg, rank, world, progress)
        if world > 1:
            state.wait_for_everyone()
            if rank == 0:
                for store in sorted({w.path for w in writers.values()}):
                    merge_rank_manifests(store)
            state.wait_for_everyone()
        return paths


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
        + (f"{remove} && {rerun}" if rerun else f"{remove}, then run the same collect_activations call again")
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
                raise ProbeError(f"model {name!r}: layer {bad[0]} is out of range for {model} with {n_layers} decoder blocks: "
                                 f"expected 0 <= layer <= {n_layers - 1} (layer L = residual stream entering block L)")
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
    batches = token_batches(data, tokenizer, column=cfg.column, seq_len=cfg.seq_len, batch_size=cfg.batch_size, start_batch=first_batch, step=world)
    desc = f"collect {','.join(models)} @ layer {','.join(map(str, layers))}"
    bar = tqdm(total=budget, initial=written, unit="tok", desc=desc, disable=not progress or rank != 0)
    try:
        for index, batch in zip(range(first_batch, 1 << 62, world), batches):
            if budget is not None and written >= budget:
                break
            captured = capture_batch(
                list(models.values()), batch, layers, bos_token_id=tokenizer.bos_token_id,
                outlier_factor=cfg.outlier_factor, max_tokens=None if budget is None else budget - written,
            )
            for (name, layer), writer in writers.items():
                writer.write(captured.acts[layer][:, slot[name]], captured.token_ids, captured.doc_ids, captured.positions, cursor=index + 1)
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
        "architecture": type(inner).__name__,
        "n_layers": getattr(config, "num_hidden_layers", None) or len(decoder_blocks(inner)),
        "fingerprint": model_fingerprint(inner),
    }
