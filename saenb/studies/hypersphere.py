"""Notebook 03: the SAE splice among many random errors of its size, and seed 004's two predictions.

    reference, samples, tails = hypersphere.sphere(loaded, hook, tokens, position=48, n_samples=500)
    aligned = hypersphere.feature_aligned(loaded, hook, tokens, position=48, n_samples=100)
    latent = hypersphere.latent_perturbation(loaded, hook, tokens, scales, position=48, n_samples=50)
    hypersphere.readings(tails, samples, reference, hypersphere.paired_tests(aligned),
                         hypersphere.latent_tests(latent, scales))
"""

from __future__ import annotations

import pandas as pd
import torch

from saenb.engine import interventions as iv
from saenb.engine import metrics
from saenb.engine.store import measure_cached
from saenb.models.loaded import Loaded
from saenb.studies import readings as rd

SAMPLED = ("eps_random", "theta_random_sae_norm", "theta_random_true_norm")
"""The random splices drawn many times per token: at the SAE's distance, and at its cosine to x."""
ALIGNED = (iv.intervention("feature_aligned", which="active"), iv.intervention("feature_aligned", which="inactive"))
"""Steps of length eps along a unit decoder direction of an active / an inactive latent of the token."""


def _at(position: int, seed: int) -> dict:
    return dict(positions=position, measure_positions=[position], seed=seed)


