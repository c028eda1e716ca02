"""posttrain-probe's crosscoders and SAEs against the peer libraries that are installed, on planted data.

Peers: dictionary_learning (the science-of-finetuning fork: ``CrossCoder``, ``BatchTopKCrossCoder``,
``BatchTopKSAE``, ``AutoEncoderTopK``), EleutherAI sparsify (``SparseCoder``, TopK), SAELens
(``TopKTrainingSAE``, ``BatchTopKTrainingSAE``) and Llamascopium (OpenMOSS: ``Crosscoder``,
``SparseAutoEncoder``). A peer that does not import is one row "not installed: <how to install>".
Every figure comes from this one process, on the CPU, in float32 (no autocast anywhere).

Usage::

    python benchmarks/peers.py --threads 1                       # (a) speed, CPU default shapes
    python benchmarks/peers.py --threads 1 --quality --json q.json  # (b) quality on ~1M planted tokens
    python benchmarks/peers.py --quality --d-model 16 --features 64 --batch 64 --tokens 2048 --k 4  # tiny

(a) Speed. One training step of each implementation = forward + backward + its gradient edits +
``clip_grad_norm_(1.0)`` + ``Adam.step`` + ``zero_grad`` + its scheduler and firing counters, on ONE
fixed batch ``x [B, N, d]`` sampled from ``planted_dictionary(n_models=N, d_model=d)`` (every
implementation gets its own copy of the same tensor). Architectures: ``relu_cc`` (ReLU crosscoder,
N=2), ``batchtopk_cc`` (BatchTopK crosscoder, N=2, k), ``sae`` (TopK/BatchTopK SAE, N=1, k); shapes
d in ``--d-model`` (256, 512) x B in ``--batch`` (2048, 4096), F = ``--features`` (4096), k = the first
of ``--k``. Per shape and architecture, every implementation is warmed up by one step (which also
creates the Adam state and runs the one-off initialisations: geometric median, b_dec = mean), then
timed round-robin, one step each per repeat, ``--repeats`` (5) times; the median is reported as
tokens/s and as the ratio to posttrain-probe's step (> 1: faster than ours). Steps are timed in the
state they have for most of a run:

* posttrain-probe: ``Crosscoder.forward`` with the trainer's arguments (λ = 2, aux_k 512, aux 1/32,
  threshold EMA 0.99, no dead features: ``dead_mask=None``, as the trainer passes while none is
  dead), backward, clip 1.0, Adam, zero_grad(set_to_none), firing counters: the body of train.py's
  optimizer step re-assembled from the public forward (the trainer's step function is private).
* dictionary_learning: its trainers' ``update(step, x)`` (BatchTopK / TopK trainers: they clip);
  the ReLU ``CrossCoderTrainer.update`` does not clip, so its body (zero_grad, loss, backward, step,
  scheduler) is run with a clip added. Timed steps pass a step number past ``threshold_start_step``
  so the threshold EMA runs.
* sparsify: the body of ``Trainer.fit``'s hook and step for ``loss_fn="fvu"`` with
  ``optimizer="adam"`` (its default is SignSGD): unit-norm decoder, forward, fvu loss, backward,
  remove the decoder-parallel gradient, Adam, zero_grad, linear warmup schedule, counters; a clip
  is added (sparsify has none).
* SAELens: ``SAETrainer.step(batch)`` (it clips) and the ``n_training_steps`` increment of ``fit``.
* Llamascopium: the loop body of ``Trainer.fit`` (normalize, ``_training_step``, backward,
  ``clip_grad_norm`` at 1.0, step, zero_grad, scheduler) without its metric logging
  (``skip_metrics_calculation``); its ReLU crosscoder gets its L1 penalty (``sparsity_loss_type
  "power"``, default coefficient), without which it trains no sparsity.

AuxK runs only when a feature is dead (posttrain-probe, dictionary_learning, SAELens) or not at all
(sparsify and Llamascopium by default), and no feature is dead in these few steps. Our SAE row is
``Crosscoder`` with N=1 (BatchTopK). Numerics check
per row: every step's loss is finite, the step changed the decoder, and the training-path L0 on the
batch afterwards (k for TopK/BatchTopK; Llamascopium's crosscoder gates per model, so its union over
the models lies in [k, N·k]).

(b) ``--quality``. The same planted data for everyone: ``planted_dictionary(n_models=2,
d_model=d)`` (defaults: 300 directions per model, a third of them exclusive, true L0 ≈ 10.8),
``--tokens`` (1,048,576) training tokens and ``--eval-tokens`` (65,536) held-out tokens from other
seeds. posttrain-probe trains with the real trainer, ``train_crosscoder(MemoryActivations(x,
names), CrosscoderConfig(activation="batchtopk", k), CrosscoderTrainingConfig(n_tokens, batch_size),
out_dir=tmp)``, once as the N=2 crosscoder and once as an SAE on the concatenation [B, 2d] (N=1).
Peers: each one's BatchTopK crosscoder where it has one (dictionary_learning, Llamascopium) and its
BatchTopK SAE (sparsify: TopK, the only one it has).
Batch order: the source records every ``iter_batches`` call the trainer makes and a checksum of
every batch it yields; each peer is then fed the batches of the trainer's training call, replayed
with the same arguments and checked batch by batch against the checksums, so every implementation
sees the same batches in the same order (the output says so, or says that the replay differed).
Crosscoder peers get [B, 2, d]; SAE peers get the concatenation [B, 2d], their decoder [F, 2d] read as
[F, 2, d]. Each peer keeps its own recipe except what must match: k, F, batch, token budget, float32,
Adam (sparsify's default optimizer is SignSGD), no k annealing. Learning rates are each library's own
default rule unless ``--lr`` sets one for all: posttrain-probe 1e-4 for ReLU and 2e-4 / sqrt(F / 2^14) for
BatchTopK (constant, linear decay over the last 20%), dictionary_learning and sparsify 2e-4 / sqrt(F / 2^14), SAELens 3e-4, Llamascopium 4e-4.
Step counts in the peers' schedules written for long runs (warmups of 1000-5000 steps, a threshold
that starts at step 1000, a decay from step 24000 of 30000) are capped at a tenth of this run's steps
(the decay keeps its last-20% share). Llamascopium is initialised as in all its examples
(``grid_search_init_norm=True``). Reported per implementation, on the held-out tokens:

* FVU: per model sum ||x^m - x̂^m||² / sum ||x^m - mean x^m||² (raw units), through the library's own
  inference path (BatchTopK: its learned threshold; Llamascopium has none and applies batch top-k to
  each batch of B held-out tokens; TopK: per-token top k), averaged over the models; "FVU train"
  the same through the training path (batch top-k over batches of B tokens);
* L0 train / L0 inf: mean number of features active per token on those two paths (a feature that a
  per-model gate keeps in any model counts once);
* dead: fraction of features inactive on every held-out token (inference path);
* recovered m / excl m: ``posttrain_probe.crosscoder.planted.recovery`` on the decoder as [F, N, d]
  in raw units: the fraction of model m's planted directions matched at cosine > 0.9, and the
  fraction of its exclusive ones whose best latent is exclusive to m;
* train s: wall seconds of the training, one implementation after the other (not a speed figure).

A benchmark, not a test: it reports and never fails on the numbers. ``--json PATH`` writes every
figure, the versions and the settings.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

INSTALL = {
    "dictionary_learning": "pip install git+https://github.com/science-of-finetuning/dictionary_learning",
    "sparsify": "pip install eai-sparsify",
    "sae_lens": "pip install sae-lens",
    "llamascopium": "pip install llamascopium",
}
"""How to install each peer (the ``bench`` extra of pyproject.toml has the PyPI ones)."""

ARCHS = ("relu_cc", "batchtopk_cc", "sae")
ARCH_TITLES = {
    "relu_cc": "ReLU crosscoder (N=2)",
    "batchtopk_cc": "BatchTopK crosscoder (N=2)",
    "sae": "TopK / BatchTopK SAE (N=1)",
}
OURS = "posttrain-probe"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quality", action="store_true", help="train on planted data and compare quality (else: speed)")
    p.add_argument("--peers", default="all", help="comma-separated peers to include, 'all' or 'none'")
    p.add_argument("--d-model", default=None, help="comma-separated d (speed default 256,512; quality 256)")
    p.add_argument("--features", type=int, default=4096, help="F")
    p.add_argument("--batch", default=None, help="comma-separated B (speed default 2048,4096; quality 1024)")
    p.add_argument("--k", default=None, help="comma-separated k (speed: the first, default 32; quality default 12,32)")
    p.add_argument("--arch", default=",".join(ARCHS), help=f"speed: comma-separated of {', '.join(ARCHS)}")
    p.add_argument("--repeats", type=int, default=5, help="speed: timed steps per implementation (median)")
    p.add_argument("--tokens", type=int, default=1 << 20, help="quality: training tokens (same for everyone)")
    p.add_argument("--eval-tokens", type=int, default=1 << 16, help="quality: held-out tokens")
    p.add_argument("--per-model", type=int, default=300, help="planted directions per model")
    p.add_argument("--true-l0", type=float, default=10.8, help="planted mean active directions per token")
    p.add_argument("--lr", type=float, default=None, help="one Adam lr for every implementation (default: each's own)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.d_model is None:
        args.d_model = "256" if args.quality else "256,512"
    if args.batch is None:
        args.batch = "1024" if args.quality else "2048,4096"
    if args.k is None:
        args.k = "12,32" if args.quality else "32"
    args.d_model = [int(s) for s in str(args.d_model).split(",")]
    args.batch = [int(s) for s in str(args.batch).split(",")]
    args.k = [int(s) for s in str(args.k).split(",")]
    args.arch = [s.strip() for s in args.arch.split(",") if s.strip()]
    unknown = set(args.arch) - set(ARCHS)
    if unknown:
        p.error(f"unknown --arch {sorted(unknown)}; choose from {ARCHS}")
    wanted = list(INSTALL) if args.peers == "all" else [] if args.peers == "none" else args.peers.split(",")
    unknown = set(wanted) - set(INSTALL)
    if unknown:
        p.error(f"unknown --peers {sorted(unknown)}; choose from {list(INSTALL)}")
    args.peers = wanted
    return args


# -- peers: import and availability -------------------------------------------------------------------


def peer_status(name: str) -> str | None:
    """None when peer ``name`` imports with what this benchmark uses; else "not installed: <how to install>"."""
    how = f"not installed: {INSTALL[name]}"
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "dictionary_learning":
                from dictionary_learning import dictionary

                if not hasattr(dictionary, "BatchTopKCrossCoder"):  # PyPI 0.1.0 predates the crosscoders
                    return f"not installed (this dictionary_learning has no BatchTopKCrossCoder): {INSTALL[name]}"
                import dictionary_learning.trainers  # noqa: F401
            elif name == "sparsify":
                import sparsify  # noqa: F401
            elif name == "sae_lens":
                import sae_lens  # noqa: F401
            elif name == "llamascopium":
                import llamascopium.initializer  # noqa: F401
                import llamascopium.trainer  # noqa: F401

                logging.getLogger("llamascopium").setLevel(logging.WARNING)
    except ImportError as exc:
        return f"{how} ({type(exc).__name__}: {exc})"
    except Exception as exc:  # a peer that is there but cannot run here (e.g. CUDA-only kernels)
        return f"unavailable: {type(exc).__name__}: {exc}"
    return None


def peer_version(name: str) -> str:
    from importlib import metadata

    dist = {"dictionary_learning": "dictionary_learning", "sparsify": "eai-sparsify", "sae_lens": "sae-lens"}
    try:
        return metadata.version(dist.get(name, name))
    except metadata.PackageNotFoundError:
        module = sys.modules.get(name)
        where = os.path.dirname(os.path.dirname(module.__file__)) if module and module.__file__ else "?"
        return f"source tree at {where}"


@contextlib.contextmanager
def _quiet():
    """Peers print and warn on every construction (Triton missing, autocast off on CPU, parameter groups)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- adapters: one training step, the two encoding paths and the decoder of every implementation ------


