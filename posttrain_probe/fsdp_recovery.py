"""Put FSDP units back in order after a forward that a capture hook aborted on purpose.

:func:`posttrain_probe.layers.truncated_forward` stops the forward by raising inside block L.
The exception unwinds through the forward of every FSDP unit enclosing that block, so their
post-forward never runs. This module finds those units and runs the step they skipped. It reads
private FSDP state (torch is pinned in pyproject.toml); if a name is missing it does nothing.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def sharded_units_in_forward(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """FSDP units of ``model`` whose forward has started and not ended, outermost first.

    Returns ``(module, state)`` pairs: FSDP2 (``fully_shard``) units whose state is in FORWARD,
    and FSDP1 ``FullyShardedDataParallel`` instances in FORWARD_BACKWARD whose handle (if any)
    is in FORWARD (in a backward the handle is in BACKWARD_PRE/POST instead). Empty, at no cost,
    when FSDP was never imported.
    """
    if "torch.distributed.fsdp" not in sys.modules:
        return []
    try:  # private state: torch is pinned (pyproject), and a missing name only disables this
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.fsdp._common_utils import TrainingState as FSDP1State
        from torch.distributed.fsdp._flat_param import HandleTrainingState
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState as FSDP2State
    except ImportError:  # pragma: no cover - torch built without distributed
        return []
    units: list[tuple[nn.Module, object]] = []
    seen: set[int] = set()
    for module in model.modules():  # pre-order: outermost first
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            if id(state) not in seen and state._training_state == FSDP2State.FORWARD:
                units.append((module, state))
            seen.add(id(state))  # fully_shard([a, b]) shares one state between modules
        elif isinstance(module, FullyShardedDataParallel):
            handle = module._handle
            if module.training_state == FSDP1State.FORWARD_BACKWARD and (
                handle is None or handle._training_state == HandleTrainingState.FORWARD
            ):
                units.append((module, module))
    return units


def finish_aborted_forward(model: nn.Module, skip: set[int]) -> None:
    """Run the post-forward step that ``_StopForward`` made sharding wrappers skip.

    The exception unwinds through the forward of every FSDP unit enclosing the stop site (always
    the root), so their post-forward never runs and they stay "in forward". FSDP2 keeps the root
    state in FORWARD with ``iter_forward_root`` set: its next forward skips the root pre-forward
    (on GPU, the all-gather streams' wait on the compute stream) and ``FSDPModule.reshard()`` is
    a no-op on it (and on every enclosing unit not resharded after forward). FSDP1 keeps the root in
    FORWARD_BACKWARD: ``summon_full_params``, full state dicts and ``clip_grad_norm_`` then fail
    with "Cannot manually unshard parameters during forward/backward". Here each such unit
    (except those in ``skip``, already in a forward before the call) gets the post-forward a
    completed forward gives it, innermost first as in a normal unwind, under no_grad so no
    backward hook is registered. FSDP2 units are then resharded (public ``reshard()``): after a
    forward FSDP2 keeps the root's parameters gathered for the backward, but none follows a
    truncated forward, and while they are gathered ``model.parameters()`` yields the plain
    gathered tensors instead of the sharded DTensors (an optimizer built then would train
    copies). FSDP1's root keeps, as after any forward, its gathered buffer (its parameters are
    the same objects either way). Units whose forward never started -- the stop block and all
    later ones, since the capture hook is prepended to the wrappers' pre-forward hooks -- were
    never touched.
    """
    units = [(module, state) for module, state in sharded_units_in_forward(model) if id(module) not in skip]
    if not units:
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._runtime_utils import _post_forward, _post_forward_reshard

    with torch.no_grad():
        for module, state in reversed(units):
            if isinstance(module, FullyShardedDataParallel):  # FSDP1
                _post_forward(module, module._handle, _post_forward_reshard, module, None, None)
            else:  # FSDP2
                state._post_forward(module, (), None)
        for module, _ in units:
            if not isinstance(module, FullyShardedDataParallel):
                module.reshard()
