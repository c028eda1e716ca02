"""``features fisher``: Fisher reasoning features (paper S sec. 2 eq. 1, A.1, B.1; docs/methods.md sec. 8) and rho.

On texts with a reasoning and a solution segment, with the per-source codes f^m of one crosscoder branch (or of
an SAE, a 1-model crosscoder) at site L:

1. **Segments** (:mod:`posttrain_probe.analysis.segments`): OpenThoughts tags, a user-given delimiter pair per
   segment, or a reasoning column + a solution column (:class:`~posttrain_probe.analysis.fisher_config.SegmentFormat`);
   tag tokens are excluded.
2. **Fisher statistics** (:mod:`posttrain_probe.analysis.fisher_stats`): E_reasoning[f_j^2] and E_solution[f_j^2]
   over all segment tokens of the dataset; ``ImportanceRatio(j) = E_r / max(E_s, 1e-8)`` (S eq. 1; A.1: E[f_j^2]
   is proportional to the trace of the Fisher information of feature j's decoder row).
3. **Selection**: candidates are live features whose E_r reaches the magnitude floor (default: the 0.9 quantile
   of E_r over live features); the top-k (default 50) candidates by ratio.
4. **rho** (S eq. 14, B.1): per sequence and segment, the fraction of the segment's tokens on which at least one
   selected feature fires, for every model given (each through its own branch, or all through the one SAE).
5. **ReasonScore** baseline (:mod:`posttrain_probe.analysis.reasonscore`, Galichin et al. 2025) on the same
   documents and codes, for comparison.

The step: :func:`features_fisher` (a :class:`~posttrain_probe.analysis.fisher_config.FisherConfig`) ->
:class:`~posttrain_probe.analysis.fisher_report.FisherReport`, written to ``config.out``; on the command line
``posttrain-probe features fisher``. Code units: the crosscoder's per-source codes f^m (normalised-input units).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from posttrain_probe.analysis.fisher_config import FisherConfig
from posttrain_probe.analysis.fisher_report import FisherReport
from posttrain_probe.analysis.fisher_stats import (
    PackedBatches,
    SegmentResiduals,
    SegmentStats,
    packed_batches,
    segment_statistics,
    select_fisher_features,
)
from posttrain_probe.analysis.reasonscore import REASON_TOKENS, WINDOW, ReasonScoreAccumulator, reasoning_token_groups
from posttrain_probe.analysis.segments import SEGMENTS, SegmentCorpus, document_column, split_document
from posttrain_probe.errors import ProbeError


def features_fisher(
    config: FisherConfig,
    *,
    crosscoder=None,
    models: Mapping[str, nn.Module] | None = None,
    tokenizer=None,
    progress: bool = False,
) -> FisherReport:
    """Fisher reasoning features of one model's codes, rho for every model, and the ReasonScore baseline.

    Reads the first ``config.max_docs`` documents of ``config.dataset``, selects the features on the codes of
    ``config.select_model`` (default: the first ``config.model``), writes the report to ``config.out`` and
    returns it. Python callers may pass objects instead of loading them: ``crosscoder`` (a
    :class:`~posttrain_probe.crosscoder.Crosscoder`, used instead of ``config.crosscoder``/``config.sae``; an SAE
    when ``config.sae`` names it), ``models`` (name -> loaded causal LM, for names of ``config.model``; the paths
    there give the tokenizer unless ``tokenizer`` is passed). Models given as paths are loaded one at a time
    (blocks after the layer dropped) and freed after use. The documents are tokenised once and packed by length
    (:func:`~posttrain_probe.analysis.fisher_stats.packed_batches`); every model runs once over them (the select
    model's rho pass reads the residuals of its selection pass, up to
    :data:`~posttrain_probe.analysis.fisher_stats.RESIDUAL_BYTES`, and runs the model on the rest only). A model that is not the one its branch was trained on
    (nor tuned from it) is refused unless ``config.allow_model_mismatch`` (then recorded in
    ``settings["model_mismatch"]``). ProbeError when no document has a reasoning (or a solution) segment.
    """
    from posttrain_probe.models import parse_model_specs

    cc, cc_path = _fisher_crosscoder(config, crosscoder)
    specs = parse_model_specs(config.model)
    given = {**specs, **dict(models or {})}
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise ProbeError(f"models {unknown} are not among the names of model {list(specs)}")
    select = next(iter(given)) if config.select_model is None else config.select_model
    if select not in given:
        raise ProbeError(f"select model {select!r} is not one of the models given {list(given)}")
    sae = config.sae is not None
    branches = {name: (0 if sae else cc.model_index(name)) for name in given}
    layer = cc.site(config.layer, what="fisher")
    if layer is None:
        raise ProbeError("the crosscoder does not record its layer: pass layer= (--layer)")
    corpus, documents, column = _corpus(config, _shared_tokenizer(given, specs, select, tokenizer))
    stats, selection, reason, mismatches = _model_statistics(
        config, cc, given, branches, select, layer, corpus, progress
    )
    documents["cut_by_seq_len"] = stats[select].n_cut
    settings = {
        "crosscoder": str(cc_path) if cc_path is not None else None,
        "kind": "sae" if sae else "crosscoder",
        "crosscoder_models": cc.model_names,
        "models": {n: (str(m) if not isinstance(m, nn.Module) else None) for n, m in given.items()},
        "branches": {n: cc.model_names[b] for n, b in branches.items()},
        "select_model": select,
        "layer": layer,
        "dataset": str(config.dataset),
        "split": config.split,
        "dataset_config": config.dataset_config,
        "segment_format": config.segments.describe(),
        "column": column,
        "max_docs": config.max_docs or None,
        "seq_len": config.seq_len,
        "code_units": "per-source codes f^m of the crosscoder branch (normalised-input units)",
    }
    if mismatches:
        settings["model_mismatch"] = mismatches
    report = FisherReport(settings, select, selection, stats, documents, reason, cc, config.table_format)
    report.write(config.out)
    return report


def _fisher_crosscoder(config: FisherConfig, crosscoder) -> tuple[Any, os.PathLike | None]:
    """The crosscoder (or SAE) object and its directory (None for an object)."""
    from posttrain_probe.crosscoder.inspect import as_crosscoder, require_complete

    if crosscoder is None:
        if config.crosscoder is None and config.sae is None:
            raise ProbeError("give exactly one of --crosscoder DIR and --sae DIR")
        require_complete(config.path, config.allow_incomplete)
        crosscoder = config.path
    cc, path = as_crosscoder(crosscoder, allow_incomplete=config.allow_incomplete)
    if config.sae is not None and cc.n_models != 1:
        raise ProbeError(
            f"an SAE is a 1-model crosscoder, but {path or 'the crosscoder'} has models {cc.model_names}: pass it as --crosscoder"
        )
    return cc, path


def _shared_tokenizer(models: Mapping[str, Any], specs: Mapping[str, str], select: str, tokenizer):
    """The one fast tokenizer of all models (``tokenizer`` if given, else loaded from the model paths)."""
    from posttrain_probe.models import check_same_tokenizer, load_tokenizer

    paths = {n: m for n, m in models.items() if not isinstance(m, nn.Module)}
    if tokenizer is None:
        tokenizers = {n: load_tokenizer(specs[n]) for n in models}
        check_same_tokenizer(tokenizers)
        tokenizer = tokenizers[select]
    elif paths:
        check_same_tokenizer({"tokenizer=": tokenizer, **{n: load_tokenizer(m) for n, m in paths.items()}})
    if not getattr(tokenizer, "is_fast", False):
        raise ProbeError(f"{type(tokenizer).__name__} is not a fast tokenizer: segment spans need its offset mapping")
    return tokenizer


def _corpus(config: FisherConfig, tokenizer) -> tuple[SegmentCorpus, dict[str, int], str | None]:
    """The documents split into segments, their counts, and the chat/text column read."""
    from posttrain_probe.data import load_rows

    fmt = config.segments
    rows, columns = load_rows(
        config.dataset, split=config.split, config_name=config.dataset_config, n_docs=config.max_docs or None
    )
    column = None if fmt.format == "columns" else document_column(columns, fmt)
    docs = [split_document(row, fmt, tokenizer, column=column) for row in rows]
    documents = {
        "n_docs": len(docs),
        "with_reasoning": sum(bool(d.reasoning) for d in docs),
        "with_solution": sum(bool(d.solution) for d in docs),
    }
    where = f"column {column!r}" if column else f"columns {fmt.reasoning_column!r}/{fmt.solution_column!r}"
    for segment in SEGMENTS:
        if documents[f"with_{segment}"] == 0:
            expected = (
                f"non-empty text in {where}" if fmt.format == "columns"
                else "{} ... {} in the assistant turns or text of {}".format(*fmt.delimiters[SEGMENTS.index(segment)], where)
            )  # fmt: skip
            raise ProbeError(
                f"no {segment} segment found in any of the {len(docs)} documents of {config.dataset} (format {fmt.format!r}): expected {expected}"
            )
    special = set(tokenizer.all_special_ids) | (
        {tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else set()
    )
    return (
        SegmentCorpus(docs, tokenizer, config.seq_len, config.forward_batch_size, frozenset(special)),
        documents,
        column,
    )


def _reason_words(config: FisherConfig) -> list[str] | tuple[str, ...]:
    if config.reason_words is None:
        return REASON_TOKENS
    try:
        words = json.loads(config.reason_words.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ProbeError(f"cannot read --reason-words {config.reason_words}: {err}") from err
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ProbeError(f"--reason-words {config.reason_words} must hold a JSON list of strings")
    return words


def _load_model(
    name: str, given, cc, branch: int, layer: int, config: FisherConfig, device
) -> tuple[nn.Module, str | None]:
    """The model ``name`` (loaded from its path, or the object given), checked against its branch: (model, mismatch)."""
    from posttrain_probe.model_identity import check_site_model, slot_fingerprint
    from posttrain_probe.models import load_causal_lm

    model = (
        given
        if isinstance(given, nn.Module)
        else load_causal_lm(given, dtype=config.dtype, device=device, keep_layers=layer)
    )
    what = f"model {name!r}" + (f" ({given})" if not isinstance(given, nn.Module) else "")
    mismatch = check_site_model(
        model,
        layer,
        cc.config.d_model,
        slot_fingerprint(cc, branch),
        cc.model_names[branch],
        what=what,
        allow_mismatch=config.allow_model_mismatch,
    )
    return model, mismatch


def _model_statistics(
    config: FisherConfig, cc, models, branches, select: str, layer: int, corpus: SegmentCorpus, progress: bool
):
    """Select on ``select``'s codes (with ReasonScore), then rho of every model: (stats, selection, reasonscore, mismatches)."""
    from posttrain_probe.models import resolve_device

    device = resolve_device(config.device)
    home = cc.W_enc.device
    stats: dict[str, SegmentStats] = {}
    selection = reason = None
    mismatches: dict[str, str] = {}
    # tokenised once for every pass; an accelerator packs short documents up to batch_size full-length ones
    batches = packed_batches(corpus, max_tokens=None if device.type == "cpu" else corpus.batch_size * corpus.seq_len)
    try:
        for name in [select] + [n for n in models if n != select]:
            model, mismatch = _load_model(name, models[name], cc, branches[name], layer, config, device)
            if mismatch:
                mismatches[name] = mismatch
            param = next(model.parameters(), None)
            cc.to(param.device if param is not None else device)
            residuals = None
            if name == select:  # the rho pass reads the selection pass's residuals instead of running the model again
                residuals = SegmentResiduals()
                first, selection, reason = _select(
                    config, cc, model, branches[name], name, layer, corpus, batches, residuals, progress
                )
            stats[name] = segment_statistics(
                model,
                cc,
                branches[name],
                corpus,
                layer=layer,
                features=selection.features,
                batches=batches,
                residuals=residuals,
                statistics=first if name == select else None,  # the select model's pass: rho's hits only
                progress=progress,
                desc=f"rho {name}",
            )
            del model, residuals
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        cc.to(home)
    return {name: stats[name] for name in models}, selection, reason, mismatches


