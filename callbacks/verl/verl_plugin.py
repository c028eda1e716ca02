"""Target of verl's ``verl.plugins`` entry point (pyproject.toml): ``import verl`` imports this module.

The fallback for Ray sessions started without our ``worker_process_setup_hook`` (Ray initialised
before verl's ``run_ppo``, so verl never passed on.yaml's runtime_env): in such a Ray process it
registers the probe trainer (:func:`~posttrain_probe.callbacks.verl.setup_hook.setup`).

It does nothing outside Ray (the driver before ``ray.init``, any script importing verl) and nothing
when the Ray job runs our hook, which registers after ``import verl`` has finished. Registering here
happens in the middle of ``import verl``: the trainer module imports verl modules that resolve verl's
device platform, so a platform that another plugin registers later is not seen yet; a failure is
logged as a warning (verl itself would only log it at debug level).
"""

from __future__ import annotations

import logging
import os


def _register_in_ray_process() -> None:
    import ray

    if not ray.is_initialized():
        return
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    from posttrain_probe.callbacks.verl.config import SETUP_HOOK

    # Ray exports the job's setup hook to its workers under this name (reading the runtime context here,
    # inside a setup hook, crashes Ray 2.60 workers).
    if os.environ.get(WORKER_PROCESS_SETUP_HOOK_ENV_VAR) == SETUP_HOOK:
        return  # our hook registers, once verl is fully imported
    from posttrain_probe.callbacks.verl.setup_hook import setup

    try:
        setup()
    except Exception as err:  # noqa: BLE001 - verl swallows plugin errors; make this one visible
        logging.getLogger(__name__).warning(
            "posttrain-probe could not register the probe trainer in this Ray process: %r", err
        )


_register_in_ray_process()