@dataclass
class Spec:
    """What an implementation is built for; x [B, N, d] raw, concatenated to [B, N*d] for SAE peers."""

    n_models: int
    d_model: int
    n_features: int
    k: int
    batch: int
    total_steps: int
    lr: float | None
    seed: int
    speed: bool
    """Speed mode: a clip of 1.0 where the library has none, steady-state step numbers."""

    @property
    def width(self) -> int:
        return self.n_models * self.d_model


def _cap(steps: int, default: int) -> int:
    """A schedule length written for long runs, capped at a tenth of this run's steps (at least 1)."""
    return max(1, min(default, steps // 10))


def _dense(values: torch.Tensor, indices: torch.Tensor, n_features: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], n_features, dtype=values.dtype).scatter_(1, indices, values)


class Adapter:
    """One implementation: ``step`` trains on raw x [B, N, d]; the rest read it (no state change)."""

    library = ""
    name = ""
    lr = float("nan")

    def step(self, x: torch.Tensor) -> torch.Tensor | float:
        raise NotImplementedError

    def train_path(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [B, F], reconstruction [B, N, d] raw) by the training-time encoding."""
        raise NotImplementedError

    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [B, F], reconstruction [B, N, d] raw) by the library's inference path."""
        raise NotImplementedError

    def decoder(self) -> torch.Tensor:
        """[F, N, d] decoder directions in raw units."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        return f"{self.library} {self.name}"


class Ours(Adapter):
    """posttrain-probe's ``Crosscoder`` stepped as the trainer steps it (speed mode; quality uses ``train_crosscoder``)."""

    library = OURS

    def __init__(self, spec: Spec, activation: str, x: torch.Tensor):
        from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig, CrosscoderTrainingConfig

        defaults = CrosscoderTrainingConfig()
        config = CrosscoderConfig(
            model_names=[f"m{i}" for i in range(spec.n_models)],
            d_model=spec.d_model,
            n_features=spec.n_features,
            activation=activation,
            k=spec.k,
        )
        self.name = f"Crosscoder {activation}"
        self.model = Crosscoder(config)
        self.model.reset_parameters(torch.Generator().manual_seed(spec.seed))
        self.model.set_scales_from([x])
        self.lr = spec.lr or defaults.learning_rate(config)
        self.defaults, self.spec = defaults, spec
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr, betas=(defaults.beta1, defaults.beta2))
        self.tokens_since_fired = torch.zeros(spec.n_features, dtype=torch.long)

    def step(self, x):
        cfg = self.defaults
        out = self.model(
            x,
            l1_coefficient=cfg.l1_coefficient,
            dead_mask=None,  # nothing is dead (the trainer passes the dead features' indices, None when none)
            aux_k=cfg.aux_k,
            aux_coefficient=cfg.aux_coefficient,
            threshold_decay=cfg.threshold_decay,
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        fired = out.fired
        self.tokens_since_fired = torch.where(
            fired, torch.zeros_like(self.tokens_since_fired), self.tokens_since_fired + x.shape[0]
        )
        return out.loss.detach()

    def train_path(self, x):
        return _ours_train_path(self.model, x)

    def infer(self, x):
        return _ours_infer(self.model, x)

    def decoder(self):
        return _ours_decoder(self.model)


@torch.no_grad()
def _ours_train_path(model, x):
    model.train()
    out = model(x, threshold_decay=None)
    codes = out.codes.to_dense() if out.codes.is_sparse else out.codes  # BatchTopK training codes are sparse COO
    return codes, out.reconstruction


@torch.no_grad()
def _ours_infer(model, x):
    model.eval()
    codes = model.encode(x)
    recon = model.decode(codes)
    model.train()
    return codes, recon


def _ours_decoder(model):
    return model.W_dec.detach() / model.scales.detach()[None, :, None]


class TrainedOurs(Adapter):
    """A crosscoder returned by ``train_crosscoder``; ``concat``: an SAE (N=1) on [B, N*d] read back as N models."""

    library = OURS

    def __init__(self, model, name: str, lr: float, n_models: int, concat: bool):
        self.model, self.name, self.lr, self.n_models, self.concat = model, name, lr, n_models, concat

    def _x(self, x):
        return x.reshape(x.shape[0], 1, -1) if self.concat else x

    def _back(self, codes, recon):
        return codes, recon.reshape(recon.shape[0], self.n_models, -1)

    def train_path(self, x):
        return self._back(*_ours_train_path(self.model, self._x(x)))

    def infer(self, x):
        return self._back(*_ours_infer(self.model, self._x(x)))

    def decoder(self):
        W = _ours_decoder(self.model)
        return W.reshape(W.shape[0], self.n_models, -1)


class DLCrossCoder(Adapter):
    """dictionary_learning ``CrossCoder`` + ``CrossCoderTrainer`` (ReLU, L1 on f·sum_m||d_i^m||)."""

    library = "dictionary_learning"
    name = "CrossCoder (relu)"

    def __init__(self, spec: Spec):
        from dictionary_learning.dictionary import CrossCoder
        from dictionary_learning.trainers.crosscoder import CrossCoderTrainer

        kwargs = {} if spec.lr is None else {"lr": spec.lr}
        with _quiet():
            self.trainer = CrossCoderTrainer(
                dict_class=CrossCoder,
                num_layers=spec.n_models,
                activation_dim=spec.d_model,
                dict_size=spec.n_features,
                warmup_steps=_cap(spec.total_steps, 1000),
                seed=spec.seed,
                device="cpu",
                layer=0,
                lm_name="planted",
                **kwargs,
            )
        self.lr, self.spec, self.i = self.trainer.lr, spec, 0

    def step(self, x):  # CrossCoderTrainer.update's body, with the clip it lacks
        t = self.trainer
        t.optimizer.zero_grad()
        loss = t.loss(x, step=self.i, normalize_activations=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(t.ae.parameters(), 1.0)
        t.optimizer.step()
        t.scheduler.step()
        self.i += 1
        return loss.detach()

    @torch.no_grad()
    def train_path(self, x):
        f = self.trainer.ae.encode(x, normalize_activations=False)
        return f, self.trainer.ae.decode(f, denormalize_activations=False)

    infer = train_path

    def decoder(self):
        return self.trainer.ae.decoder.weight.detach().permute(1, 0, 2)


class DLBatchTopK(Adapter):
    """dictionary_learning ``BatchTopKCrossCoder`` (crosscoder) or ``BatchTopKSAE`` (SAE on [B, N*d]) and its trainer."""

    library = "dictionary_learning"

    def __init__(self, spec: Spec, crosscoder: bool):
        from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
        from dictionary_learning.trainers.crosscoder import BatchTopKCrossCoderTrainer

        self.crosscoder, self.spec = crosscoder, spec
        self.name = "BatchTopKCrossCoder" if crosscoder else "BatchTopKSAE"
        start = _cap(spec.total_steps, 1000)
        common = dict(
            steps=spec.total_steps,
            dict_size=spec.n_features,
            k=spec.k,
            layer=0,
            lm_name="planted",
            lr=spec.lr,  # None: its rule 2e-4 / sqrt(F / 2^14)
            warmup_steps=start,
            threshold_start_step=start,
            seed=spec.seed,
            device="cpu",
        )
        with _quiet():
            if crosscoder:
                self.trainer = BatchTopKCrossCoderTrainer(
                    activation_dim=spec.d_model, num_layers=spec.n_models, **common
                )
            else:
                self.trainer = BatchTopKTrainer(activation_dim=spec.width, **common)
        self.lr, self.i, self.steady = self.trainer.lr, 0, start + 1

    def _x(self, x):
        return x if self.crosscoder else x.reshape(x.shape[0], -1)

    def step(self, x):
        loss = self.trainer.update(self.i, self._x(x))
        self.i += 1
        if self.spec.speed:  # timed steps run the threshold EMA, as past threshold_start_step
            self.i = max(self.i, self.steady)
        return loss

    def _back(self, f, recon):
        return f, recon.reshape(recon.shape[0], self.spec.n_models, -1)

    @torch.no_grad()
    def _path(self, x, use_threshold):
        ae = self.trainer.ae
        f = ae.encode(self._x(x), use_threshold=use_threshold, normalize_activations=False)
        return self._back(f, ae.decode(f, denormalize_activations=False))

    def train_path(self, x):
        return self._path(x, use_threshold=False)

    def infer(self, x):
        return self._path(x, use_threshold=True)

    def decoder(self):
        W = self.trainer.ae.decoder.weight.detach()
        if self.crosscoder:
            return W.permute(1, 0, 2)  # [N, F, d] -> [F, N, d]
        return W.T.reshape(self.spec.n_features, self.spec.n_models, -1)  # nn.Linear [N*d, F]


class DLTopK(Adapter):
    """dictionary_learning ``AutoEncoderTopK`` + ``TrainerTopK`` (SAE on [B, N*d])."""

    library = "dictionary_learning"
    name = "AutoEncoderTopK"

    def __init__(self, spec: Spec):
        from dictionary_learning.trainers.top_k import TrainerTopK

        with _quiet():
            self.trainer = TrainerTopK(
                activation_dim=spec.width,
                dict_size=spec.n_features,
                k=spec.k,
                steps=spec.total_steps,
                decay_start=int(0.8 * spec.total_steps),  # its default: 24000 of 30000 steps
                seed=spec.seed,
                device="cpu",
                layer=0,
                lm_name="planted",
            )
        if spec.lr is not None:  # TrainerTopK has no lr argument: its rule is 2e-4 / sqrt(F / 2^14)
            self.trainer.lr = spec.lr
            for group in self.trainer.optimizer.param_groups:
                group["lr"] = group["initial_lr"] = spec.lr
            self.trainer.scheduler.base_lrs = [spec.lr]
        self.lr, self.spec, self.i = self.trainer.lr, spec, 0

    def step(self, x):
        loss = self.trainer.update(self.i, x.reshape(x.shape[0], -1))
        self.i += 1
        return loss

    @torch.no_grad()
    def train_path(self, x):
        f = self.trainer.ae.encode(x.reshape(x.shape[0], -1))
        return f, self.trainer.ae.decode(f).reshape(x.shape)

    infer = train_path

    def decoder(self):
        return self.trainer.ae.decoder.weight.detach().T.reshape(self.spec.n_features, self.spec.n_models, -1)


class Sparsify(Adapter):
    """EleutherAI sparsify ``SparseCoder`` (TopK, SAE on [B, N*d]) with the step of its ``Trainer`` (fvu loss, Adam)."""

    library = "sparsify"
    name = "SparseCoder topk"

    def __init__(self, spec: Spec):
        from transformers import get_linear_schedule_with_warmup

        with _quiet():
            from sparsify import SparseCoder, SparseCoderConfig
            from sparsify.config import TrainConfig

            torch.manual_seed(spec.seed)
            self.sae = SparseCoder(
                spec.width, SparseCoderConfig(k=spec.k, num_latents=spec.n_features), device="cpu", dtype=torch.float32
            )
            self.cfg = TrainConfig(SparseCoderConfig(), optimizer="adam", log_to_wandb=False)
        self.lr = spec.lr or 2e-4 / (self.sae.num_latents / 2**14) ** 0.5  # its Adam rule
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.lr)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, _cap(spec.total_steps, self.cfg.lr_warmup_steps), spec.total_steps
        )
        self.tokens_since_fired = torch.zeros(spec.n_features, dtype=torch.long)
        self.did_fire = torch.zeros(spec.n_features, dtype=torch.bool)
        self.spec, self.global_step = spec, 0

    def step(self, x):
        cfg, sae = self.cfg, self.sae
        x = x.reshape(x.shape[0], -1)
        if self.global_step == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = self.tokens_since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        self.did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        if self.spec.speed:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        with torch.no_grad():
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[self.did_fire] = 0
            self.did_fire.zero_()
        self.global_step += 1
        return loss.detach()

    @torch.no_grad()
    def train_path(self, x):
        top_acts, top_indices, _ = self.sae.encode(x.reshape(x.shape[0], -1))
        recon = self.sae.decode(top_acts, top_indices)
        return _dense(top_acts, top_indices, self.spec.n_features), recon.reshape(x.shape)

    infer = train_path

    def decoder(self):
        return self.sae.W_dec.detach().reshape(self.spec.n_features, self.spec.n_models, -1)


