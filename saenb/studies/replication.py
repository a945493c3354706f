"""Notebook 01: Gurnee's (2024) all-token replication: every layer, every intervention, KL and CE delta per token.

    df = saenb.measure_cached(loaded, hooks, replication.INTERVENTIONS, tokens)
    means, ratios = replication.kl_means(df), replication.ratios(df)
    replication.readings(means, replication.position_means(df), ratios)
"""

from __future__ import annotations

import pandas as pd
import torch

from saenb.engine import metrics
from saenb.engine.patching import NOTEBOOK1, next_token_distributions
from saenb.engine.store import measure_cached
from saenb.hooks import sae_layer
from saenb.models.loaded import Loaded
from saenb.studies import literature
from saenb.studies import readings as rd

INTERVENTIONS = NOTEBOOK1
RANDOM = ("eps_random", "theta_random_sae_norm", "theta_random_true_norm")
"""The random baselines at the SAE's distance (eps-random) or cosine (theta-random)."""
PAIR = ("sae", "eps_random")


def kl_means(df: pd.DataFrame, by=("layer", "intervention"), *, seed: int = 0) -> pd.DataFrame:
    """Mean KL per group with 95% bootstrap CIs over contexts (`metrics.mean_table`)."""
    return metrics.mean_table(df, "kl", by=by, seed=seed)


def pair(df: pd.DataFrame, family: str | None = None) -> pd.DataFrame:
    """The SAE splice's and eps-random's rows (of one `family` when the frame has that column)."""
    rows = df[df.intervention.isin(PAIR)]
    return rows if family is None else rows[rows.family == family]


def kl_histograms(df: pd.DataFrame, *, high: float = 1.0, bins: int = 50, digits: int = 2) -> tuple[pd.DataFrame, dict]:
    """Counts of the SAE's and eps-random's per-token KL per layer in [0, high] (larger values clamped into the
    last bin), and each layer's note: both 99.9th percentiles (the tail the clamp hides)."""
    sae_eps = pair(df)
    hist = metrics.histogram_table(sae_eps, "kl", by=("layer", "intervention"), low=0.0, high=high, bins=bins)
    tails = metrics.tail_table(sae_eps, "kl", by=("layer", "intervention"), q=0.999)
    t = tails.pivot(index="layer", columns="intervention", values="quantile")
    return hist, {layer: f"99.9th pct\nSAE {row.sae:.{digits}f}\neps-random {row.eps_random:.{digits}f}"
                  for layer, row in t.iterrows()}


def tail_high(df: pd.DataFrame) -> float:
    """The largest per-layer 99.9th percentile of the SAE's and eps-random's KL (a clamp that hides no layer's body)."""
    return float(metrics.tail_table(pair(df), "kl", by=("layer", "intervention"), q=0.999)["quantile"].max())


def ce_histograms(df: pd.DataFrame, *, bins: int = 60) -> tuple[pd.DataFrame, dict]:
    """Counts of the SAE's and eps-random's per-token CE delta per layer in [-1, 1] (clamped), and each layer's
    note: both means."""
    sae_eps = pair(df)
    hist = metrics.histogram_table(sae_eps, "ce_delta", by=("layer", "intervention"), low=-1.0, high=1.0, bins=bins)
    means = sae_eps.groupby(["layer", "intervention"], observed=True).ce_delta.mean().unstack()
    return hist, {layer: f"mean\nSAE {row.sae:+.3f}\neps-random {row.eps_random:+.3f}"
                  for layer, row in means.iterrows()}


def position_means(df: pd.DataFrame, x: str = "pos", interventions=PAIR) -> pd.DataFrame:
    """Mean KL per position (or offset, `x`) of the given interventions per layer, normal 95% bands over contexts."""
    return metrics.position_table(df[df.intervention.isin(interventions)], "kl", by=("layer", "intervention"), x=x)


def ratios(df: pd.DataFrame, by=("layer",), *, seed: int = 0) -> pd.DataFrame:
    """SAE / eps-random ratio of mean KL and of mean CE delta per group, 95% paired bootstrap CIs over contexts."""
    return metrics.ratio_table(df, "sae", "eps_random", values=("kl", "ce_delta"), by=by, seed=seed)


