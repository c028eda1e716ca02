"""SFT with gradient blocking (docs/methods.md sec. 9, paper S sec. 2 / RQ5): protected crosscoder features cannot be trained directly.

The run of recipes/sft.py (full CoT traces, correct only, 1 epoch, probe callbacks under ``<output_dir>/probe/``) plus a
``GradientBlockingCallback``: at the crosscoder's site, in every training forward, the protected features' part x_S of
the residual stream is detached, x_new = sg(x_S) + (x - x_S) (forward values unchanged; see ``--block_*`` in ``--help``).
Without ``block_crosscoder``/``block_features`` the same script is a plain SFT control run with identical settings.

# Tiny run on a laptop CPU (offline, seconds; first build the tiny crosscoder as recipes/configs/tiny/sft_blocked.yaml says)
```bash
accelerate launch --num_processes 1 --cpu recipes/sft_blocked.py --config recipes/configs/tiny/sft_blocked.yaml
```

# Paper arms: Qwen3-4B-Base, shared / base-only / fine-tune-only features of the base-vs-SFT crosscoder blocked, 8 GPUs
```bash
accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/sft_blocked.py \
    --config recipes/configs/qwen3-4b-base/sft_blocked_shared.yaml
```

# Afterwards: how much the protected features still moved (leakage, paper S E.1)
```bash
posttrain-probe leakage --crosscoder runs/qwen3-4b-base/crosscoder-base-sft --features shared \
    --base Qwen/Qwen3-4B-Base --blocked runs/qwen3-4b-base/sft-blocked-shared \
    --dataset open-r1/OpenR1-Math-220k --seq-len 1024 --out runs/qwen3-4b-base/leakage-shared
```
"""

import argparse

from posttrain_probe.recipes.common import MathScriptArguments, parse_recipe_args


def main(script_args, training_args, model_args, probe_args, blocking_args, monitor_args=None):
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from posttrain_probe.callbacks import add_probe_callbacks, blocking_callback
    from posttrain_probe.recipes.common import load_model_and_tokenizer, sft_dataset

    # Model (a name or path; tiny:<arch> builds a tiny model for CPU runs) and its tokenizer
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)

    # Dataset: question -> correct worked solution, as conversational prompt-completion rows
    with training_args.main_process_first(desc="map the dataset"):
        dataset = sft_dataset(script_args)

    # Trainer
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )

    # Gradient blocking: hooked in front of decoder block L at train begin, removed at train end
    blocking = blocking_callback(blocking_args)
    if blocking is None:
        trainer.accelerator.print(
            "Gradient blocking: off (no block_crosscoder / block_features): a plain SFT control run."
        )
    else:
        trainer.add_callback(blocking)
        trainer.accelerator.print(
            f"Gradient blocking: {blocking.blocker!r}, features {blocking_args.block_features!r} of {blocking_args.block_crosscoder}"
        )

    # The probe callbacks (snapshots + activations)
    add_probe_callbacks(trainer, probe_args, paradigm="sft_blocked", monitor=monitor_args)

    # Train and save
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import ModelConfig, SFTConfig, TrlParser

    from posttrain_probe.callbacks import BlockingArguments, MonitorArguments, ProbeArguments

    dataclass_types = (MathScriptArguments, SFTConfig, ModelConfig, ProbeArguments, BlockingArguments, MonitorArguments)
    if subparsers is not None:
        return subparsers.add_parser(
            "sft_blocked", help="SFT with gradient blocking and the probe callbacks", dataclass_types=dataclass_types
        )
    return TrlParser(dataclass_types, prog=prog)


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line (``argv``, default ``sys.argv[1:]``; ``--config FILE`` + flags) and train."""
    main(*parse_recipe_args(make_parser(), argv))


if __name__ == "__main__":
    from posttrain_probe.process_group import end_process_group

    cli()
    end_process_group()  # the script's end: torch's documented shutdown (see process_group.py)