class SAELens(Adapter):
    """SAELens ``TopKTrainingSAE`` / ``BatchTopKTrainingSAE`` (SAE on [B, N*d]) and its ``SAETrainer.step``."""

    library = "sae_lens"

    def __init__(self, spec: Spec, batch_topk: bool):
        with _quiet():
            import sae_lens
            from sae_lens.config import SAETrainerConfig
            from sae_lens.training.sae_trainer import SAETrainer

            torch.manual_seed(spec.seed)
            if batch_topk:
                cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=spec.width, d_sae=spec.n_features, k=spec.k)
                self.sae = sae_lens.BatchTopKTrainingSAE(cfg)
            else:
                cfg = sae_lens.TopKTrainingSAEConfig(d_in=spec.width, d_sae=spec.n_features, k=spec.k)
                self.sae = sae_lens.TopKTrainingSAE(cfg)
            lr = SAETrainerConfig.lr if spec.lr is None else spec.lr  # its default 3e-4
            trainer_cfg = SAETrainerConfig(  # lr_end: what its runner config sets (lr / 10; cosine schedules only)
                total_training_samples=spec.total_steps * spec.batch,
                train_batch_size_samples=spec.batch,
                lr=lr,
                lr_end=lr / 10,
            )
            self.trainer = SAETrainer(trainer_cfg, self.sae, data_provider=iter(()))
        self.name = "BatchTopKTrainingSAE" if batch_topk else "TopKTrainingSAE"
        self.lr, self.spec, self._inference = trainer_cfg.lr, spec, None

    def step(self, x):
        out = self.trainer.step(x.reshape(x.shape[0], -1))
        self.trainer.n_training_steps += 1
        self._inference = None
        return out.loss.detach()

    @torch.no_grad()
    def train_path(self, x):
        f = self.sae.encode(x.reshape(x.shape[0], -1))
        return f, self.sae.decode(f).reshape(x.shape)

    def _inference_sae(self):
        """Its inference model (BatchTopK: a JumpReLU SAE at the learned threshold), by its own save and load."""
        if self._inference is None:
            from sae_lens import SAE

            with _quiet(), tempfile.TemporaryDirectory() as tmp:
                self.sae.save_inference_model(tmp)
                self._inference = SAE.load_from_disk(tmp, device="cpu")
        return self._inference

    @torch.no_grad()
    def infer(self, x):
        sae = self._inference_sae()
        f = sae.encode(x.reshape(x.shape[0], -1))
        return f, sae.decode(f).reshape(x.shape)

    def decoder(self):
        return self.sae.W_dec.detach().reshape(self.spec.n_features, self.spec.n_models, -1)


