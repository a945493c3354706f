"""Notebook 06: does seed 003's NFM close the gap, and which of its parts does the work?

    trained, training = nfm_comparison.fit_variants(loaded, hooks, fit_tokens)       # one NFM per variant and hook
    df = nfm_comparison.measure(loaded, hooks, trained, tokens)                      # splices under short names
    c = nfm_comparison.compare(df)                                                   # means, ratios, t-tests
    gains = nfm_comparison.gains(nfm_comparison.reconstruction(loaded, trained, tokens), c.vs_sae)
    nfm_comparison.readings(c, gains)
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from saenb.engine import metrics
from saenb.engine.store import measure_cached
from saenb.models.loaded import Loaded
from saenb.studies import literature, nfm
from saenb.studies import readings as rd

SHORT = {"both": "sae_nfm", "linear": "sae_nfm_linear", "interaction": "sae_nfm_interaction",
         "linear_control": "linear_control"}
"""Each `nfm.VARIANTS` entry's splice, as the notebook names it."""
NAMES = [SHORT[v] for v in nfm.VARIANTS]
PUBLISHED = (literature.CLAFLIN_NFM.value["error_reduction"], literature.CLAFLIN_NFM.value["kl_reduction"])
"""Seed 003's (reconstruction error reduction, KL reduction) on GPT-2 small: the reference point of the figure."""


def fit_variants(loaded: Loaded, hooks, fit_tokens: torch.Tensor, *, progress: bool = True,
                 **cfg) -> tuple[dict[str, nfm.TrainedNFM], pd.DataFrame]:
    """One NFM per variant and hook (`nfm.fit`, cached; `cfg`: `nfm.NFMConfig`'s fields but `variant`), and the
    training table: per variant and hook the held-out squared error of the SAE and of SAE + NFM, its reduction."""
    trained = {v: nfm.fit(loaded, hooks, fit_tokens, nfm.NFMConfig(variant=v, **cfg), progress=progress)
               for v in nfm.VARIANTS}
    training = pd.DataFrame([{k: v for k, v in info.items() if k != "val_history"}
                             for t in trained.values() for info in t.info.values()])
    training["val_reduction"] = 1 - training.val_mse_nfm / training.val_mse_sae
    return trained, training


def measure(loaded: Loaded, hooks, trained: dict[str, nfm.TrainedNFM], tokens: torch.Tensor, *,
            seed: int = 0) -> pd.DataFrame:
    """All-token splices (cached): the SAE, eps-random, every variant's SAE + NFM, and eps-random at the full NFM
    splice's own error size (`nfm_eps_random`), under their short names."""
    both = trained["both"]
    specs = ["sae", "eps_random", *(t.intervention for t in trained.values()), both.eps_intervention]
    df = measure_cached(loaded, hooks, specs, tokens, seed=seed)
    df["intervention"] = df.intervention.cat.rename_categories(
        {**{t.intervention.label: SHORT[v] for v, t in trained.items()}, both.eps_intervention.label: "nfm_eps_random"})
    return df


@dataclass
class Comparison:
    """Every splice's mean KL and its paired comparisons (ratios of means with CIs, t-tests over contexts)."""

    means: pd.DataFrame
    """`metrics.mean_table` per layer and intervention."""
    vs_random: pd.DataFrame
    """The SAE and each variant against eps-random (`metrics.paired_test`)."""
    vs_sae: pd.DataFrame
    """Each variant against the SAE."""
    own: pd.DataFrame
    """SAE + NFM against eps-random at its own error size."""
    table: pd.DataFrame
    """means, with each splice's ratio to eps-random and to the SAE (CIs, t, p) as columns."""


