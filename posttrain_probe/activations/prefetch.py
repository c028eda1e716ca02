"""Run an iterator of batches on a background thread, a few items ahead of its consumer.

For training on a GPU from activation stores: reading, shuffling (the buffer refills concatenate and gather up to
gigabytes on the host) and pinning run beside the training step instead of between steps, while the GPU works
through the kernels already queued. PyTorch's tensor ops release the GIL, so the host work overlaps.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

from posttrain_probe.errors import ProbeError

T = TypeVar("T")

_POLL_SECONDS = 0.1
"""How often a producer blocked on a full queue checks whether its consumer has gone (and the consumer whether
the producer is alive)."""
_JOIN_SECONDS = 60.0
"""How long closing waits for the producer to finish the item it is making."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def prefetched(items: Iterable[T], depth: int = 2, *, name: str = "posttrain-probe-prefetch") -> Iterator[T]:
    """The items of ``items`` in order, produced by a daemon thread that runs at most ``depth`` items ahead.

    An exception raised by ``items`` is raised here, at the item where it happened. Closing this generator (or
    dropping it) stops the thread at its next item, closes ``items`` there and waits for that (up to a minute).
    ``depth`` >= 1.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ProbeError(f"prefetch depth={depth!r}: expected an integer >= 1")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:
        """Put ``item`` in the queue unless the consumer has gone; False when it has."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = None
        try:
            source = iter(items)
            for item in source:
                if not offer(item):
                    return
            offer(_END)
        except BaseException as error:  # handed to the consumer, raised there
            offer(_Failure(error))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            try:
                item = ready.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not worker.is_alive() and ready.empty():  # it ended without a word: nothing more will come
                    raise ProbeError("the prefetching thread stopped without an item, an end or an error") from None
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join(timeout=_JOIN_SECONDS)  # it stops at its next item: the source is closed when this returns
