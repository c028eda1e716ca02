"""GRPO with an outcome reward (math-verify final-answer check), observed by the probe callbacks.

The papers' RL run: 8 rollouts per prompt, clip 0.2 / 0.28 (``epsilon``, ``epsilon_high``), no KL
(``beta: 0.0``), no entropy bonus (``entropy_coef: 0.0``), 1 epoch. The reward is TRL's
``trl.rewards.accuracy_reward``: 1 when math-verify finds the completion's \\boxed{} (or LaTeX) answer equal
to the row's ``solution`` (the gold final answer), 0 otherwise; rows whose gold answer does not parse are
skipped. Its extraction is TRL's own, not the last-\\boxed{} check of ``data prepare``'s acceptance and the eval
suites (``posttrain_probe.math_answers.answer_correct``), so a borderline completion can score differently
(docs/data.md). The probe callbacks write ``<output_dir>/probe/`` (see ``--probe_*`` in ``--help``).

Generation: HF ``generate`` by default (the tiny configs); the GPU configs set ``use_vllm: true`` with
``vllm_mode: colocate`` (TRL's vLLM engine inside the training processes). The probe callbacks read the trained
model, never the vLLM copy. ``use_vllm`` without vllm or a GPU stops with a one-line error before loading.

# Tiny run on a laptop CPU (offline, seconds)
```bash
accelerate launch --num_processes 1 --cpu recipes/grpo.py --config recipes/configs/tiny/grpo.yaml
```

# Paper run: Qwen3-4B-Base on OpenR1-Math-220k, 8 GPUs, DeepSpeed ZeRO-3, vLLM generation (colocated)
```bash
accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/grpo.py \
    --config recipes/configs/qwen3-4b-base/grpo.yaml
```

# gsm8k through the column mapping (the gold answer is cut from '#### N' at the end of `answer`)
```bash
accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/grpo.py \
    --config recipes/configs/qwen3-4b-base/grpo.yaml \
    --dataset_name openai/gsm8k --dataset_config main \
    --question_column question --answer_column answer --final_answer_column "" \
    --output_dir runs/qwen3-4b-base/grpo-gsm8k
```
"""

import argparse
import sys
from dataclasses import dataclass, field

from posttrain_probe.recipes.common import MathScriptArguments, parse_recipe_args


@dataclass
class GRPOScriptArguments(MathScriptArguments):
    """The math column mapping plus the chat template for base models that ship none."""

    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (hub id or local path) or .jinja file whose chat template renders the prompts, for "
            "base models whose tokenizer has none (e.g. meta-llama/Llama-3.1-8B-Instruct for Llama-3.1-8B). A "
            "tokenizer also sets the eos token, so generation stops at the end of the assistant turn."
        },
    )

    rewards: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={
            "help": "Reward functions, summed: accuracy (TRL's math-verify outcome reward, the papers'), answer_distance "
            "(partial credit 1 / (1 + |answer - gold| / max(1, |gold|)) for the last number of the completion: tiny "
            "models that never hit the exact answer, e.g. the CPU demo; beyond the papers)."
        },
    )


REWARDS = ("accuracy", "answer_distance")


def answer_distance_reward(completions, solution, **kwargs) -> list[float]:
    """Partial credit per completion: 1 / (1 + |a - g| / max(1, |g|)) for the last number a of the completion
    (inside \\boxed{} if there is one) and the gold number g; 0 when either is not a number."""
    import re

    number = re.compile(r"-?\d+(?:\.\d+)?")
    rewards = []
    for completion, gold in zip(completions, solution):
        text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
        boxed = re.findall(r"\\boxed\{([^}]*)\}", text)
        found = number.findall(boxed[-1] if boxed else text)
        target = number.findall(str(gold))
        if not found or not target:
            rewards.append(0.0)
            continue
        a, g = float(found[-1]), float(target[-1])
        rewards.append(1.0 / (1.0 + abs(a - g) / max(1.0, abs(g))))
    return rewards


def main(script_args, training_args, model_args, probe_args, monitor_args=None):
    from transformers import AutoTokenizer
    from trl import GRPOTrainer, get_peft_config, get_quantization_config
    from trl.rewards import accuracy_reward

    from posttrain_probe.callbacks import add_probe_callbacks
    from posttrain_probe.recipes.common import check_vllm_generation, grpo_dataset, load_model_and_tokenizer

    check_vllm_generation(training_args)  # before any model is loaded
    # Model (a name or path; tiny:<arch> builds a tiny model for CPU runs) and its tokenizer
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    if script_args.chat_template_path and script_args.chat_template_path.endswith((".jinja", ".j2")):
        with open(script_args.chat_template_path, encoding="utf-8") as template:
            tokenizer.chat_template = template.read()
    elif script_args.chat_template_path:
        source = AutoTokenizer.from_pretrained(script_args.chat_template_path)
        tokenizer.chat_template, tokenizer.eos_token = source.get_chat_template(), source.eos_token

    # Dataset: conversational prompts with the gold final answer in `solution`
    with training_args.main_process_first(desc="map the dataset"):
        dataset = grpo_dataset(script_args)

    # Trainer (outcome reward by default), with the probe callbacks (snapshots + activations)
    unknown = [r for r in script_args.rewards if r not in REWARDS]
    if unknown:
        raise SystemExit(f"error: rewards {unknown}: expected some of {', '.join(REWARDS)}")
    funcs = {"accuracy": accuracy_reward, "answer_distance": answer_distance_reward}
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[funcs[name] for name in script_args.rewards],
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    add_probe_callbacks(trainer, probe_args, paradigm="grpo", monitor=monitor_args)

    # Train and save
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import GRPOConfig, ModelConfig, TrlParser

    from posttrain_probe.callbacks import MonitorArguments, ProbeArguments

    dataclass_types = (GRPOScriptArguments, GRPOConfig, ModelConfig, ProbeArguments, MonitorArguments)
    if subparsers is not None:
        return subparsers.add_parser("grpo", help="GRPO with the probe callbacks", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line (``argv``, default ``sys.argv[1:]``; ``--config FILE`` + flags) and train."""
    script_args, training_args, model_args, probe_args, monitor_args = parse_recipe_args(make_parser(), argv)
    from posttrain_probe.recipes.common import check_vllm_generation

    try:
        check_vllm_generation(training_args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    main(script_args, training_args, model_args, probe_args, monitor_args)


if __name__ == "__main__":
    from posttrain_probe.process_group import end_process_group

    cli()
    end_process_group()  # the script's end: torch's documented shutdown (see process_group.py)
