"""Training throughput of ``Crosscoder`` against the straightforward per-model implementation.

One optimisation step = forward + backward + ``clip_grad_norm_(1.0)`` + ``Adam.step`` +
``zero_grad(set_to_none=True)``, as the trainer runs it, on one fixed random batch ``x [B, N, d]``
(raw units; the scales s_m are estimated from it and shared), for every activation of
``--activation`` and every N of ``--models``:

* reference: ``PerModelCrosscoder`` below, the straightforward per-model implementation of the SAME
            loss (docs/methods.md sec. 3): per-model parameter tensors W_enc^m [d, F], W_dec^m [F, d],
            b_dec^m [d] and a shared b_enc; encoder = b_enc + sum over models of
            ``einsum('bd,df->bf', ã^m, W_enc^m)`` in a Python loop; one decoder einsum per model;
            loss = mean_x sum_m ||ã^m - â^m||² + λ mean_x sum_i f_i sum_m ||d_i^m||, the L1 term
            also accumulated model by model. BatchTopK keeps the top k·B of f_i·sum_m||d_i^m|| by
            a dense mask and decodes densely; AuxK scatters the top ``aux_k`` dead activations
            into a dense [B, F] code and decodes it densely too.
* ours:     ``Crosscoder(x, ...).loss`` (one [B, N·d] x [N·d, F] encoder matmul, one decoder
            matmul or a sparse embedding_bag gather for BatchTopK, plus the FVU/L0 metrics the
            trainer logs, which the reference skips).

Before timing, float64 copies of ours and of the reference get the same weights and their losses
and gradients (one backward, no autocast) are compared; that check is printed, and the table
marks a configuration that fails it. The timed reference then gets ours' weights too.

Usage::

    python benchmarks/crosscoder_throughput.py [--models 2,3] [--activation relu,batchtopk]
        [--d-model 256] [--features 4096] [--batch 1024] [--steps 1] [--repeats 7] [--threads N]
    python benchmarks/crosscoder_throughput.py --device cuda   # d 2560, F 32768, N 3, batch 4096, bf16 autocast

GPU defaults (``--device cuda``): d=2560, F=32768, N=3, batch 4096, bf16 autocast on (master
weights fp32, as the trainer's mixed_precision=auto). On cuda the table adds the achieved
fraction of ``--peak-tflops`` (default 989: H100 SXM dense bf16) and the peak memory of a step.

FLOPs counted per token (multiply-accumulate = 2 FLOPs; B tokens, D = N·d inputs, F features;
elementwise work, the norms and Adam are not counted):

* encoder pre = x @ W_enc, [B, D] x [D, F]: forward 2·D·F; backward only dW_enc = x^T @ dpre,
  2·D·F (x is data, so no dx matmul is run). Encoder: 4·D·F.
* decoder â = f @ W_dec, [B, F] x [F, D]: forward 2·F·D; backward df = dâ @ W_dec^T and
  dW_dec = f^T @ dâ, 2·F·D each. Decoder: 6·F·D.
* relu: 10·N·d·F per token, 10·B·N·d·F per step. (The rule of thumb "2 matmuls x 3 passes x
  2 FLOPs", 12·B·N·d·F, counts an input-gradient matmul dx that training never runs.)
* batchtopk: 2·N·d·F (the encoder matmul: every score is needed to select the top k·B)
  + 2·k·N·d (dW_enc: only the selected entries carry a gradient) + 6·k·N·d (sparse decoder: k
  active features per token on average); with dead features (``--dead-fraction``) AuxK adds
  4·N·d·n_dead (the dead features' encoder columns, forward and dW) + 6·min(aux_k, n_dead)·N·d
  (AuxK decoder). The trainer passes the dead features' indices (refreshed at log steps), None
  when none is dead; so does this benchmark for ours, and a dense mask to the reference.

The same count is used for both sides (work the loss needs, not work each side happens to do), so
the two "%pk" columns have the ratio of the tok/s columns. Peak memory (cuda) = this side's
parameters + Adam state + the input batch + the largest ``max_memory_allocated`` growth during
one timed call (activations, gradients, autocast weight copies); the other side's tensors, also
resident, are left out.

Calls are timed round-robin (reference, ours per repeat) after one warm-up call of each, which
also creates the Adam state; the median is reported. CPU numbers are noisy when other processes
share the cores (with OpenMP threads on a contended core, parallel sorts and GEMMs can stall for
whole time slices); ``--threads 1`` is steadier there. A benchmark, not a test: it reports
numbers and never fails on timing.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from timing import host_syncs, op_profile
from torch import nn

from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_DEFAULTS = {"d_model": 256, "features": 4096, "batch": 1024, "models": "2,3"}
GPU_DEFAULTS = {"d_model": 2560, "features": 32768, "batch": 4096, "models": "3"}
TARGET = 1.5  # ours/reference tok/s printed as the target on CPU
GPU_TARGET = 0.40  # fraction of bf16 peak, the issue's target on GPU


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    p.add_argument("--models", default=None, help="comma-separated N (default: 2,3 on cpu, 3 on cuda)")
    p.add_argument("--activation", default="relu,batchtopk", help="comma-separated: relu, batchtopk")
    p.add_argument("--d-model", type=int, default=None, help="d (default: 256 on cpu, 2560 on cuda)")
    p.add_argument("--features", type=int, default=None, help="F (default: 4096 on cpu, 32768 on cuda)")
    p.add_argument("--batch", type=int, default=None, help="tokens per step (default: 1024 on cpu, 4096 on cuda)")
    p.add_argument("--k", type=int, default=32, help="BatchTopK: mean active features per token")
    p.add_argument("--aux-k", type=int, default=512, help="BatchTopK: dead features per token in the AuxK loss")
    p.add_argument(
        "--dead-fraction",
        type=float,
        default=0.25,
        help="BatchTopK: fraction of features marked dead (fixed random mask; 0: none, AuxK still runs as in the trainer)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="optimisation steps per timed call (default: 1 on cpu, 10 on cuda)"
    )
    p.add_argument("--repeats", type=int, default=7, help="timed calls per side; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="dtype of the weights and the batch (the trainer: float32)",
    )
    p.add_argument(
        "--autocast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast of both forwards (default: on for cuda, off for cpu)",
    )
    p.add_argument(
        "--profile-rows",
        type=int,
        default=0,
        help="after the table, torch.profiler's top operators of one timed call of ours per activation (0: none)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak for the %%pk column (cuda default: 989, H100 SXM dense bf16)",
    )
    args = p.parse_args()
    gpu = torch.device(args.device).type == "cuda"
    for key, value in (GPU_DEFAULTS if gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.steps = args.steps or (10 if gpu else 1)
    args.autocast = gpu if args.autocast is None else args.autocast
    args.peak_tflops = args.peak_tflops or (989.0 if gpu else None)
    return args


class PerModelCrosscoder(nn.Module):
    """The straightforward per-model implementation of the crosscoder loss (docs/methods.md sec. 3).

    W_enc^m [d, F], W_dec^m [F, d], b_dec^m [d] per model m, one shared b_enc [F]; the models are
    visited in Python loops. Inputs are raw [B, N, d], normalised by the same scales s_m.
    """

    def __init__(self, n_models: int, d_model: int, n_features: int, activation: str, k: int):
        super().__init__()
        self.activation, self.k = activation, k
        self.W_enc = nn.ParameterList([nn.Parameter(torch.empty(d_model, n_features)) for _ in range(n_models)])
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(n_features, d_model)) for _ in range(n_models)])
        self.b_dec = nn.ParameterList([nn.Parameter(torch.zeros(d_model)) for _ in range(n_models)])
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.register_buffer("scales", torch.ones(n_models))
        self.register_buffer("threshold", torch.tensor(-1.0))

    @torch.no_grad()
    def copy_from(self, cc: Crosscoder) -> None:
        for m in range(len(self.W_enc)):
            self.W_enc[m].copy_(cc.W_enc[m])
            self.W_dec[m].copy_(cc.W_dec[:, m])
            self.b_dec[m].copy_(cc.b_dec[m])
        self.b_enc.copy_(cc.b_enc)
        self.scales.copy_(cc.scales)
        self.threshold.copy_(cc.threshold)

    def forward(
        self, x, *, l1_coefficient=2.0, dead_mask=None, aux_k=512, aux_coefficient=1 / 32, threshold_decay=0.99
    ) -> torch.Tensor:
        """Scalar loss of raw x [B, N, d]: mse + λ·l1 (relu) or mse + aux_coefficient·auxk (batchtopk)."""
        n = len(self.W_enc)
        xs = [x[:, m] * self.scales[m].to(x.dtype) for m in range(n)]  # ã^m [B, d]
        pre = self.b_enc
        for m in range(n):
            pre = pre + torch.einsum("bd,df->bf", xs[m], self.W_enc[m])
        acts = F.relu(pre)
        norms = [self.W_dec[m].norm(dim=1) for m in range(n)]  # ||d_i^m||, [F] each
        if self.activation == "relu":
            codes = acts
        else:  # BatchTopK: top k·B of f_i·sum_m||d_i^m|| over the batch, by a dense mask
            scores = acts * sum(norms)
            top = scores.flatten().topk(min(self.k * acts.shape[0], scores.numel()), sorted=False)
            keep = torch.zeros(scores.numel(), dtype=torch.bool, device=x.device).index_fill_(0, top.indices, True)
            codes = acts * keep.view_as(acts)
            if threshold_decay is not None:
                with torch.no_grad():
                    smallest = torch.where(top.values > 0, top.values, torch.full_like(top.values, float("inf"))).min()
                    smallest = torch.where(torch.isfinite(smallest), smallest, self.threshold)
                    blended = torch.where(
                        self.threshold < 0,
                        smallest,
                        self.threshold * threshold_decay + smallest * (1 - threshold_decay),
                    )
                    self.threshold.copy_(blended)
        mse, errors = 0.0, []
        for m in range(n):
            recon = torch.einsum("bf,fd->bd", codes, self.W_dec[m]) + self.b_dec[m]
            errors.append(xs[m].float() - recon.float())
            mse = mse + errors[m].pow(2).sum(-1).mean()
        if self.activation == "relu":
            l1 = 0.0
            for m in range(n):
                l1 = l1 + (codes.float() * norms[m].float()).sum(-1).mean()
            return mse + l1_coefficient * l1
        aux = mse.new_zeros(())
        if dead_mask is not None:  # AuxK: top aux_k dead features reconstruct the error, densely decoded
            dead = acts * dead_mask
            top = dead.topk(min(aux_k, dead.shape[1]), dim=-1, sorted=False)
            aux_codes = torch.zeros_like(dead).scatter(1, top.indices, top.values)
            for m in range(n):
                aux_recon = torch.einsum("bf,fd->bd", aux_codes, self.W_dec[m])
                aux = aux + (errors[m].detach() - aux_recon.float()).pow(2).sum(-1).mean()
            aux = aux * dead_mask.any()
        return mse + aux_coefficient * aux


def flops_per_token(activation: str, n: int, d: int, f: int, k: int, aux_k: int, n_dead: int = 0) -> int:
    """Matmul FLOPs of one training step per token (see the module docstring)."""
    if activation == "relu":
        return 10 * n * d * f
    aux = 4 * n * d * n_dead + 6 * min(aux_k, n_dead) * n * d if n_dead else 0
    return 2 * n * d * f + 8 * k * n * d + aux


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_same_loss(
    ours: Crosscoder, kwargs: dict, x: torch.Tensor, ours_kwargs: dict | None = None
) -> tuple[float, float]:
    """Relative loss difference and largest relative gradient difference, on float64 copies of ``ours``.

    float64 (ours still casts its error and L1 terms to float32 internally), because in float32 a
    near-tie at the BatchTopK boundary (score gaps of ~1e-8 are common among k·B of 1e6 scores)
    can select a different feature on each side, which changes two gradient rows entirely.
    """
    ours = copy.deepcopy(ours).double()
    n, d = ours.n_models, ours.config.d_model
    ref = PerModelCrosscoder(n, d, ours.config.n_features, ours.config.activation, ours.config.k).to(x.device).double()
    ref.copy_from(ours)
    loss_ours = ours(x.double(), **(ours_kwargs or kwargs)).loss
    loss_ref = ref(x.double(), **kwargs)
    loss_ours.backward()
    loss_ref.backward()
    grads = [
        rel_diff(ours.W_enc.grad, torch.stack([p.grad for p in ref.W_enc])),
        rel_diff(ours.W_dec.grad, torch.stack([p.grad for p in ref.W_dec], dim=1)),
        rel_diff(ours.b_dec.grad, torch.stack([p.grad for p in ref.b_dec])),
        rel_diff(ours.b_enc.grad, ref.b_enc.grad),
    ]
    return rel_diff(loss_ours, loss_ref), max(grads)


def make_step(model: nn.Module, loss_of, device: torch.device, autocast: bool, steps: int):
    # fused Adam on a GPU, as the trainer (crosscoder/train.py) uses it
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999), fused=device.type == "cuda" or None)

    def run() -> None:
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = loss_of()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run, optimizer


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.parameters()) + [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def timed(fns: dict, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """Median seconds of each ``fns[key]()`` after one warm-up call each, round-robin per repeat.

    Also the largest growth of ``torch.cuda.max_memory_allocated`` over one call (cuda; else 0).
    """
    cuda = device.type == "cuda"
    times: dict = {key: [] for key in fns}
    peak: dict = {key: 0 for key in fns}
    for rep in range(-1, repeats):
        for key, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if cuda and rep >= 0:  # the warm-up also allocates the Adam state, counted separately
                peak[key] = max(peak[key], torch.cuda.max_memory_allocated(device) - before)
            if rep >= 0:
                times[key].append(elapsed)
    return {key: statistics.median(t) for key, t in times.items()}, peak


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    d, n_features, batch = args.d_model, args.features, args.batch
    models = [int(s) for s in str(args.models).split(",")]
    activations = [s.strip() for s in args.activation.split(",")]
    cuda = device.type == "cuda"

    rows = []
    syncs: dict[str, int | None] = {}
    profiles: dict[str, str] = {}
    for n in models:
        # Correlated models (a shared component plus per-model noise) with different raw norms.
        gen = torch.Generator().manual_seed(n)
        shared = torch.randn(batch, 1, d, generator=gen)
        x = (shared + 0.5 * torch.randn(batch, n, d, generator=gen)) * torch.arange(1, n + 1).view(1, n, 1)
        x = x.to(device, dtype)
        for activation in activations:
            config = CrosscoderConfig(
                model_names=[f"m{i}" for i in range(n)],
                d_model=d,
                n_features=n_features,
                activation=activation,
                k=args.k,
            )
            ours = Crosscoder(config)
            ours.reset_parameters(torch.Generator().manual_seed(0))
            ours.set_scales_from([x])
            ours.to(device)
            ref = PerModelCrosscoder(n, d, n_features, activation, args.k).to(device)
            dead_mask = (torch.rand(n_features, generator=torch.Generator().manual_seed(1)) < args.dead_fraction).to(
                device
            )
            kwargs = dict(
                l1_coefficient=2.0, dead_mask=dead_mask, aux_k=args.aux_k, aux_coefficient=1 / 32, threshold_decay=0.99
            )
            # ours gets what the trainer passes: the dead features' indices, None when none is dead
            dead_index = dead_mask.nonzero().squeeze(1)
            ours_kwargs = kwargs | {"dead_mask": dead_index if dead_index.numel() else None}
            loss_diff, grad_diff = check_same_loss(ours, kwargs, x, ours_kwargs)
            same = loss_diff < 1e-4 and grad_diff < 1e-3
            ref.copy_from(ours)
            print(
                f"check {activation:<9} N={n}: same weights (float64 copies): loss rel. diff {loss_diff:.1e}, "
                f"largest grad rel. diff {grad_diff:.1e}: {'ok' if same else 'MISMATCH'}"
            )
            ours.to(dtype)
            ref.to(dtype)
            run_ours, opt_ours = make_step(
                ours,
                lambda ours=ours, x=x, kwargs=ours_kwargs: ours(x, **kwargs).loss,
                device,
                args.autocast,
                args.steps,
            )
            run_ref, opt_ref = make_step(
                ref, lambda ref=ref, x=x, kwargs=kwargs: ref(x, **kwargs), device, args.autocast, args.steps
            )
            sec, peak = timed({"ref": run_ref, "ours": run_ours}, device, args.repeats)
            syncs[activation] = host_syncs(run_ours, device)
            if args.profile_rows > 0:
                profiles[f"{activation} N={n}"] = op_profile(run_ours, device, args.profile_rows)
            tokens = batch * args.steps
            flops = flops_per_token(activation, n, d, n_features, args.k, args.aux_k, int(dead_mask.sum()))
            x_bytes = x.numel() * x.element_size()
            mem = {
                "ref": state_bytes(ref, opt_ref) + x_bytes + peak["ref"],
                "ours": state_bytes(ours, opt_ours) + x_bytes + peak["ours"],
            }
            rows.append((activation, n, tokens / sec["ref"], tokens / sec["ours"], flops, mem, same))
            del ours, ref, opt_ours, opt_ref, run_ours, run_ref
            if cuda:
                torch.cuda.empty_cache()

    precision = f"{args.dtype}{' + bf16 autocast' if args.autocast else ''}"
    print(
        f"crosscoder throughput: d_model={d} F={n_features} batch={batch} k={args.k} aux_k={args.aux_k} "
        f"dead_fraction={args.dead_fraction} {precision} device={device} threads={torch.get_num_threads()} "
        f"steps/call={args.steps} repeats={args.repeats} (median after 1 warm-up)"
    )
    print(
        "step = forward + backward + clip_grad_norm_(1.0) + Adam.step + zero_grad; "
        "reference = the straightforward per-model implementation of the same loss"
    )
    header = f"{'activation':<10} | {'N':>2} | {'ref tok/s':>10} | {'ours tok/s':>10} | {'ours/ref':>9} | {f'>= {TARGET}x':>7}"
    if args.peak_tflops:
        header += f" | {'ref %pk':>8} | {'ours %pk':>8}"
    if cuda:
        header += f" | {'ref GiB':>8} | {'ours GiB':>8}"
    print(header)
    print("-" * len(header))
    for activation, n, tps_ref, tps_ours, flops, mem, same in rows:
        ratio = tps_ours / tps_ref
        line = f"{activation:<10} | {n:>2} | {tps_ref:>10,.0f} | {tps_ours:>10,.0f} | {ratio:>8.2f}x | {'yes' if ratio >= TARGET else 'NO':>7}"
        if args.peak_tflops:
            peak_flops = args.peak_tflops * 1e12
            line += f" | {tps_ref * flops / peak_flops:>7.1%} | {tps_ours * flops / peak_flops:>7.1%}"
        if cuda:
            line += f" | {mem['ref'] / 2**30:>8.2f} | {mem['ours'] / 2**30:>8.2f}"
        print(line + ("" if same else "  (loss check MISMATCH: not the same loss)"))
    flop_text = (
        "relu 10*N*d*F, batchtopk 2*N*d*F + 8*k*N*d + (with n_dead > 0) 4*N*d*n_dead + 6*min(aux_k, n_dead)*N*d"
        " matmul FLOPs per token (docstring)"
    )
    if args.peak_tflops:
        print(f"%pk = tok/s x ({flop_text}) / {args.peak_tflops:g} TFLOP/s; target on GPU: ours >= {GPU_TARGET:.0%}")
    if cuda:
        print("GiB = own params + Adam state + input batch + peak growth of max_memory_allocated in a timed call")
        print(
            f"host syncs in {args.steps} steps of ours (last N): "
            + ", ".join(f"{activation} {count}" for activation, count in syncs.items())
            + " (target 0: the step never waits for the GPU)"
        )
    for name, table in profiles.items():
        print(
            f"\nprofile of ours, {name}: one timed call ({args.steps} steps), top {args.profile_rows} operators by self {'device' if cuda else 'CPU'} time"
        )
        print(table)


if __name__ == "__main__":
    main()
