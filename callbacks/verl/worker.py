"""verl's actor worker with two extra methods: probe activations, HF snapshots and the feature monitor of the live actor.

``ProbeActorRolloutRefWorker`` is ``verl.workers.engine_workers.ActorRolloutRefWorker`` plus
``probe_init`` and ``probe_step`` (``Dispatch.ONE_TO_ALL``: every rank runs them, the trainer
reads rank 0's result). The probe trainer (``posttrain_probe.callbacks.verl.trainer``) puts this
class into the role mapping and calls::

    info = actor_rollout_wg.probe_init(probe)[0]            # once, before training
    metrics = actor_rollout_wg.probe_step(step)[0]          # step 0 (base), each snapshot and monitor step

The probe forward runs through the sharded actor (``actor.engine.module`` inside
``engine.eval_mode()``, FSDP1 or FSDP2) with a stop hook at the deepest requested layer; the probe
set, the token selection, the store and run-directory formats are those of the TRL callbacks
(:class:`posttrain_probe.callbacks.probe_run.ProbeRun`, reused here), so the same model, probe set
and layers give the same store. Snapshots are verl's own ``hf_model`` export
(``FSDPCheckpointManager`` with ``save_contents=["hf_model"]``), moved to
``<run>/snapshots/step-NNNNNN``.

With ``probe.monitor.crosscoder`` set, ``probe_step`` also runs the feature monitor
(:class:`~posttrain_probe.callbacks.verl.monitor.WorkerMonitor`: the TRL ``FeatureMonitorCallback`` on the
actor) and appends to ``<run>/monitor.jsonl``.

Like verl's own checkpoints, the run directory must be on a filesystem every rank can write:
each rank writes the store shards of its slice of the probe set and rank 0 merges them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from posttrain_probe.callbacks.verl import compat

compat.apply()  # before verl builds a model in this process (Ray workers import this module first)

from verl.single_controller.base.decorator import Dispatch, register  # noqa: E402
from verl.workers.engine_workers import ActorRolloutRefWorker  # noqa: E402

from posttrain_probe.activations.capture import select_tokens  # noqa: E402
from posttrain_probe.callbacks.arguments import ProbeArguments  # noqa: E402
from posttrain_probe.callbacks.probe_run import ProbeRun  # noqa: E402
from posttrain_probe.callbacks.verl.config import VerlProbeConfig, probe_keys  # noqa: E402
from posttrain_probe.callbacks.verl.monitor import WorkerMonitor  # noqa: E402
from posttrain_probe.data import load_dataset_spec  # noqa: E402
from posttrain_probe.errors import ProbeError  # noqa: E402
from posttrain_probe.layers import default_layer, hidden_size, unwrap_model, validate_layer  # noqa: E402


def worker_probe_config(probe: dict[str, Any]) -> VerlProbeConfig:
    """The :class:`VerlProbeConfig` of a ``probe`` dict: its ``probe.*`` keys (``VerlProbeConfig.to_dict()``),
    checked as the ``probe`` node is; the trainer's extra keys (run directory, schedule, ...) are read by
    :meth:`ProbeActorRolloutRefWorker.probe_init` itself."""
    keys = set(probe_keys())
    return VerlProbeConfig.from_dict({key: value for key, value in probe.items() if key in keys})


def probe_arguments(probe: dict[str, Any]) -> ProbeArguments:
    """The ProbeArguments of a ``probe`` dict (:func:`worker_probe_config`). ``dataset`` None means the
    training-data sample."""
    return worker_probe_config(probe).to_probe_arguments()


def train_files_dataset(files: str | os.PathLike | list[str] | None):
    """verl's ``data.train_files`` (one parquet/JSONL path or a list) as one ``datasets.Dataset``,
    rows in file order: what the probe set samples when ``probe.dataset`` is not set."""
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files or [])
    if not paths:
        raise ProbeError(
            "probe.dataset is not set (a sample of the training data) but no training files were given "
            "(data.train_files is empty): set data.train_files, or probe.dataset to a parquet/JSONL file"
        )
    import datasets

    parts = [load_dataset_spec(str(path)) for path in paths]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


class _Processes:
    """What :class:`ProbeRun` asks of an accelerate ``Accelerator``, over verl's process group."""

    @property
    def process_index(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def num_processes(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:
        if self.num_processes > 1:
            dist.barrier()

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """``tensor`` summed over the process group (a new tensor; accelerate's ``reduce``, sums only)."""
        if reduction != "sum":
            raise ProbeError(f"only reduction='sum' is supported over verl's process group, got {reduction!r}")
        total = tensor.clone()
        if self.num_processes > 1:
            dist.all_reduce(total)
        return total


class VerlProbeRun(ProbeRun):
    """A :class:`ProbeRun` on a verl FSDP engine: same probe set, capture and run directory; the
    model is the engine's sharded module and snapshots come from verl's checkpoint manager."""

    def __init__(
        self,
        engine,
        args: ProbeArguments,
        *,
        paradigm: str,
        trainer_name: str = "verl",
        train_files: str | list[str] | None = None,
        base_model: str | None = None,
    ) -> None:
        super().__init__(None, args, paradigm=paradigm)
        self.engine = engine
        self._trainer_name = trainer_name
        self._base_model = base_model
        self._train_files = train_files
        self._processes = _Processes()
        self._train_data = None

    @property
    def accelerator(self) -> _Processes:
        return self._processes

    @property
    def model(self):
        """The actor's FSDP module (sharded parameters; every rank must run the same forwards)."""
        return self.engine.module

    @property
    def tokenizer(self):
        """The actor's tokenizer (verl's HFModelConfig.tokenizer)."""
        return self.engine.model_config.tokenizer

    @property
    def trainer_name(self) -> str:
        return self._trainer_name

    @property
    def base_model(self) -> str:
        """``actor_rollout_ref.model.path`` as the trainer passed it, else the path verl loaded from."""
        return self._base_model or super().base_model

    @property
    def train_dataset(self):
        """The run's training files (``data.train_files``) as one dataset, loaded once."""
        if self._train_data is None:
            self._train_data = train_files_dataset(self._train_files)
        return self._train_data

    def share(self, value):
        """``value`` of rank 0 on every rank (torch.distributed object broadcast)."""
        if self.accelerator.num_processes == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def save_snapshot(self, step: int) -> float:
        """Write ``snapshots/step-NNNNNN`` with verl's FSDP ``hf_model`` export; returns seconds.

        Collective. verl's ``FSDPCheckpointManager`` (``save_contents=["hf_model"]``, a manager of
        our own, so verl's checkpoint rotation never sees or deletes snapshots) gathers the full
        state dict to rank 0, which writes config, generation config, tokenizer and safetensors
        into a staging folder that is renamed when complete.
        """
        from verl.trainer.config import CheckpointConfig
        from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

        started = time.perf_counter()
        processes, engine = self.accelerator, self.engine
        target = self.run.snapshot_dir(step)
        staging = target.with_name(f".{target.name}.verl")
        if processes.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        processes.wait_for_everyone()
        manager = FSDPCheckpointManager(
            model=engine.module,
            optimizer=None,
            lr_scheduler=None,
            processing_class=engine.checkpoint_manager.processing_class,  # what verl's own checkpoints save
            checkpoint_config=CheckpointConfig(save_contents=["hf_model"], load_contents=["hf_model"]),
            trust_remote_code=engine.model_config.trust_remote_code,
        )
        with engine.eval_mode():  # brings offloaded parameters to the device and back
            manager.save_checkpoint(local_path=str(staging), global_step=step, max_ckpt_to_keep=None)
        if processes.is_main_process:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging / "huggingface", target)
            shutil.rmtree(staging, ignore_errors=True)
        processes.wait_for_everyone()
        seconds = time.perf_counter() - started
        self.run.record(
            "snapshots",
            {"step": step, "path": str(target.relative_to(self.run.path)), "peft": None, "seconds": round(seconds, 3)},
        )
        return seconds

    @contextmanager
    def actor_forward(self) -> Iterator[None]:
        """Where probe forwards of the actor run: the engine's eval mode, its autocast dtype (as verl's own
        forward) and no Ulysses sequence parallelism (each rank feeds whole probe documents)."""
        from verl.utils.ulysses import get_ulysses_sequence_parallel_group, set_ulysses_sequence_parallel_group

        engine = self.engine
        dtype = getattr(engine, "_autocast_dtype", torch.float32)
        device = _device_type(self.model)
        with ExitStack() as stack:
            stack.enter_context(engine.eval_mode())
            previous = get_ulysses_sequence_parallel_group()
            set_ulysses_sequence_parallel_group(None)
            stack.callback(set_ulysses_sequence_parallel_group, previous)
            stack.enter_context(
                nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device, dtype=dtype)
            )
            yield

    def capture_live(self, step: int) -> dict[str, float]:
        """:meth:`ProbeRun.capture` in :meth:`actor_forward`."""
        with self.actor_forward():
            return self.capture(step)