class Llamascopium(Adapter):
    """Llamascopium ``Crosscoder`` (per-model encoder and decoder, one hook point per model) or
    ``SparseAutoEncoder`` (on [B, N*d]) with the loop body of its ``Trainer.fit``."""

    library = "llamascopium"

    def __init__(self, spec: Spec, crosscoder: bool, act_fn: str, init_batches: list[torch.Tensor]):
        from llamascopium.initializer import Initializer, InitializerConfig
        from llamascopium.models.crosscoder import CrosscoderConfig as LCrosscoderConfig
        from llamascopium.models.sae import SAEConfig
        from llamascopium.trainer import Trainer, TrainerConfig

        self.spec, self.crosscoder = spec, crosscoder
        self.hooks = [f"m{i}" for i in range(spec.n_models)] if crosscoder else ["x"]
        self.name = f"{'Crosscoder' if crosscoder else 'SparseAutoEncoder'} {act_fn}"
        width = spec.d_model if crosscoder else spec.width
        common = dict(
            d_model=width,
            expansion_factor=spec.n_features / width,
            act_fn=act_fn,
            top_k=spec.k,
            device="cpu",
            dtype=torch.float32,
        )
        if crosscoder:
            cfg = LCrosscoderConfig(hook_points=self.hooks, **common)
        else:
            cfg = SAEConfig(hook_point_in="x", hook_point_out="x", **common)
        assert cfg.d_sae == spec.n_features, (cfg.d_sae, spec.n_features)
        self._tmp = tempfile.TemporaryDirectory()
        relu = act_fn == "relu"
        trainer_kwargs = dict(
            amp_dtype=torch.float32,
            total_training_tokens=spec.total_steps * spec.batch,
            lr_warm_up_steps=_cap(spec.total_steps, 5000),
            k_warmup_steps=0,  # k must match: no k annealing
            clip_grad_norm=1.0 if spec.speed else 0.0,
            skip_metrics_calculation=True,
            n_checkpoints=0,
            log_frequency=1 << 62,
            exp_result_path=self._tmp.name,
        )
        if relu:  # without a sparsity loss its ReLU crosscoder is not sparse
            trainer_kwargs.update(sparsity_loss_type="power", l1_coefficient_warmup_steps=_cap(spec.total_steps, 1000))
        else:
            trainer_kwargs.update(l1_coefficient=None)
        if spec.lr is not None:
            trainer_kwargs["lr"] = spec.lr
        with _quiet():
            torch.manual_seed(spec.seed)
            batches = [self._batch(x) for x in init_batches]
            self.sae = Initializer(InitializerConfig(grid_search_init_norm=True)).initialize_sae_from_config(
                cfg, activation_stream=batches
            )
            self.trainer = Trainer(TrainerConfig(**trainer_kwargs))
            first = {**batches[0], "mask": torch.ones(spec.batch, dtype=torch.bool)}
            self.trainer._initialize_trainer(self.sae, [first])
            self.trainer._initialize_optimizer(self.sae)
        self.lr = float(self.trainer.cfg.lr)

    def _batch(self, x):
        if self.crosscoder:
            batch = {hook: x[:, m] for m, hook in enumerate(self.hooks)}
        else:
            batch = {"x": x.reshape(x.shape[0], -1)}
        return {**batch, "tokens": torch.zeros(x.shape[0], dtype=torch.long)}

    def step(self, x):  # Trainer.fit's loop body, less its logging and checkpoints
        from llamascopium.optim import clip_grad_norm

        sae, trainer = self.sae, self.trainer
        batch = sae.normalize_activations(self._batch(x))
        sae.train()
        ctx = trainer._training_step(sae, batch)
        ctx["loss"].backward()
        clip_grad_norm(
            [p for name, p in sae.named_parameters() if p.grad is not None and "log_jumprelu_threshold" not in name],
            max_norm=trainer.cfg.clip_grad_norm if trainer.cfg.clip_grad_norm > 0 else math.inf,
        )
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        trainer.scheduler.step()
        trainer.cur_step += 1
        trainer.cur_tokens += x.shape[0]
        return ctx["loss"].detach()

    def _scales(self) -> torch.Tensor:
        """Normalisation factor per hook point (normalised = raw x factor)."""
        probe = {h: torch.ones(1, 1) for h in self.hooks}
        _, factors = self.sae.normalize_activations(probe, return_scale_factor=True)
        return torch.stack([torch.as_tensor(factors[h], dtype=torch.float32).reshape(()) for h in self.hooks])

    @torch.no_grad()
    def _path(self, x):
        """Its only encoding: the activation function on the batch (batch top-k has no inference threshold)."""
        sae = self.sae
        sae.eval()
        batch = sae.normalize_activations(self._batch(x))
        xin, _, _ = sae.prepare_input(batch)
        f = sae.encode(xin)
        recon = sae.decode(f)
        sae.train()
        scales = self._scales()
        if self.crosscoder:  # f [B, N, F] (gated per model), recon [B, N, d]
            return f.amax(dim=1), recon / scales[None, :, None]
        return f, (recon / scales[0]).reshape(x.shape)

    train_path = _path
    infer = _path

    def decoder(self):
        W = self.sae.W_D.detach()
        if self.crosscoder:  # [N, F, d] in normalised units
            return (W / self._scales()[:, None, None]).permute(1, 0, 2)
        return W.reshape(self.spec.n_features, self.spec.n_models, -1)


