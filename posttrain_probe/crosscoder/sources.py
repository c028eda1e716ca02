"""Open the training data of a crosscoder from what a user names: store directories or live models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain_probe.activations.paired import COLLECT_INDEX, PairedActivations
from posttrain_probe.activations.store import ActivationStore
from posttrain_probe.errors import ProbeError


def open_source(
    *,
    acts: list[str] | None = None,
    models: dict[str, str] | None = None,
    dataset: Any = None,
    layer: int | None = None,
    model_names: list[str] | None = None,
    seq_len: int = 512,
    forward_batch_size: int = 8,
    split: str = "train",
    column: str | None = None,
):
    """A PairedActivations over stored activations, or a LiveActivations over models.

    ``acts``: one collect output directory (``<dir>/<model>/layer<L>/``, pick with ``layer`` and
    ``model_names``) or several store directories (model names from their manifests, or
    ``model_names`` in the same order). ``models`` + ``dataset``: live paired forwards at
    ``layer``; under several processes each rank reads its own document batches.
    """
    if bool(acts) == bool(models):
        raise ProbeError(
            "give either activation stores (--acts DIR ...) or models and a dataset (--model NAME=PATH ... --dataset ...), not both or neither"
        )
    if models:
        from accelerate import PartialState

        from posttrain_probe.activations.live import LiveActivations
        from posttrain_probe.activations.live_config import LiveConfig

        if dataset is None:
            raise ProbeError("live training needs --dataset as well as --model NAME=PATH")
        state = PartialState()
        reading = LiveConfig(
            seq_len=seq_len, forward_batch_size=forward_batch_size, split=split, column=column, device=str(state.device)
        )
        return LiveActivations(
            models, dataset, layer=layer, config=reading, rank=state.process_index, world_size=state.num_processes
        )
    paths = [Path(p) for p in acts or []]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ProbeError(f"activation directories not found: {', '.join(missing)}")
    if len(paths) == 1 and (paths[0] / COLLECT_INDEX).exists():
        return PairedActivations.from_directory(paths[0], layer=layer, models=model_names or None)
    stores = [ActivationStore(p) for p in paths]
    names = list(model_names) if model_names else [store.model_name for store in stores]
    if len(names) != len(stores):
        raise ProbeError(
            f"{len(names)} model names {names} for {len(stores)} stores: give one name per --acts directory"
        )
    if len(set(names)) != len(names):
        raise ProbeError(f"the stores are named {names}: names must differ (pass --model-names to rename them)")
    if layer is not None:
        wrong = [f"{name} (layer {s.layer})" for name, s in zip(names, stores) if s.layer != layer]
        if wrong:
            raise ProbeError(f"stores from other layers than {layer}: {', '.join(wrong)}")
    layers = {s.layer for s in stores}
    if len(layers) > 1:
        raise ProbeError(
            f"the stores come from different layers {sorted(layers)}: a crosscoder pairs one site of every model"
        )
    return PairedActivations(dict(zip(names, stores)))
