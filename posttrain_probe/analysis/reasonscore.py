"""ReasonScore (Galichin et al. 2025), the baseline paper S compares its Fisher features against (docs/methods.md sec. 8).

Source: A. Galichin, A. Dontsov, P. Druzhinina, A. Razzhigaev, O. Y. Rogov, E. Tutubalina, I. Oseledets,
"I Have Covered All the Bases Here: Interpreting Reasoning Features in Large Language Models via Sparse
Autoencoders", arXiv:2503.18878 (2025), sec. 3, and its official code (github.com/AIRI-Institute/SAE-Reasoning:
``extraction/compute_score.py``, ``extraction/reason_tokens.json``, ``extraction/scripts/compute_score.sh``;
read through public mirrors of that repository, e.g. wantbook-book/SAE-Reasoning at 17efc06, which carry the
same files). The paper text itself was not reachable here; the definition below is the one the official code
computes, with the paper's settings from its run script: window ``--expand_range 1,2`` (1 token before, 2 after),
``--alpha 0.7``, ignored tokens = the tokenizer's BOS/EOS ids.

Definition, for every feature i of an SAE (here: one branch m of a crosscoder, per-source codes f^m):

1. Activations are the **decoder-norm-weighted** codes a_i(x) = f_i(x) ||d_i|| (the official code calls
   sae_lens' ``fold_W_dec_norm()`` first, which turns f_i into f_i ||d_i||; here ||d_i^m||_2 of branch m, in
   the crosscoder's normalised units; ``decoder_norm_weighted=False`` uses f_i as it is).
2. The reasoning vocabulary R: the 10 words of :data:`REASONING_WORDS`, each given by the string variants of
   :data:`REASON_TOKENS` (the official ``reason_tokens.json``: lower/capitalised, with and without a leading
   space). Variants are grouped by ``variant.lstrip().lower()``; each variant is tokenised on its own
   (no special tokens) and every exact occurrence of that token-id sequence in a document marks its tokens.
3. Each marked position p marks the window [p - 1, p + 2] (``window=(1, 2)``), clipped to the sequence.
   Ignored tokens (special tokens, padding, and here also the first position, docs/methods.md sec. 1) are then removed.
4. Per word group r: mu_i(r) = mean of a_i over the tokens in r's windows; mu_i^+ = mean over the tokens in
   any window; mu_i^- = mean over all other (non-ignored) tokens. A word that never occurs has mu_i(r) = 0.
5. p_i(r) = mu_i(r) / (sum_r' mu_i(r') + eps), H_i = -sum_r p_i(r) log p_i(r) / log |R| (|R| = number of word
   groups, occurring or not; H_i = 1 when |R| = 1).
6. ReasonScore_i = mu_i^+ / (sum_j mu_j^+ + eps) * H_i^alpha - mu_i^- / (sum_j mu_j^- + eps), eps = 1e-12,
   alpha = 0.7: high for features that fire around reasoning words, spread over many of the words (the
   entropy term penalises features tied to one word), and not elsewhere.

Entry points: :func:`reason_score` (step 5-6, the formula), :func:`reasoning_token_groups` and
:func:`reasoning_word_masks` (steps 2-3), :class:`ReasonScoreAccumulator` (step 4 over batches, float64 on the
codes' device). :mod:`posttrain_probe.analysis.fisher` runs it next to the Fisher ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from posttrain_probe.errors import ProbeError

REASONING_WORDS: tuple[str, ...] = (
    "alternatively",
    "hmm",
    "maybe",
    "wait",
    "perhaps",
    "let me",
    "therefore",
    "however",
    "but",
    "another",
)
"""The 10 reasoning words of Galichin et al. (the groups of :data:`REASON_TOKENS`)."""

REASON_TOKENS: tuple[str, ...] = (
    "alternatively", " alternatively", "Alternatively", " Alternatively",
    "hmm", " hmm", "Hmm", " Hmm",
    "maybe", " maybe", "Maybe", " Maybe",
    "wait", " wait", "Wait", " Wait",
    "perhaps", " perhaps", "Perhaps", " Perhaps",
    "let me", " let me", "Let me", " Let me",
    "therefore", " therefore", "Therefore", " Therefore",
    "however", " however", "However", " However",
    "But", "Another",
)  # fmt: skip
"""String variants of the reasoning words, exactly as the official ``extraction/reason_tokens.json`` lists them
(note: ``but`` and ``another`` only capitalised, without a leading space)."""

WINDOW: tuple[int, int] = (1, 2)
"""Tokens marked before and after every token of a reasoning-word occurrence (official ``--expand_range 1,2``)."""

ALPHA: float = 0.7
"""Exponent of the normalised entropy (official ``--alpha 0.7``)."""

EPSILON: float = 1e-12
"""Stabiliser of the normalisations (official default)."""


def reason_score(
    mean_in: torch.Tensor,
    mean_out: torch.Tensor,
    word_means: torch.Tensor,
    *,
    alpha: float = ALPHA,
    eps: float = EPSILON,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReasonScore of every feature (Galichin et al. 2025; see the module docstring, steps 5-6).

    Args:
        mean_in: ``[F]`` mu_i^+, mean weighted activation over tokens inside reasoning-word windows (code units
            x decoder norm).
        mean_out: ``[F]`` mu_i^-, the same over all other kept tokens.
        word_means: ``[G, F]`` mu_i(r), the mean over the windows of each of the G word groups (0 for a word that
            never occurs).
        alpha: exponent of the normalised entropy (paper: 0.7).
        eps: stabiliser of the three normalisations (official: 1e-12).

    Returns:
        ``(score [F], entropy [F])`` in float64: ReasonScore (unitless; sums of the two normalised terms, so in
        about [-1, 1]) and the normalised entropy H_i in [0, 1] of the feature's activation across the words.
    """
    mean_in = torch.as_tensor(mean_in, dtype=torch.float64)
    mean_out = torch.as_tensor(mean_out, dtype=torch.float64, device=mean_in.device)
    word_means = torch.as_tensor(word_means, dtype=torch.float64, device=mean_in.device)
    if (
        mean_in.ndim != 1
        or mean_out.shape != mean_in.shape
        or word_means.ndim != 2
        or word_means.shape[1] != mean_in.shape[0]
    ):
        raise ProbeError(
            f"reason_score expects mean_in [F], mean_out [F] and word_means [G, F]; got {tuple(mean_in.shape)}, "
            f"{tuple(mean_out.shape)} and {tuple(word_means.shape)}"
        )
    if word_means.shape[0] == 0:
        raise ProbeError("reason_score needs at least one reasoning word group")
    probs = word_means / (word_means.sum(dim=0, keepdim=True) + eps)
    plogp = torch.where(
        probs > 0, probs * probs.clamp_min(torch.finfo(torch.float64).tiny).log(), torch.zeros_like(probs)
    )
    entropy = 0.0 - plogp.sum(dim=0)  # 0.0 - x: no negative zeros
    n_words = word_means.shape[0]
    entropy = entropy / math.log(n_words) if n_words > 1 else torch.ones_like(entropy)
    score = mean_in / (mean_in.sum() + eps) * entropy.pow(alpha) - mean_out / (mean_out.sum() + eps)
    return score, entropy


