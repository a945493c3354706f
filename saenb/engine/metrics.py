"""Reductions: per-token KL and CE, reconstruction geometry, ratios and bootstrap CIs.

KL is always KL(clean || patched) of the next-token distribution, in nats, per token.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor

from saenb.engine.kernels import constant


def kl_per_token(
    clean_logp: Float[Tensor, "... d_vocab"], patched_logp: Float[Tensor, "... d_vocab"]
) -> Float[Tensor, "..."]:
    """KL(clean || patched) per position, from log-probs (torch's `kl_div`, target = clean)."""
    return F.kl_div(patched_logp, clean_logp, log_target=True, reduction="none").sum(-1)


TEMPORARY_ELEMENTS = 2**22
"""CleanDistribution works through a batch in groups of sequences whose vocabulary-long temporaries hold about
this many elements (16 MB of float32): small enough for the allocator to reuse rather than map afresh."""

VOCAB_SLICE = 4096
"""Vocabulary slice of `CleanDistribution.reduce` on a CPU: a block of 512 tokens' logit changes over
4,096 words (8 MB, against 100 MB for GPT-2's whole vocabulary) is reduced while it is still in cache, so the
passes over it cost little beside the matmul that wrote the block (at GPT-2's sizes, measured in
one process: 122 against 135 ms per block, the matmul alone 117 ms; a whole all-token run 4% faster). On a GPU
the whole vocabulary is one slice."""


class CleanDistribution:
    """The clean next-token distribution at the measured positions of a batch, prepared once and compared with
    many patched ones.

    The readout is l = cap(h W + b) (cap: a soft-cap, or none). For a patched row the logits change by delta, and with
    p = softmax(c) of the clean logits c, KL(p || softmax(c + delta)) is computed in the centred form

        t = delta - D,   KL = log1p(A + B) - B,   A = sum_v p_v (expm1(t_v) - t_v),   B = sum_v p_v t_v,

    D a centre: exactly p . delta = u . delta_h with a linear readout (u = W p, one d_model-long product per clean
    position, so B = 0 there), its first-order part (W (p sech^2(c / cap))) . delta_h under a soft-cap. A's terms are
    non-negative and of the size of t^2: nothing cancels, and float32 keeps float64's digits to about 4e-6 on every
    token (where sum p exp(delta) - p . delta, or a log-softmax and kl_div, lose up to 1% on a KL of 1e-4: they subtract
    numbers of size 1, or of the logits, to get the KL). Each term is expm1(t) - t, or its Taylor polynomial for the
    (row, position)s whose |t| stays within `SMALL_T` over a vocabulary slice (after a single-token splice, positions
    whose KL is 1e-10). delta = delta_h W (the bias cancels; capped: `_capped`) is computed from the difference of
    the readout's inputs, slice by slice of the vocabulary (`reduce`). The clean distribution itself is taken in
    float64 where it counts (`TOP_EXACT`).
    """

    def __init__(self, h: Float[Tensor, "b m d"], targets: Int[Tensor, "b m"], weight: Float[Tensor, "d d_vocab"],
                 bias: Float[Tensor, "d_vocab"] | None = None, *, soft_cap: float = 0.0,
                 vocab_slice: int | None = None):
        """h: the readout's input at the measured positions; targets: each position's next token; weight, bias and
        soft_cap: the readout (W_U, b_U, the logits' soft-cap or 0); vocab_slice: the width of `reduce`'s slices
        (default: the whole vocabulary)."""
        self.h, self.targets, self.weight, self.soft_cap = h, targets, weight, soft_cap
        b, m = targets.shape
        d_vocab = weight.shape[1]
        self.vocab_slice = min(vocab_slice or d_vocab, d_vocab)
        device = h.device
        self.p = torch.empty(b, m, d_vocab, device=device)
        """p, scaled per position by up to e^80 so that no word's falls below float32's normal range."""
        self.lse, self.z, self.ce = (torch.empty(b, m, device=device) for _ in range(3))
        """The clean logits' log-sum-exp, sum_v p_v (p's scale), and the target's cross-entropy [b, m]."""
        self.u = torch.empty(b, m, weight.shape[0], device=device)
        self.w_target = _columns(weight, targets)  # [b, m, d]: the target's column of W
        if soft_cap:
            self.tanh_c, self.sech2_c = torch.empty_like(self.p), torch.empty_like(self.p)
        # a few sequences at a time: their vocabulary-long temporaries stay small
        group = max(1, TEMPORARY_ELEMENTS // (m * d_vocab))
        k = min(TOP_EXACT, d_vocab)
        for i in range(0, b, group):
            j = min(i + group, b)
            logits = torch.matmul(h[i:j], weight)  # [g, m, d_vocab], before the cap
            if bias is not None:
                logits += bias
            top = logits.topk(k, dim=-1).indices  # the most probable words: their logits in float64
            exact = (_columns(weight, top).double() @ h[i:j].double()[..., None]).squeeze(-1)  # [g, m, k]
            target = (self.w_target[i:j].double() * h[i:j].double()).sum(-1)  # the target's logit [g, m]
            if bias is not None:
                exact += bias.double()[top]
                target += bias.double()[targets[i:j]]
            if soft_cap:
                x = logits / soft_cap
                self.tanh_c[i:j], self.sech2_c[i:j] = x.tanh(), x.cosh().pow_(-2)
                logits = x.tanh_().mul_(soft_cap)
                exact, target = ((v / soft_cap).tanh_().mul_(soft_cap) for v in (exact, target))
            lowest = logits.amin(-1)
            highest = exact.amax(-1, keepdim=True)  # float64 [g, m, 1]
            rest = logits.scatter_(-1, top, -math.inf).sub_(highest.float())  # the other words' l - max, float32
            log_z = (_sum_float64(rest.exp()) + (exact - highest).exp_().sum(-1)).log_()
            lse = highest.squeeze(-1) + log_z
            self.lse[i:j], self.ce[i:j] = lse, lse - target
            shift = (LOGP_FLOOR - (lowest - lse)).clamp_(0, 80)  # [g, m]
            p = self.p[i:j]
            torch.exp(rest.sub_((log_z - shift).float()[..., None]), out=p)
            p.scatter_(-1, top, (exact - (lse - shift)[..., None]).exp_().float())
            self.z[i:j] = _sum_float64(p)
            slope = p if not soft_cap else p * self.sech2_c[i:j]  # how the logits move with h, weighted by p
            self.u[i:j] = _matmul_fixed_order(slope, weight.T).div_(self.z[i:j, :, None])
        if soft_cap:
            self.tanh_t, self.sech2_t = (x.gather(-1, targets[..., None]).squeeze(-1)
                                         for x in (self.tanh_c, self.sech2_c))

    def reduce(self, seq: int | slice, delta_h: Float[Tensor, "... r m d"], buffer: Float[Tensor, "n"]
               ) -> tuple[Float[Tensor, "... r m"], Float[Tensor, "... r m"], Float[Tensor, "... r m"]]:
        """KL(p || q), lse(l) - lse(c) and p . delta for r patched copies of sequence `seq` (delta_h [r, m, d]), or of
        each sequence of the slice `seq` (delta_h [g, r, m, d]; the clean distributions broadcast over the copies, not
        copied), from the change of the readout's input delta_h = h - h_c. Computed one vocabulary slice at a time into
        `buffer` (at least 2 r m vocab_slice elements, times g) and reduced while it is in cache. A term of A that
        overflowed leaves an infinite KL (the caller recomputes those, `CENTRED_KL_MAX`)."""
        d_vocab, step = self.weight.shape[1], self.vocab_slice
        centre = (self._of(self.u, seq) * delta_h).sum(-1)  # [..., r, m]: D
        a = torch.zeros_like(centre)
        b = torch.zeros_like(centre) if self.soft_cap else None
        size = delta_h.numel() // delta_h.shape[-1]
        for lo in range(0, d_vocab, step):
            n = min(step, d_vocab - lo)
            t = torch.matmul(delta_h, self.weight[:, lo:lo + n],
                             out=buffer[:size * n].view(*delta_h.shape[:-1], n))  # [..., r, m, n]
            spare = buffer[size * n:2 * size * n].view_as(t)
            p = self._of(self.p[..., lo:lo + n], seq)
            if self.soft_cap:
                self._capped(t, spare, seq, lo, n)
            t.sub_(centre[..., None])
            if b is not None:
                b += torch.mul(t, p, out=spare).sum(-1)
            a += _centred_terms(t, p, spare)
        z = self._of(self.z, seq)
        if b is None:  # D is p . delta itself: B = 0
            log_ratio = a.div_(z).log1p_()
            return log_ratio, centre + log_ratio, centre
        b = b.div_(z)
        log_ratio = a.div_(z).add_(b).log1p_()
        return log_ratio - b, centre + log_ratio, centre + b

    @staticmethod
    def _of(x: Float[Tensor, "b ..."], seq: int | slice | Tensor) -> Tensor:
        """The clean `x` of `seq`, shaped to broadcast over its rows: x[seq] for one sequence (or a tensor naming
        each row's), with a rows axis after the sequences' for a slice of them (a view: nothing is copied)."""
        return x[seq, None] if isinstance(seq, slice) else x[seq]

    def _capped(self, dl: Float[Tensor, "... m n"], spare: Float[Tensor, "... m n"], seq: int | slice, lo: int,
                n: int) -> None:
        """The soft-capped logits' change, in place of the linear one dl: cap (tanh(a + x) - tanh(a)) with a = c / cap
        and x = dl / cap, written as cap tanh(x) sech^2(a) / (1 + tanh(a) tanh(x)) (no difference of near numbers)."""
        tanh_x = dl.div_(self.soft_cap).tanh_()
        denominator = torch.mul(tanh_x, self._of(self.tanh_c[..., lo:lo + n], seq), out=spare).add_(1)
        tanh_x.mul_(self._of(self.sech2_c[..., lo:lo + n], seq)).div_(denominator).mul_(self.soft_cap)

    def delta_target(self, seq, delta_h: Float[Tensor, "... m d"]) -> Float[Tensor, "... m"]:
        """The change of each position's target logit (row i a copy of sequence seq[i], or the rows of sequence `seq`
        or of each sequence of the slice `seq`, as in `reduce`)."""
        dl = (self._of(self.w_target, seq) * delta_h).sum(-1)
        if not self.soft_cap:
            return dl
        tanh_x = (dl / self.soft_cap).tanh_()
        return tanh_x * self._of(self.sech2_t, seq) / (1 + tanh_x * self._of(self.tanh_t, seq)) * self.soft_cap

    def dot(self, seq, delta_h: Float[Tensor, "r m d"]) -> Float[Tensor, "r m"]:
        """p . delta per row (row i a copy of sequence seq[i]) of a linear readout, from the streams' difference."""
        return (self.u[seq] * delta_h).sum(-1)


def _columns(weight: Float[Tensor, "d n"], index: Int[Tensor, "..."]) -> Float[Tensor, "... d"]:
    """weight's columns at `index` (weight.T[index]), gathered along the rows of the stored matrix: indexing its
    transpose reads one element per cache line, 1.6x slower at SmolLM2's unembedding."""
    return weight.index_select(1, index.flatten()).T.reshape(*index.shape, weight.shape[0])


def _sum_float64(x: Float[Tensor, "... n"], block: int = 64) -> Float[Tensor, "..."]:
    """x.sum(-1) accumulated in float64, from float32 sums of blocks of `block` elements: within 5e-9 of the
    float64 sum on 49,152 probabilities (the blocks' roundings average out; float32's own sum: 1.4e-7), within
    1.2e-7 on any length. `x.sum(-1, dtype=torch.float64)` casts all of x to float64 first, which on a CPU costs
    20x the sum."""
    k = x.shape[-1] // block * block
    blocks = x[..., :k].unflatten(-1, (-1, block)).sum(-1)  # float32 [..., n // block]
    return blocks.sum(-1, dtype=torch.float64) + x[..., k:].sum(-1, dtype=torch.float64)


def _centred_terms(t: Float[Tensor, "... r m n"], p: Float[Tensor, "... m n"], spare: Float[Tensor, "... r m n"]
                   ) -> Float[Tensor, "... r m"]:
    """sum_v p_v (expm1(t_v) - t_v) per (row, position): from expm1, or, for the (row, position)s whose |t| stays
    within SMALL_T, from the Taylor polynomial (float32's expm1 rounds at 6e-8 of |t|, large beside t^2 / 2 when t is
    small: positions after a single-token splice), of the degree their largest |t| needs (`_taylor_degree`). Where
    most (row, position)s are small (single-token mode), the polynomial runs over the whole block and expm1 over the
    others, gathered; else expm1 over the block and the polynomial over the small ones. t is [r, m, n] with p [m, n]
    (the rows of one sequence), or [g, r, m, n] with p [g, 1, m, n] (of g sequences). Overwrites spare."""
    peak = torch.maximum(t.amax(-1), t.amin(-1).neg_())  # [..., r, m]: the largest |t| (torch.aminmax: 25x slower)
    small = peak <= SMALL_T
    # each read by the host makes it wait for a GPU: the count is read once, the minority's size follows from it
    # (nonzero_static), the largest small |t| is read only where there are small ones (|t| >= 0: others count as 0)
    n_small = int(small.sum())
    over_block = 2 * n_small >= small.numel()  # the polynomial over the whole block, expm1 over the rest
    degree = _taylor_degree(float(torch.where(small, peak, 0).amax())) if n_small else 5
    n_minority = small.numel() - n_small if over_block else n_small
    if n_minority:  # copied out before the block is overwritten
        minority = torch.nonzero_static((~small if over_block else small).flatten(), size=n_minority).squeeze(1)
        r, m = t.shape[-3:-1]
        at = minority % m if p.dim() == 2 else minority // (r * m) * m + minority % m  # each one's row of p
        rows, weights = t.reshape(-1, t.shape[-1])[minority], p.reshape(-1, p.shape[-1])[at]
    block = _taylor(t, spare, degree) if over_block else torch.expm1(t, out=spare).sub_(t)
    out = block.mul_(p).sum(-1)
    if n_minority:
        part = torch.expm1(rows).sub_(rows) if over_block else _taylor(rows, torch.empty_like(rows), degree)
        out.view(-1)[minority] = part.mul_(weights).sum(-1)
    return out


_INVERSE_FACTORIAL = [1 / math.factorial(k) for k in range(9)]
TAYLOR_TOLERANCE = 2e-8
"""The relative truncation error `_taylor_degree` allows: the first term left out, beside t^2 / 2."""


def _taylor_degree(peak: float) -> int:
    """The degree j of expm1(t) - t = t^2 (1/2! + t/3! + ... + t^j/(j+2)!) + ... that keeps the first term left out
    within TAYLOR_TOLERANCE of t^2 / 2 for every |t| <= peak (5 at SMALL_T; 2 at 0.01, where single-token mode's
    later positions often lie: 3 passes over the block fewer)."""
    for j in range(6):
        if 2 * peak ** (j + 1) * _INVERSE_FACTORIAL[j + 3] <= TAYLOR_TOLERANCE:
            return j
    return 5


def _taylor(t: Float[Tensor, "... n"], out: Float[Tensor, "... n"], degree: int = 5) -> Float[Tensor, "... n"]:
    """expm1(t) - t = t^2 (1/2! + t/3! + ... + t^degree/(degree+2)!) into `out` (Horner's rule): relative error below
    2e-8 for |t| <= SMALL_T at degree 5 (`_taylor_degree` for smaller |t|). Each Horner step q <- q t + 1/k! is one
    pass (`torch.addcmul` with the coefficient as a 0-d tensor; a multiply and an add in place are two): degree + 2
    passes over the block in all."""
    if degree == 0:
        return torch.mul(t, t, out=out).mul_(0.5)

    def coefficient(k: int) -> Tensor:  # 1/k! on the block's device
        return constant(_INVERSE_FACTORIAL[k], t.device, t.dtype)

    poly = torch.add(coefficient(degree + 1), t, alpha=_INVERSE_FACTORIAL[degree + 2], out=out)
    for k in range(degree, 1, -1):
        torch.addcmul(coefficient(k), poly, t, out=poly)
    return poly.mul_(t).mul_(t)


def _matmul_fixed_order(a: Float[Tensor, "... k"], b: Float[Tensor, "k n"], block: int = 256) -> Float[Tensor, "... n"]:
    """a @ b summed over k in blocks of `block`, added in a fixed order.

    Written out because a single CPU GEMM with a long k (the vocabulary) and a small output splits k between threads,
    so its rounding depends on the thread count, and frames computed with other thread counts (Ray workers) must be
    bit-identical; blocks of 256 are not split (checked for 1 against 2 threads by tests/test_distributed.py)."""
    out = a[..., :block] @ b[:block]
    for k in range(block, a.shape[-1], block):
        out += a[..., k:k + block] @ b[k:k + block]
    return out


TOP_EXACT = 32
"""Words per clean position whose logits `CleanDistribution` recomputes in float64 (the most probable ones): the
float32 readout rounds a logit by about 1e-6, which moved their probabilities enough to cost the KL up to 1e-5 of
itself (measured: 16 already give float64's result)."""

SMALL_T = 0.25
"""The |t| up to which `CleanDistribution` sums the Taylor polynomial of expm1(t) - t instead of computing it, for a
(row, position) whose every |t| in a vocabulary slice is this small (measured on tiny-stdlib, single-token: with a
larger |t| somewhere, expm1's terms keep the KL within 4e-6 of float64's; with every |t| below 0.05 they lost up to
7e-4, below 0.2 up to 1e-5)."""

LOGP_FLOOR = -80.0
"""Clean log-probabilities are shifted (per position, by at most 80) to lie above this, within float32's normal range
(from -87.3): a word of log-probability -100 whose logit rises by 90 still counts."""

CENTRED_KL_MAX = 60.0
"""A KL from `CleanDistribution.reduce` at or above this, or not finite (a term overflowed: a patched distribution
far from the clean one), is recomputed from the two log-sum-exps, whose rounding is small beside such a KL."""


def ce_per_token(
    logits_or_logp: Float[Tensor, "... d_vocab"], targets: Int[Tensor, "..."], *, normalized: bool = False
) -> Float[Tensor, "..."]:
    """Cross-entropy -log q(target) per position; pass `normalized=True` when given log-probs already."""
    logp = logits_or_logp if normalized else logits_or_logp.log_softmax(-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def geometry(
    x: Float[Tensor, "... d"], x_sae: Float[Tensor, "... d"], latents: Float[Tensor, "... d_sae"]
) -> dict[str, Float[Tensor, "..."]]:
    """Per-token reconstruction geometry: norms, error norm eps, cosine(x, x_sae), L0."""
    norm_x, norm_sae = x.norm(dim=-1), x_sae.norm(dim=-1)
    return {
        "norm_x": norm_x,
        "norm_sae": norm_sae,
        "eps": (x_sae - x).norm(dim=-1),
        "cos_sae": F.cosine_similarity(x, x_sae, dim=-1),
        "l0": (latents > 0).sum(-1).to(torch.float32),
    }


def explained_variance(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> float:
    """R^2 = 1 - SSE / SST with mean-centred totals: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the
    rows (sae_lens's explained variance, and seed 002's R^2)."""
    x, x_hat = x.double(), x_hat.double()
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return float(1 - residual / total)


def relative_error(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> Float[Tensor, "n"]:
    """||x - x_hat|| / ||x|| per token (seed 002's relative error norm is its mean)."""
    return (x - x_hat).norm(dim=-1) / x.norm(dim=-1)


def mse(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> Float[Tensor, "n"]:
    """Squared error averaged over the model dimensions, per token (seed 002's mse_mean is its mean)."""
    return (x - x_hat).pow(2).mean(-1)


def alive_fraction(latents: Float[Tensor, "n d_sae"]) -> float:
    """Share of latents that are nonzero on at least one token (for TopK: selected at least once)."""
    return float((latents != 0).any(0).float().mean())


def rate_bits(latents: Float[Tensor, "n d_sae"], value_bits: int = 8) -> float:
    """Seed 002's rate proxy, bits per token of the sparse code: each active latent's index entropy-coded
    under the latents' empirical firing frequencies, plus `value_bits` for its value."""
    return rate_bits_from_counts((latents != 0).sum(0), len(latents), value_bits)


def rate_bits_from_counts(counts: Float[Tensor, "d_sae"], n_tokens: int, value_bits: int = 8) -> float:
    """`rate_bits` from each latent's firing count over `n_tokens` tokens (no need to keep the latents)."""
    counts = counts.double()
    q = counts[counts > 0] / counts.sum()
    index_bits = float(-(q * q.log2()).sum())
    return float(counts.sum()) / n_tokens * (index_bits + value_bits)


def participation_ratio(x: Float[Tensor, "n d"], deflate: int = 0) -> float:
    """(sum lambda)^2 / sum lambda^2 over the eigenvalues of x's mean-centred covariance; `deflate` removes
    the top eigenvalues (directions) first. From singular values of the centred rows (float64)."""
    centred = x.double() - x.double().mean(0)
    lam = (torch.linalg.svdvals(centred).pow(2) / (len(x) - 1))[deflate:]  # descending
    return float(lam.sum().pow(2) / lam.pow(2).sum())


def k_star(ks, values, target: float) -> float:
    """The smallest k at which `values` (e.g. CE_rec over a grid of k, increasing k) reaches `target`, by
    linear interpolation between grid points (seed 002's k*); NaN when the grid never reaches it."""
    ks, values = np.asarray(ks, float), np.asarray(values, float)
    order = np.argsort(ks)
    ks, values = ks[order], values[order]
    if values[0] >= target:
        return float(ks[0])
    for k0, v0, k1, v1 in zip(ks[:-1], values[:-1], ks[1:], values[1:], strict=True):
        if v0 < target <= v1:
            return float(k0 + (target - v0) * (k1 - k0) / (v1 - v0))
    return float("nan")


def ce_loss_score(ce_clean: float, ce_patched: float, ce_ablation: float) -> float:
    """sae_lens's ce_loss_score: the share of the ablation's CE increase that the splice recovers."""
    return (ce_ablation - ce_patched) / (ce_ablation - ce_clean)


def ce_rec(ce_clean: float, ce_patched: float) -> float:
    """Seed 002's CE_rec = 2 - L_recon / L_orig (1: loss preserved; 0: loss doubled). Not ablation-normalised:
    unlike `ce_loss_score`, it does not compare with an ablation."""
    return 2 - ce_patched / ce_clean


def ce_rec_ci(ce_patched_per_seq: np.ndarray, ce_clean_per_seq: np.ndarray, *, confidence: float = 0.95,
              n_resamples: int = 5000, seed: int = 0) -> tuple[float, float, float]:
    """CE_rec of token-mean losses with a BCa bootstrap CI over sequences (per-sequence loss sums over the
    same tokens; 5,000 resamples as in seed 002): 2 minus `ratio_ci` of the two."""
    ratio, low, high = ratio_ci(ce_patched_per_seq, ce_clean_per_seq, confidence=confidence, n_resamples=n_resamples,
                                seed=seed)
    return 2 - ratio, 2 - high, 2 - low


def ratio_ci(
    num_per_seq: np.ndarray, den_per_seq: np.ndarray, *, confidence: float = 0.95, n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Ratio of means (num / den) with a paired BCa bootstrap CI over sequences (both resampled together).

    Given per-sequence sums over the same tokens, this is the ratio of token means."""
    num, den = np.asarray(num_per_seq, float), np.asarray(den_per_seq, float)

    def statistic(n, d, axis=-1):
        return n.mean(axis=axis) / d.mean(axis=axis)

    res = stats.bootstrap((num, den), statistic, paired=True, confidence_level=confidence,
                          n_resamples=n_resamples, random_state=np.random.default_rng(seed), vectorized=True)
    return float(num.mean() / den.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def seed_ratio_ci(num_per_seq: list[np.ndarray], den_per_seq: list[np.ndarray], *, same_seqs: bool = False,
                  confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """The ratio of one recipe trained at several seeds, with a two-level bootstrap CI: resample the seeds, then the
    sequences (one draw shared by every seed when `same_seqs`: all were measured on the same sequences, in the same
    order; one draw per seed otherwise).

    num_per_seq[s], den_per_seq[s]: per-sequence sums of seed s's SAE and its baseline (`ratio_ci`'s inputs). Seed
    s's ratio r_s is its ratio of means; the recipe's is their mean R. Var(R) = sigma_seed^2 / S + Var(e), e the
    sequences' noise in R. The sample variance b of the r_s estimates sigma_seed^2 + w, w the part of the sequences'
    noise that differs between seeds (all of it for independent sequences, less for shared ones); the sequence
    resamples measure w (from each seed's deviation from the seeds' mean deviation) and Var(e) (from the mean
    deviation). Resampling seeds and sequences would count w twice, so the seeds' deviations from R are shrunk by c,
    c^2 = S / (S - 1) (1 - w / b) (0 when b <= w; Davison & Hinkley 1997, section 3.8): the bootstrap variance is
    then (b - w) / S + Var(e), unbiased. With a handful of seeds it has few degrees of freedom (b's S - 1, by
    Satterthwaite's rule, Var(e) taken as known), so the interval is R -/+ t sd* with sd* the bootstrap standard
    deviation and t Student's quantile there (the normal one when b <= w: the seeds add nothing measurable). A
    percentile interval of the same resamples would cover far less than its level with three seeds (a normal
    interval on 2 degrees of freedom covers 81%, not 95%).

    Returns ratio, ci_low, ci_high, seed_sd (the standard deviation of the r_s, ddof 1), context_sd (sqrt Var(e)),
    df and n_seeds. With one seed: its `ratio_ci` (seed_sd NaN)."""
    pairs = [(np.asarray(n, float), np.asarray(d, float)) for n, d in zip(num_per_seq, den_per_seq, strict=True)]
    S = len(pairs)
    if S == 1:
        ratio, low, high = ratio_ci(*pairs[0], confidence=confidence, n_resamples=n_resamples, seed=seed)
        return {"ratio": ratio, "ci_low": low, "ci_high": high, "seed_sd": float("nan"), "context_sd": float("nan"),
                "df": float("nan"), "n_seeds": 1}
    if same_seqs and len({len(n) for n, _ in pairs}) != 1:
        lengths = [len(n) for n, _ in pairs]
        raise ValueError(f"same_seqs: every seed must have the same sequences; got lengths {lengths}")
    rng = np.random.default_rng(seed)
    r = np.array([n.mean() / d.mean() for n, d in pairs])
    R = float(r.mean())
    # each seed's resampled ratio's deviation from its own [S, n_resamples]
    shared = rng.integers(0, len(pairs[0][0]), size=(n_resamples, len(pairs[0][0]))) if same_seqs else None
    dev = np.empty((S, n_resamples))
    for s, (n, d) in enumerate(pairs):
        idx = shared if same_seqs else rng.integers(0, len(n), size=(n_resamples, len(n)))
        dev[s] = n[idx].mean(-1) / d[idx].mean(-1) - r[s]
    mean_dev = dev.mean(0)
    var_e = float(mean_dev.var())
    w = float((dev - mean_dev).var(axis=1).mean()) * S / (S - 1)
    b = float(r.var(ddof=1))
    c = np.sqrt(S / (S - 1) * (1 - w / b)) if b > w else 0.0
    drawn = rng.integers(0, S, size=(n_resamples, S))
    boot = R + c * (r[drawn] - R).mean(-1) + mean_dev[rng.permutation(n_resamples)]
    sd = float(boot.std(ddof=1))
    estimate = max(b - w, 0.0) / S + var_e
    df = (S - 1) * (estimate * S / b) ** 2 if b > w else float("inf")
    t = float(stats.t.ppf(0.5 + confidence / 2, df))
    return {"ratio": R, "ci_low": R - t * sd, "ci_high": R + t * sd, "seed_sd": float(np.sqrt(b)),
            "context_sd": float(np.sqrt(var_e)), "df": float(df), "n_seeds": S}


# ---------------------------------------------------------------------------------- tables of a frame
def seq_sums(df: pd.DataFrame, value: str, by) -> pd.DataFrame:
    """Per group and sequence: the sum of `value` and the token count (NaNs, e.g. the last position's CE,
    left out). Columns: *by, seq, sum, count."""
    g = df.groupby([*by, "seq"], observed=True)[value]
    return pd.DataFrame({"sum": g.sum(), "count": g.count()}).reset_index()


def mean_table(df: pd.DataFrame, value: str = "kl", by=("layer", "intervention"), *, confidence: float = 0.95,
               n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Token mean of `value` per group with a 95% BCa bootstrap CI over sequences (scipy.stats.bootstrap;
    each resample draws whole sequences, and its statistic is the resampled tokens' mean).

    Columns: *by, metric, mean, ci_low, ci_high, n_tokens, n_seqs."""
    by = list(by)
    rows = []
    for key, sub in seq_sums(df, value, by).groupby(by, observed=True, sort=True):
        sums, counts = sub["sum"].to_numpy(float), sub["count"].to_numpy(float)
        low, high = _sum_ratio_ci(sums, counts, confidence, n_resamples, seed)
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)), "metric": value,
                     "mean": sums.sum() / counts.sum(), "ci_low": low, "ci_high": high,
                     "n_tokens": int(counts.sum()), "n_seqs": len(sums)})
    return pd.DataFrame(rows)


def ratio_table(df: pd.DataFrame, num: str = "sae", den: str = "eps_random", values=("kl", "ce_delta"),
                by=("layer",), *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Ratio of token means of `num` and `den` interventions (e.g. SAE / eps-random KL) per group, with a
    paired bootstrap CI over sequences (`ratio_ci` on per-sequence sums over the same tokens).

    Columns: *by, metric, ratio, ci_low, ci_high, num, den (the token means of `num` and `den`), n_seqs."""
    by = list(by)
    rows = []
    for value in values:
        sums = seq_sums(df[df["intervention"].isin([num, den])], value, [*by, "intervention"])
        wide = sums.pivot_table(index=[*by, "seq"], columns="intervention", values=["sum", "count"], observed=True)
        for key, sub in wide.groupby(level=list(range(len(by))), sort=True):
            n, d = sub[("sum", num)].to_numpy(float), sub[("sum", den)].to_numpy(float)
            ratio, low, high = ratio_ci(n, d, confidence=confidence, n_resamples=n_resamples, seed=seed)
            tokens = sub[("count", num)].to_numpy(float).sum()
            rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)), "metric": value,
                         "ratio": ratio, "ci_low": low, "ci_high": high, "num": n.sum() / tokens,
                         "den": d.sum() / tokens, "n_seqs": len(n)})
    return pd.DataFrame(rows)


def tail_table(df: pd.DataFrame, value: str = "kl", by=("layer", "intervention"), q: float = 0.999) -> pd.DataFrame:
    """The q-quantile, mean and max of `value` per group (what a clamped histogram hides). Columns: *by,
    metric, quantile, q, mean, max."""
    g = df.groupby(list(by), observed=True)[value]
    out = pd.DataFrame({"quantile": g.quantile(q), "mean": g.mean(), "max": g.max()}).reset_index()
    return out.assign(metric=value, q=q)[[*by, "metric", "quantile", "q", "mean", "max"]]


def histogram_table(df: pd.DataFrame, value: str = "kl", by=("layer", "intervention"), *, low: float = 0.0,
                    high: float = 1.0, bins: int = 50) -> pd.DataFrame:
    """Counts of `value` in `bins` equal bins over [low, high] per group; values outside are clamped into the
    end bins (the tails a log-count histogram would otherwise stretch over). Columns: *by, metric, bin_left,
    bin_right, count."""
    edges = np.linspace(low, high, bins + 1)
    frames = []
    for key, sub in df.groupby(list(by), observed=True, sort=True):
        # clipped in float64: a float32 column clipped at a float64 `high` can round above the last edge and be lost
        counts, _ = np.histogram(sub[value].dropna().astype(np.float64).clip(low, high), bins=edges)
        frame = pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:], "count": counts})
        for col, v in zip(by, key if isinstance(key, tuple) else (key,), strict=True):
            frame[col] = v
        frames.append(frame.assign(metric=value))
    return pd.concat(frames, ignore_index=True)[[*by, "metric", "bin_left", "bin_right", "count"]]


def position_table(df: pd.DataFrame, value: str = "kl", by=("layer", "intervention"), x: str = "pos") -> pd.DataFrame:
    """Mean of `value` per position (column `x`: "pos", or e.g. an offset from the patched position) within
    each group, with a normal 95% band over sequences (mean +/- 1.96 standard errors of the per-sequence
    values; one value per sequence and position). Columns: *by, x, mean, ci_low, ci_high."""
    g = df.groupby([*by, x], observed=True)[value]
    out = pd.DataFrame({"mean": g.mean(), "sem": g.sem()}).reset_index()
    out["ci_low"], out["ci_high"] = out["mean"] - 1.96 * out["sem"], out["mean"] + 1.96 * out["sem"]
    return out.drop(columns="sem")


def tail_position(samples: pd.DataFrame, reference: pd.DataFrame, value: str = "kl",
                  by=("hook", "layer", "seq", "pos")) -> pd.DataFrame:
    """Where one reference value per token (e.g. the SAE splice's KL) falls among that token's samples (e.g.
    500 eps-random splices): z = (reference - sample mean) / sample std, and the percentile (the share of
    samples below the reference). Columns: *by, reference, sample_mean, sample_std, z, percentile, n_samples."""
    by = list(by)
    ref = reference.groupby(by, observed=True)[value].first().rename("reference")
    g = samples.groupby(by, observed=True)[value]
    out = pd.concat([ref, g.mean().rename("sample_mean"), g.std().rename("sample_std"),
                     g.size().rename("n_samples")], axis=1, join="inner")
    out["z"] = (out["reference"] - out["sample_mean"]) / out["sample_std"]
    below = samples.join(ref, on=by).assign(below=lambda d: d[value] < d["reference"])
    out["percentile"] = below.groupby(by, observed=True)["below"].mean()
    return out.reset_index()


def paired_test(df: pd.DataFrame, a: str, b: str, value: str = "kl", by=("layer",)) -> pd.DataFrame:
    """Intervention `a` against `b` on the same tokens: the ratio of token means with its bootstrap CI
    (`ratio_table`) and a paired t-test of the per-sequence means (scipy.stats.ttest_rel). Columns: *by, a, b,
    ratio, ci_low, ci_high, t, p_value, n_seqs."""
    ratios = ratio_table(df, a, b, values=(value,), by=by)
    rows = []
    for row in ratios.itertuples(index=False):
        key = dict(zip(by, row[:len(by)], strict=True))
        sub = df.loc[np.logical_and.reduce([df[k] == v for k, v in key.items()])] if key else df
        per_seq = sub.groupby(["intervention", "seq"], observed=True)[value].mean().unstack(0)[[a, b]].dropna()
        per_seq = per_seq.astype(np.float64)  # float32 frames: small p-values would underflow
        test = stats.ttest_rel(per_seq[a], per_seq[b])
        rows.append({**key, "a": a, "b": b, "ratio": row.ratio, "ci_low": row.ci_low, "ci_high": row.ci_high,
                     "t": float(test.statistic), "p_value": float(test.pvalue), "n_seqs": len(per_seq)})
    return pd.DataFrame(rows)


def _sum_ratio_ci(sums: np.ndarray, counts: np.ndarray, confidence: float, n_resamples: int,
                  seed: int) -> tuple[float, float]:
    if len(sums) < 2:
        return float("nan"), float("nan")

    def statistic(s, c, axis=-1):
        return s.sum(axis=axis) / c.sum(axis=axis)

    res = stats.bootstrap((sums, counts), statistic, paired=True, confidence_level=confidence,
                          n_resamples=n_resamples, random_state=np.random.default_rng(seed), vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
