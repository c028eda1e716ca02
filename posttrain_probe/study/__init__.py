"""The study of issue 13 on a CPU: one tiny base model, several post-training arms, lm-eval and crosscoders.

* :mod:`~posttrain_probe.study.world_config` / :mod:`~posttrain_probe.study.world` -- the "world": a synthetic
  training set, lm-eval tasks over it and a tiny base model briefly pretrained on it (:func:`build_world`).
"""