def reasoning_token_groups(
    tokenizer, variants: Sequence[str] = REASON_TOKENS
) -> tuple[list[str], list[list[list[int]]]]:
    """Token-id sequences of the reasoning-word variants, grouped by word (module docstring, step 2).

    Every variant is tokenised alone with ``add_special_tokens=False``; variants with the same
    ``variant.lstrip().lower()`` form one group. Returns ``(words, groups)``: the G group names in first-seen
    order and, per group, the list of its variants' token-id lists. Empty variants are refused.
    """
    words: list[str] = []
    groups: dict[str, list[list[int]]] = {}
    for variant in variants:
        if not isinstance(variant, str) or not variant.strip():
            raise ProbeError(f"reasoning word variant {variant!r} is empty: expected strings like ' Wait' or 'Hmm'")
    encoded = tokenizer(list(variants), add_special_tokens=False)["input_ids"] if variants else []  # each alone
    for variant, found in zip(variants, encoded):
        key = variant.lstrip().lower()
        ids = list(found)
        if not ids:
            raise ProbeError(f"reasoning word variant {variant!r} tokenises to no tokens")
        if key not in groups:
            words.append(key)
            groups[key] = []
        if ids not in groups[key]:
            groups[key].append(ids)
    if not words:
        raise ProbeError("no reasoning words given: expected a list of word variants like [' Wait', 'Hmm']")
    return words, [groups[w] for w in words]


