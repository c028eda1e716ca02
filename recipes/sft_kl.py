"""SFT with a KL penalty to the frozen base model (paper S's "SFT + KL", lambda = 0.1), observed by the probe callbacks.

    loss = SFT loss + kl_coefficient * mean over completion tokens t of KL(p_base(. | x_<t) || p_theta(. | x_<t))

The KL runs over the full next-token distributions at every token the SFT loss covers (completion tokens,
padding excluded) and is normalised exactly like the SFT loss, so both terms are per-token means over the
optimizer batch. Everything else is ``recipes/sft.py`` (same data, same column mapping, same probe callbacks).

# Tiny run on a laptop CPU (offline, seconds)
```bash
accelerate launch --num_processes 1 --cpu recipes/sft_kl.py --config recipes/configs/tiny/sft_kl.yaml
```

# Paper run: Qwen3-4B-Base on OpenR1-Math-220k, 8 GPUs, DeepSpeed ZeRO-3 (the base model is sharded too)
```bash
accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/sft_kl.py \
    --config recipes/configs/qwen3-4b-base/sft_kl.yaml
```

# Another strength of the regulariser
```bash
accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/sft_kl.py \
    --config recipes/configs/qwen3-4b-base/sft_kl.yaml --kl_coefficient 0.5 --output_dir runs/qwen3-4b-base/sft-kl0.5
```
"""

import argparse
import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from trl import SFTConfig, SFTTrainer

from posttrain_probe.recipes.common import MathScriptArguments, parse_recipe_args


@dataclass
class SFTKLConfig(SFTConfig):
    """SFTConfig plus the weight of the KL term."""

    kl_coefficient: float = field(
        default=0.1,
        metadata={
            "help": "lambda: weight of the per-token KL(p_base || p_theta) added to the SFT loss (paper S: 0.1)."
        },
    )


class SFTKLTrainer(SFTTrainer):
    """SFTTrainer whose loss adds ``kl_coefficient * KL(p_base || p_theta)`` per completion token.

    Direction: KL(base || current) = sum_v p_base(v) (log p_base(v) - log p_theta(v)), the usual "stay close to
    the base" regulariser (mass-covering: it penalises the fine-tuned model for dropping tokens the base model
    finds likely; its gradient is a distillation cross-entropy towards the base distribution).

    ``base_model`` is the frozen reference: a model, a name/path, or None for the policy's own checkpoint
    (``model.config._name_or_path``, loaded like TRL's GRPO/DPO reference models) or, for a PEFT policy, the
    policy with its adapter switched off. It is prepared as TRL prepares reference models: DeepSpeed inference
    engine (sharded under ZeRO-3, replicated otherwise), else ``accelerator.prepare_model(evaluation_mode=True)``.
    FSDP is not supported.

    The policy runs one forward, TRL's fused-head SFT forward; the KL reads the backbone's last hidden state
    from it (a forward hook) and projects only the completion positions through the LM head, so no
    ``(batch, seq, vocab)`` logits are built for the policy. The term costs one base forward plus
    ``(completion tokens, vocab)`` logits for both models. Logged as ``kl`` (mean per token, before lambda).
    """

    def __init__(self, *args, base_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SFTKLConfig):
            raise TypeError(f"SFTKLTrainer needs an SFTKLConfig (for kl_coefficient), got {type(self.args).__name__}")
        if self.is_fsdp_enabled:
            raise ValueError("SFTKLTrainer supports DDP and DeepSpeed ZeRO-1/2/3, not FSDP")
        self.base_model = self._prepare_base_model(base_model)

    def _prepare_base_model(self, base_model):
        from accelerate.utils import is_peft_model
        from trl.models import prepare_deepspeed
        from trl.trainer.utils import create_model_from_path, get_config_model_id

        if base_model is None and is_peft_model(self.model):
            return None  # the base forward disables the adapter
        if base_model is None:
            base_model = get_config_model_id(self.model.config)
            if not base_model:
                raise ValueError(
                    "the policy does not record where it was loaded from: pass base_model= (a model or a path)"
                )
        if isinstance(base_model, str):
            init_kwargs = dict(self.args.model_init_kwargs or {})
            if self.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                init_kwargs["device_map"] = None
            init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
            init_kwargs.setdefault("dtype", self.model.dtype)
            init_kwargs.setdefault("attn_implementation", self.model.config._attn_implementation)
            base_model = create_model_from_path(base_model, **init_kwargs)
        vocab, base_vocab = (m.config.get_text_config().vocab_size for m in (self.model, base_model))
        if vocab != base_vocab:
            raise ValueError(
                f"the policy's vocabulary ({vocab} tokens) differs from the base model's ({base_vocab}): no KL between them"
            )
        base_model.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(base_model, self.accelerator)
        return self.accelerator.prepare_model(base_model, evaluation_mode=True)

    def _causal_lm(self, model):
        """The HF causal LM inside DDP / DeepSpeed / PEFT wrappers (its ``base_model`` is the backbone)."""
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # SFT loss and metrics exactly as SFTTrainer computes them; keep the backbone output of its forward
        policy = self._causal_lm(model)
        captured = {}

        def keep_hidden(module, args, output):  # the first backbone call is the training forward
            captured.setdefault("hidden", output[0])

        handle = policy.base_model.register_forward_hook(keep_hidden)
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            handle.remove()
        loss = result[0] if return_outputs else result

        # Completion tokens: where the (shifted) labels are not -100
        hidden = captured["hidden"]
        labels = inputs.get("shift_labels")
        if labels is None:
            labels, hidden = inputs["labels"][:, 1:], hidden[:, :-1]
        mask = labels != -100
        kl = self.token_kl(model, inputs, hidden[mask], mask)

        # Normalised like the SFT loss: per token over the optimizer batch (num_items_in_batch), summed over ranks
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        kl_term = kl.sum() / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            kl_term = kl_term * (self.accelerator.num_processes // self.get_tp_size())
        loss = loss + self.args.kl_coefficient * kl_term

        mode = "train" if self.model.training else "eval"
        n_tokens = self.accelerator.gather_for_metrics(mask.sum()).sum()
        kl_total = self.accelerator.gather_for_metrics(kl.detach().sum()).sum()
        self._metrics[mode]["kl"].append((kl_total / n_tokens.clamp(min=1)).item())
        return (loss, result[1]) if return_outputs else loss

    @contextlib.contextmanager
    def _base(self, model):
        """The frozen base causal LM; for a PEFT policy, the policy with its adapter switched off."""
        if self.base_model is not None:
            yield self._causal_lm(self.base_model)
            return
        peft_model = self.accelerator.unwrap_model(model)
        with peft_model.disable_adapter():
            yield peft_model.get_base_model()

    def token_kl(self, model, inputs, hidden, mask):
        """KL(p_base || p_theta) per completion token, shape ``[mask.sum()]``; ``hidden`` holds the policy's last
        hidden states at those positions (with gradient)."""
        log_p = F.log_softmax(_next_token_logits(self._causal_lm(model), hidden), dim=-1)
        backbone_inputs = {
            k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "output_router_logits")
        }
        with torch.no_grad(), self._base(model) as base:
            base_hidden = base.base_model(**backbone_inputs)[0]
            log_q = F.log_softmax(_next_token_logits(base, _shifted(base_hidden, inputs)[mask]), dim=-1)
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)  # sum_v q (log q - log p)


