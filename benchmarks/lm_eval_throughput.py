"""Throughput of an lm-eval run with an active feature intervention vs without (probe-hf, same process).

    python benchmarks/lm_eval_throughput.py                                  # tiny Qwen3 on CPU
    python benchmarks/lm_eval_throughput.py --model shape:qwen3-4b --device cuda --limit 500 --gen-limit 100
    python benchmarks/lm_eval_throughput.py --model Qwen/Qwen3-4B-Base --device cuda --crosscoder runs/cc --model-name base

Loads the model once and evaluates the shipped offline tasks (probe_mcq: loglikelihood, probe_math:
generate_until) with lm-eval's ``probe-hf`` model, alternating runs without and with a
FeatureIntervention (default: zero 50 features at positions=all of a random crosscoder with 32768
features at the middle layer; ``--crosscoder`` takes a trained one) attached to the same model, and
reports the median wall time of each and the throughput ratio (with / without). Target: >= 0.9x on
GPU for a 4B model. Then, outside lm-eval, the model's forward alone on one log-likelihood-sized batch
(``--batch-size`` x ``--forward-tokens`` random token ids, as HFLM calls it: ids only) with and without the
intervention (median of ``--forward-repeats`` alternating forwards) and, on CUDA, the host syncs one forward
with the intervention makes: the intervention's own cost, apart from lm-eval's request handling. ``shape:qwen3-4b`` is a randomly initialised model of Qwen3-4B's shape (36
layers, d = 2560, vocabulary 151936) with the tiny tokenizer, for machines without the weights.
A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

VALUES = {"set": 3.0, "scale": 0.5, "add": 0.5}
"""value= of the modes that need one."""

SHAPES = {
    # Qwen3-4B(-Base): 36 layers, d 2560, 32 query / 8 key-value heads of 128, MLP 9728, vocab 151936,
    # tied embeddings (4.02 B parameters).
    "qwen3-4b": dict(
        hidden_size=2560,
        num_layers=36,
        vocab_size=151936,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=9728,
        tie_word_embeddings=True,
    ),
}


def load_model(args):
    import torch

    from posttrain_probe.testing import tiny_config, tiny_model, tiny_tokenizer

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.model.startswith("tiny:"):
        model, tokenizer = (
            tiny_model(args.model.split(":", 1)[1], hidden_size=args.hidden_size, num_layers=args.layers),
            tiny_tokenizer(),
        )
    elif args.model.startswith("shape:"):
        import transformers

        shape = dict(SHAPES[args.model.split(":", 1)[1]])
        config = tiny_config(
            "qwen3",
            hidden_size=shape.pop("hidden_size"),
            num_layers=shape.pop("num_layers"),
            vocab_size=shape.pop("vocab_size"),
            **shape,
        )
        with torch.device(args.device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer = tiny_tokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    return model.to(device=args.device, dtype=dtype).eval(), tokenizer


def random_crosscoder(model, args, out_dir: str) -> tuple[str, str]:
    """A random single-branch crosscoder (SAE) at the middle layer of ``model``; (directory, branch)."""
    import torch

    from posttrain_probe.crosscoder.config import CrosscoderConfig
    from posttrain_probe.crosscoder.model import Crosscoder
    from posttrain_probe.layers import default_layer, hidden_size

    cc = Crosscoder(
        CrosscoderConfig(
            model_names=["model"], d_model=hidden_size(model), n_features=args.n_features, layer=default_layer(model)
        )
    )
    with torch.no_grad():
        cc.b_enc.fill_(0.01)  # a good share of codes fire on random inputs, so the edit does real work
    cc.save_pretrained(out_dir)
    return out_dir, "model"


def timed(evaluate, lm, args, task_manager) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one lm-eval run."""
    import torch

    from posttrain_probe.eval.lm_eval_config import LmEvalConfig

    config = LmEvalConfig(
        model_args={},
        tasks=args.tasks,
        samples=args.samples,
        batch_size=args.batch_size,
        device=args.device,
        log_samples=False,
    )
    if args.device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    evaluate(config, lm=lm, task_manager=task_manager, gen_kwargs={"max_gen_toks": args.max_gen_toks})
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def forward_cost(model, intervention, args) -> dict:
    """The intervention's cost on the bare forward: median seconds of one ``model(ids)`` without and with it
    attached (``[batch_size, forward_tokens]`` random ids, alternating, after one warm-up of each) and, on CUDA,
    the synchronising calls of one forward without and with it (None elsewhere). Leaves the intervention
    detached."""
    import torch
    from timing import host_syncs, seconds

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch_size, args.forward_tokens), generator=generator).to(device)

    def forward() -> None:
        with torch.inference_mode():
            model(ids)

    times: dict[str, list[float]] = {"without": [], "with": []}
    for round_ in range(args.forward_repeats + 1):  # round 0 is the warm-up of both
        for kind in ("without", "with") if round_ % 2 else ("with", "without"):
            if kind == "with":
                intervention.attach(model)
            elapsed = seconds(forward, device)
            if round_:
                times[kind].append(elapsed)
            if kind == "with":
                intervention.detach()
    plain_syncs = host_syncs(forward, device)  # the model's own, if any: not the intervention's
    intervention.attach(model)
    try:
        syncs = host_syncs(forward, device)
    finally:
        intervention.detach()
    return {kind: statistics.median(t) for kind, t in times.items()} | {"syncs": (plain_syncs, syncs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="tiny:qwen3",
        help="tiny:<arch> (posttrain_probe.testing), shape:qwen3-4b (random weights) or a HF model path/name",
    )
    parser.add_argument("--hidden-size", type=int, default=128, help="tiny models only")
    parser.add_argument("--layers", type=int, default=4, help="tiny models only")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--crosscoder",
        default=None,
        help="trained crosscoder/SAE directory (default: a random one at the middle layer)",
    )
    parser.add_argument("--model-name", default=None, help="crosscoder branch to edit (with --crosscoder)")
    parser.add_argument("--n-features", type=int, default=32768, help="dictionary size of the random crosscoder")
    parser.add_argument("--n-selected", type=int, default=50, help="features edited (the first n)")
    parser.add_argument("--mode", default="zero", help="zero | set | scale | add")
    parser.add_argument("--positions", default="all", help="all | prompt | last_prompt")
    parser.add_argument("--limit", type=int, default=200, help="probe_mcq documents (4 loglikelihood requests each)")
    parser.add_argument("--gen-limit", type=int, default=32, help="probe_math documents (generate_until; 0 = skip)")
    parser.add_argument("--max-gen-toks", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=6, help="alternating timed runs of each kind (after one warm-up of each)"
    )
    parser.add_argument(
        "--forward-tokens", type=int, default=128, help="tokens per row of the bare-forward batch (0 = skip it)"
    )
    parser.add_argument(
        "--forward-repeats", type=int, default=10, help="alternating bare forwards of each kind (after one warm-up)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (cpu device; tiny models run fastest on one)"
    )
    args = parser.parse_args()

    if args.device == "cpu":
        import torch

        torch.set_num_threads(args.threads)

    from posttrain_probe.eval.runner import evaluate, load_probe_lm, make_task_manager

    args.tasks = ["probe_mcq"] + (["probe_math"] if args.gen_limit else [])
    args.samples = {"probe_mcq": list(range(args.limit))}
    if args.gen_limit:
        args.samples["probe_math"] = list(range(args.gen_limit))
    model, tokenizer = load_model(args)
    task_manager = make_task_manager(args.tasks)
    with tempfile.TemporaryDirectory() as tmp:
        cc_dir, branch = (args.crosscoder, args.model_name) if args.crosscoder else random_crosscoder(model, args, tmp)
        common = {"pretrained": model, "tokenizer": tokenizer}
        plain = load_probe_lm(common, batch_size=args.batch_size, device=args.device)
        intervention = {
            "crosscoder": cc_dir,
            "features": list(range(args.n_selected)),
            "mode": args.mode,
            "positions": args.positions,
        }
        if branch:
            intervention["model_name"] = branch
        if args.mode in VALUES:
            intervention["value"] = VALUES[args.mode]
        probed = load_probe_lm({**common, **intervention}, batch_size=args.batch_size, device=args.device)
        iv = probed.intervention
        iv.detach()  # attached only around the runs "with"
        times: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
        for round_ in range(args.repeats + 1):  # round 0 is the warm-up of both
            # alternate which kind goes first, so that neither always follows the other
            for kind in ("without", "with") if round_ % 2 else ("with", "without"):
                if kind == "with":
                    iv.attach(probed.model)
                    elapsed = timed(evaluate, probed, args, task_manager)
                    iv.detach()
                else:
                    elapsed = timed(evaluate, plain, args, task_manager)
                if round_:
                    times[kind].append(elapsed)
        bare = forward_cost(probed.model, iv, args) if args.forward_tokens else None
    n_requests = 4 * args.limit + args.gen_limit
    print(
        f"lm-eval throughput: model={args.model} device={args.device} tasks={','.join(args.tasks)} docs={args.limit}+{args.gen_limit} batch={args.batch_size}"
    )
    print(
        f"intervention: {iv!r} (|S| = {args.n_selected} of {args.n_features if not args.crosscoder else 'trained'} features)"
    )
    medians = {}
    for kind in ("without", "with"):
        wall = statistics.median(t[0] for t in times[kind])
        cpu = statistics.median(t[1] for t in times[kind])
        medians[kind] = (wall, cpu)
        print(
            f"{kind + ' intervention:':<22}{wall:8.2f} s wall ({n_requests / wall:8.1f} requests/s), {cpu:8.2f} s CPU; wall of each run {[round(t[0], 2) for t in times[kind]]}"
        )
    ratio = medians["without"][0] / medians["with"][0]
    print(
        f"throughput ratio (with / without), wall: {ratio:.3f}x  (target >= 0.9x on GPU for a 4B model: {'met' if ratio >= 0.9 else 'NOT met'})"
    )
    if args.device == "cpu":  # on a shared CPU, process CPU time is the steadier measure
        print(f"throughput ratio (with / without), CPU time: {medians['without'][1] / medians['with'][1]:.3f}x")
    if bare is not None:
        print(
            f"bare forward ({args.batch_size} x {args.forward_tokens} tokens, median of {args.forward_repeats}): "
            f"{bare['without'] * 1e3:.2f} ms without, {bare['with'] * 1e3:.2f} ms with the intervention, "
            f"speed ratio (with / without) {bare['without'] / bare['with']:.3f}x"
        )
        if bare["syncs"][0] is not None:
            plain, with_ = bare["syncs"]
            print(
                f"host syncs in one forward: {plain} without, {with_} with the intervention; "
                f"the intervention's: {with_ - plain} (target 0)"
            )


if __name__ == "__main__":
    main()