def build(arch: str, library: str, spec: Spec, x: torch.Tensor) -> list[Adapter]:
    """The implementations of ``arch`` in ``library`` (x: a first batch, for one-off initialisations)."""
    if library == OURS:
        activation = "relu" if arch == "relu_cc" else "batchtopk"
        return [Ours(spec, activation, x)]
    if library == "dictionary_learning":
        if arch == "relu_cc":
            return [DLCrossCoder(spec)]
        if arch == "batchtopk_cc":
            return [DLBatchTopK(spec, crosscoder=True)]
        return [DLBatchTopK(spec, crosscoder=False), DLTopK(spec)]
    if library == "sparsify":
        return [Sparsify(spec)] if arch == "sae" else []
    if library == "sae_lens":
        return [SAELens(spec, batch_topk=False), SAELens(spec, batch_topk=True)] if arch == "sae" else []
    if library == "llamascopium":
        if arch == "relu_cc":
            return [Llamascopium(spec, True, "relu", [x])]
        if arch == "batchtopk_cc":
            return [Llamascopium(spec, True, "batchtopk", [x])]
        return [Llamascopium(spec, False, "topk", [x]), Llamascopium(spec, False, "batchtopk", [x])]
    raise ValueError(library)


NO_ARCH = {"sparsify": "no crosscoder", "sae_lens": "no crosscoder"}


