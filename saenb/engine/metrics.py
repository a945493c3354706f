"""Reductions: per-token KL and CE, reconstruction geometry, ratios and bootstrap CIs.

KL is always KL(clean || patched) of the next-token distribution, in nats, per token.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor


def kl_per_token(
    clean_logp: Float[Tensor, "... d_vocab"], patched_logp: Float[Tensor, "... d_vocab"]
) -> Float[Tensor, "..."]:
    """KL(clean || patched) per position, from log-probs (torch's `kl_div`, target = clean)."""
    return F.kl_div(patched_logp, clean_logp, log_target=True, reduction="none").sum(-1)


TEMPORARY_ELEMENTS = 2**22
"""CleanDistribution works through a batch in groups of sequences whose vocabulary-long temporaries hold about
this many elements (16 MB of float32): small enough for the allocator to reuse rather than map afresh."""

VOCAB_SLICE = 4096
"""Vocabulary slice of `CleanDistribution.log_partition_linear` on a CPU: a block of 512 tokens' logits over
4,096 words (8 MB, against 100 MB for GPT-2's whole vocabulary) is reduced while it is still in cache, so the
log-partition's three passes cost little beside the matmul that wrote the block (at GPT-2's sizes, measured in
one process: 122 against 135 ms per block, the matmul alone 117 ms; a whole all-token run 4% faster). On a GPU
the whole vocabulary is one slice."""


class CleanDistribution:
    """The clean next-token distribution at the measured positions of a batch, prepared once and compared with
    many patched ones.

    With clean logits c, patched logits l = c + delta, p = softmax(c) and lse the log-sum-exp over the vocabulary,

        KL(p || softmax(l)) = sum_v p_v (log p_v - log q_v) = log sum_v p_v exp(delta_v)  -  p . delta

    (sum_v p_v = 1). The first term is one pass over the vocabulary per patched row (`log_partition`: add log p,
    exp, sum, in place), where `kl_div` or a log-softmax followed by a weighted difference make five to seven,
    three of them writing the vocabulary. When the logits are linear in the normalised final residual stream h
    (l = h W_U + b, no soft-cap), delta = (h - h_c) W_U is computed from the difference of the streams (its
    rounding scales with the change, not with the logits: an unchanged row gives 0), slice by slice of the
    vocabulary (`log_partition_linear`), and p . delta = u . (h - h_c) with u = W_U p is a d_model-long product,
    u computed once per clean position. A KL of -1e-7 left by rounding is clamped at 0.
    """

    def __init__(self, logits: Float[Tensor, "b m d_vocab"], targets: Int[Tensor, "b m"],
                 h: Float[Tensor, "b m d"] | None = None, weight: Float[Tensor, "d d_vocab"] | None = None,
                 vocab_slice: int | None = None):
        """logits: the clean logits; targets: each position's next token; h and weight (W_U): the readout's
        input and matrix, when the logits are h @ weight + bias (omit them otherwise); vocab_slice: the width
        of `log_partition_linear`'s slices (default, and without `weight`: the whole vocabulary)."""
        self.logp = logits.log_softmax(-1)  # as the naive path and kl_div take it
        self.targets = targets
        self.ce = ce_per_token(self.logp, targets, normalized=True)
        """The clean cross-entropy of each position's target token [b, m]."""
        self.h = h
        self.weight = weight
        self.linear = weight is not None
        d_vocab = logits.shape[-1]
        # slices serve the linear readout only (a soft-capped one is reduced from whole-vocabulary logits)
        self.vocab_slice = min(vocab_slice or d_vocab, d_vocab) if self.linear else d_vocab
        if not self.linear:
            self.p = self.logp.exp()
        # a few sequences at a time: the vocabulary-long temporaries of a whole batch (200 MB each for 8
        # sequences at GPT-2's vocabulary) would be mapped and page-faulted in afresh for every batch
        b, m = targets.shape
        self.lse, self.logz = torch.empty(b, m, device=logits.device), torch.empty(b, m, device=logits.device)
        if self.linear:
            self.u = torch.empty(b, m, weight.shape[0], device=logits.device)  # [b, m, d]
        group = max(1, TEMPORARY_ELEMENTS // logits[0].numel())
        for i in range(0, b, group):
            j = min(i + group, b)
            self.lse[i:j] = logits[i:j].logsumexp(-1)
            p = self.p[i:j] if not self.linear else self.logp[i:j].exp()
            # log sum_v p_v, 0 up to rounding, summed as the log-partitions sum, so that delta = 0 gives 0
            self.logz[i:j] = self._slice_sum(p).log_()
            if self.linear:
                self.u[i:j] = _matmul_fixed_order(p, weight.T)

    def _slice_sum(self, x: Float[Tensor, "... d_vocab"]) -> Float[Tensor, "..."]:
        """The sum over the vocabulary, slice by slice in order (the order `log_partition_linear` adds in)."""
        step = self.vocab_slice
        total = x[..., :step].sum(-1)
        for a in range(step, x.shape[-1], step):
            total += x[..., a:a + step].sum(-1)
        return total

    def log_partition(self, seq: int, delta: Float[Tensor, "r m d_vocab"]) -> Float[Tensor, "r m"]:
        """lse(c + delta) - lse(c) = log sum_v p_v exp(delta_v) for r patched copies of sequence `seq` (the clean
        distribution broadcast over the copies, not copied); overwrites `delta`. Exact to float32 rounding
        within `LOG_PARTITION_RANGE`; outside it exp may over- or underflow, and the caller recomputes."""
        return self._slice_sum(delta.add_(self.logp[seq]).exp_()).log_().sub_(self.logz[seq])

    def log_partition_linear(self, seq: int, delta_h: Float[Tensor, "r m d"], buffer: Float[Tensor, "n"]
                             ) -> Float[Tensor, "r m"]:
        """`log_partition` of delta = delta_h W_U (a linear readout's), computed one vocabulary slice at a time
        into `buffer` (at least r * m * vocab_slice elements) and reduced while it is in cache."""
        d_vocab, step = self.weight.shape[1], self.vocab_slice
        total = None
        for a in range(0, d_vocab, step):
            n = min(step, d_vocab - a)
            delta = torch.matmul(delta_h, self.weight[:, a:a + n],
                                 out=buffer[:delta_h.numel() // delta_h.shape[-1] * n].view(*delta_h.shape[:-1], n))
            part = delta.add_(self.logp[seq, :, a:a + n]).exp_().sum(-1)
            total = part if total is None else total.add_(part)
        return total.log_().sub_(self.logz[seq])

    def dot(self, seq, delta_h: Float[Tensor, "r m d"] | None = None,
            delta: Float[Tensor, "r m d_vocab"] | None = None) -> Float[Tensor, "r m"]:
        """p . delta per row (row i a copy of sequence seq[i], or all of sequence `seq` when it is an int): from
        the streams' difference delta_h with a linear readout, else from the logits' difference delta."""
        if self.linear:
            return (self.u[seq] * delta_h).sum(-1)
        return (delta * self.p[seq]).sum(-1)


def _matmul_fixed_order(a: Float[Tensor, "... k"], b: Float[Tensor, "k n"], block: int = 256) -> Float[Tensor, "... n"]:
    """a @ b summed over k in blocks of `block`, added in a fixed order.

    Written out because a single CPU GEMM with a long k (the vocabulary) and a small output splits k between threads,
    so its rounding depends on the thread count, and frames computed with other thread counts (Ray workers) must be
    bit-identical; blocks of 256 are not split (checked for 1 against 2 threads by tests/test_distributed.py)."""
    out = a[..., :block] @ b[:block]
    for k in range(block, a.shape[-1], block):
        out += a[..., k:k + block] @ b[k:k + block]
    return out


LOG_PARTITION_RANGE = (-60.0, 60.0)
"""`CleanDistribution.log_partition` results within this range are exact to float32 rounding (no term can have
overflowed, and the largest, at least exp(-60) / d_vocab, is far above float32's subnormals); outside it they
are recomputed with torch.logsumexp."""


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

    Columns: *by, metric, ratio, ci_low, ci_high, num_mean, den_mean, n_seqs."""
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
                         "ratio": ratio, "ci_low": low, "ci_high": high, "num_mean": n.sum() / tokens,
                         "den_mean": d.sum() / tokens, "n_seqs": len(n)})
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
