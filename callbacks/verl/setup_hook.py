"""Make the probe trainer known to verl in every Ray process, without patching verl.

Two routes, both ending in :func:`setup`:

- ``+probe=on`` sets ``ray_kwargs.ray_init.runtime_env.worker_process_setup_hook`` to :func:`setup`;
  verl passes that runtime_env to ``ray.init``, so Ray runs the hook in every worker process
  (the TaskRunner included) before any task.
- verl's ``verl.plugins`` entry point (pyproject.toml, loaded by ``import verl`` unless
  ``VERL_USE_EXTERNAL_PLUGINS`` excludes it) imports :mod:`posttrain_probe.callbacks.verl.verl_plugin`,
  which registers in Ray processes. This is what works when Ray was initialised before verl's
  ``run_ppo``: verl then skips ``ray.init`` and the runtime_env (and our hook) with it.

:func:`check_ray_registration` fails early, in the driver, when neither route can work.
"""

from __future__ import annotations

import os

from posttrain_probe.callbacks.verl.config import ENTRY_POINT_GROUP, ENTRY_POINT_NAME, SETUP_HOOK
from posttrain_probe.errors import ProbeError


def setup() -> None:
    """Register the probe trainer under ``trainer.v1.trainer_mode=probe`` and apply the trl compatibility fix.

    The Ray ``worker_process_setup_hook`` of on.yaml / on_ckpt.yaml (Ray runs it in each worker process
    before it executes anything) and what :mod:`~posttrain_probe.callbacks.verl.verl_plugin` calls.
    Idempotent. Importing :mod:`posttrain_probe.callbacks.verl.trainer` registers it (verl's
    ``register_trainer`` decorator); the worker module it imports applies
    :func:`posttrain_probe.callbacks.verl.compat.apply`, which verl's own actor worker needs as well
    (``+probe=on_ckpt``) when trl 1.x is installed.
    """
    from posttrain_probe.callbacks.verl import compat

    compat.apply()
    import posttrain_probe.callbacks.verl.trainer  # noqa: F401  (registers ProbePPOTrainer)


def entry_point_enabled() -> bool:
    """Whether ``import verl`` loads our ``verl.plugins`` entry point in this environment.

    True when the installed package metadata declares it and ``VERL_USE_EXTERNAL_PLUGINS`` (verl's
    switch: ``auto`` by default, ``none``, or a comma-separated list of plugin names) allows it.
    """
    from importlib.metadata import entry_points

    policy = os.getenv("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    if policy == "none":
        return False
    ours = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == ENTRY_POINT_NAME]
    if not ours:
        return False
    return policy == "auto" or ENTRY_POINT_NAME in {name.strip() for name in policy.split(",")}


def check_ray_registration() -> None:
    """Driver-side check: if Ray is already initialised, verl will not apply our runtime_env, so the
    ``verl.plugins`` entry point (or a setup hook the caller passed to ``ray.init``) must register the
    probe trainer; raise a ProbeError naming the fix if neither does."""
    import ray

    if not ray.is_initialized() or entry_point_enabled():
        return
    if (ray.get_runtime_context().runtime_env or {}).get("worker_process_setup_hook") == SETUP_HOOK:
        return  # whoever started Ray passed our hook
    policy = os.getenv("VERL_USE_EXTERNAL_PLUGINS", "auto")
    raise ProbeError(
        "Ray is already initialised, so verl skips ray.init and the probe's worker_process_setup_hook "
        f"({SETUP_HOOK}) never runs, and verl's '{ENTRY_POINT_GROUP}' entry point '{ENTRY_POINT_NAME}' is "
        f"{'disabled (VERL_USE_EXTERNAL_PLUGINS=' + policy + ')' if policy.strip().lower() != 'auto' else 'not installed'}. "
        "Fix one of: install posttrain-probe with pip (pip install 'posttrain-probe[verl]') and leave "
        f"VERL_USE_EXTERNAL_PLUGINS unset (or add {ENTRY_POINT_NAME} to it); or call "
        f"ray.init(runtime_env={{'worker_process_setup_hook': '{SETUP_HOOK}'}}) yourself; or let verl start Ray"
    )
