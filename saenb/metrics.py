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


class CleanDistribution:
    """The clean next-token distribution at some positions, prepared once and compared with many patched ones.

    `kl_div` exponentiates the clean log-probs on every call; here p = exp(log p) is computed once per batch
    and shared by every hook, intervention and sample, and each comparison is one subtraction and one dot
    product over the vocabulary. Rounding can leave a zero KL at -1e-7: it is clamped at 0.
    """

    def __init__(self, clean_logp: Float[Tensor, "b m d_vocab"]):
        self.logp = clean_logp
        self.p = clean_logp.exp()

    def kl_and_ce(
        self, seq: Int[Tensor, "t"], pos: Int[Tensor, "t"], patched_logits: Float[Tensor, "t d_vocab"],
        targets: Int[Tensor, "t"],
    ) -> tuple[Float[Tensor, "t"], Float[Tensor, "t"]]:
        """KL(clean || patched) and the patched CE of `targets`, per token; token t compares with the clean
        distribution of sequence `seq[t]` at measured position index `pos[t]`."""
        logq = patched_logits.log_softmax(-1)
        ce = -logq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        diff = torch.sub(self.logp[seq, pos], logq, out=logq)  # log p - log q, in logq's memory
        return torch.linalg.vecdot(self.p[seq, pos], diff).clamp_min(0), ce


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
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the rows (sae_lens's definition)."""
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return float(1 - residual / total)


def relative_error(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> Float[Tensor, "n"]:
    return (x - x_hat).norm(dim=-1) / x.norm(dim=-1)


def alive_fraction(latents: Float[Tensor, "n d_sae"]) -> float:
    return float((latents > 0).any(0).float().mean())


def ce_loss_score(ce_clean: float, ce_patched: float, ce_ablation: float) -> float:
    """sae_lens's ce_loss_score: the share of the ablation's CE increase that the splice recovers."""
    return (ce_ablation - ce_patched) / (ce_ablation - ce_clean)


def ce_rec(ce_clean: float, ce_patched: float, ce_ablation: float) -> float:
    """CE_rec of seed 002: the same recovered fraction, named as that post names it."""
    return ce_loss_score(ce_clean, ce_patched, ce_ablation)


def bootstrap_ci(
    per_seq: np.ndarray, statistic=np.mean, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """BCa bootstrap CI (scipy.stats.bootstrap) of `statistic` over per-sequence values."""
    res = stats.bootstrap((np.asarray(per_seq),), statistic, confidence_level=confidence, n_resamples=n_resamples,
                          random_state=np.random.default_rng(seed), vectorized=False)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def ratio_ci(
    num_per_seq: np.ndarray, den_per_seq: np.ndarray, *, confidence: float = 0.95, n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Ratio of means (num / den) with a paired bootstrap CI over sequences (both resampled together)."""
    num, den = np.asarray(num_per_seq, float), np.asarray(den_per_seq, float)

    def statistic(n, d, axis=-1):
        return n.mean(axis=axis) / d.mean(axis=axis)

    res = stats.bootstrap((num, den), statistic, paired=True, confidence_level=confidence,
                          n_resamples=n_resamples, random_state=np.random.default_rng(seed), vectorized=True)
    return float(num.mean() / den.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def per_sequence(df: pd.DataFrame, value: str = "kl", by: tuple[str, ...] = ("hook", "intervention")) -> pd.DataFrame:
    """Mean of `value` per sequence within each group: the unit the bootstrap resamples."""
    return df.groupby([*by, "seq"], observed=True)[value].mean().reset_index()
