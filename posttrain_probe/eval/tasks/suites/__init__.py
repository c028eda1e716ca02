"""The two papers' evaluation suites as lm-eval tasks and groups (docs/evaluation.md).

This folder lies under :data:`posttrain_probe.eval.tasks.TASKS_DIR`, which ``posttrain-probe lm-eval``
and :func:`posttrain_probe.eval.runner.evaluate` give lm-eval as an include path; lm-eval indexes it
recursively, so every name below works as ``--tasks NAME`` (the data come from the HF hub on first use:
run on a networked machine, or with ``HF_DATASETS_OFFLINE=1`` and a filled cache).

Groups (:data:`posttrain_probe.eval.tasks.SUITES`):

* Paper R (rl-generalization): ``paper_r_in_domain`` (``pr_math500``, ``pr_aime24``, ``pr_aime25``),
  ``paper_r_general_gen`` / ``paper_r_general_ll`` (OpenBookQA, CommonsenseQA, HeadQA-en, SciQ,
  ARC-Challenge), ``paper_r_held_out_gen`` / ``paper_r_held_out_ll`` (LogiQA, PIQA) and ``paper_r`` =
  in-domain + general_gen + held_out_gen, the study's default.
* Paper S (sft-robustness): ``paper_s_math``, ``paper_s_other_reasoning`` (with lm-eval's ``humaneval``
  standing in for LiveCodeBench and the ``ps_acpbench_mcq`` group of lm-eval's ``acp_*_mcq`` tasks),
  ``paper_s_general``, ``paper_s_non_reasoning`` (lm-eval's ``ifeval`` and ``mc_taco``) and ``paper_s``.

Tasks: ``pr_*`` / ``ps_*`` YAMLs here; multiple-choice datasets come in two variants, ``*_ll``
(log-likelihood, ``acc`` / ``acc_norm``) and ``*_gen`` (generative, the letter read strictly, ``acc``);
math tasks report ``acc`` = ``pass@1``, the correctness averaged over their sampled repeats. The
``_template_*.yaml`` files are shared configs, not tasks. The functions the YAMLs name (dataset
normalisers, prompts, scorers, :func:`~posttrain_probe.eval.tasks.suites.utils.paper_s_scores`) are in
:mod:`posttrain_probe.eval.tasks.suites.utils`.
"""
