"""The end of a command run under ``torchrun`` / ``accelerate launch``: destroy the default process group.

torch's documented shutdown (``torch.distributed.destroy_process_group``) is left to the script; TRL's
trainers and transformers' ``Trainer`` never call it. Without it gloo's worker threads can still be alive
while the interpreter finalises, and the process aborts at exit now and then (SIGABRT, "terminate called
without an active exception"), failing a run whose work was all done. The CLI and the recipes call
:func:`end_process_group` after their work succeeded (never on an error path: ranks that stopped at
different points could wait on each other there).
"""

from __future__ import annotations

import gc
import sys


def end_process_group() -> bool:
    """Destroy the default process group if this process has one; returns whether it did. Imports nothing: a
    process that never imported torch has no group (and a light command stays light). Leaves the group to vLLM
    when it is loaded: in TRL's colocate mode vLLM builds its own groups on the default one and destroys them at
    exit, which would fail on groups already gone.

    Unreachable objects are collected first (``gc.collect()``): a finished trainer that callbacks refer back to
    is a reference cycle, and its DDP wrapper holds the group's backend; collected here, the backend and its
    threads go with the group now, while the interpreter is whole, not in the finalisation that aborts. Objects
    the caller still holds (a module-level ``trainer``) keep it: delete them before calling this."""
    torch = sys.modules.get("torch")
    if torch is None or "vllm" in sys.modules:  # vLLM (TRL's colocate mode) tears down the groups it built itself
        return False
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    gc.collect()
    dist.destroy_process_group()
    return True