def intuition(loaded: Loaded, df: pd.DataFrame, tokens: torch.Tensor, *, layer: int, quantiles=(0.5, 0.9, 0.99),
              seed: int = 0, top_k: int = 25) -> tuple[pd.DataFrame, dict]:
    """Contexts at the given quantiles of the SAE's KL at `layer`: the clean model's top_k next tokens and their
    log-probs under each splice (`next_token_distributions`), with columns seq, pos, quantile; and each pick's
    title (its layer, context, position, and the end of its text)."""
    hook = next(h for h in loaded.hooks("resid") if sae_layer(h) == layer)
    at = df[(df.layer == layer) & (df.intervention == "sae")].sort_values("kl", kind="stable")
    picks = at.iloc[[int(q * (len(at) - 1)) for q in quantiles]][["seq", "pos"]]
    frames, titles = [], {}
    for q, (seq, pos) in zip(quantiles, picks.itertuples(index=False), strict=True):
        dist = next_token_distributions(loaded, hook, tokens, seq, pos, seed=seed, top_k=top_k)
        frames.append(dist.assign(seq=seq, pos=pos, quantile=q))
        titles[(seq, pos)] = (f"layer {layer}, context {seq}, position {pos} (SAE KL at its {q:.0%} quantile): "
                              f"...{context(loaded, tokens, seq, pos)!r}")
    return pd.concat(frames, ignore_index=True), titles


def context(loaded: Loaded, tokens: torch.Tensor, seq: int, pos: int, n_tokens: int = 24, n_chars: int = 60) -> str:
    """The last `n_chars` characters of the `n_tokens` tokens up to `pos` of context `seq` (BOS left out)."""
    return loaded.model.tokenizer.decode(tokens[seq, max(1, pos - n_tokens):pos + 1])[-n_chars:]


def readings(means: pd.DataFrame, by_pos: pd.DataFrame, ratios: pd.DataFrame) -> pd.DataFrame:
    """Notebook 01's verdicts: from `kl_means` (layer x intervention), `position_means` and `ratios`."""
    kl = means.pivot(index="layer", columns="intervention", values="mean")
    low = means.pivot(index="layer", columns="intervention", values="ci_low")
    high = means.pivot(index="layer", columns="intervention", values="ci_high")
    randoms = kl[list(RANDOM)]
    separated = low["sae"] > high[list(RANDOM)].max(axis=1)
    norm_share = kl.sae_norm / kl.sae
    early, late = by_pos[by_pos.pos <= 8], by_pos[by_pos.pos >= by_pos.pos.max() - 8]
    r = ratios[ratios.metric == "kl"].set_index("layer")
    above = r.ci_low > 1
    ref_low, ref_high = literature.GURNEE_RESID.value
    inside = r.ratio.between(ref_low, ref_high)
    return rd.frame([
        rd.claim("the SAE splice and its norm-corrected version cost about the same",
                 f"their mean KLs differ by {(kl.sae_norm_corrected / kl.sae - 1).abs().max():.0%} at most across "
                 "layers"),
        rd.claim("the SAE splice costs more than every random baseline at its distance or cosine (eps-random, "
                 "theta-random), CIs apart, at every layer",
                 f"SAE {rd.span(kl.sae, '{:.4f}')} nats against {rd.span(randoms.stack(), '{:.4f}')}; CIs apart at "
                 f"{int(separated.sum())} of {len(kl)} layers", holds=separated.all()),
        rd.claim("rescaling x to the SAE's norm alone (SAE-norm) costs less than half the SAE's KL",
                 f"{rd.span(kl.sae_norm, '{:.4f}')} nats, at most {norm_share.max():.0%} of the SAE's KL",
                 holds=(norm_share < 0.5).all()),
        rd.claim("zero ablation bounds the scale from above", f"{rd.span(kl['zero'])} nats"),
        rd.claim("the SAE / eps-random gap over the context (mean over layers)",
                 f"{_gap(early):.2f}x over the first 8 positions, {_gap(late):.2f}x over the last 8"),
        rd.claim("the SAE splice moves the next-token distribution more than eps-random (KL ratio's CI above 1) at "
                 "every layer", f"{rd.span(r.ratio, unit='x')}; CI above 1 at {int(above.sum())} of {len(r)} layers"
                 + ("" if above.all() else f" (not at layers {sorted(r.index[~above])})"), holds=above.all()),
        rd.claim(f"the ratio lies in the original study's {ref_low}-{ref_high}x at every layer",
                 f"{int(inside.sum())} of {len(r)} layers inside, {int((r.ratio < ref_low).sum())} below, "
                 f"{int((r.ratio > ref_high).sum())} above", holds=inside.all(),
                 published=f"{ref_low}-{ref_high}x on GPT-2 small's residual stream (Gurnee 2024)"),
    ])


def _gap(by_pos: pd.DataFrame) -> float:
    means = by_pos.groupby("intervention", observed=True)["mean"].mean()
    return means["sae"] / means["eps_random"]