def compare(df: pd.DataFrame, *, seed: int = 0) -> Comparison:
    means = metrics.mean_table(df, "kl", by=("layer", "intervention"), seed=seed)
    vs_random = pd.concat([metrics.paired_test(df, a, "eps_random") for a in ["sae", *NAMES]])
    vs_sae = pd.concat([metrics.paired_test(df, a, "sae") for a in NAMES])
    own = metrics.paired_test(df, "sae_nfm", "nfm_eps_random")
    table = means.rename(columns={"mean": "kl"})
    for other, against in (("eps_random", vs_random), ("sae", vs_sae)):
        cols = {"a": "intervention", "ratio": f"ratio_to_{other}", "ci_low": f"ratio_to_{other}_ci_low",
                "ci_high": f"ratio_to_{other}_ci_high", "t": f"t_vs_{other}", "p_value": f"p_vs_{other}"}
        table = table.merge(against.rename(columns=cols)[["layer", *cols.values()]], on=["layer", "intervention"],
                            how="left")
    return Comparison(means, vs_random, vs_sae, own, table)


def shown_table(c: Comparison) -> pd.DataFrame:
    """`Comparison.table` as text, one column per comparison ("ratio [CI]"), the last one SAE + NFM against
    eps-random at its own error size."""
    t, own = c.table, c.own.set_index("layer")
    blank = lambda fmt: (lambda v: fmt.format(v) if pd.notna(v) else "")  # noqa: E731
    shown = pd.DataFrame({
        "layer": t.layer, "intervention": t.intervention,
        "mean KL [95% CI]": [f"{m:.4f} [{lo:.4f}, {hi:.4f}]" for m, lo, hi in zip(t.kl, t.ci_low, t.ci_high)],
        "/ eps-random [CI]": [f"{r:.2f} [{lo:.2f}, {hi:.2f}]" if pd.notna(r) else "" for r, lo, hi in
                              zip(t.ratio_to_eps_random, t.ratio_to_eps_random_ci_low, t.ratio_to_eps_random_ci_high)],
        "t vs eps-random": t.t_vs_eps_random.map(blank("{:.1f}")),
        "/ SAE [CI]": [f"{r:.3f} [{lo:.3f}, {hi:.3f}]" if pd.notna(r) else "" for r, lo, hi in
                       zip(t.ratio_to_sae, t.ratio_to_sae_ci_low, t.ratio_to_sae_ci_high)],
        "t vs SAE": t.t_vs_sae.map(blank("{:.1f}")),
        "p vs SAE": t.p_vs_sae.map(blank("{:.1e}")),
    })
    shown["/ own eps-random [CI]"] = [f"{own.ratio[l]:.2f} [{own.ci_low[l]:.2f}, {own.ci_high[l]:.2f}]"
                                      if i == "sae_nfm" else "" for l, i in zip(t.layer, t.intervention)]
    return shown


def reconstruction(loaded: Loaded, trained: dict[str, nfm.TrainedNFM], tokens: torch.Tensor) -> pd.DataFrame:
    """`nfm.reconstruction_table` on the evaluation tokens, with each variant's splice name (`intervention`)."""
    recon = nfm.reconstruction_table(loaded, list(trained.values()), tokens)
    recon["intervention"] = recon.variant.map(SHORT)
    return recon


def gains(recon: pd.DataFrame, vs_sae: pd.DataFrame) -> pd.DataFrame:
    """Per variant and layer: the relative reduction of the reconstruction error and of the splice's mean KL
    (1 - KL_nfm / KL_sae, with its CI from the ratio's), and a point label (`where`)."""
    out = recon.merge(vs_sae.rename(columns={"a": "intervention"})[["layer", "intervention", "ratio", "ci_low",
                                                                    "ci_high"]], on=["layer", "intervention"])
    out["kl_reduction"] = 1 - out.ratio
    out["kl_reduction_ci_low"], out["kl_reduction_ci_high"] = 1 - out.ci_high, 1 - out.ci_low
    out["where"] = "layer " + out.layer.astype(str)
    return out


