"""Activations held in memory, served like a store: :class:`MemoryActivations`.

For small runs whose activations fit in memory (e.g. a base-vs-blocked crosscoder trained on the tokens a
leakage analysis compared): ``train_crosscoder(MemoryActivations(acts, ["base", "blocked"], layer), ...)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from posttrain_probe.activations.shuffle import ActivationSource
from posttrain_probe.errors import ProbeError


class MemoryActivations(ActivationSource):
    """Paired activations ``[n, N, d]`` (raw model units) held in memory, one slot per model of ``model_names``."""

    default_buffer_tokens = 65536
    chunk_tokens = 16384
    """Tokens per chunk of :meth:`chunks`."""

    def __init__(self, acts: torch.Tensor, model_names: list[str], layer: int | None = None) -> None:
        if acts.ndim != 3 or acts.shape[1] != len(model_names):
            raise ProbeError(
                f"expected activations [tokens, {len(model_names)}, d] for models {list(model_names)}, got {tuple(acts.shape)}"
            )
        self.acts, self._names, self.layer = acts, list(model_names), layer

    @property
    def model_names(self) -> list[str]:
        """Names of the N models in slot order."""
        return self._names

    @property
    def n_models(self) -> int:
        """N."""
        return len(self._names)

    @property
    def d_model(self) -> int:
        """Residual-stream width d."""
        return self.acts.shape[-1]

    @property
    def n_tokens(self) -> int:
        """Tokens held (the first dimension of the tensor)."""
        return self.acts.shape[0]

    def chunks(self, *, shuffle: bool = False, seed: int = 0, epochs: int | None = 1) -> Iterator[torch.Tensor]:
        """Chunks of :attr:`chunk_tokens` tokens, in order or (``shuffle``) in a seeded chunk order per epoch."""
        size = self.chunk_tokens
        starts = list(range(0, self.n_tokens, size))
        epoch = 0
        while epochs is None or epoch < epochs:
            order = (
                torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
                if shuffle
                else range(len(starts))
            )
            for i in order:
                yield self.acts[starts[i] : starts[i] + size]
            epoch += 1