# ----------------------------------------------------------------------------- notebook 05: attention SAEs
FAMILIES = {"resid": "residual stream (hook_resid_pre)", "z": "attention output (hook_z)"}
"""The SAE families notebook 05 sets side by side, with their panel titles."""
REFERENCES = {"resid": literature.GURNEE_RESID.value, "z": literature.GURNEE_Z.value}
"""The original study's SAE / eps-random range per family (GPT-2 small)."""


def measure_families(loaded: Loaded, tokens: torch.Tensor, families=tuple(FAMILIES), *, seed: int = 0) -> pd.DataFrame:
    """Notebook 01's all-token measurement (cached) of each SAE family's hooks, with a column family."""
    return pd.concat([measure_cached(loaded, loaded.hooks(family), INTERVENTIONS, tokens, seed=seed)
                      .assign(family=family) for family in families], ignore_index=True)


def norm_shares(df: pd.DataFrame, by=("family", "layer"), *, seed: int = 0) -> pd.DataFrame:
    """What the norm change costs, per group: sae_norm / sae (x rescaled to the SAE's norm alone, as a share of
    the SAE splice's KL) and sae_norm_corrected / sae (the SAE splice with its norm restored), ratios of mean KL
    with 95% paired bootstrap CIs; column metric names the pair."""
    return pd.concat([metrics.ratio_table(df, num, "sae", values=("kl",), by=by, seed=seed)
                      .assign(metric=f"{num} / sae") for num in ("sae_norm", "sae_norm_corrected")], ignore_index=True)


def gap_explained(means: pd.DataFrame) -> pd.DataFrame:
    """Per family and layer: the mean KLs behind the norm's share, and the share of the SAE's gap to eps-random that
    restoring the norm explains, (KL_sae - KL_norm_corrected) / (KL_sae - KL_eps_random) (outside [0, 1] when the
    norm-corrected splice is worse than the SAE's, or better than eps-random)."""
    kl = means.pivot(index=["family", "layer"], columns="intervention", values="mean")
    explained = ((kl.sae - kl.sae_norm_corrected) / (kl.sae - kl.eps_random)).rename("gap_explained_by_norm")
    return pd.concat([kl[["sae", "sae_norm_corrected", "eps_random", "sae_norm"]], explained], axis=1)


def attention_readings(ratios: pd.DataFrame, norm: pd.DataFrame, explained: pd.DataFrame) -> pd.DataFrame:
    """Notebook 05's verdicts, from `ratios` and `norm_shares` by family and layer, and `gap_explained`."""
    r = ratios[ratios.metric == "kl"].set_index(["family", "layer"])
    z, resid = r.loc["z"], r.loc["resid"]
    z_low, z_high = REFERENCES["z"]
    share = norm[norm.metric == "sae_norm / sae"].set_index(["family", "layer"]).ratio
    ex = explained.gap_explained_by_norm
    apart = z.ci_high.max() < resid.ci_low.min()
    inside = z.ratio.between(z_low, z_high)
    return rd.frame([
        rd.claim("attention-output SAEs' splice moves the next-token distribution more than eps-random (CI above 1) "
                 "at every layer", f"{rd.span(z.ratio, unit='x')}; CI above 1 at {int((z.ci_low > 1).sum())} of "
                 f"{len(z)} layers", holds=(z.ci_low > 1).all()),
        rd.claim(f"their ratio lies in the study's attention range, {z_low}-{z_high}x, at every layer",
                 f"{int(inside.sum())} of {len(z)} layers", holds=inside.all(),
                 published=f"{z_low}-{z_high}x on GPT-2 small's hook_z SAEs (Gurnee 2024)"),
        rd.claim("the attention gap is smaller than the residual one (every attention CI below every residual CI)",
                 f"attention {rd.span(z.ratio, unit='x')} (mean {z.ratio.mean():.2f}), residual "
                 f"{rd.span(resid.ratio, unit='x')} (mean {resid.ratio.mean():.2f})", holds=apart,
                 published="smaller on GPT-2 small (Gurnee 2024)"),
        rd.claim("the norm change alone (sae_norm / sae) costs",
                 f"{rd.span(share.loc['z'], '{:.0%}')} of the attention SAE splice's KL, "
                 f"{rd.span(share.loc['resid'], '{:.0%}')} of the residual one's"),
        rd.claim("restoring the norm explains a larger share of the attention gap than of the residual gap (means "
                 "over layers, no CI)", f"attention {rd.share(ex.loc['z'].min())} to {rd.share(ex.loc['z'].max())}, "
                 f"residual {rd.share(ex.loc['resid'].min())} to {rd.share(ex.loc['resid'].max())}",
                 holds=ex.loc["z"].mean() > ex.loc["resid"].mean(),
                 published="a larger share on GPT-2 small (Gurnee 2024)"),
    ])
