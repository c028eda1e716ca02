"""The state the probe callbacks share during one ``trainer.train()``: schedule, run directory,
probe-set token batches, and the two actions (HF snapshot, activation capture).

:class:`ProbeRun` reaches its training loop only through a few members -- ``accelerator``
(``process_index``, ``num_processes``, ``is_main_process``, ``wait_for_everyone()``), ``model``,
``tokenizer``, ``train_dataset``, ``trainer_name``, ``base_model``, :meth:`ProbeRun.share` and
:meth:`ProbeRun.save_snapshot` -- so the verl worker (``posttrain_probe.callbacks.verl.worker``)
reuses everything else by overriding those.
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from posttrain_probe.activations.capture import capture_batch
from posttrain_probe.activations.store import ActivationStore, ActivationStoreWriter, merge_rank_manifests
from posttrain_probe.callbacks.arguments import ProbeArguments, snapshot_schedule
from posttrain_probe.callbacks.run_dir import RunDirectory, step_name
from posttrain_probe.data import TokenBatch, load_dataset_spec, text_column, token_batches
from posttrain_probe.errors import ProbeError
from posttrain_probe.layers import default_layer, hidden_size, unwrap_model, validate_layer
from posttrain_probe.model_identity import model_fingerprint

_PARADIGMS = {"SFTTrainer": "sft", "GRPOTrainer": "grpo", "DPOTrainer": "dpo", "RLOOTrainer": "rloo"}


def tokenizer_of(processing_class):
    """The tokenizer of a Trainer's processing class (a tokenizer or a processor holding one)."""
    return getattr(processing_class, "tokenizer", processing_class)