def _device_type(module: torch.nn.Module) -> str:
    parameter = next(module.parameters(), None)
    return parameter.device.type if parameter is not None else "cpu"


class ProbeActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's ActorRolloutRefWorker with ``probe_init`` / ``probe_step`` (see the module docstring)."""

    _probe: VerlProbeRun | None = None
    _monitor: WorkerMonitor | None = None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def probe_init(self, probe: dict) -> dict:
        """Build the probe set, check it against the actor and open the run directory (collective).

        ``probe``: ``VerlProbeConfig.to_dict()`` plus the trainer's keys -- ``run_dir`` (resolved
        run directory, required), ``schedule`` (snapshot steps, recorded in probe.json),
        ``resume_step`` (global step the run resumes from, 0 for a fresh run), ``total_training_steps``
        (the monitor's last step; required with ``probe.monitor.crosscoder``), ``train_files``
        (``data.train_files``, for the training-data sample), ``max_prompt_length`` (default the
        rollout's ``prompt_length``), ``paradigm``, ``trainer`` and ``base_model`` (recorded in
        probe.json; default the path verl loaded the actor from). Raises
        ProbeError for a layer outside ``0..n_layers-1`` of the actor, a probe document longer
        than the max prompt length, or a ``probe.monitor`` crosscoder the actor cannot be monitored
        with, before anything is written.

        Returns ``{"n_tokens": tokens captured per layer, "n_docs", "layers", "hidden_size",
        "run_dir", "probe_fingerprint"}``, plus ``"monitor": {"layer", "model", "model_mismatch"}``
        with the monitor on.
        """
        if self.actor is None:
            raise ProbeError(
                f"probe_init needs the actor, but this worker has role {self.role!r}: expected a role with 'actor'"
            )
        run_dir = probe.get("run_dir")
        if not run_dir:
            raise ProbeError(
                "probe_init got no run_dir: expected the resolved probe run directory (probe.run_dir or <trainer.default_local_dir>/probe)"
            )
        config = worker_probe_config(probe)
        args = config.to_probe_arguments()
        engine = self.actor.engine
        if args.probe_save_snapshots and getattr(engine, "_is_lora", False):
            raise ProbeError(
                "snapshots of a LoRA actor are not supported (verl's hf_model export does not merge adapters): "
                "set probe.save_snapshots=false to stream activations only"
            )
        run = VerlProbeRun(
            engine,
            args,
            paradigm=str(probe.get("paradigm") or "verl"),
            trainer_name=str(probe.get("trainer") or type(self).__name__),
            train_files=probe.get("train_files"),
            base_model=probe.get("base_model"),
        )
        inner = unwrap_model(run.model)
        for layer in args.probe_layers:
            try:
                validate_layer(inner, layer)
            except ProbeError as err:
                raise ProbeError(f"probe.layers: {err}") from None
        monitor = None
        if config.monitor.crosscoder is not None:
            total_steps = probe.get("total_training_steps")
            if not isinstance(total_steps, int) or total_steps < 1:
                raise ProbeError(
                    f"probe_init with probe.monitor.crosscoder needs total_training_steps >= 1 (the monitor's last step), got {total_steps!r}"
                )
            monitor = WorkerMonitor(
                run, config.monitor, total_steps=total_steps, resume_step=int(probe.get("resume_step") or 0)
            )
        batches = run.probe_batches() if args.probe_stream_activations or monitor is not None else []
        max_prompt_length = probe.get("max_prompt_length") or self.config.rollout.get("prompt_length")
        if batches and max_prompt_length:
            lengths = torch.cat([batch.attention_mask.sum(dim=1) for batch in batches])
            longest = int(lengths.argmax())
            if int(lengths[longest]) > int(max_prompt_length):
                row = run.probe_rows[longest]
                raise ProbeError(
                    f"probe document {row} has {int(lengths[longest])} tokens, longer than the max prompt length "
                    f"{max_prompt_length} (data.max_prompt_length): set probe.seq_len <= {max_prompt_length} to truncate "
                    "the probe documents, or use a probe set of shorter documents"
                )
        run.open(run_dir, list(probe.get("schedule") or []), resume_step=int(probe.get("resume_step") or 0))
        run.run.close()  # verl has no end-of-training hook: the directory is held while probe_step writes only
        self._probe, self._monitor = run, monitor
        n_tokens = sum(
            int(select_tokens(b.input_ids, b.attention_mask, bos_token_id=run.tokenizer.bos_token_id).sum())
            for b in (batches if args.probe_stream_activations else [])
        )
        info = {
            "n_tokens": n_tokens,
            "n_docs": len(run.probe_rows),
            "layers": list(run.layers or [default_layer(inner)]),
            "hidden_size": hidden_size(inner),
            "run_dir": str(run.run.path),
            "probe_fingerprint": run.run.manifest.get("probe_fingerprint"),
        }
        if monitor is not None:
            cc = monitor.callback
            info["monitor"] = {
                "layer": cc.layer,
                "model": cc.crosscoder.model_names[cc.slot],
                "model_mismatch": cc.model_mismatch,
            }
        return info

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def probe_step(self, step: int, snapshot: bool = True, activations: bool = True, monitor: bool = True) -> dict:
        """Snapshot (steps > 0), capture the probe set and run the feature monitor at optimizer step ``step`` (collective).

        Writes ``snapshots/step-NNNNNN`` (when ``snapshot`` and probe.save_snapshots) and then
        ``activations/step-NNNNNN/layer<L>`` (when ``activations`` and probe.stream_activations;
        step 0 is the base model), and records both in probe.json. A step already recorded in probe.json
        is skipped, so a resumed run does not redo it. With ``monitor`` and probe.monitor.crosscoder set,
        the monitor's first call begins it (base sums and the step-0 line, or on resume the saved base
        sums), and a step that is due (every probe.monitor.every steps, the last step) appends its line to
        ``monitor.jsonl``. Returns metrics for verl's logger: ``probe/snapshot_seconds``,
        ``probe/activation_seconds``, ``probe/drift/layer<L>`` (mean relative change against step 0) and
        the monitor's ``monitor/*`` figures (``monitor/stop`` = 1 when an alert asks to stop).
        """
        run = self._probe
        if run is None:
            raise ProbeError("probe_step called before probe_init: call probe_init(probe) once before training")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ProbeError(f"probe_step needs an optimizer step >= 0, got {step!r}")
        metrics: dict[str, float] = {}
        run.run.lock()
        try:
            if snapshot and run.args.probe_save_snapshots and step > 0 and step not in run.run.steps_done("snapshots"):
                metrics["probe/snapshot_seconds"] = run.save_snapshot(step)
            if activations and run.args.probe_stream_activations and step not in run.run.steps_done("activations"):
                result = run.capture_live(step)
                metrics.update({f"probe/{key}": value for key, value in result.items() if key != "seconds"})
                metrics["probe/activation_seconds"] = result["seconds"]
            if monitor and self._monitor is not None:
                metrics.update(self._monitor.step(step))
        finally:
            run.run.close()
        return metrics


__all__ = [
    "ProbeActorRolloutRefWorker",
    "VerlProbeRun",
    "probe_arguments",
    "train_files_dataset",
    "worker_probe_config",
]
