"""Seconds of ``features fisher`` against ``features generalization`` on the same documents and tiny models.

Both steps run through their Python API (``features_fisher(FisherConfig(...))`` and
``features_generalization(GeneralizationConfig(...))``), each loading the two models from their directories as
the commands do, on the same inputs:

* models:     a base/tuned pair of ``posttrain_probe.testing.save_tiny_pair`` (the README demo's models: Qwen3,
              4 layers, d = 64, the tiny tokenizer)
* crosscoder: a random 2-model crosscoder at layer 2 (``--features`` F, default 512 as in the demo), its input
              scales set from the base model's activations so that codes are of a useful size
* documents:  ``--docs`` synthetic OpenThoughts traces (``posttrain_probe.synthetic.openthoughts_dataset``), fisher's
              dataset; generalization gets, as the prompts of one task's G_t (``generate_until``: the prompt is
              the whole model input), with ``--prompts documents`` (default) the same texts as fisher renders
              them, so both run both models over the same tokens; with ``--prompts problems`` only each text up
              to its first reasoning tag (the chat-rendered problem), short prompts as in the README demo, where
              generalization reads the probe_mcq prompts of G_t and fisher 50 full traces

Generalization keeps the residual at the last prompt token and encodes it; fisher encodes every segment token
of the select model (selection, ReasonScore, rho) and of the other model (rho). Each step writes its result and
figures (generalization: the overlap heatmap; fisher: the rho histograms, one panel per model). The target:
fisher <= 1.0x generalization.

Usage::

    python benchmarks/fisher_speed.py [--docs 50] [--features 512] [--prompts documents|problems]
        [--forward-batch-size N] [--batch-size 8] [--repeats 3] [--threads N] [--device cpu]

The steps are timed round-robin (generalization, fisher per repeat) after one warm-up run of each; the ratio
of the two medians and the median of the per-repeat ratios are reported (the target counts as met when both
are). CPU numbers are noisy when other processes share the cores (``--threads 1`` is steadier there). A benchmark, not a test: it reports numbers and never fails on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
from timing import seconds

LAYER = 2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=50, help="documents (the README demo's --max-docs)")
    p.add_argument("--features", type=int, default=512, help="crosscoder features F")
    p.add_argument(
        "--prompts",
        choices=("documents", "problems"),
        default="documents",
        help="generalization's prompts: the same texts as fisher's documents, or their problems only",
    )
    p.add_argument(
        "--forward-batch-size",
        type=int,
        default=None,
        help="fisher: FisherConfig.forward_batch_size (default: its default)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="generalization: GeneralizationConfig.batch_size")
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each step; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    return p.parse_args()


def build_inputs(root: Path, n_docs: int, n_features: int, prompts: str) -> dict:
    """Models, crosscoder, dataset and critical-samples file under ``root``."""
    from transformers import AutoModelForCausalLM

    from posttrain_probe.analysis.critical import CriticalSamples, TaskCritical
    from posttrain_probe.analysis.fisher_config import SegmentFormat
    from posttrain_probe.analysis.segments import document_column, split_document
    from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig
    from posttrain_probe.synthetic import openthoughts_dataset
    from posttrain_probe.testing import save_tiny_pair, tiny_tokenizer

    paths = save_tiny_pair(root / "models")
    tokenizer = tiny_tokenizer()
    data = openthoughts_dataset(n=n_docs)
    data.to_json(str(root / "openthoughts.jsonl"))
    cc = Crosscoder(CrosscoderConfig(model_names=["base", "tuned"], d_model=64, n_features=n_features, layer=LAYER))
    cc.reset_parameters(torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    batch = tokenizer(list(data["text"][:8]), return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model(**batch, output_hidden_states=True).hidden_states[LAYER]
        cc.scales.fill_(8.0 / float(h[batch["attention_mask"].bool()].norm(dim=-1).mean()))
        cc.b_enc.fill_(-0.1)
    cc.save_pretrained(root / "cc")
    fmt = SegmentFormat()
    column = document_column(list(data.column_names), fmt)
    docs = [split_document(row, fmt, tokenizer, column=column) for row in data]
    texts = [doc.text if prompts == "documents" else doc.text[: doc.tags[0][0]] for doc in docs]
    task = TaskCritical(
        metric="exact_match", filter="none", n_docs=n_docs, n_base_correct=0, n_rl_correct=n_docs,
        doc_ids=list(range(n_docs)), prompts=dict(enumerate(texts)), request_type="generate_until",
    )  # fmt: skip
    CriticalSamples("benchmark", "benchmark", {"openthoughts": task}).write(root / "critical.json")

    def n_tokens(strings) -> int:
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in strings)

    return {"models": paths, "n_tokens": n_tokens(d.text for d in docs), "n_prompt_tokens": n_tokens(texts)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from posttrain_probe.analysis.fisher import features_fisher
    from posttrain_probe.analysis.fisher_config import FisherConfig
    from posttrain_probe.eval.generalization import features_generalization
    from posttrain_probe.eval.generalization_config import GeneralizationConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = build_inputs(root, args.docs, args.features, args.prompts)
        models = [f"{name}={path}" for name, path in inputs["models"].items()]
        common = {"crosscoder": root / "cc", "model": models, "device": args.device}
        fisher = FisherConfig(
            **common, select_model="tuned", dataset=str(root / "openthoughts.jsonl"), max_docs=args.docs,
            out=root / "fisher", **({} if args.forward_batch_size is None else {"forward_batch_size": args.forward_batch_size}),
        )  # fmt: skip
        generalization = GeneralizationConfig(
            **common, base="base", rl="tuned", critical=root / "critical.json", batch_size=args.batch_size,
            out=root / "genfeat",
        )  # fmt: skip
        steps = {
            "features generalization": lambda: features_generalization(generalization),
            "features fisher": lambda: features_fisher(fisher),
        }
        device = torch.device(args.device)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for repeat in range(args.repeats + 1):  # the first round is the warm-up
            for name, step in steps.items():
                elapsed = seconds(step, device)
                if repeat:
                    times[name].append(elapsed)
        summary = json.loads((root / "fisher" / "summary.json").read_text())["documents"]

    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"fisher speed: tiny Qwen3 pair (d 64, 4 layers), crosscoder F={args.features} at layer {LAYER}, "
        f"{args.docs} OpenThoughts documents ({inputs['n_tokens']:,} tokens; {summary['tokens']['reasoning']:,} "
        f"reasoning, {summary['tokens']['solution']:,} solution); generalization prompts: {args.prompts} "
        f"({inputs['n_prompt_tokens']:,} tokens); device={args.device} threads={torch.get_num_threads()}, "
        f"repeats={args.repeats} (median after 1 warm-up)"
    )
    header = f"{'step':<24} | {'median s':>8} | {'min s':>6} | {'max s':>6}"
    print(header)
    print("-" * len(header))
    for name, t in times.items():
        print(f"{name:<24} | {medians[name]:>8.2f} | {min(t):>6.2f} | {max(t):>6.2f}")
    ratio = medians["features fisher"] / medians["features generalization"]
    # each repeat times both steps back to back: the per-repeat ratios cancel slow drifts of the machine's speed
    paired = statistics.median(f / g for f, g in zip(times["features fisher"], times["features generalization"]))
    print(
        f"fisher / generalization: {ratio:.2f}x of the medians, {paired:.2f}x median of the per-repeat ratios "
        f"(target <= 1.00x: {'met' if max(ratio, paired) <= 1.0 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
