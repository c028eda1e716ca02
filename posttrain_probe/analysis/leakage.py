"""``leakage``: how much gradient blocking let the protected features move (docs/methods.md sec. 9, paper S E.1).

After a fine-tuning run with gradient blocking (``recipes/sft_blocked.py``), on the same tokens:

1. **Activation shift** (:mod:`posttrain_probe.analysis.leakage_shift`): for every feature i of the blocking
   crosscoder's branch m (default ``base``), the per-source code f_i^m (docs/methods.md sec. 3) of the base model's
   and of the blocked model's activations at the crosscoder's site, and

       relative_change_i = sum_x |f_i^m(a^blocked(x)) - f_i^m(a^base(x))| / sum_x f_i^m(a^base(x)).

   Protected features are compared with the unprotected ones of the same crosscoder (which training was free
   to move): blocking worked where the protected features moved much less.
2. **NormRatio in a base-vs-blocked crosscoder** (:mod:`posttrain_probe.analysis.leakage_crosscoder`, paper S
   figs. 10-13), given an already trained one (``blocked_crosscoder``): every protected feature is matched to a
   feature of it by base-decoder cosine; one that kept its role shows up as shared, one outside the band leaked.

The step: :func:`leakage` (a :class:`~posttrain_probe.analysis.leakage_config.LeakageConfig`) ->
:class:`~posttrain_probe.analysis.leakage_report.LeakageReport`, written to ``config.out``; on the command line
``posttrain-probe leakage``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from posttrain_probe.analysis.leakage_config import LeakageConfig
from posttrain_probe.analysis.leakage_crosscoder import HUNGARIAN_MAX_CELLS, crosscoder_leakage
from posttrain_probe.analysis.leakage_report import LeakageReport
from posttrain_probe.analysis.leakage_shift import feature_shift
from posttrain_probe.errors import ProbeError


def leakage(
    config: LeakageConfig,
    *,
    crosscoder=None,
    base_model: nn.Module | None = None,
    blocked_model: nn.Module | None = None,
    blocked_crosscoder=None,
    tokenizer=None,
    progress: bool = False,
) -> LeakageReport:
    """How much the protected features still moved after blocked training (docs/methods.md sec. 9, paper S E.1).

    Compares the base model ``config.base`` and the blocked model ``config.blocked`` on the same tokens of
    ``config.dataset`` through the per-source codes of branch ``config.model_name`` of the blocking crosscoder
    ``config.crosscoder``; the protected set ``config.features`` resolves as
    :func:`~posttrain_probe.analysis.feature_sets.resolve_features` does. With ``config.blocked_crosscoder`` (an
    already trained base-vs-blocked crosscoder) also part 2, :func:`crosscoder_leakage`. Writes the report to
    ``config.out`` and returns it. Python callers may pass objects instead of loading them: ``crosscoder``,
    ``blocked_crosscoder`` (:class:`~posttrain_probe.crosscoder.Crosscoder`), ``base_model``/``blocked_model``
    (loaded causal LMs; they need ``tokenizer``). A base or blocked model that is not the model of branch
    ``model_name`` (nor tuned from it) is refused unless ``config.allow_model_mismatch`` (then recorded in
    ``settings["model_mismatch"]``).
    """
    from posttrain_probe.activations.live import LiveActivations
    from posttrain_probe.activations.live_config import LiveConfig
    from posttrain_probe.analysis.feature_sets import resolve_features

    cc, cc_path = _crosscoder(config.crosscoder if crosscoder is None else crosscoder, config.allow_incomplete)
    slot = cc.model_index(config.model_name)
    layer = cc.site(config.layer, what="leakage")
    if layer is None:
        raise ProbeError("the crosscoder does not record its layer: pass layer= (--layer)")
    protected = resolve_features(
        cc,
        config.features,
        base=config.model_name,
        finetuned=config.finetuned,
        norm_ratio_scale=config.norm_ratio_scale,
    )
    new_cc, new_path = _blocked_crosscoder(config, blocked_crosscoder, cc, len(protected))
    models = {
        "base": config.base if base_model is None else base_model,
        "blocked": config.blocked if blocked_model is None else blocked_model,
    }
    reading = LiveConfig(
        seq_len=config.seq_len,
        forward_batch_size=config.forward_batch_size,
        max_tokens=config.max_tokens or None,
        column=config.column,
        split=config.split,
        dataset_config=config.dataset_config,
        model_dtype=config.dtype,
        device=config.device,
    )
    source = LiveActivations(models, config.dataset, layer=layer, tokenizer=tokenizer, config=reading)
    if source.d_model != cc.config.d_model:
        raise ProbeError(
            f"the crosscoder {cc_path or ''} has d_model {cc.config.d_model} but the models' hidden size is {source.d_model}: "
            "expected the crosscoder trained on (a model of the family of) the base model"
        )
    mismatches = _model_mismatches(config, cc, slot, source, models)
    home = cc.W_enc.device
    shift = feature_shift(cc, _progress_chunks(source, config.max_tokens or None, progress), slot)
    cc.to(home)
    settings = _settings(config, cc, cc_path, slot, layer, len(protected), base_model, blocked_model)
    if mismatches:
        settings["model_mismatch"] = mismatches
    report = LeakageReport(protected, shift, settings)
    if new_cc is not None:
        path = str(new_path) if new_path is not None else None
        report.crosscoder = crosscoder_leakage(
            cc,
            new_cc,
            protected,
            model=slot,
            matching=config.matching,
            path=path,
            norm_ratio_scale=config.norm_ratio_scale,
        )
    report.write(config.out)
    return report


def _blocked_crosscoder(config: LeakageConfig, given, cc, n_protected: int):
    """``(crosscoder, directory)`` of the base-vs-blocked crosscoder (part 2), or ``(None, None)`` without one."""
    if given is None and config.blocked_crosscoder is None:
        return None, None
    new_cc, new_path = _crosscoder(config.blocked_crosscoder if given is None else given, config.allow_incomplete)
    if new_cc.config.d_model != cc.config.d_model:
        raise ProbeError(
            f"the base-vs-blocked crosscoder has d_model {new_cc.config.d_model}, the blocking crosscoder {cc.config.d_model}"
        )
    if config.matching == "hungarian" and n_protected * new_cc.config.n_features > HUNGARIAN_MAX_CELLS:
        raise ProbeError(
            f"Hungarian matching of {n_protected} protected features to {new_cc.config.n_features} features is too large: use matching='argmax' (--matching argmax)"
        )
    return new_cc, new_path


def _settings(
    config: LeakageConfig, cc, cc_path, slot: int, layer: int, n_protected: int, base_model, blocked_model
) -> dict:
    """The ``settings`` block of leakage.json: what was compared, at which site, in which units."""
    return {
        "crosscoder": str(cc_path) if cc_path is not None else None,
        "crosscoder_models": cc.model_names,
        "model_name": cc.model_names[slot],
        "features_spec": config.features,
        "n_protected": n_protected,
        "n_features": cc.config.n_features,
        "layer": layer,
        "base": config.base if base_model is None else None,
        "blocked": config.blocked if blocked_model is None else None,
        "dataset": str(config.dataset),
        "max_tokens": config.max_tokens or None,
        "seq_len": config.seq_len,
        "code_units": "per-source codes f^m of the crosscoder (normalised-input units)",
        "norm_ratio_scale": config.norm_ratio_scale,
    }


def _crosscoder(crosscoder, allow_incomplete: bool):
    """A crosscoder object, or the one in a directory (which must exist and, unless allowed, be complete)."""
    from posttrain_probe.crosscoder.inspect import as_crosscoder, require_complete

    if not isinstance(crosscoder, nn.Module):
        crosscoder = Path(crosscoder)
        if not crosscoder.exists():
            raise ProbeError(f"crosscoder {crosscoder} does not exist")
        require_complete(crosscoder, allow_incomplete)
    return as_crosscoder(crosscoder, allow_incomplete=allow_incomplete)


def _model_mismatches(config: LeakageConfig, cc, slot: int, source, models) -> dict[str, str]:
    """Check the base and blocked models against the crosscoder branch: the mismatches let through."""
    from posttrain_probe.model_identity import check_model, slot_fingerprint

    mismatches = {}
    for role, given in models.items():
        what = f"the {role} model" + (f" {given}" if not isinstance(given, nn.Module) else "")
        mismatch = check_model(
            source.models[role],
            slot_fingerprint(cc, slot),
            cc.model_names[slot],
            what=what,
            allow_mismatch=config.allow_model_mismatch,
        )
        if mismatch:
            mismatches[role] = mismatch
    return mismatches


def _progress_chunks(source, max_tokens: int | None, progress: bool) -> Iterator[torch.Tensor]:
    from tqdm.auto import tqdm

    bar = tqdm(total=max_tokens, desc="leakage", unit="tok", disable=not progress)  # no total: the whole dataset
    for chunk in source.chunks():
        bar.update(chunk.shape[0])
        yield chunk
    bar.close()