def position_means(df: pd.DataFrame) -> pd.DataFrame:
    """Mean KL per position of the SAE splice, SAE + NFM and eps-random per layer (normal 95% bands over contexts)."""
    pair = df[df.intervention.isin(["sae", "sae_nfm", "eps_random"])]
    return metrics.position_table(pair, "kl", by=("layer", "intervention"))


def readings(c: Comparison, gains: pd.DataFrame) -> pd.DataFrame:
    """Notebook 06's verdicts, from `compare` and `gains`."""
    g = gains.set_index(["intervention", "layer"])
    kl_red, err_red = g.kl_reduction.unstack("layer"), g.error_reduction.unstack("layer")
    kl_low, kl_high = g.kl_reduction_ci_low.unstack("layer"), g.kl_reduction_ci_high.unstack("layer")
    r = c.table.set_index(["intervention", "layer"]).ratio_to_eps_random
    layers = list(kl_red.columns)
    per_layer = lambda values, fmt="{:.0%}": " / ".join(fmt.format(v) for v in values)  # noqa: E731
    share = gains[gains.variant == "both"].set_index("layer").interaction_share
    excess = kl_red - err_red
    beyond = kl_low.loc["sae_nfm"] > err_red.loc["sae_nfm"]
    linear_best = kl_high.loc[["sae_nfm_linear", "linear_control"]].max()
    interactions = kl_low.loc["sae_nfm"] > linear_best
    own = c.own
    ref = literature.CLAFLIN_NFM.value
    return rd.frame([
        rd.claim(f"SAE / eps-random KL at layers {', '.join(map(str, layers))}",
                 f"{per_layer([r.loc[('sae', l)] for l in layers], '{:.2f}')}x; with the NFM "
                 f"{per_layer([r.loc[('sae_nfm', l)] for l in layers], '{:.2f}')}x",
                 published=f"{ref['ratio_sae']:.2f}x and {ref['ratio_nfm']:.2f}x on GPT-2 small (seed 003)"),
        rd.claim("the NFM lowers the splice's KL more than the reconstruction error (the KL cut's CI above the "
                 "error cut) at every layer", f"KL {per_layer(kl_red.loc['sae_nfm'])}, error "
                 f"{per_layer(err_red.loc['sae_nfm'])}; at {int(beyond.sum())} of {len(layers)} layers",
                 holds=beyond.all(), published=f"KL -{ref['kl_reduction']:.0%}, error -{ref['error_reduction']:.0%} "
                 "(seed 003)"),
        rd.claim("how far each variant sits above the diagonal (KL cut minus error cut, mean over layers): a gain "
                 "specific to the interactions would show in sae_nfm and sae_nfm_interaction only",
                 ", ".join(f"{n} {excess.loc[n].mean():+.0%}" for n in NAMES)),
        rd.claim("against eps-random at its own, smaller error, SAE + NFM is still worse (CI above 1) at every layer",
                 f"{per_layer(own.ratio, '{:.2f}')}x; CI above 1 at {int((own.ci_low > 1).sum())} of {len(own)} layers",
                 holds=(own.ci_low > 1).all()),
        rd.claim("KL cut of each part", f"linear only {per_layer(kl_red.loc['sae_nfm_linear'])}, interaction only "
                 f"{per_layer(kl_red.loc['sae_nfm_interaction'])}, the equal-budget linear control "
                 f"{per_layer(kl_red.loc['linear_control'])}"),
        rd.claim("the interaction part's share of the NFM's output norm", per_layer(share),
                 published=f"about {ref['interaction_share']:.1%} (seed 003)"),
        rd.claim("the feature interactions do work no linear map of the latents does: the full NFM's KL cut clears "
                 "(CIs apart) the linear part's and the equal-budget linear control's at every layer",
                 f"at {int(interactions.sum())} of {len(layers)} layers" + ("" if interactions.all() else
                 "; elsewhere a linear map of the latents does as well (capacity, a linear correction of the error)"),
                 holds=interactions.all()),
    ])
