"""Run verl's real workers and FSDP engine on CPU (gloo) in tests.

verl 0.9.1 ships CUDA, NPU and ROCm platforms only and, finding no accelerator, falls back to
"nvidia" (``torch.cuda.set_device`` then fails on a CPU-only torch). It documents the way to add a
platform: subclass ``PlatformBase``, register it with ``PlatformRegistry.register`` and select it
with ``VERL_PLATFORM``. :class:`PlatformCPU` does that for the CPU: device ``cpu``, gloo for every
collective, no memory statistics. ``VERL_ENGINE_DEVICE=cuda`` (verl's own override of the engine
lookup) picks the FSDP engine, which verl registers for cuda/npu only; nothing CUDA-specific runs
in it once the platform says ``cpu``.

:func:`use_cpu_platform` must run before verl first asks for its platform (importing verl alone
does not), in every process that runs verl code: scripts call it first, Ray workers get it as
their ``worker_process_setup_hook`` (where it also joins the worker group's gloo process group,
see :func:`_init_gloo_process_group`). :func:`actor_config` composes verl's own ppo_trainer config
with :data:`CPU_OVERRIDES`.

What stays GPU-only: verl's default FSDP1 strategy (torch refuses ``sync_module_states=True``,
which verl hard-codes, for CPU tensors), the reference model in the same worker (its FSDP2
``CPUOffloadPolicy(pin_memory=True)`` needs an accelerator to pin memory) and the rollout (vLLM /
SGLang servers).
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from typing import Any

import torch


def _noop(*args, **kwargs) -> None:
    return None


def _zero(*args, **kwargs) -> int:
    return 0


def _cpu_device_module() -> types.ModuleType:
    """``torch.cpu`` plus the torch.cuda-style calls verl makes on its device module (memory
    statistics report 0, cache/IPC calls do nothing, RNG is the CPU generator)."""
    module = types.ModuleType("verl_cpu_device")
    for name in (
        "current_device",
        "device_count",
        "is_available",
        "synchronize",
        "current_stream",
        "stream",
        "set_device",
        "Stream",
    ):
        setattr(module, name, getattr(torch.cpu, name))
    for name in ("empty_cache", "ipc_collect", "set_per_process_memory_fraction", "reset_peak_memory_stats"):
        setattr(module, name, _noop)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        setattr(module, name, _zero)
    module.mem_get_info = lambda *args, **kwargs: (0, 0)
    module.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    module.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    module.manual_seed = torch.manual_seed
    module.manual_seed_all = torch.manual_seed
    module.get_device_name = lambda *args, **kwargs: "cpu"
    return module


def use_cpu_platform() -> None:
    """Register the CPU platform with verl and select it (idempotent; call before verl runs); in a
    Ray worker of a verl worker group, also join the group's gloo process group."""
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    if PlatformRegistry.get("cpu") is None:

        @PlatformRegistry.register(platform="cpu")
        class PlatformCPU(PlatformBase):
            """verl platform for CPU-only hosts (tests): device ``cpu``, gloo collectives."""

            _module = _cpu_device_module()

            @property
            def device_name(self) -> str:
                return "cpu"

            @property
            def vendor_name(self) -> str:
                return "cpu"

            @property
            def device_module(self) -> types.ModuleType:
                return self._module

            def is_available(self) -> bool:
                return True

            def current_device(self) -> torch.device:  # a device, not an index: FSDP reads an int as cuda:<int>
                return torch.device("cpu")

            def device_count(self) -> int:
                return 1

            def set_device(self, device_index: int) -> None:
                return None

            def synchronize(self, device_index: int | None = None) -> None:
                return None

            def manual_seed(self, seed: int) -> None:
                torch.manual_seed(seed)

            def manual_seed_all(self, seed: int) -> None:
                torch.manual_seed(seed)

            def set_allocator_settings(self, settings: str) -> None:
                return None

            def empty_cache(self) -> None:
                return None

            def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
                return None, None

            def communication_backend_name(self) -> str:
                return "gloo"

            def visible_devices_envvar(self) -> str:
                return "CPU_VISIBLE_DEVICES"

            @contextmanager
            def nvtx_range(self, msg: str):
                yield

            def profiler_start(self) -> None:
                return None

            def profiler_stop(self) -> None:
                return None

            def ray_resource_name(self) -> str:
                return "CPU"

            def ray_noset_envvars(self) -> list[str]:
                return []

            def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
                return {}

            def is_ipc_supported(self) -> bool:
                return False

            def cudart(self) -> Any:
                return None

    os.environ["VERL_PLATFORM"] = "cpu"
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    if os.environ.get("WG_BACKEND") == "ray" and "RANK" in os.environ:
        _init_gloo_process_group()


def _init_gloo_process_group() -> None:
    """Join the worker group's process group with gloo (a Ray worker of a verl RayWorkerGroup).

    verl's ``initialize_global_process_group_ray`` asks torch for the backend
    ``"cpu:gloo,<device>:<backend>"``, i.e. ``"cpu:gloo,cpu:gloo"`` on the CPU platform, which torch
    rejects ("Duplicate device type cpu"); it skips the call when a process group exists, so the
    worker process joins one first, from the rank, world size and master address verl's
    ``RayWorkerGroup`` put into its environment.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )


CPU_OVERRIDES = (
    "actor_rollout_ref.actor.strategy=fsdp2",  # FSDP1: verl passes sync_module_states=True, which torch refuses for CPU tensors
    "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",  # verl's default is flash_attention_2
    "actor_rollout_ref.model.use_remove_padding=false",  # the packed (varlen) path needs flash-attn
    "actor_rollout_ref.actor.use_torch_compile=false",
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
)
"""Overrides of verl's ppo_trainer config that a CPU actor needs (each line says why)."""


def actor_config(model_path: str, *overrides: str):
    """``actor_rollout_ref`` of verl's own ``ppo_trainer`` config (Hydra compose API) for an actor
    on CPU loading ``model_path``; ``overrides`` are Hydra overrides applied after CPU_OVERRIDES."""
    from pathlib import Path

    import verl
    from hydra import compose, initialize_config_dir

    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(
            config_name="ppo_trainer",
            overrides=[f"actor_rollout_ref.model.path={model_path}", *CPU_OVERRIDES, *overrides],
        )
    return config.actor_rollout_ref
