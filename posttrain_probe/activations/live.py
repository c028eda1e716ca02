"""Serve paired activations straight from forwards of N models, without writing to disk."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from posttrain_probe.activations.capture import capture_batch
from posttrain_probe.activations.live_config import LiveConfig
from posttrain_probe.activations.shuffle import ActivationSource
from posttrain_probe.data import load_dataset_spec, token_batches
from posttrain_probe.errors import ProbeError
from posttrain_probe.layers import default_layer, hidden_size, validate_layer
from posttrain_probe.models import check_same_hidden_size, check_same_tokenizer, load_causal_lm, load_tokenizer


class LiveActivations(ActivationSource):
    """Paired truncated forwards of N models over a dataset, served as shuffled [batch, n_models, d].

    Same token selection as the stores (no padding, first position or BOS; optional norm-outlier
    filter), same units (raw model activations); how the dataset is read is ``config`` (:class:`LiveConfig`).
    Models given as paths are loaded with ``config.model_dtype`` onto ``config.device`` with the blocks after
    ``layer`` dropped. For data-parallel training pass ``rank``/``world_size``: each rank reads every
    world_size-th document batch.
    """

    def __init__(
        self,
        models: Mapping[str, str | os.PathLike | nn.Module],
        dataset: Any,
        *,
        layer: int | None = None,
        tokenizer=None,
        config: LiveConfig | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not models:
            raise ProbeError("LiveActivations needs at least one model")
        config = config or LiveConfig()
        if not 0 <= rank < world_size:
            raise ProbeError(f"rank {rank} is outside world_size {world_size}")
        path_models = {n: m for n, m in models.items() if not isinstance(m, nn.Module)}
        tokenizers = {n: load_tokenizer(m) for n, m in path_models.items()}
        if tokenizers:
            check_same_tokenizer(tokenizers if tokenizer is None else {"tokenizer=": tokenizer, **tokenizers})
        self.tokenizer = tokenizer if tokenizer is not None else next(iter(tokenizers.values()), None)
        if self.tokenizer is None:
            raise ProbeError("models were given as objects: pass tokenizer= as well")
        self.models: dict[str, nn.Module] = {}
        for name, model in models.items():
            self.models[name] = (
                model
                if isinstance(model, nn.Module)
                else load_causal_lm(model, dtype=config.model_dtype, device=config.device, keep_layers=layer)
            )
            check_same_hidden_size({n: hidden_size(m) for n, m in self.models.items()})
        first = next(iter(self.models.values()))
        self.layer = default_layer(first) if layer is None else layer
        for name, model in self.models.items():
            try:
                validate_layer(model, self.layer)
            except ProbeError as err:
                raise ProbeError(f"model {name!r}: {err}") from None
        self.dataset = load_dataset_spec(dataset, split=config.split, config_name=config.dataset_config)
        self.config = config
        self.rank, self.world_size = rank, world_size

    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def d_model(self) -> int:
        return hidden_size(next(iter(self.models.values())))

    def __repr__(self) -> str:
        return f"LiveActivations(models={self.model_names}, layer={self.layer}, n_docs={len(self.dataset)}, d_model={self.d_model})"

    default_buffer_tokens = 65536  # held on the models' device
    batches_on_host = False  # the forwards run on the models' device: no second thread beside the training step

    def chunks(self, *, shuffle: bool = False, seed: int = 0, epochs: int | None = 1) -> Iterator[torch.Tensor]:
        """Per-forward chunks [n, n_models, d] in dataset order (shuffling happens in iter_batches)."""
        models = list(self.models.values())
        training = [m.training for m in models]
        for model in models:
            model.eval()
        try:
            epoch = 0
            while epochs is None or epoch < epochs:
                produced = 0
                for batch in token_batches(
                    self.dataset,
                    self.tokenizer,
                    column=self.config.column,
                    seq_len=self.config.seq_len,
                    batch_size=self.config.forward_batch_size,
                    start_batch=self.rank,
                    step=self.world_size,
                ):
                    remaining = None if self.config.max_tokens is None else self.config.max_tokens - produced
                    if remaining is not None and remaining <= 0:
                        break
                    captured = capture_batch(
                        models,
                        batch,
                        [self.layer],
                        bos_token_id=self.tokenizer.bos_token_id,
                        outlier_factor=self.config.outlier_factor,
                        max_tokens=remaining,
                    )
                    produced += captured.token_ids.numel()
                    yield captured.acts[self.layer]
                if produced == 0:
                    raise ProbeError(
                        "the dataset gave no tokens to keep (after dropping the first position, BOS and padding)"
                    )
                epoch += 1
        finally:
            for model, was_training in zip(models, training):
                model.train(was_training)
