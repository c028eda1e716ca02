"""Shared pieces of the probe-callback tests (test_callbacks.py, test_verl_worker.py, test_verl_trainer.py):
reading an activation store back, an independent reference forward, and the TRL probe run the verl
tests compare their stores with."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain_probe.activations.store import ActivationStore
from posttrain_probe.synthetic import arithmetic_dataset
from posttrain_probe.testing import BOS_TOKEN, SPECIAL_TOKEN_IDS

BOS = SPECIAL_TOKEN_IDS[BOS_TOKEN]


def read_store(path: Path) -> tuple[ActivationStore, dict[str, torch.Tensor]]:
    """The complete, verified store at ``path`` and all its shards concatenated per key
    (``acts [T, d]``, ``token_ids``/``doc_ids``/``positions [T]``)."""
    store = ActivationStore(path)
    assert store.complete and store.verify_all() == []
    shards = [store.load_shard(i) for i in range(store.n_shards)]
    return store, {key: torch.cat([s[key] for s in shards]) for key in shards[0]}


@torch.no_grad()
def fresh_forward(model, batches, layers, *, autocast: bool = False) -> dict:
    """Independent reference: full forwards with output_hidden_states, kept tokens selected by hand
    (real tokens, not the first of the document, not BOS), in batch order. Returns ``acts``
    ({layer: [T, d] float32}), ``token_ids``, ``doc_ids``, ``positions`` ([T] each); ``autocast``
    runs the forwards under CPU bf16 autocast."""
    model.eval()
    acts = {layer: [] for layer in layers}
    token_ids, doc_ids, positions = [], [], []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
            ).hidden_states
        position = batch.attention_mask.cumsum(1) - 1
        keep = batch.attention_mask.bool() & (position > 0) & (batch.input_ids != BOS)
        for layer in layers:
            acts[layer].append(hidden[layer][keep].float())
        rows, _ = keep.nonzero(as_tuple=True)
        token_ids.append(batch.input_ids[keep])
        doc_ids.append(batch.doc_ids[rows])
        positions.append(position[keep])
    return {"acts": {layer: torch.cat(v) for layer, v in acts.items()}, "token_ids": torch.cat(token_ids),
            "doc_ids": torch.cat(doc_ids), "positions": torch.cat(positions)}  # fmt: skip


def trl_probe_run(model_dir: Path, train_file: Path, out: Path, *, layers: list[int], n_docs: int) -> Path:
    """The TRL path: one SFTTrainer step (float32, CPU) of the model in ``model_dir`` with
    add_probe_callbacks probing ``n_docs`` rows of the ``prompt`` column of ``train_file`` (the parquet a
    verl worker samples as its training data; seq_len 48, batch 3, float32) at ``layers``; no snapshots.
    Returns the probe run directory ``out / "probe"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from posttrain_probe.callbacks import ProbeArguments, add_probe_callbacks

    config = SFTConfig(
        output_dir=str(out), max_steps=1, per_device_train_batch_size=2, report_to=[], save_strategy="no", use_cpu=True,
        max_length=64, seed=0, disable_tqdm=True, bf16=False, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=config,
        train_dataset=arithmetic_dataset(8, seed=1).select_columns(["messages"]),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    args = ProbeArguments(
        probe_dataset=str(train_file), probe_column="prompt", probe_n_docs=n_docs, probe_seq_len=48, probe_batch_size=3,
        probe_layers=layers, probe_dtype="float32", probe_save_snapshots=False,
    )  # fmt: skip
    add_probe_callbacks(trainer, args)
    trainer.train()
    return out / "probe"