def _shifted(hidden, inputs):
    """Hidden states at the positions that predict the labels (all positions when labels come pre-shifted)."""
    return hidden if "shift_labels" in inputs else hidden[:, :-1]


def _next_token_logits(causal_lm, hidden):
    """float32 next-token logits of ``hidden`` through the model's LM head (with Gemma's final soft-capping)."""
    logits = causal_lm.get_output_embeddings()(hidden.to(causal_lm.get_output_embeddings().weight.dtype))
    cap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def main(script_args, training_args, model_args, probe_args, monitor_args=None):
    from trl import get_peft_config, get_quantization_config

    from posttrain_probe.callbacks import add_probe_callbacks
    from posttrain_probe.recipes.common import TINY_PREFIX, load_model_and_tokenizer, sft_dataset, tiny_model

    # Model (a name or path; tiny:<arch> builds a tiny model for CPU runs), its tokenizer, and the frozen base:
    # the same checkpoint (loaded by the trainer), or the same tiny model
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    name = model_args.model_name_or_path
    base_model = tiny_model(name) if name.startswith(TINY_PREFIX) else None

    # Dataset: question -> correct worked solution, as conversational prompt-completion rows
    with training_args.main_process_first(desc="map the dataset"):
        dataset = sft_dataset(script_args)

    # Trainer, with the probe callbacks (snapshots + activations)
    trainer = SFTKLTrainer(
        model=model,
        base_model=base_model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    add_probe_callbacks(trainer, probe_args, paradigm="sft_kl", monitor=monitor_args)

    # Train and save
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import ModelConfig, TrlParser

    from posttrain_probe.callbacks import MonitorArguments, ProbeArguments

    dataclass_types = (MathScriptArguments, SFTKLConfig, ModelConfig, ProbeArguments, MonitorArguments)
    if subparsers is not None:
        return subparsers.add_parser(
            "sft_kl", help="SFT + KL to the base model, with the probe callbacks", dataclass_types=dataclass_types
        )
    return TrlParser(dataclass_types, prog=prog)


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line (``argv``, default ``sys.argv[1:]``; ``--config FILE`` + flags) and train."""
    script_args, training_args, model_args, probe_args, monitor_args = parse_recipe_args(make_parser(), argv)
    main(script_args, training_args, model_args, probe_args, monitor_args)


if __name__ == "__main__":
    from posttrain_probe.process_group import end_process_group

    cli()
    end_process_group()  # the script's end: torch's documented shutdown (see process_group.py)
