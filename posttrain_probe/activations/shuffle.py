"""Shuffle a stream of token chunks through a buffer and cut it into fixed-size batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

import torch

from posttrain_probe.errors import ProbeError


def shuffled_batches(
    chunks: Iterable[tuple[torch.Tensor, ...]],
    batch_size: int,
    *,
    buffer_tokens: int = 262144,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Re-batch aligned chunks (each a tuple of tensors sharing dim 0 = tokens) into batches.

    Chunks are gathered until at least ``buffer_tokens`` tokens are held, the held tokens are
    permuted together (all tensors of a tuple with the same permutation), and full batches of
    ``batch_size`` tokens are yielded; the remainder stays in the buffer. Every token of the
    stream is yielded exactly once; the final partial batch is yielded unless ``drop_last``.
    """
    if batch_size < 1:
        raise ProbeError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    held: list[tuple[torch.Tensor, ...]] = []
    n_held = 0

    def drain(final: bool) -> Iterator[tuple[torch.Tensor, ...]]:
        nonlocal held, n_held
        if not held:
            return
        parts = tuple(torch.cat(column) if len(held) > 1 else column[0] for column in zip(*held))
        n_full = n_held // batch_size * batch_size
        if shuffle:  # gather batch by batch: no permuted copy of the whole buffer
            order = torch.randperm(n_held, generator=generator).to(parts[0].device)
            for start in range(0, n_full, batch_size):
                index = order[start : start + batch_size]
                yield tuple(part[index] for part in parts)
            rest = tuple(part[order[n_full:]] for part in parts)
        else:
            for start in range(0, n_full, batch_size):
                yield tuple(part[start : start + batch_size] for part in parts)
            rest = tuple(part[n_full:] for part in parts)
        held, n_held = ([rest], n_held - n_full) if n_held > n_full else ([], 0)
        if final and held and not drop_last:
            yield rest
            held, n_held = [], 0

    for chunk in chunks:
        if chunk[0].shape[0] == 0:
            continue
        held.append(chunk)
        n_held += chunk[0].shape[0]
        if n_held >= max(buffer_tokens, batch_size):
            yield from drain(final=False)
    yield from drain(final=True)


class ActivationSource(ABC):
    """A source of activation chunks that serves shuffled fixed-size batches.

    Subclasses implement :meth:`chunks`; every source (stores, paired stores, live forwards)
    shares this :meth:`iter_batches`.
    """

    default_buffer_tokens: int = 262144
    """Tokens held for shuffling when ``buffer_tokens`` is not given."""
    batches_on_host: bool = True
    """Batches are built in host memory (stores), so a GPU trainer may read them on a background thread."""

    @abstractmethod
    def chunks(self, *, shuffle: bool, seed: int, epochs: int | None) -> Iterator[torch.Tensor]:
        """Activation chunks [n, ...] in raw model units, ``epochs`` passes (None: forever)."""

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = 1,
        buffer_tokens: int | None = None,
        drop_last: bool = False,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device | None = None,
    ) -> Iterator[torch.Tensor]:
        """Batches [batch_size, ...] (the chunks' trailing shape) in ``dtype`` (None: the source's) on ``device``, raw
        model units.

        With ``shuffle`` the chunk order (where the source has one) is permuted and tokens are
        shuffled through a buffer of at least ``buffer_tokens`` tokens; every token comes exactly
        once per epoch (the last partial batch of the run is kept unless ``drop_last``).
        ``epochs=None`` repeats forever.
        """
        chunks = ((chunk,) for chunk in self.chunks(shuffle=shuffle, seed=seed, epochs=epochs))
        buffer = self.default_buffer_tokens if buffer_tokens is None else buffer_tokens
        for (acts,) in shuffled_batches(
            chunks, batch_size, buffer_tokens=buffer, shuffle=shuffle, seed=seed, drop_last=drop_last
        ):
            yield acts.to(device=device, dtype=dtype, non_blocking=True)
