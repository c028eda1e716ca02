"""SFT with feature preservation (docs/methods.md sec. 12, docs/preserve.md): chosen crosscoder features are held near the base model's.

    loss = SFT loss + preserve_coefficient * mean over tokens x of ||f_S(a_theta(x)) - f_S(a_base(x))||^2

The run of recipes/sft.py (full CoT traces, correct only, 1 epoch, probe callbacks under ``<output_dir>/probe/``) whose
loss adds the change of the features S (default: the base-only NormRatio category) of a crosscoder's base branch at its
site L: a_theta from the training forward itself, a_base from a truncated forward (blocks < L) of the frozen base model
on the same batch (see ``--preserve_*`` in ``--help``). Without ``preserve_crosscoder`` the same script is a plain SFT
control run with identical settings.

# Tiny run on a laptop CPU (offline, seconds; first build the tiny crosscoder as recipes/configs/tiny/sft_preserve.yaml says)
```bash
accelerate launch --num_processes 1 --cpu recipes/sft_preserve.py --config recipes/configs/tiny/sft_preserve.yaml
```

# Qwen3-4B-Base, the base-only features of the base-vs-SFT crosscoder preserved, 8 GPUs
```bash
accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/sft_preserve.py \
    --config recipes/configs/qwen3-4b-base/sft_preserve_base_only.yaml
```

# Afterwards: how much the preserved features still moved (the leakage figures of paper S E.1)
```bash
posttrain-probe leakage --crosscoder runs/qwen3-4b-base/crosscoder-base-sft --features base-only \
    --base Qwen/Qwen3-4B-Base --blocked runs/qwen3-4b-base/sft-preserve-base-only \
    --dataset open-r1/OpenR1-Math-220k --seq-len 1024 --out runs/qwen3-4b-base/leakage-preserve-base-only
```
"""

import argparse

from posttrain_probe.recipes.common import MathScriptArguments, parse_recipe_args


def main(script_args, training_args, model_args, probe_args, preserve_args, monitor_args=None):
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from posttrain_probe.callbacks import add_probe_callbacks
    from posttrain_probe.callbacks.preserve import FeaturePreservingMixin, build_preserver
    from posttrain_probe.recipes.common import TINY_PREFIX, load_model_and_tokenizer, sft_dataset, tiny_model

    class SFTPreserveTrainer(FeaturePreservingMixin, SFTTrainer):
        """SFTTrainer whose loss adds lambda * mean_x ||f_S(a_theta(x)) - f_S(a_base(x))||^2 (logged as `preserve`)."""

    # Model (a name or path; tiny:<arch> builds a tiny model for CPU runs), its tokenizer, and the frozen base:
    # preserve_base_model, else the same checkpoint (loaded by the trainer, blocks after L dropped), or the same tiny model
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    name = model_args.model_name_or_path
    base_model = preserve_args.preserve_base_model
    if base_model is None and name.startswith(TINY_PREFIX):
        base_model = tiny_model(name)

    # Dataset: question -> correct worked solution, as conversational prompt-completion rows
    with training_args.main_process_first(desc="map the dataset"):
        dataset = sft_dataset(script_args)

    # Trainer: the preserved features, their site and both models are checked here, before training
    preserver = build_preserver(preserve_args)
    trainer = SFTPreserveTrainer(
        model=model,
        preserver=preserver,
        base_model=base_model if preserver is not None else None,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    if preserver is None:
        trainer.accelerator.print("Feature preservation: off (no preserve_crosscoder): a plain SFT control run.")
    else:
        trainer.accelerator.print(
            f"Feature preservation: {preserver!r}, features {preserve_args.preserve_features!r} of {preserve_args.preserve_crosscoder}"
        )

    # The probe callbacks (snapshots + activations)
    add_probe_callbacks(trainer, probe_args, paradigm="sft_preserve", monitor=monitor_args)

    # Train and save
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import ModelConfig, SFTConfig, TrlParser

    from posttrain_probe.callbacks import MonitorArguments, ProbeArguments
    from posttrain_probe.callbacks.preserve import PreserveArguments

    dataclass_types = (MathScriptArguments, SFTConfig, ModelConfig, ProbeArguments, PreserveArguments, MonitorArguments)
    if subparsers is not None:
        return subparsers.add_parser(
            "sft_preserve",
            help="SFT with feature preservation and the probe callbacks",
            dataclass_types=dataclass_types,
        )
    return TrlParser(dataclass_types, prog=prog)


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line (``argv``, default ``sys.argv[1:]``; ``--config FILE`` + flags) and train."""
    main(*parse_recipe_args(make_parser(), argv))


if __name__ == "__main__":
    from posttrain_probe.process_group import end_process_group

    cli()
    end_process_group()  # the script's end: torch's documented shutdown (see process_group.py)
