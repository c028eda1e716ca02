"""posttrain_probe.activations.prefetch: order, errors, early close and the bound on how far it runs ahead."""

from __future__ import annotations

import threading
import time

import pytest

from posttrain_probe.activations.prefetch import prefetched
from posttrain_probe.errors import ProbeError


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "posttrain-probe-prefetch"]


def _wait_for_no_workers(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _workers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _workers(), "the prefetch thread is still running"


def test_items_come_in_order_and_the_thread_ends():
    assert list(prefetched(iter(range(100)), depth=3)) == list(range(100))
    _wait_for_no_workers()


def test_an_error_of_the_source_is_raised_at_its_item():
    def source():
        yield 1
        yield 2
        raise ProbeError("shard 7 of store x is corrupt")

    got = []
    with pytest.raises(ProbeError, match="shard 7 of store x is corrupt"):
        for item in prefetched(source()):
            got.append(item)
    assert got == [1, 2]
    _wait_for_no_workers()


def test_closing_early_stops_the_thread_and_closes_the_source():
    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    items = prefetched(endless(), depth=2)
    assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    items.close()
    assert closed.wait(5.0), "the source was not closed"
    _wait_for_no_workers()


def test_the_producer_runs_at_most_depth_items_ahead():
    produced = []

    def source():
        for n in range(50):
            produced.append(n)
            yield n

    items = prefetched(source(), depth=2)
    assert next(items) == 0
    time.sleep(0.3)  # let the producer fill the queue
    # taken: 1; queued: 2; one more produced and waiting to be put
    assert len(produced) <= 1 + 2 + 1
    assert list(items) == list(range(1, 50))


@pytest.mark.parametrize("depth", [0, -1, 1.5, True])
def test_bad_depth_is_one_line(depth):
    with pytest.raises(ProbeError, match="prefetch depth"):
        next(prefetched(iter([1]), depth=depth))


def test_a_source_that_cannot_start_raises_instead_of_hanging():
    class NotIterable:
        def __iter__(self):
            raise ProbeError("store x cannot be opened")

    with pytest.raises(ProbeError, match="store x cannot be opened"):
        next(prefetched(NotIterable()))
    _wait_for_no_workers()


def test_closing_waits_for_the_source_to_be_closed():
    closed = threading.Event()

    def slow():
        try:
            while True:
                time.sleep(0.05)
                yield 1
        finally:
            closed.set()

    items = prefetched(slow(), depth=1)
    next(items)
    items.close()
    assert closed.is_set()  # closed before close() returned
    assert not _workers()
