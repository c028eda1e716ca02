"""verl integration: ``python -m verl.trainer.main_ppo +probe=on probe.layers=[18] ...``.

One config group, one registered trainer, one worker subclass:

- ``config/probe/on.yaml``, ``on_ckpt.yaml``: the Hydra config group ``probe`` (found through the
  ``hydra_plugins.posttrain_probe`` search-path plugin), ``probe.*`` keys = :class:`config.VerlProbeConfig`
  (``probe.monitor.*``: the feature monitor, run in the worker by :mod:`.monitor`);
- :mod:`.setup_hook` / :mod:`.verl_plugin`: register the trainer in every Ray process;
- :mod:`.trainer`: ``ProbePPOTrainer``, verl's sync trainer calling the worker at step 0 and at the
  snapshot steps; :mod:`.worker`: ``ProbeActorRolloutRefWorker`` (probe forward on the live actor,
  HF snapshot via verl's checkpoint manager);
- :mod:`.checkpoint_callback`: ``+probe=on_ckpt``, snapshots and activations from verl's own checkpoint saves.

Nothing is imported here: the Hydra plugin imports :mod:`.config` in every Hydra application, and
verl/Ray/torch are imported by the modules that need them.
"""