def _select(
    config: FisherConfig,
    cc,
    model: nn.Module,
    branch: int,
    name: str,
    layer: int,
    corpus: SegmentCorpus,
    batches: PackedBatches,
    residuals: SegmentResiduals,
    progress: bool,
):
    """The Fisher selection on one model's codes: (its segment statistics, the selection, its ReasonScore (None when
    switched off)); fills ``residuals``."""
    accumulator = None
    if config.reasonscore:
        words, groups = reasoning_token_groups(corpus.tokenizer, _reason_words(config))
        weights = cc.W_dec.detach()[:, branch].norm(dim=-1)
        accumulator = ReasonScoreAccumulator(
            words, groups, cc.config.n_features, weights=weights, alpha=config.alpha, window=WINDOW
        )
    first = segment_statistics(
        model,
        cc,
        branch,
        corpus,
        layer=layer,
        reasonscore=accumulator,
        batches=batches,
        residuals=residuals,
        progress=progress,
        desc=f"fisher {name}",
    )
    if int(first.n_tokens[0]) == 0 or int(first.n_tokens[1]) == 0:
        missing = "reasoning" if int(first.n_tokens[0]) == 0 else "solution"
        raise ProbeError(
            f"no {missing} tokens left after tokenisation (seq_len {config.seq_len}): the segments start beyond the first {config.seq_len} tokens; raise --seq-len"
        )
    e = first.mean_sq
    selection = select_fisher_features(
        e[0], e[1], first.live, k=config.top_k, floor_quantile=config.floor_quantile, floor=config.floor
    )
    if not selection.features:
        raise ProbeError(
            f"no candidate feature: no live feature of {name!r} has E_reasoning[f^2] > 0 and >= the floor {selection.floor:.4g}"
        )
    return first, selection, accumulator.result() if accumulator is not None else None
