"""Timing helpers of the benchmark scripts (a sibling module: the scripts import it when run as files)."""

from __future__ import annotations

import time
import warnings

import torch


def seconds(fn, device: torch.device) -> float:
    """Wall seconds of one call of ``fn()`` including the work it queued on ``device`` (CUDA: synchronised
    before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def host_syncs(fn, device: torch.device) -> int | None:
    """Synchronising CUDA calls (a read of a device value by the host) made by one call of ``fn``, counted by
    ``torch.cuda.set_sync_debug_mode("warn")``; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def op_profile(fn, device: torch.device, rows: int = 12) -> str:
    """torch.profiler's table of the ``rows`` operators with the most self time in one call of ``fn()``: device
    (kernel) time on CUDA, CPU time otherwise. Where a step's time goes, for a figure below its target."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    return prof.key_averages().table(
        sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows
    )