# -- (a) speed ----------------------------------------------------------------------------------------


def planted_batch(n_models: int, d_model: int, n_tokens: int, args, seed: int) -> tuple[object, torch.Tensor]:
    from posttrain_probe.crosscoder.planted import planted_dictionary

    planted = planted_dictionary(n_models=n_models, d_model=d_model, per_model=args.per_model, true_l0=args.true_l0)
    generator = torch.Generator().manual_seed(seed)
    chunks = [planted.sample(min(65536, n_tokens - s), generator) for s in range(0, n_tokens, 65536)]
    return planted, torch.cat(chunks)


def check_row(
    adapter: Adapter, losses: list, before: torch.Tensor, x: torch.Tensor, k: int | None
) -> tuple[str, float]:
    """Numerics check of a timed implementation: 'ok' or what failed, and its training-path L0 on x."""
    problems = []
    if not all(math.isfinite(float(loss)) for loss in losses):
        problems.append("non-finite loss")
    if torch.equal(before, adapter.decoder()):
        problems.append("decoder unchanged")
    codes, _ = adapter.train_path(x)
    l0 = float((codes != 0).sum(-1).float().mean())
    n = x.shape[1]
    if k is not None and not (0 < l0 <= n * k * 1.001 + 1e-6):
        problems.append(f"L0 {l0:.1f} outside (0, {n * k}]")
    if k is not None and adapter.library != "llamascopium" and abs(l0 - k) > 0.05 * k + 0.5:
        problems.append(f"L0 {l0:.1f} != k {k}")
    return ("ok" if not problems else "FAIL: " + "; ".join(problems)), l0


def speed(args, available: dict[str, str | None]) -> list[dict]:
    k, rows = args.k[0], []
    libraries = [OURS] + args.peers
    for d in args.d_model:
        for batch in args.batch:
            for arch in args.arch:
                n, first = (1 if arch == "sae" else 2), len(rows)
                _, x = planted_batch(n, d, batch, args, seed=1)
                spec = Spec(n, d, args.features, k, batch, 10**6, args.lr, args.seed, speed=True)
                impls: list[Adapter] = []
                for library in libraries:
                    if available.get(library) is None:
                        impls += build(arch, library, spec, x)
                copies = {id(a): x.clone() for a in impls}
                before = {id(a): a.decoder().clone() for a in impls}
                times: dict = {id(a): [] for a in impls}
                losses: dict = {id(a): [] for a in impls}
                for rep in range(-1, args.repeats):  # -1: the warm-up step of each
                    for a in impls:
                        start = time.perf_counter()
                        loss = a.step(copies[id(a)])
                        elapsed = time.perf_counter() - start
                        losses[id(a)].append(loss)
                        if rep >= 0:
                            times[id(a)].append(elapsed)
                ref = statistics.median(times[id(impls[0])])
                for a in impls:
                    check, l0 = check_row(a, losses[id(a)], before[id(a)], x, None if arch == "relu_cc" else k)
                    sec = statistics.median(times[id(a)])
                    rows.append(
                        dict(
                            arch=arch,
                            d_model=d,
                            batch=batch,
                            n_models=n,
                            library=a.library,
                            implementation=a.name,
                            median_s=sec,
                            tokens_per_s=batch / sec,
                            vs_ours=ref / sec,
                            times_s=times[id(a)],
                            train_l0=l0,
                            check=check,
                        )
                    )
                for library in args.peers:
                    if available.get(library) is not None or library in NO_ARCH and arch != "sae":
                        reason = available.get(library) or NO_ARCH[library]
                        rows.append(
                            dict(arch=arch, d_model=d, batch=batch, n_models=n, library=library, missing=reason)
                        )
                del impls, copies
                for r in rows[first:]:  # progress: the group's rows as soon as they are measured
                    print(speed_line(r), file=sys.stderr, flush=True)
    return rows


def speed_line(r: dict) -> str:
    where = f"{ARCH_TITLES[r['arch']]:<27} | {r['d_model']:>4} | {r['batch']:>5}"
    if "missing" in r:
        return f"{where} | {r['library'] + ': ' + r['missing']}"
    name = f"{r['library']} {r['implementation']}"
    return (
        f"{where} | {name:<48} | {r['median_s'] * 1e3:>8.1f} | {r['tokens_per_s']:>9,.0f} | "
        f"{r['vs_ours']:>6.2f}x | {r['train_l0']:>6.1f} | {r['check']}"
    )


def print_speed(rows: list[dict], args) -> None:
    print(
        f"speed: one training step (forward + backward + clip + Adam + schedule/counters), F={args.features}, "
        f"k={args.k[0]}, planted data, float32, threads={torch.get_num_threads()}, median of {args.repeats} "
        "round-robin steps after 1 warm-up; vs ours = our step time / theirs (> 1: faster than ours)"
    )
    header = f"{'architecture':<27} | {'d':>4} | {'B':>5} | {'implementation':<48} | {'ms/step':>8} | {'tok/s':>9} | {'vs ours':>7} | {'L0':>6} | check"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(speed_line(r))
    print("target: posttrain-probe's step at least as fast as the fastest peer of each architecture")
    if not any(r["library"] != OURS and "missing" not in r for r in rows):
        print("  no peer ran: nothing to compare")
    for arch in args.arch:
        for d in args.d_model:
            for batch in args.batch:
                group = [r for r in rows if r["arch"] == arch and r["d_model"] == d and r["batch"] == batch]
                ours = [r for r in group if r.get("library") == OURS and "missing" not in r]
                peers = [r for r in group if r.get("library") != OURS and "missing" not in r]
                if not ours or not peers:
                    continue
                best = max(peers, key=lambda r: r["tokens_per_s"])
                ratio = ours[0]["tokens_per_s"] / best["tokens_per_s"]
                print(
                    f"  {ARCH_TITLES[arch]}, d={d}, B={batch}: ours / fastest peer ({best['library']} "
                    f"{best['implementation']}) = {ratio:.2f}x: {'met' if ratio >= 1 else 'MISSED'}"
                )