def reasoning_word_masks(
    input_ids: torch.Tensor,
    groups: Sequence[Sequence[Sequence[int]]],
    *,
    window: tuple[int, int] = WINDOW,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens inside the windows of each reasoning-word group (module docstring, steps 2-3).

    Args:
        input_ids: ``[B, T]`` token ids (one document per row; matches never cross rows).
        groups: per word group, its variants' token-id sequences (:func:`reasoning_token_groups`).
        window: ``(before, after)``: every token of an occurrence marks itself, ``before`` tokens to its left and
            ``after`` to its right (clipped at the row's ends).
        keep: optional ``[B, T]`` bool of tokens that count (ignored tokens and padding False); windows are
            computed first, then restricted to ``keep``, as the official code does.

    Returns:
        ``[B, T, G]`` bool, on the device of ``input_ids``.
    """
    if input_ids.ndim != 2:
        raise ProbeError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
    before, after = (int(w) for w in window)
    if before < 0 or after < 0:
        raise ProbeError(f"window {window!r}: expected two non-negative token counts (before, after)")
    batch, length = input_ids.shape
    if input_ids.numel() == 0 or not groups:
        return torch.zeros(batch, length, len(groups), dtype=torch.bool, device=input_ids.device)
    variants = [(g, list(ids)) for g, group in enumerate(groups) for ids in group if 0 < len(ids) <= length]
    device = input_ids.device
    marked = torch.zeros(batch, len(groups), length, device=device)  # tokens of an occurrence, per group
    if variants:  # every variant at once: patterns right-padded with -1, which matches anything
        longest = max(len(ids) for _, ids in variants)
        patterns = torch.as_tensor(
            [ids + [-1] * (longest - len(ids)) for _, ids in variants], dtype=input_ids.dtype, device=device
        )  # [V, longest]
        sizes = torch.as_tensor([len(ids) for _, ids in variants], device=device)
        owner = torch.as_tensor([g for g, _ in variants], device=device)
        # the `longest` tokens from each position; past the row's end -1, which no variant token equals
        windows = torch.nn.functional.pad(input_ids, (0, longest - 1), value=-1).unfold(1, longest, 1)
        # candidates: (row, position, variant) where the token is the variant's first; then their whole windows
        rows, cols, variant = (input_ids[:, :, None] == patterns[:, 0]).nonzero(as_tuple=True)
        found = ((windows[rows, cols] == patterns[variant]) | (patterns[variant] < 0)).all(dim=1)
        rows, cols, variant = rows[found], cols[found], variant[found]  # the occurrences
        offsets = torch.arange(longest, device=device)
        inside = offsets < sizes[variant][:, None]  # [M, longest]: the occurrence's own tokens
        where = (
            rows[:, None].expand(-1, longest)[inside],
            owner[variant][:, None].expand(-1, longest)[inside],
            (cols[:, None] + offsets)[inside],
        )
        marked[where] = 1.0
    # token t is covered when an occurrence's token sits in [t - after, t + before]: a sliding max, zero-padded
    padded = torch.nn.functional.pad(marked, (after, before))
    out = (torch.nn.functional.max_pool1d(padded, kernel_size=after + before + 1, stride=1) > 0).transpose(1, 2)
    if keep is not None:
        out &= keep.to(device=out.device, dtype=torch.bool)[:, :, None]
    return out


@dataclass
class ReasonScoreResult:
    """ReasonScore of every feature with the statistics behind it (float64, CPU)."""

    score: torch.Tensor
    """[F] ReasonScore (:func:`reason_score`)."""
    entropy: torch.Tensor
    """[F] normalised entropy H_i of the activation across the reasoning words, in [0, 1]."""
    mean_in: torch.Tensor | None
    """[F] mu_i^+: mean weighted activation inside reasoning-word windows. (None when read back from a report, which does not store it)"""
    mean_out: torch.Tensor | None
    """[F] mu_i^-: mean weighted activation on all other kept tokens. (None when read back from a report, which does not store it)"""
    word_means: torch.Tensor | None
    """[G, F] mu_i(r) per word group (None when read back from a report)."""
    words: list[str]
    """The G word groups."""
    word_tokens: list[int]
    """[G] tokens inside each group's windows."""
    n_in: int
    """Tokens inside any window."""
    n_out: int
    """Kept tokens outside every window."""
    alpha: float
    window: tuple[int, int]
    decoder_norm_weighted: bool

    def top(self, k: int) -> list[int]:
        """The ``k`` features of highest ReasonScore (ties: lower index first)."""
        order = torch.sort(self.score, descending=True, stable=True).indices
        return [int(i) for i in order[: max(0, int(k))]]

    def summary(self, k: int) -> dict:
        """JSON-ready settings, token counts and the top-``k`` features."""
        return {
            "definition": "Galichin et al. 2025 (arXiv:2503.18878), official code: mu+/sum mu+ * H^alpha - mu-/sum mu-, decoder-norm-weighted codes",
            "alpha": self.alpha,
            "window": {"before": self.window[0], "after": self.window[1]},
            "decoder_norm_weighted": self.decoder_norm_weighted,
            "words": {w: int(n) for w, n in zip(self.words, self.word_tokens)},
            "n_tokens_in_windows": self.n_in,
            "n_tokens_outside": self.n_out,
            "top_k": k,
            "top_features": self.top(k),
        }


class ReasonScoreAccumulator:
    """Accumulates the window means of :func:`reason_score` over batches of codes (float64, on the codes' device).

    Built from :func:`reasoning_token_groups` ``(words, groups)``. Per batch: ``masks(input_ids [B, T], keep)``
    gives the ``[B, T, G]`` window masks (:func:`reasoning_word_masks`), then ``update(codes [n, F], word_masks
    [n, G])`` takes the kept tokens only (one row per kept token). ``weights`` ``[F]`` (the decoder norms for the
    official weighting, or None) weights each feature's code (applied to its sums: sum_t f_t w = w sum_t f_t).
    """

    def __init__(
        self,
        words: Sequence[str],
        groups: Sequence[Sequence[Sequence[int]]],
        n_features: int,
        *,
        weights: torch.Tensor | None = None,
        alpha: float = ALPHA,
        window: tuple[int, int] = WINDOW,
    ):
        if len(words) != len(groups) or not words:
            raise ProbeError(
                f"expected one token group per reasoning word, got {len(words)} words and {len(groups)} groups"
            )
        if not alpha >= 0:
            raise ProbeError(f"alpha must be >= 0 (the paper uses 0.7), got {alpha!r}")
        self.words = list(words)
        self.groups = [[list(ids) for ids in variants] for variants in groups]
        self.n_features = int(n_features)
        self.weights = weights
        self.alpha, self.window = float(alpha), (int(window[0]), int(window[1]))
        if self.window[0] < 0 or self.window[1] < 0:
            raise ProbeError(f"window {window!r}: expected two non-negative token counts (before, after)")
        self._sums: torch.Tensor | None = None  # [G + 2, F]: groups, inside any window, outside
        self._counts: torch.Tensor | None = None  # [G + 2] int64

    def masks(self, input_ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, G]`` bool window masks of this accumulator's words (:func:`reasoning_word_masks`)."""
        return reasoning_word_masks(input_ids, self.groups, window=self.window, keep=keep)

    def update(self, codes: torch.Tensor, word_masks: torch.Tensor) -> None:
        """Add ``n`` kept tokens: ``codes`` [n, F] per-source codes, ``word_masks`` [n, G] bool."""
        n_groups = len(self.words)
        if codes.ndim != 2 or codes.shape[1] != self.n_features or word_masks.shape != (codes.shape[0], n_groups):
            raise ProbeError(
                f"expected codes [n, {self.n_features}] and word masks [n, {n_groups}], got {tuple(codes.shape)} and {tuple(word_masks.shape)}"
            )
        device = codes.device
        if self._sums is None:
            self._sums = torch.zeros(n_groups + 2, self.n_features, dtype=torch.float64, device=device)
            self._counts = torch.zeros(n_groups + 2, dtype=torch.int64, device=device)
        word_masks = word_masks.to(device)
        inside = word_masks.any(dim=1)
        masks = torch.cat([word_masks, inside[:, None], ~inside[:, None]], dim=1)  # [n, G + 2]
        # the G + 2 masked sums as one [G + 2, n] x [n, F] matmul in the codes' precision (float32 for half codes),
        # weighted per feature afterwards (sum_t f_t w = w sum_t f_t) and added to the float64 sums per call
        wide = codes.dtype if codes.dtype in (torch.float32, torch.float64) else torch.float32
        sums = (masks.T.to(wide) @ codes.to(wide)).double()
        self._sums += sums if self.weights is None else sums * self.weights.to(device=device, dtype=torch.float64)
        self._counts += masks.sum(dim=0)

    def result(self) -> ReasonScoreResult:
        """Means per group / inside / outside and the ReasonScore (CPU tensors)."""
        if self._sums is None:
            raise ProbeError("ReasonScore saw no tokens: the dataset gave no kept tokens")
        sums, counts = self._sums.cpu(), self._counts.cpu()
        means = sums / counts.clamp_min(1).double()[:, None]  # a group with no tokens keeps mean 0
        n_groups = len(self.words)
        score, entropy = reason_score(means[n_groups], means[n_groups + 1], means[:n_groups], alpha=self.alpha)
        return ReasonScoreResult(
            score=score,
            entropy=entropy,
            mean_in=means[n_groups],
            mean_out=means[n_groups + 1],
            word_means=means[:n_groups],
            words=self.words,
            word_tokens=[int(c) for c in counts[:n_groups]],
            n_in=int(counts[n_groups]),
            n_out=int(counts[n_groups + 1]),
            alpha=self.alpha,
            window=self.window,
            decoder_norm_weighted=self.weights is not None,
        )
