"""The lm-eval model ``probe-hf``: lm-eval's HF model (``HFLM``) with a crosscoder-feature intervention.

    lm-eval ... --model probe-hf --model_args pretrained=DIR,crosscoder=CC,features=3;17;42,mode=zero

Everything about HFLM stays as it is (model loading, batching, padding, truncation, chat
templates); the intervention (:class:`~posttrain_probe.interventions.features.FeatureIntervention`,
docs/methods.md sec. 7) is attached to the loaded model as forward hooks. Without ``crosscoder=`` the model
is exactly ``hf``.

Positions ``prompt`` / ``last_prompt``: in a loglikelihood request the model input is context +
continuation (right-padded, truncated from the left); the context is the prompt, so the number of
context tokens of every row is passed to the intervention around each forward. In
``generate_until`` the whole (left-padded) input is the prompt and the generated tokens are the
decode steps.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from posttrain_probe.errors import ProbeError

INTERVENTION_ARGS = (
    "crosscoder",
    "features",
    "mode",
    "value",
    "model_name",
    "positions",
    "reference",
    "allow_model_mismatch",
)
"""model_args that ``probe-hf`` adds to HFLM's."""

_PAD = 0  # lm-eval right-pads loglikelihood batches with zeros (pad_and_concat)


def _features_spec(features: Any) -> Any:
    """lm-eval's model_args parser turns ``features=3`` into an int and keeps ``3;17;42`` a string
    (',' separates model_args, so ';' separates indices there) -> what ``resolve_features`` takes."""
    if isinstance(features, bool):
        raise ProbeError(f"features={features!r}: expected a feature-set JSON, a category or indices like 3;17;42")
    if isinstance(features, int):
        return [features]
    if isinstance(features, float):
        if not features.is_integer():
            raise ProbeError(f"features={features!r}: expected integer feature indices like 3;17;42")
        return [int(features)]
    if isinstance(features, str):
        if _is_file(features):
            return features  # a feature-set file
        return features.replace(";", ",")
    if isinstance(features, (list, tuple)):
        return [int(f) for f in features]
    raise ProbeError(f"features={features!r}: expected a feature-set JSON, a category or indices like 3;17;42")


