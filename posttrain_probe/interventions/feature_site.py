"""Features S of one crosscoder branch at one site: what gradient blocking and feature preservation both set up.

:class:`FeatureSite` validates the branch, the site L and the feature indices once, keeps the branch's model
fingerprint for the model check (:mod:`posttrain_probe.model_identity`), and holds the crosscoder restricted to S
(:meth:`~posttrain_probe.crosscoder.model.Crosscoder.restrict`: its ``encode_source`` is the full one's ``[:, S]``),
copied to each device and dtype it is used in. :class:`~posttrain_probe.interventions.blocking.GradientBlocker` and
:class:`~posttrain_probe.interventions.preserve.FeaturePreserver` build on it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch
from torch import nn

from posttrain_probe.errors import ProbeError
from posttrain_probe.model_identity import check_site_model, slot_fingerprint


class FeatureSite:
    """Features ``features`` of branch ``model`` of a crosscoder/SAE at site ``layer`` (default: its layer).

    ``what`` names the use in errors ("blocking", "feature preservation"). ``allow_empty``: an empty S is valid
    (else a ProbeError). ``encoder``: keep the restricted encoder (``encoder_bias=False`` drops its b_enc, paper S's
    ReLU(W_enc^T x)). A BatchTopK crosscoder without an inference threshold is refused: its codes are undefined.
    ``override_hint`` ends the model check's error (default: the Python argument; a recipe names its flag).
    """

    def __init__(
        self,
        crosscoder,
        features: Sequence[int],
        *,
        model: str | int,
        layer: int | None,
        what: str,
        allow_model_mismatch: bool = False,
        allow_empty: bool = True,
        encoder: bool = True,
        encoder_bias: bool = True,
        override_hint: str | None = None,
    ) -> None:
        self.override_hint = override_hint
        self.slot = crosscoder.model_index(model)
        self.model_name = crosscoder.model_names[self.slot]
        self.model_fingerprint = slot_fingerprint(crosscoder, self.slot)
        self.allow_model_mismatch = bool(allow_model_mismatch)
        self.model_mismatch: str | None = None
        """The last mismatch :meth:`check_model` let through with ``allow_model_mismatch`` (None: none so far)."""
        self.layer = crosscoder.site(layer, what=what)
        if self.layer is None:
            raise ProbeError("the crosscoder does not record its layer: pass layer=")
        n_features = crosscoder.config.n_features
        try:
            self.features = sorted({int(f) for f in features})
        except (TypeError, ValueError) as err:
            raise ProbeError(
                f"features must be integer indices, got {features!r}: use resolve_features() for categories, files or '3,17'"
            ) from err
        if not self.features and not allow_empty:
            raise ProbeError(f"the feature set is empty: {what} would protect nothing")
        bad = [f for f in self.features if not 0 <= f < n_features]
        if bad:
            raise ProbeError(f"feature indices {bad[:10]} are out of range for a crosscoder of {n_features} features")
        if crosscoder.config.activation == "batchtopk":
            crosscoder.source_threshold(self.slot)  # ProbeError when the crosscoder has no inference threshold yet
        self.d_model = crosscoder.config.d_model
        self._encoder = (
            crosscoder.restrict(self.features, encoder_bias=encoder_bias) if encoder and self.features else None
        )  # float32 CPU copy
        self._encoders: dict[tuple, nn.Module] = {}

    @classmethod
    def from_directory(
        cls,
        path: str | os.PathLike,
        spec: str | Sequence[int],
        *,
        base: str | int = "base",
        finetuned: str | int | None = None,
        norm_ratio_scale: str = "all",
        **kwargs,
    ):
        """``cls`` for the features ``spec`` of the crosscoder in directory ``path``: a NormRatio category of
        ``base`` vs ``finetuned``, a feature-set JSON or indices (:func:`~posttrain_probe.analysis.feature_sets.resolve_features`);
        ``kwargs`` go to ``cls``."""
        from posttrain_probe.analysis.feature_sets import resolve_features
        from posttrain_probe.crosscoder.inspect import load_crosscoder

        crosscoder = load_crosscoder(path)
        features = resolve_features(crosscoder, spec, base=base, finetuned=finetuned, norm_ratio_scale=norm_ratio_scale)
        return cls(crosscoder, features, **kwargs)

    def encoder_like(self, x: torch.Tensor):
        """The restricted encoder on ``x``'s device and dtype (copied there once), or None without one."""
        if self._encoder is None:
            return None
        key = (x.device, x.dtype)
        if key not in self._encoders:
            with torch.inference_mode(False):  # normal tensors: usable in and outside inference mode
                self._encoders[key] = copy.deepcopy(self._encoder).to(x.device, x.dtype)
        return self._encoders[key]

    def check_model(self, model: nn.Module, *, what: str | None = None) -> str | None:
        """Refuse ``model`` (any wrapper) when it has no block ``layer``, another width, or is another model than
        the one branch ``model_name`` was trained on (nor tuned from it; unless ``allow_model_mismatch``, which
        records the mismatch in ``model_mismatch`` and returns it)."""
        mismatch = check_site_model(
            model,
            self.layer,
            self.d_model,
            self.model_fingerprint,
            self.model_name,
            what=what,
            allow_mismatch=self.allow_model_mismatch,
            override=self.override_hint,
        )
        self.model_mismatch = mismatch or self.model_mismatch
        return mismatch
