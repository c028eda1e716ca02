"""Settings of the study's world (:class:`WorldConfig`): the synthetic data, the lm-eval tasks and the tiny base
model pretrained on them. Torch-free: the CLI builds its options from this dataclass at startup."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain_probe.errors import ProbeError

ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")
"""Architectures of :func:`posttrain_probe.testing.tiny_model` (repeated here so this module stays torch-free)."""

IN_DOMAIN_TASKS: tuple[str, ...] = ("world_arithmetic",)
"""The task of the training distribution (arithmetic with worked solutions)."""
GENERAL_TASKS: tuple[str, ...] = ("world_colours", "world_capitals", "world_animals")
"""Knowledge the base model was pretrained on and post-training does not train."""
HELD_OUT_TASKS: tuple[str, ...] = ("world_numbers",)
"""A skill (largest/smallest of four numbers) kept apart from the general knowledge tasks."""


def world_tasks() -> dict[str, list[str]]:
    """The world's lm-eval task names by group: ``in_domain``, ``general``, ``held_out``."""
    return {"in_domain": list(IN_DOMAIN_TASKS), "general": list(GENERAL_TASKS), "held_out": list(HELD_OUT_TASKS)}


def _check_int(name: str, value: Any, minimum: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProbeError(f"{name}={value!r}: expected an int >= {minimum} ({what})")


@dataclass(kw_only=True)
class WorldConfig:
    """Settings of :func:`~posttrain_probe.study.world.build_world`: ``n_train`` arithmetic problems with worked
    solutions (the training prompts of every post-training arm), lm-eval tasks of ``n_eval`` documents each, and a
    tiny ``arch`` model pretrained for ``pretrain_steps`` AdamW steps on a mixed synthetic corpus.

    The defaults take about 20 s on one CPU core (300 steps of 8 x 128 tokens; torch already imported) and give a
    base well above chance on the general tasks and at chance on arithmetic. ``demo --quick`` (the ``world:`` section of
    ``posttrain_probe/study/configs/demo_quick.yaml``) uses ``n_train=64``, ``n_eval=40``, ``pretrain_steps=60`` (other fields at their defaults; about 8 s, a base still
    near chance everywhere: a smoke test of the pipeline, not a study).

    Python: ``build_world(WorldConfig(out="runs/world"))``; YAML (a section of the study's file): the same keys.
    """

    out: str = field(metadata={"help": "World directory: train.jsonl, tasks/, base/ and world.json are written here."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the data, the base model's initialisation and its training."}
    )
    n_train: int = field(
        default=256, metadata={"help": "Arithmetic training problems (train.jsonl; the same prompts for SFT and RL)."}
    )
    n_eval: int = field(default=100, metadata={"help": "Documents per lm-eval task (none is a training problem)."})
    arch: str = field(default="qwen3", metadata={"help": f"Architecture of the tiny base model: {', '.join(ARCHS)}."})
    hidden_size: int = field(default=64, metadata={"help": "Hidden size of the base model (a multiple of 4)."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers of the base model."})
    pretrain_steps: int = field(default=300, metadata={"help": "AdamW steps of pretraining (0: a random base)."})
    pretrain_batch_size: int = field(default=8, metadata={"help": "Sequences of seq_len tokens per pretraining step."})
    pretrain_lr: float = field(
        default=1e-2, metadata={"help": "Peak learning rate of pretraining (linear warm-up, cosine decay to 10%)."}
    )
    seq_len: int = field(default=128, metadata={"help": "Tokens per pretraining sequence (documents are packed)."})
    device: str | None = field(
        default=None, metadata={"help": "Device of pretraining (cpu, cuda, cuda:0; default: cuda if available)."}
    )

    def __post_init__(self) -> None:
        if self.out is None or str(self.out) == "":
            raise ProbeError(f"out={self.out!r}: expected a directory path for the world")
        self.out = str(self.out)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ProbeError(f"seed={self.seed!r}: expected an int")
        _check_int("n_train", self.n_train, 1, "arithmetic training problems")
        _check_int("n_eval", self.n_eval, 1, "documents per evaluation task")
        if self.arch not in ARCHS:
            raise ProbeError(f"arch={self.arch!r}: expected one of {', '.join(ARCHS)}")
        _check_int("num_layers", self.num_layers, 1, "decoder layers")
        _check_int("hidden_size", self.hidden_size, 4, "a multiple of the 4 attention heads")
        if self.hidden_size % 4:
            raise ProbeError(f"hidden_size={self.hidden_size!r}: expected a multiple of the 4 attention heads")
        _check_int("pretrain_steps", self.pretrain_steps, 0, "AdamW steps")
        _check_int("pretrain_batch_size", self.pretrain_batch_size, 1, "sequences per step")
        _check_int("seq_len", self.seq_len, 8, "tokens per pretraining sequence")
        lr = self.pretrain_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
            raise ProbeError(f"pretrain_lr={lr!r}: expected a learning rate in (0, 1), e.g. 1e-2")
        if self.device is not None and (not isinstance(self.device, str) or not self.device.strip()):
            raise ProbeError(f"device={self.device!r}: expected a torch device such as cpu or cuda:0, or None")

    @property
    def path(self) -> Path:
        """``out`` as a :class:`~pathlib.Path`."""
        return Path(self.out)
