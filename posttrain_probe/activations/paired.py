"""Read the stores of several models over the same tokens as one stream of [batch, n_models, d]."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from posttrain_probe.activations.shuffle import ActivationSource
from posttrain_probe.activations.store import ActivationStore, shard_chunks
from posttrain_probe.errors import ProbeError

logger = logging.getLogger(__name__)

COLLECT_INDEX = "collect.json"


class PairedActivations(ActivationSource):
    """Zip activation stores of N models collected on identical tokens.

    ``stores`` maps model names (in the order wanted for the model axis) to store directories or
    :class:`ActivationStore` objects; :meth:`iter_batches` serves [batch, n_models, d] where token
    i of every model is the same token. Stores whose token fingerprints differ (other tokens, other
    order or other shard boundaries) or whose widths differ are refused, naming both.
    """

    def __init__(self, stores: Mapping[str, str | os.PathLike | ActivationStore], *, verify: bool = True) -> None:
        if not stores:
            raise ProbeError("PairedActivations needs at least one store, got none")
        self.stores: dict[str, ActivationStore] = {
            name: store if isinstance(store, ActivationStore) else ActivationStore(store, verify=verify)
            for name, store in stores.items()
        }
        (first_name, first), *others = self.stores.items()
        for name, store in others:
            if store.token_fingerprint != first.token_fingerprint:
                raise ProbeError(
                    f"stores {first_name!r} ({first.path}, {first.n_tokens} tokens, fingerprint "
                    f"{first.token_fingerprint[:12]}) and {name!r} ({store.path}, {store.n_tokens} tokens, "
                    f"fingerprint {store.token_fingerprint[:12]}) hold different tokens; pair only stores "
                    "collected on the same token batches (posttrain-probe collect with all models at once)"
                )
            if store.d_model != first.d_model:
                raise ProbeError(
                    f"stores {first_name!r} (d_model {first.d_model}) and {name!r} (d_model {store.d_model}) "
                    "have different widths; expected equal hidden sizes"
                )
            if store.layer != first.layer:
                logger.warning(
                    "pairing stores of different layers: %s@%d, %s@%d", first_name, first.layer, name, store.layer
                )
        self._first = first

    @classmethod
    def from_directory(
        cls, path: str | os.PathLike, *, layer: int | None = None, models: list[str] | None = None, verify: bool = True
    ) -> PairedActivations:
        """Open ``path/<model>/layer<L>/`` stores written by :func:`~posttrain_probe.activations.collect.collect`.

        ``models`` selects and orders models (default: the order of the collect run); ``layer``
        is required when more than one layer was collected.
        """
        path = Path(path)
        index_file = path / COLLECT_INDEX
        if not index_file.exists():
            raise ProbeError(f"{path} is not a collect output directory: {COLLECT_INDEX} is missing")
        index = json.loads(index_file.read_text())
        layers = index["layers"]
        if layer is None:
            if len(layers) != 1:
                raise ProbeError(f"{path} holds layers {layers}; pass layer= to choose one")
            layer = layers[0]
        if layer not in layers:
            raise ProbeError(f"layer {layer} was not collected in {path}: expected one of {layers}")
        names = models or list(index["models"])
        unknown = [n for n in names if n not in index["models"]]
        if unknown:
            raise ProbeError(f"models {unknown} are not in {path}: expected some of {list(index['models'])}")
        return cls({name: path / name / f"layer{layer}" for name in names}, verify=verify)

    @property
    def model_names(self) -> list[str]:
        return list(self.stores)

    @property
    def n_models(self) -> int:
        return len(self.stores)

    @property
    def d_model(self) -> int:
        return self._first.d_model

    @property
    def layer(self) -> int:
        return self._first.layer

    @property
    def n_tokens(self) -> int:
        return self._first.n_tokens

    def __repr__(self) -> str:
        return f"PairedActivations(models={self.model_names}, layer={self.layer}, n_tokens={self.n_tokens}, d_model={self.d_model})"

    def load_shard(self, index: int) -> torch.Tensor:
        """Shard ``index`` of every store stacked as [n, n_models, d] (store dtype)."""
        return torch.stack([store.load_shard(index)["acts"] for store in self.stores.values()], dim=1)

    def chunks(self, *, shuffle: bool, seed: int, epochs: int | None) -> Iterator[torch.Tensor]:
        """Shards of all stores [n, n_models, d]; one shard order for all models, new each epoch."""
        return shard_chunks(self.load_shard, self._first.n_shards, shuffle=shuffle, seed=seed, epochs=epochs)
