"""The TRL recipes (SFT, GRPO, SFT + KL, gradient-blocked SFT, feature-preserving SFT), shipped as ``posttrain_probe.recipes``.

From a checkout: ``accelerate launch recipes/sft.py --config recipes/configs/tiny/sft.yaml``; from an
installed wheel, anywhere: ``accelerate launch -m posttrain_probe.recipes.sft --config FILE``. Each recipe
module has ``cli(argv)`` (parse ``--config`` + flags, then train); ``posttrain-probe study`` launches them.
"""