class ProbeRun:
    """Everything both callbacks need; built once per trainer and started on ``on_train_begin``."""

    def __init__(self, trainer, args: ProbeArguments, *, paradigm: str | None = None) -> None:
        self.trainer = trainer
        self.args = args
        self.paradigm = paradigm or _PARADIGMS.get(type(trainer).__name__, type(trainer).__name__.lower())
        self.started = False
        self.schedule: list[int] = []
        self.layers: list[int] = []
        self.run: RunDirectory | None = None
        self._batches: list[TokenBatch] | None = None
        self.probe_rows: list[int] = []
        """Dataset rows of the probe documents; a store's doc_ids index this list."""

    # -- set-up ---------------------------------------------------------------------------------
    @property
    def accelerator(self):
        return self.trainer.accelerator

    @property
    def model(self):
        """The module to run probe forwards through: unwrapped for DDP, the sharded module under ZeRO-3/FSDP."""
        return self.trainer.model

    @property
    def train_dataset(self):
        """The training data, sampled for the probe set when ``probe_dataset`` is not set."""
        return self.trainer.train_dataset

    @property
    def trainer_name(self) -> str:
        """Name of the training loop recorded in ``probe.json``."""
        return type(self.trainer).__name__

    @property
    def base_model(self) -> str:
        """Name or path of the model being trained, recorded in ``probe.json`` and the step-0 store."""
        inner = unwrap_model(self.model)
        return str(getattr(getattr(inner, "config", None), "_name_or_path", "") or type(inner).__name__)

    def share(self, value):
        """``value`` of the main process, returned on every process (a collective call)."""
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def begin(self, state) -> None:
        """Resolve schedule, layers and probe set, and open (or continue) the run directory. Idempotent."""
        if self.started:
            return
        args = self.args
        run_dir = Path(args.probe_run_dir or os.path.join(self.trainer.args.output_dir, "probe"))
        self.open(run_dir, snapshot_schedule(args, state.max_steps), resume_step=state.global_step)

    def open(self, run_dir: str | os.PathLike, schedule: list[int], *, resume_step: int) -> None:
        """Resolve layers and probe set, and open (or continue) ``run_dir`` for ``schedule``.

        Collective: every process calls it; the main process checks and writes probe.json
        (``resume_step`` as in :meth:`RunDirectory.open`), the others read it. Idempotent.
        """
        if self.started:
            return
        args = self.args
        self.schedule = list(schedule)
        inner = unwrap_model(self.model)
        self.layers = sorted(set(args.probe_layers)) or [default_layer(inner)]
        for layer in self.layers:
            validate_layer(inner, layer)
        run_dir = Path(run_dir)
        identity = {
            "base_model": self.base_model,
            "paradigm": self.paradigm,
            "trainer": self.trainer_name,
            "layers": self.layers,
            "schedule": self.schedule,
            "probe_fingerprint": self.probe_fingerprint() if args.probe_stream_activations else None,
            "probe": {
                "dataset": args.probe_dataset or "training data sample",
                "rows": self.probe_rows,
                "seq_len": args.probe_seq_len,
                "seed": args.probe_seed,
            },
            "world_size": self.accelerator.num_processes,
        }
        self.run = RunDirectory(run_dir, is_main=self.accelerator.is_main_process)
        error = None
        if self.accelerator.is_main_process:  # one process checks and writes; the others follow
            try:
                self.run.open(identity, resume_step=resume_step)
            except ProbeError as err:
                error = str(err)
        error = self.share(error)
        if error is not None:
            raise ProbeError(error)
        if not self.accelerator.is_main_process:
            self.run.load()
        self.started = True

    def probe_batches(self) -> list[TokenBatch]:
        """The probe set as token batches (same on every rank, built once)."""
        if self._batches is not None:
            return self._batches
        args = self.args
        tokenizer = self.tokenizer
        if args.probe_dataset:
            data = load_dataset_spec(args.probe_dataset, split=args.probe_dataset_split)
        else:
            data = self.train_dataset
            if data is None or not hasattr(data, "select") or not hasattr(data, "__len__"):
                raise ProbeError(
                    "the training dataset cannot be sampled (streaming?): set probe_dataset to a dataset spec"
                )
        if len(data) == 0:
            raise ProbeError("the probe set is empty: set probe_dataset to a non-empty dataset")
        rows = list(range(len(data)))
        if len(data) > args.probe_n_docs:
            rows = sorted(random.Random(args.probe_seed).sample(rows, args.probe_n_docs))
            data = data.select(rows)
        self.probe_rows = rows
        column = args.probe_column or ("input_ids" if "input_ids" in data.column_names else text_column(data))
        if isinstance(tokenizer, _TokenIds) and column != "input_ids":
            raise ProbeError(
                f"the Trainer has no processing_class (tokenizer) to tokenise the probe column {column!r}: pass one, or a tokenised probe set"
            )
        context = getattr(getattr(unwrap_model(self.model), "config", None), "max_position_embeddings", None)
        if context is not None and args.probe_seq_len > context:
            raise ProbeError(
                f"probe_seq_len {args.probe_seq_len} is longer than the model context ({context} positions)"
            )
        self._batches = list(
            token_batches(data, tokenizer, column=column, seq_len=args.probe_seq_len, batch_size=args.probe_batch_size)
        )
        if not any(int(b.attention_mask.sum()) > 1 for b in self._batches):
            raise ProbeError("the probe set holds no token to capture (every document has at most one token)")
        return self._batches

    @property
    def tokenizer(self):
        """The Trainer's tokenizer, or the model config's special ids when it has none (tokenised data)."""
        tokenizer = tokenizer_of(self.trainer.processing_class)
        if tokenizer is not None:
            return tokenizer
        config = getattr(unwrap_model(self.model), "config", None)
        return _TokenIds(
            getattr(config, "pad_token_id", None),
            getattr(config, "bos_token_id", None),
            getattr(config, "eos_token_id", None),
        )

    def probe_fingerprint(self) -> str:
        """sha256 of the probe set's token ids and masks."""
        digest = hashlib.sha256()
        for batch in self.probe_batches():
            digest.update(batch.input_ids.numpy().tobytes())
            digest.update(batch.attention_mask.numpy().tobytes())
        return digest.hexdigest()

    # -- actions --------------------------------------------------------------------------------
    def save_snapshot(self, step: int) -> float:
        """Write ``snapshots/step-NNNNNN`` (HF layout, safetensors, tokenizer); returns seconds spent.

        Weights are gathered on every rank (ZeRO-3 / FSDP) and written by the main process into a
        temporary directory that is renamed when complete.
        """
        started = time.perf_counter()
        accelerator, trainer = self.accelerator, self.trainer
        target = self.run.snapshot_dir(step)
        unwrapped = accelerator.unwrap_model(trainer.model_wrapped)
        is_peft = hasattr(unwrapped, "peft_config")
        try:
            state_dict = accelerator.get_state_dict(trainer.model_wrapped)
        except ValueError as err:  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save
            raise ProbeError(
                f"cannot gather the full weights for snapshot {step}: {err} "
                "(set zero3_save_16bit_model: true / stage3_gather_16bit_weights_on_model_save in the DeepSpeed config)"
            ) from err
        if accelerator.is_main_process:
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if is_peft and self.args.probe_peft_snapshot == "merged":
                if any(p.numel() == 0 for p in unwrapped.parameters()):
                    raise ProbeError(
                        "merged PEFT snapshots need unsharded parameters: use probe_peft_snapshot=adapter under ZeRO-3/FSDP"
                    )
                merged = copy.deepcopy(unwrapped).to("cpu")
                merged.load_state_dict({k: v.to("cpu") for k, v in state_dict.items()})
                merged.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
                del merged
            else:
                unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if tokenizer_of(trainer.processing_class) is not None:
                tokenizer_of(trainer.processing_class).save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        accelerator.wait_for_everyone()
        seconds = time.perf_counter() - started
        self.run.record(
            "snapshots",
            {
                "step": step,
                "path": str(target.relative_to(self.run.path)),
                "peft": self.args.probe_peft_snapshot if is_peft else None,
                "seconds": round(seconds, 3),
            },
        )
        return seconds

    @torch.no_grad()
    def capture(self, step: int) -> dict[str, float]:
        """Capture the probe set at every layer into ``activations/step-NNNNNN/layer<L>/``.

        Each rank runs the same number of forwards (ZeRO-3 / FSDP gather collectively) over its
        slice of the probe set and writes its own shards; the main process merges them. The model
        comes back in its own train/eval mode with every RNG state unchanged. Returns the seconds
        spent and, against step 0, the drift per layer.
        """
        started = time.perf_counter()
        accelerator, model, args = self.accelerator, self.model, self.args
        rank, world = accelerator.process_index, accelerator.num_processes
        batches = self.probe_batches()
        mine = batches[rank::world]
        rounds = -(-len(batches) // world)  # every rank runs this many forwards
        d_model = hidden_size(model)
        tokenizer = self.tokenizer
        snapshot = self.run.snapshot_dir(step) if step > 0 and args.probe_save_snapshots else None
        fingerprint = self.share(model_fingerprint(model))  # rank 0's: ranks of a sharded model see different pieces
        if accelerator.is_main_process:  # a capture a killed run left unfinished starts over
            shutil.rmtree(self.run.path / "activations" / step_name(step), ignore_errors=True)
        accelerator.wait_for_everyone()
        writers = {
            layer: ActivationStoreWriter(
                self.run.activations_dir(step, layer),
                layer=layer,
                d_model=d_model,
                model={
                    "name": step_name(step),
                    "step": step,
                    "path": str(snapshot) if snapshot else (self.run.manifest.get("base_model") if step == 0 else None),
                    "fingerprint": fingerprint,
                },
                dtype=args.probe_dtype,
                source={
                    "probe_fingerprint": self.run.manifest.get("probe_fingerprint"),
                    "seq_len": args.probe_seq_len,
                    "run": str(self.run.path),
                },
                shard_tokens=max(1, sum(int(b.attention_mask.sum()) for b in mine)),  # one shard per rank
                rank=rank,
                world_size=world,
            )
            for layer in self.layers
        }
        rng = _rng_state()
        was_training = model.training
        model.eval()
        try:
            for index in range(rounds):
                batch = mine[index] if index < len(mine) else batches[0]  # padding round: result dropped
                captured = capture_batch([model], batch, self.layers, bos_token_id=tokenizer.bos_token_id)
                if index < len(mine):
                    for layer, writer in writers.items():
                        writer.write(
                            captured.acts[layer][:, 0],
                            captured.token_ids,
                            captured.doc_ids,
                            captured.positions,
                            cursor=index + 1,
                        )
        except BaseException:
            for writer in writers.values():
                writer.release()  # the stores' locks go with the error, not with the process
            raise
        finally:
            model.train(was_training)
            _restore_rng(rng)
        for writer in writers.values():
            writer.close()
        accelerator.wait_for_everyone()
        result = {"seconds": 0.0}
        if accelerator.is_main_process:
            for writer in writers.values():
                if world > 1:
                    merge_rank_manifests(writer.path)
            if args.probe_drift and step > 0:
                for layer in self.layers:
                    result[f"drift/layer{layer}"] = relative_drift(
                        self.run.activations_dir(0, layer), self.run.activations_dir(step, layer)
                    )
        accelerator.wait_for_everyone()
        result["seconds"] = time.perf_counter() - started
        self.run.record(
            "activations",
            {
                "step": step,
                "path": str((self.run.path / "activations" / step_name(step)).relative_to(self.run.path)),
                "layers": self.layers,
                "seconds": round(result["seconds"], 3),
            },
        )
        return result


class _TokenIds(NamedTuple):
    """Special token ids from a model config, standing in for a tokenizer on tokenised data."""

    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None


def relative_drift(base_store: str | os.PathLike, store: str | os.PathLike) -> float:
    """Mean over probe tokens of ||a - a_base|| / ||a_base|| between two stores of the same tokens."""
    base, current = ActivationStore(base_store), ActivationStore(store)
    if base.token_fingerprint != current.token_fingerprint:
        raise ProbeError(f"cannot compare {store} with {base_store}: they hold different tokens")
    total, count = 0.0, 0
    for index in range(base.n_shards):
        a0 = base.load_shard(index)["acts"].float()
        a1 = current.load_shard(index)["acts"].float()
        total += ((a1 - a0).norm(dim=-1) / a0.norm(dim=-1).clamp_min(1e-12)).sum().item()
        count += a0.shape[0]
    return total / max(count, 1)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