# -- (b) quality --------------------------------------------------------------------------------------


def _fingerprint(x: torch.Tensor) -> tuple[float, float]:
    flat = x.reshape(-1)
    return (float(flat.double().sum()), float(flat[: 997 if flat.numel() > 997 else flat.numel()].double().sum()))


def recording_source(acts: torch.Tensor, names: list[str]):
    """``MemoryActivations`` that records the arguments of every ``iter_batches`` call and a checksum of every batch."""
    from posttrain_probe.activations.memory import MemoryActivations

    class Recording(MemoryActivations):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.calls: list[dict] = []

        def iter_batches(self, batch_size, **kwargs):
            call = {"batch_size": batch_size, "kwargs": kwargs, "sums": []}
            self.calls.append(call)
            for x in super().iter_batches(batch_size, **kwargs):
                call["sums"].append(_fingerprint(x))
                yield x

    return Recording(acts, names)


def training_call(source, batch: int, steps: int) -> dict | None:
    """The recorded call that fed the training loop: batch size B and at least ``steps`` batches."""
    calls = [c for c in source.calls if c["batch_size"] == batch and len(c["sums"]) >= steps]
    return max(calls, key=lambda c: len(c["sums"])) if calls else None


def replay(acts: torch.Tensor, call: dict | None, batch: int, steps: int, seed: int):
    """The training batches [B, N, d] again, in the recorded order (or one fixed shuffled order without a record)."""
    from posttrain_probe.activations.memory import MemoryActivations

    source = MemoryActivations(acts, [f"m{i}" for i in range(acts.shape[1])])
    if call is None:
        stream = source.iter_batches(batch, shuffle=True, seed=seed, epochs=None, drop_last=True)
    else:
        stream = source.iter_batches(call["batch_size"], **call["kwargs"])
    yield from zip(range(steps), stream)  # range first: no batch is drawn past the last step


@torch.no_grad()
def evaluate(adapter: Adapter, planted, x_eval: torch.Tensor, batch: int) -> dict:
    """Held-out FVU (inference and training path), L0 on both paths, dead fraction and planted recovery."""
    from posttrain_probe.crosscoder.planted import recovery

    n = x_eval.shape[1]
    count = x_eval.shape[0] // batch * batch  # whole batches: the batch-top-k paths need B tokens
    x_eval = x_eval[:count]
    err = {"inf": torch.zeros(n, dtype=torch.float64), "train": torch.zeros(n, dtype=torch.float64)}
    l0 = {"inf": 0.0, "train": 0.0}
    fired = None
    var = (x_eval.double() - x_eval.double().mean(0)).pow(2).sum(dim=(0, 2))
    for start in range(0, count, batch):
        x = x_eval[start : start + batch]
        for path, fn in (("inf", adapter.infer), ("train", adapter.train_path)):
            codes, recon = fn(x)
            err[path] += (x.double() - recon.double()).pow(2).sum(dim=(0, 2))
            l0[path] += float((codes != 0).sum())
            if path == "inf":
                active = (codes != 0).any(0)
                fired = active if fired is None else fired | active
    fvu = (err["inf"] / var).tolist()
    fvu_train = (err["train"] / var).tolist()
    rec = recovery(planted, adapter.decoder())
    return dict(
        fvu=sum(fvu) / n,
        fvu_per_model=fvu,
        fvu_train=sum(fvu_train) / n,
        fvu_train_per_model=fvu_train,
        train_l0=l0["train"] / count,
        inference_l0=l0["inf"] / count,
        dead_fraction=float((~fired).float().mean()),
        recovered=rec.recovered,
        exclusive_as_exclusive=rec.exclusive_as_exclusive,
        eval_tokens=count,
    )


def train_ours(acts, names, k, args, concat: bool):
    from posttrain_probe.crosscoder import CrosscoderConfig, CrosscoderTrainingConfig, train_crosscoder

    n_models = acts.shape[1]
    data = acts.reshape(acts.shape[0], 1, -1) if concat else acts
    data_names = ["concat"] if concat else names
    source = recording_source(data, data_names)
    training = CrosscoderTrainingConfig(n_tokens=args.tokens, batch_size=args.batch[0], seed=args.seed)
    if args.lr is not None:
        training.lr = args.lr
    config = CrosscoderConfig(
        model_names=data_names, d_model=data.shape[-1], n_features=args.features, activation="batchtopk", k=k
    )
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its quality warnings are about the run, not the comparison
        model = train_crosscoder(source, config, training, out_dir=tmp, progress=False)
    name = "SAE on concat (N=1, batchtopk)" if concat else "Crosscoder batchtopk"
    return TrainedOurs(model.cpu(), name, training.learning_rate(config), n_models, concat), source


def build_quality_peer(library: str, model: str, spec: Spec, first: list[torch.Tensor]) -> Adapter:
    if library == "dictionary_learning":
        return {
            "BatchTopKCrossCoder": lambda: DLBatchTopK(spec, True),
            "BatchTopKSAE": lambda: DLBatchTopK(spec, False),
        }[model]()
    if library == "sparsify":
        return Sparsify(spec)
    if library == "sae_lens":
        return SAELens(spec, batch_topk=True)
    if library == "llamascopium":
        return Llamascopium(spec, model == "Crosscoder", "batchtopk", first)
    raise ValueError(library)


QUALITY_PEERS = [
    ("dictionary_learning", "BatchTopKCrossCoder"),
    ("dictionary_learning", "BatchTopKSAE"),
    ("sparsify", "SparseCoder"),
    ("sae_lens", "BatchTopKTrainingSAE"),
    ("llamascopium", "Crosscoder"),
    ("llamascopium", "SparseAutoEncoder"),
]
"""Quality rows per peer: its BatchTopK crosscoder where it has one, and its BatchTopK SAE (sparsify: TopK)."""