def sphere(loaded: Loaded, hook: str, tokens: torch.Tensor, *, position: int = 48, n_samples: int = 500,
           seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The SAE splice (one row per token) and `n_samples` draws of each `SAMPLED` splice per token, one token per
    context at `position` (cached); and where the SAE's KL falls among each token's eps-random draws
    (`metrics.tail_position`: z-score, percentile)."""
    reference = measure_cached(loaded, hook, ["sae"], tokens, **_at(position, seed))
    samples = measure_cached(loaded, hook, list(SAMPLED), tokens, n_samples=n_samples, **_at(position, seed))
    return reference, samples, metrics.tail_position(samples[samples.intervention == "eps_random"], reference)


def shown_samples(samples: pd.DataFrame, tails: pd.DataFrame, n_panels: int) -> pd.DataFrame:
    """The draws of the first `n_panels` tokens (the per-token figure's frame)."""
    shown = tails.seq.iloc[:n_panels].tolist()
    return samples[samples.seq.isin(shown)][["seq", "intervention", "sample", "kl"]]


def z_histograms(tails: pd.DataFrame, hook: str, bins: int = 40) -> tuple[pd.DataFrame, dict]:
    """Counts of the SAE's z-score (over its range) and percentile (over [0, 1]) across tokens; each panel's note."""
    long = tails.melt(id_vars=["seq"], value_vars=["z", "percentile"], var_name="statistic")
    hist = pd.concat([metrics.histogram_table(long[long.statistic == "z"], "value", by=("statistic",),
                                              low=float(tails.z.min()), high=float(tails.z.max()), bins=bins),
                      metrics.histogram_table(long[long.statistic == "percentile"], "value", by=("statistic",),
                                              low=0.0, high=1.0, bins=bins)], ignore_index=True).assign(hook=hook)
    notes = {"z": f"median z {tails.z.median():.2f}\nz > 2: {(tails.z > 2).mean():.0%}",
             "percentile": f"median {tails.percentile.median():.3f}\n>= 0.99: {(tails.percentile >= 0.99).mean():.0%}"}
    return hist, notes


def feature_aligned(loaded: Loaded, hook: str, tokens: torch.Tensor, *, position: int = 48, n_samples: int = 100,
                    seed: int = 0) -> pd.DataFrame:
    """`n_samples` steps per token along active / inactive latents' decoder directions (`ALIGNED`) and isotropic
    ones (eps-random), all of the token's own SAE error norm (cached)."""
    return measure_cached(loaded, hook, [*ALIGNED, "eps_random"], tokens, n_samples=n_samples, **_at(position, seed))


def paired_tests(aligned: pd.DataFrame) -> pd.DataFrame:
    """Each feature-aligned splice against eps-random: ratio of mean KL (95% bootstrap CI over contexts) and a
    paired t-test of the per-context means (`metrics.paired_test`)."""
    return pd.concat([metrics.paired_test(aligned, s.label, "eps_random") for s in ALIGNED], ignore_index=True)


def kl_histogram(aligned: pd.DataFrame, bins: int = 50) -> tuple[pd.DataFrame, float]:
    """Counts of the feature-aligned and isotropic KLs, clamped at their 99.9th percentile (returned too)."""
    high = float(aligned.kl.quantile(0.999))
    return metrics.histogram_table(aligned, "kl", by=("layer", "intervention"), low=0.0, high=high, bins=bins), high


def ratio_notes(tests: pd.DataFrame) -> dict:
    """Per layer: each pair's ratio with its CI (a histogram panel's note)."""
    return {layer: "\n".join(f"{r.a.split('=')[-1].rstrip(')')} / eps-random: {r.ratio:.2f} [{r.ci_low:.2f}, "
                             f"{r.ci_high:.2f}]" for r in tests.itertuples()) for layer in tests.layer}


def latent_perturbation(loaded: Loaded, hook: str, tokens: torch.Tensor, scales, *, position: int = 48,
                        n_samples: int = 50, seed: int = 0) -> pd.DataFrame:
    """`latent_perturb(scale)` (active latents scaled by exp(scale * N(0, 1)), decoded) and `sae_plus_random(scale)`
    (x_sae + a random vector of the same norm) per scale, `n_samples` each (cached); columns family and scale."""
    specs = [iv.intervention(name, scale=s) for s in scales for name in ("latent_perturb", "sae_plus_random")]
    latent = measure_cached(loaded, hook, specs, tokens, n_samples=n_samples, **_at(position, seed))
    latent["family"] = latent.intervention.astype(str).str.split("(").str[0]
    latent["scale"] = latent.intervention.astype(str).str.extract(r"scale=([\d.]+)")[0].astype(float)
    return latent


def latent_sizes(latent: pd.DataFrame) -> pd.DataFrame:
    """Mean KL per family and scale (normal 95% bands over contexts) with the perturbation's mean norm `dist_sae`."""
    return metrics.position_table(latent, "kl", by=("family",), x="scale").merge(
        latent.groupby(["family", "scale"], observed=True).dist_sae.mean().reset_index(), on=["family", "scale"])


def latent_tests(latent: pd.DataFrame, scales) -> pd.DataFrame:
    """latent_perturb against sae_plus_random at each scale (`metrics.paired_test`), with columns scale and pair."""
    return pd.concat([metrics.paired_test(latent, f"latent_perturb(scale={s})", f"sae_plus_random(scale={s})")
                      .assign(scale=s, pair="latent_perturb / sae_plus_random") for s in scales], ignore_index=True)


def _versus(row, what: str) -> tuple[bool | None, str]:
    """A ratio against 1 as its CI allows: more / less than `what`, or not distinguishable from it."""
    p = f"p = {row.p_value:.2g}" if row.p_value > 0 else "p < 1e-300"
    ci = f"{row.ratio:.2f}x [{row.ci_low:.2f}, {row.ci_high:.2f}]"
    if row.ci_low > 1:
        return True, f"{ci}, more than {what} ({p})"
    if row.ci_high < 1:
        return False, f"{ci}, less than {what} ({p})"
    return False, f"{ci}, not distinguishable from {what}"


def readings(tails: pd.DataFrame, samples: pd.DataFrame, reference: pd.DataFrame, tests: pd.DataFrame,
             latent: pd.DataFrame) -> pd.DataFrame:
    """Notebook 03's verdicts, from `sphere`'s three frames, `paired_tests` and `latent_tests`."""
    mean = samples.groupby("intervention", observed=True).kl.mean()
    active, inactive = (_versus(tests.iloc[i], "isotropic") for i in (0, 1))
    below = latent.ci_high < 1
    return rd.frame([
        rd.claim("where the SAE splice's KL falls among random errors of its size",
                 f"median z-score {tails.z.median():.2f} (median percentile {tails.percentile.median():.3f}); "
                 f"{(tails.z > 2).mean():.0%} of tokens have z > 2, {(tails.percentile >= 0.99).mean():.0%} lie above "
                 "the 99th percentile of their own draws"),
        rd.claim("mean KL of each splice (nats)",
                 f"theta-random {mean['theta_random_sae_norm']:.4f} (SAE norm) and "
                 f"{mean['theta_random_true_norm']:.4f} "
                 f"(true norm), eps-random {mean['eps_random']:.4f}, the SAE {reference.kl.mean():.4f}"),
        rd.claim("a step along an active latent's decoder direction costs more than an isotropic one (CI above 1)",
                 active[1], holds=active[0], published="predicted by seed 004"),
        rd.claim("a step along an inactive latent's decoder direction against an isotropic one", inactive[1]),
        rd.claim("perturbing only the active latents costs less than a random vector of the same norm, at every "
                 "scale (CI below 1)", ", ".join(f"{r.ratio:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] at scale {r.scale}"
                                                 for r in latent.itertuples())
                 + f"; below 1 at {int(below.sum())} of {len(latent)} scales", holds=below.all(),
                 published="predicted by seed 004"),
    ])
