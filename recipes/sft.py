"""SFT on worked math solutions (full CoT traces, correct only, 1 epoch), observed by the probe callbacks.

The probe callbacks write ``<output_dir>/probe/``: the base model's probe-set activations at step 0, then an
HF snapshot and the activations at every fifth of the run (see ``--probe_*`` in ``--help``).

# Tiny run on a laptop CPU (offline, seconds)
```bash
accelerate launch --num_processes 1 --cpu recipes/sft.py --config recipes/configs/tiny/sft.yaml
```

# Paper run: Qwen3-4B-Base on OpenR1-Math-220k, 8 GPUs, DeepSpeed ZeRO-3
```bash
accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/sft.py \
    --config recipes/configs/qwen3-4b-base/sft.yaml
```

# Another math dataset through the column mapping (gsm8k: `question`, `answer` ending in '#### N')
```bash
accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/sft.py \
    --model_name_or_path Qwen/Qwen3-4B-Base --dtype bfloat16 \
    --dataset_name openai/gsm8k --dataset_config main \
    --question_column question --answer_column answer \
    --learning_rate 5e-5 --num_train_epochs 1 --output_dir runs/qwen3-4b-base/sft-gsm8k
```
"""

import argparse

from posttrain_probe.recipes.common import MathScriptArguments, parse_recipe_args


def main(script_args, training_args, model_args, probe_args, monitor_args=None):
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from posttrain_probe.callbacks import add_probe_callbacks
    from posttrain_probe.recipes.common import load_model_and_tokenizer, sft_dataset

    # Model (a name or path; tiny:<arch> builds a tiny model for CPU runs) and its tokenizer
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)

    # Dataset: question -> correct worked solution, as conversational prompt-completion rows
    with training_args.main_process_first(desc="map the dataset"):
        dataset = sft_dataset(script_args)

    # Trainer, with the probe callbacks (snapshots + activations)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    add_probe_callbacks(trainer, probe_args, paradigm="sft", monitor=monitor_args)

    # Train and save
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import ModelConfig, SFTConfig, TrlParser

    from posttrain_probe.callbacks import MonitorArguments, ProbeArguments

    dataclass_types = (MathScriptArguments, SFTConfig, ModelConfig, ProbeArguments, MonitorArguments)
    if subparsers is not None:
        return subparsers.add_parser("sft", help="SFT with the probe callbacks", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line (``argv``, default ``sys.argv[1:]``; ``--config FILE`` + flags) and train."""
    script_args, training_args, model_args, probe_args, monitor_args = parse_recipe_args(make_parser(), argv)
    main(script_args, training_args, model_args, probe_args, monitor_args)


if __name__ == "__main__":
    from posttrain_probe.process_group import end_process_group

    cli()
    end_process_group()  # the script's end: torch's documented shutdown (see process_group.py)