def quality(args, available: dict[str, str | None]) -> tuple[list[dict], dict]:
    d, batch = args.d_model[0], args.batch[0]
    steps = args.tokens // batch
    names = ["m0", "m1"]
    planted, x_train = planted_batch(2, d, args.tokens, args, seed=1)
    _, x_eval = planted_batch(2, d, args.eval_tokens, args, seed=2)
    rows: list[dict] = []
    order: dict = {"batches": steps, "batch": batch}

    def done(adapter: Adapter, started: float, **extra) -> None:
        seconds = time.perf_counter() - started
        row = dict(k=k, library=adapter.library, implementation=adapter.name, lr=adapter.lr, train_s=seconds)
        rows.append({**row, **extra, **evaluate(adapter, planted, x_eval, batch)})
        print(quality_line(rows[-1]), file=sys.stderr, flush=True)  # progress: each row as soon as it is measured

    for k in args.k:
        started = time.perf_counter()
        ours, source = train_ours(x_train, names, k, args, concat=False)
        call = training_call(source, batch, steps)
        expected = call["sums"][:steps] if call else None
        done(ours, started)
        started = time.perf_counter()
        ours_sae, sae_source = train_ours(x_train, names, k, args, concat=True)
        sae_call = training_call(sae_source, batch, steps)
        same_as_cc = bool(sae_call and expected and sae_call["sums"][:steps] == expected)
        done(ours_sae, started, same_batches=same_as_cc)
        mismatches = 0
        first = [x for _, x in replay(x_train, call, batch, min(8, steps), args.seed)]
        for library, model in QUALITY_PEERS:
            if library not in args.peers:
                continue
            if available.get(library) is not None:
                if not any(r.get("missing") and r["library"] == library and r["k"] == k for r in rows):
                    rows.append(dict(k=k, library=library, missing=available[library]))
                continue
            spec = Spec(2, d, args.features, k, batch, steps, args.lr, args.seed, speed=False)
            started = time.perf_counter()
            with _quiet():
                peer = build_quality_peer(library, model, spec, first)
                for i, x in replay(x_train, call, batch, steps, args.seed):
                    if expected is not None and _fingerprint(x) != expected[i]:
                        mismatches += 1
                    peer.step(x)
            done(peer, started)
            del peer
        order.setdefault("per_k", []).append(
            dict(
                k=k, recorded=call is not None, replay_mismatches=mismatches, sae_same_batches_as_crosscoder=same_as_cc
            )
        )
    order["how"] = (
        "the batches of posttrain-probe's training call, replayed and checked batch by batch"
        if all(o["recorded"] and o["replay_mismatches"] == 0 for o in order["per_k"])
        else "NOT verified: a fixed shuffled order or a replay that differed (see per_k)"
    )
    info = dict(
        order=order,
        planted=dict(
            n_models=2,
            d_model=d,
            per_model=args.per_model,
            features=int(planted.directions.shape[0]),
            true_l0=planted.true_l0,
        ),
        tokens=args.tokens,
        eval_tokens=args.eval_tokens,
        batch=batch,
        steps=steps,
    )
    return rows, info


def quality_line(r: dict) -> str:
    if "missing" in r:
        return f"{r['k']:>3} | {r['library']}: {r['missing']}"
    name = f"{r['library']} {r['implementation']}"
    return (
        f"{r['k']:>3} | {name:<52} | {r['lr']:>8.2e} | {r['fvu']:>6.4f} | {r['fvu_train']:>7.4f} | "
        f"{r['train_l0']:>6.1f} | {r['inference_l0']:>6.1f} | {r['dead_fraction']:>6.1%} | "
        f"{r['recovered'][0]:>6.1%} | {r['recovered'][1]:>6.1%} | {r['exclusive_as_exclusive'][0]:>7.1%} | "
        f"{r['exclusive_as_exclusive'][1]:>7.1%} | {r['train_s']:>7.0f}"
    )


def print_quality(rows: list[dict], info: dict, args) -> None:
    p = info["planted"]
    print(
        f"quality: planted N=2, d={p['d_model']}, {p['features']} directions ({p['per_model']} per model), "
        f"true L0 {p['true_l0']:.1f}; F={args.features}, batch {info['batch']}, {info['steps']} steps = "
        f"{info['steps'] * info['batch']:,} training tokens each; {rows[0]['eval_tokens'] if rows else 0:,} held-out tokens"
    )
    print(f"batch order: {info['order']['how']}")
    header = (
        f"{'k':>3} | {'implementation':<52} | {'lr':>8} | {'FVU':>6} | {'FVU trn':>7} | {'L0 trn':>6} | {'L0 inf':>6} | "
        f"{'dead':>6} | {'rec m0':>6} | {'rec m1':>6} | {'excl m0':>7} | {'excl m1':>7} | {'train s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(quality_line(r))
    print(
        "FVU: held-out, inference path, mean over the 2 models; rec: planted directions matched at cos > 0.9; "
        "excl: exclusive planted features whose best latent is exclusive; SAEs run on the concatenation [B, 2d]"
    )
    print("targets: ours at least as good an FVU at equal L0 as every peer; at k=32 recovery >= dictionary_learning's")
    for k in args.k:
        ours = next((r for r in rows if r["k"] == k and r["library"] == OURS and "missing" not in r), None)
        peers = [r for r in rows if r["k"] == k and r["library"] != OURS and "missing" not in r]
        if ours is None or not peers:
            continue
        best = min(peers, key=lambda r: r["fvu"])
        verdict = "met" if ours["fvu"] <= best["fvu"] else "MISSED"
        print(
            f"  k={k}: ours FVU {ours['fvu']:.4f} (L0 inf {ours['inference_l0']:.1f}) vs best peer {best['library']} "
            f"{best['implementation']} {best['fvu']:.4f} (L0 inf {best['inference_l0']:.1f}): {verdict}"
        )
        dl = next((r for r in peers if r["implementation"] == "BatchTopKCrossCoder"), None)
        if dl is not None:
            ok = all(o >= t for o, t in zip(ours["recovered"], dl["recovered"]))
            print(
                f"  k={k}: recovery ours {ours['recovered'][0]:.1%}/{ours['recovered'][1]:.1%} vs dictionary_learning "
                f"BatchTopKCrossCoder {dl['recovered'][0]:.1%}/{dl['recovered'][1]:.1%}: {'met' if ok else 'MISSED'}"
            )


# -- main ---------------------------------------------------------------------------------------------


def environment(args, available: dict[str, str | None]) -> dict:
    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        peers={name: (peer_version(name) if available.get(name) is None else available[name]) for name in args.peers},
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    available = {name: peer_status(name) for name in args.peers}
    report = dict(mode="quality" if args.quality else "speed", settings={k: v for k, v in vars(args).items()})
    if args.quality:
        rows, info = quality(args, available)
        print_quality(rows, info, args)
        report.update(quality=rows, quality_info=info)
    else:
        rows = speed(args, available)
        print_speed(rows, args)
        report["speed"] = rows
    report["environment"] = environment(args, available)
    for name in args.peers:
        version = report["environment"]["peers"][name]
        print(f"{name}: {version}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2, default=str)
    return report


if __name__ == "__main__":
    main()