def _float_or_none(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ProbeError(f"{name}={value!r}: expected a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ProbeError(f"{name}={value!r}: expected a number, e.g. value=3.0") from None


@dataclasses.dataclass
class InterventionSpec:
    """The intervention arguments, checked and the feature set resolved (see :func:`check_intervention_args`)."""

    crosscoder: Any
    """The loaded ``Crosscoder``."""
    crosscoder_dir: str
    """Its directory (``steer`` caches max activations under ``<dir>/max_activations/``)."""
    features: list[int]
    """Feature indices (sorted, in range)."""
    mode: str
    value: float | None
    model_name: str | None
    positions: str
    reference: str | None
    allow_model_mismatch: bool = False
    """Attach even to a model other than the branch's (:mod:`posttrain_probe.model_identity`)."""
    provenance: dict = dataclasses.field(default_factory=dict)
    """The feature-set file's provenance ({} for indices or a category)."""

    @property
    def features_arg(self) -> str:
        """The resolved indices as the ``features`` model_arg of ``probe-hf`` (``3;17;42``)."""
        return ";".join(str(i) for i in self.features)


def _flag(name: str, value: Any) -> bool:
    """A boolean model_arg: lm-eval's parser gives True/False, or the string as typed."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ProbeError(f"{name}={value!r}: expected True or False")


def check_intervention_args(
    *,
    crosscoder: Any = None,
    features: Any = None,
    mode: Any = None,
    value: Any = None,
    model_name: Any = None,
    positions: Any = None,
    reference: Any = None,
    allow_model_mismatch: Any = None,
    controls: bool = False,
) -> InterventionSpec | None:
    """The one check of the intervention arguments (``probe-hf``'s model_args, ``intervene``'s options), without
    loading the language model: mode, positions, value, the crosscoder directory, the feature indices (range,
    feature-set provenance: the set is resolved here, once) and the branch. Values as lm-eval's parser gives them
    (``features=3`` arrives as an int, ``3;17;42`` as a string). ``controls``: a ``reference`` is also used by
    the frequency-matched controls of ``intervene`` (else only by ``steer``). Returns ``None`` when no
    ``crosscoder`` is given (plain ``hf``); raises :class:`ProbeError` naming the bad value."""
    from posttrain_probe.interventions.features import check_mode

    given = {
        k: v
        for k, v in dict(
            features=features,
            mode=mode,
            value=value,
            model_name=model_name,
            positions=positions,
            reference=reference,
            allow_model_mismatch=allow_model_mismatch,
        ).items()
        if v is not None
    }
    if crosscoder is None:
        if given:
            raise ProbeError(
                f"model_args {', '.join(f'{k}=' for k in given)} need crosscoder=DIR (the crosscoder whose features are edited)"
            )
        return None
    mode = "zero" if mode is None else str(mode)
    positions = "all" if positions is None else str(positions)
    check_mode(mode, positions)
    if features is None:
        raise ProbeError("crosscoder= needs features= (a feature-set JSON, a category, or indices like 3;17;42)")
    value = _float_or_none("value", value)
    if mode == "steer" and reference is None:
        raise ProbeError(
            "mode=steer needs reference=DATASET (--reference): the corpus over which each feature's max activation is taken"
        )
    if mode != "steer" and reference is not None and not controls:
        raise ProbeError(
            f"reference= is only used by mode=steer and by the controls' firing rates (mode is {mode!r}, controls are off)"
        )
    if not Path(str(crosscoder)).is_dir():
        raise ProbeError(
            f"crosscoder={crosscoder}: no such directory (expected a crosscoder saved with save_pretrained)"
        )
    from posttrain_probe.analysis.feature_sets import load_feature_set, resolve_features
    from posttrain_probe.crosscoder.inspect import as_crosscoder
    from posttrain_probe.interventions.features import FeatureIntervention

    cc, _ = as_crosscoder(str(crosscoder))
    parsed = _features_spec(features)
    spec = InterventionSpec(
        crosscoder=cc,
        crosscoder_dir=str(crosscoder),
        features=resolve_features(cc, parsed),
        mode=mode,
        value=value,
        model_name=None if model_name is None else str(model_name),
        positions=positions,
        reference=None if reference is None else str(reference),
        allow_model_mismatch=_flag("allow_model_mismatch", allow_model_mismatch),
        provenance=load_feature_set(parsed).provenance if isinstance(parsed, str) and _is_file(parsed) else {},
    )
    if spec.model_name is None and cc.n_models != 1:
        raise ProbeError(
            f"the crosscoder has models {cc.model_names}: add model_name=NAME (the branch to intervene on)"
        )
    if mode != "steer":  # value and branch checks of the intervention itself
        FeatureIntervention(cc, spec.features, mode=mode, value=value, model_name=spec.model_name, positions=positions)
    else:
        cc.model_index(0 if spec.model_name is None else spec.model_name)
    return spec


def _is_file(features: str) -> bool:
    """A feature-set file rather than indices or a category (a long string is no file name: ENAMETOOLONG)."""
    return features.endswith(".json") or (len(features) < 256 and Path(features).exists())


@register_model("probe-hf")
class ProbeHFLM(HFLM):
    """lm-eval's ``hf`` model plus one feature intervention, configured by model_args.

    Extra model_args (all optional; without ``crosscoder`` the model is plain ``hf``):

    * ``crosscoder`` -- crosscoder (or SAE) directory (``Crosscoder.save_pretrained`` layout).
    * ``features`` -- a feature-set JSON, a NormRatio category, or indices ``3;17;42``.
    * ``mode`` -- ``zero`` (default), ``set``, ``scale``, ``add`` or ``steer``.
    * ``value`` -- ``set``: code value (default 3.0); ``scale``: factor; ``add``: delta;
      ``steer``: multiple of the feature's max activation over ``reference`` (default 2.0).
    * ``model_name`` -- crosscoder branch whose per-source code is edited (needed when the
      crosscoder has several models).
    * ``positions`` -- ``all`` (default), ``prompt`` or ``last_prompt``.
    * ``reference`` -- ``steer`` only: dataset spec (as for ``posttrain-probe collect``) of the
      corpus the max activations are computed on (cached next to the crosscoder).
    * ``allow_model_mismatch`` -- ``True``: intervene even when ``pretrained`` is not the model the
      branch was trained on (nor tuned from it), which is refused otherwise
      (:mod:`posttrain_probe.model_identity`); the mismatch is kept in ``intervention.model_mismatch``.

    The attached intervention is :attr:`intervention` (``None`` without ``crosscoder``);
    :meth:`detach_intervention` removes it from the model.
    """

    def __init__(
        self,
        pretrained: Any,
        crosscoder: str | None = None,
        features: Any = None,
        mode: str | None = None,
        value: Any = None,
        model_name: str | None = None,
        positions: str | None = None,
        reference: str | None = None,
        allow_model_mismatch: Any = None,
        **kwargs: Any,
    ) -> None:
        self.intervention = None
        self._prompt_table: dict[tuple[int, ...], collections.deque] | None = None
        spec = check_intervention_args(
            crosscoder=crosscoder,
            features=features,
            mode=mode,
            value=value,
            model_name=model_name,
            positions=positions,
            reference=reference,
            allow_model_mismatch=allow_model_mismatch,
        )
        if spec is None:
            super().__init__(pretrained, **kwargs)
            return
        if spec.mode != "steer":  # fully checked by construction, before the model is loaded
            self.intervention = self._build(spec, None)
        super().__init__(pretrained, **kwargs)
        if self.backend != "causal":
            raise ProbeError(
                f"probe-hf interventions need a decoder-only (causal) model; {pretrained} loads as {self.backend}"
            )
        if spec.mode == "steer":
            self.intervention = self._build(spec, self._max_activations(spec))
        self.intervention.attach(self.model)

    # ------------------------------------------------------------------ intervention set-up

    @staticmethod
    def _build(spec: InterventionSpec, max_acts: torch.Tensor | None):
        from posttrain_probe.interventions.features import FeatureIntervention

        return FeatureIntervention(
            spec.crosscoder,
            spec.features,
            mode=spec.mode,
            value=spec.value,
            model_name=spec.model_name,
            positions=spec.positions,
            max_acts=max_acts,
            allow_model_mismatch=spec.allow_model_mismatch,
        )

    def _max_activations(self, spec: InterventionSpec) -> torch.Tensor:
        """[F] per-feature max activation of the edited branch over the ``reference`` corpus (cached
        next to the crosscoder)."""
        from posttrain_probe.interventions.activation_stats import max_activations

        branch = 0 if spec.model_name is None else spec.model_name
        return max_activations(
            spec.crosscoder,
            branch,
            self.model,
            spec.reference,
            tokenizer=self.tokenizer,
            cache_dir=Path(spec.crosscoder_dir) / "max_activations",
            allow_model_mismatch=spec.allow_model_mismatch,
        )

    def detach_intervention(self) -> None:
        """Remove the intervention's hooks from the model (no-op without one)."""
        if self.intervention is not None and self.intervention.is_attached:
            self.intervention.detach()

    @property
    def _needs_prompt_lengths(self) -> bool:
        return self.intervention is not None and self.intervention.positions != "all"

    # ------------------------------------------------------------------ lm-eval hooks

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's loglikelihood loop; with positions prompt/last_prompt, first records how many
        context tokens each model input row holds, for :meth:`_model_call`.

        ``requests``: ``((context, continuation), context_ids, continuation_ids)`` per request.
        A row is ``(context_ids + continuation_ids)[-(max_length + 1):][:-1]``; its prompt is what
        is left of the context after the left truncation.
        """
        if not self._needs_prompt_lengths:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        window = self.max_length + 1
        table: dict[tuple[int, ...], collections.deque] = collections.defaultdict(collections.deque)
        # Visit the requests in the order lm-eval batches them (its Collator sorts by this key,
        # stably), so that rows of identical ids but different context lengths queue up in order.
        ordered = sorted(requests, key=lambda req: (-(len(req[1]) + len(req[2])), tuple(req[1]) + tuple(req[2])))
        for _, context_ids, continuation_ids in ordered:
            ids = (list(context_ids) + list(continuation_ids))[-window:][:-1]
            cut = max(0, len(context_ids) + len(continuation_ids) - window)
            table[tuple(ids)].append(min(max(0, len(context_ids) - cut), len(ids)))
        # lm-eval computes one forward for requests whose inputs are identical (logits_cache);
        # if such requests split context/continuation differently, each needs its own forward.
        ambiguous = any(len(set(lengths)) > 1 for lengths in table.values())
        logits_cache = self.logits_cache
        self._prompt_table = dict(table)
        self.logits_cache = logits_cache and not ambiguous
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._prompt_table = None
            self.logits_cache = logits_cache

    def _row_prompt_lengths(self, inps: torch.Tensor) -> torch.Tensor | None:
        """[B] prompt lengths of the rows of a right-padded batch ``inps`` [B, T] (from the table
        :meth:`_loglikelihood_tokens` made); ``None`` for a batch not built from requests (lm-eval's
        batch-size probe)."""
        assert self._prompt_table is not None
        width = inps.shape[1]
        nonpad = (inps != _PAD).to(torch.int64)
        # length up to the last non-pad token; a row may really end in token 0, hence the search below
        last = torch.where(
            nonpad.any(dim=1), width - nonpad.flip(dims=[1]).argmax(dim=1), torch.zeros_like(nonpad[:, 0])
        )
        rows, lasts = inps.tolist(), last.tolist()
        lengths: list[int | None] = []
        for row, n in zip(rows, lasts):
            found = None
            for end in range(n, width + 1):
                queue = self._prompt_table.get(tuple(row[:end]))
                if queue:
                    found = queue[0] if len(set(queue)) == 1 else queue.popleft()
                    break
            lengths.append(found)
        if all(length is None for length in lengths):
            return None
        if any(length is None for length in lengths):  # pragma: no cover - would be an lm-eval change
            raise RuntimeError(
                "probe-hf: a loglikelihood batch mixes known and unknown rows; cannot tell its prompt lengths"
            )
        return torch.tensor(lengths, dtype=torch.long, device=inps.device)

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """HFLM's forward ([B, T] ids -> [B, T, V] logits), inside ``intervention.prompt_lengths``
        for loglikelihood batches when the intervention acts on prompt positions only."""
        if self._prompt_table is None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        lengths = self._row_prompt_lengths(inps)
        if lengths is None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with self.intervention.prompt_lengths(lengths):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def get_model_info(self) -> dict:
        """HFLM's model info plus a description of the intervention (written to lm-eval's results)."""
        info = super().get_model_info()
        if self.intervention is not None:
            iv = self.intervention
            info["probe_intervention"] = {
                "mode": iv.mode,
                "positions": iv.positions,
                "n_features": len(iv.features),
                "value": None if getattr(iv, "value", None) is None else float(iv.value),
                "model_name": getattr(iv, "model_name", None),
            }
        return info
