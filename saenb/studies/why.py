"""Notebook 09: why is the SAE's error worse than a random one of its size? Each explanation measured.

    fitted = baselines.fit(loaded, hooks, fit_tokens)
    df = why.measure_baselines(loaded, hooks, tokens, fitted)            # all-token splices
    gap = why.gap_table(df)                                              # SAE / each baseline, share of the gap
    split = why.split_table(loaded, fitted, df, tokens)                  # Engels et al.'s linear / nonlinear parts
    splices, per_token = why.curvature_study(loaded, hook, curve_tokens, fitted, position=48)
    summary = why.curvature_summary(splices, per_token)

Explanations and the measurement each gets:
- *activation space is anisotropic* (seed 001's readers; Lee & Heimersheim 2024): the SAE against `cov_random`;
- *SAE-error directions are harmful in general, not for their own token*: against `error_shuffled`;
- *the cosine to x, not the distance, is what matters* (Logan Riggs' robustness curves): against theta-random at
  the SAE's cosine, and KL over a grid of cosines at the true norm (`theta_random_cos`);
- *the error's linear part is benign, or harmful* (Engels et al. 2024): x_sae + the linear part and x_sae + the
  nonlinear part, each against eps-random at its own error size;
- *curvature* (no published account): the Fisher information F of the measured distributions in the patched
  activation (`saenb.studies.curvature`): the quadratic model's KL, the curvature quotient (its prediction of the
  ratio), the error's energy in F's top eigenvectors and in the activations' top principal components.

"Share of the gap" compares log ratios: a baseline whose ratio to the SAE is 1 accounts for all of the SAE's gap
to eps-random (share 1), one equal to eps-random for none (share 0): share = 1 - log(r_baseline) / log(r_eps).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats

from saenb.engine import interventions as iv
from saenb.engine import metrics, patching
from saenb.engine.store import measure_cached
from saenb.models.presets import Loaded, sae_layer
from saenb.studies import baselines, curvature

COS_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
"""Cosines to x of the robustness curves (theta-random at the true norm)."""
SCALES = (0.25, 0.5)
"""Fractions of the SAE's error (and of eps) at which the quadratic model is checked besides the full error."""
TOP_K = (1, 2, 4, 8, 16, 32)
"""Numbers of top Fisher eigenvectors / principal components whose share of the error's energy is reported."""
REFERENCES = {
    "lee_heimersheim": "with a covariance-matched random direction the gap on GPT-2 small \"no longer seems "
                       "pathologically high\", varying by layer",
    "engels_variance": 0.5,
    "engels_norm_r2": 0.9,
}
"""Published figures the notebook prints beside its own: Lee & Heimersheim 2024 (GPT-2 small); Engels et al.
2024: about half of the error's variance, and over 90% of its norm, linearly predictable from x."""
BASELINES = ("eps_random", "cov_random", "error_shuffled", "theta_random_sae_norm")
"""The random errors the SAE is compared with at its own size, in the order of the gap table."""


def _short(label: str, fitted: baselines.Fitted) -> str:
    return fitted.labels().get(label, label)


def baseline_specs(fitted: baselines.Fitted, cos_grid=COS_GRID) -> list[iv.Spec]:
    """The all-token splices of notebook 09: the SAE, its random baselines, the linear / nonlinear split with
    their eps-random, and the robustness curves' theta-random points."""
    return [iv.Spec.of("sae"), iv.Spec.of("eps_random"), fitted.spec("cov_random"), fitted.spec("error_shuffled"),
            iv.Spec.of("theta_random_sae_norm"), fitted.spec("sae_plus_linear"), fitted.eps_spec("sae_plus_linear"),
            fitted.spec("sae_plus_nonlinear"), fitted.eps_spec("sae_plus_nonlinear"),
            *(iv.spec("theta_random_cos", cos=float(c)) for c in cos_grid)]


def measure_baselines(loaded: Loaded, hooks, tokens: torch.Tensor, fitted: baselines.Fitted, *, cos_grid=COS_GRID,
                      seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """The engine's all-token frame of `baseline_specs` (cached), interventions under their short names."""
    df = measure_cached(loaded, hooks, baseline_specs(fitted, cos_grid), tokens, seed=seed, progress=progress)
    df["intervention"] = df["intervention"].cat.rename_categories(lambda c: _short(c, fitted))
    return df


def share_of_gap(ratio_eps: float, ratio_baseline: float) -> float:
    """1 - log(r_baseline) / log(r_eps) (module docstring); NaN when there is no gap to account for."""
    if not ratio_eps > 0 or abs(np.log(ratio_eps)) < 1e-9 or not ratio_baseline > 0:
        return float("nan")
    return float(1 - np.log(ratio_baseline) / np.log(ratio_eps))


def gap_table(df: pd.DataFrame, baselines_=BASELINES, *, seed: int = 0) -> pd.DataFrame:
    """Per hook and baseline: the SAE's KL over the baseline's (token means, 95% paired bootstrap CI over
    contexts), both means, and the share of the SAE's gap to eps-random the baseline accounts for.

    Columns: hook, layer, baseline, ratio, ci_low, ci_high, kl_sae, kl_baseline, share_of_gap."""
    rows = []
    for b in baselines_:
        t = metrics.ratio_table(df, "sae", b, values=("kl",), by=("hook", "layer"), seed=seed)
        rows.append(t.assign(baseline=b))
    out = pd.concat(rows, ignore_index=True).rename(columns={"num_mean": "kl_sae", "den_mean": "kl_baseline"})
    eps = out[out.baseline == "eps_random"].set_index("hook")["ratio"]
    out["share_of_gap"] = [share_of_gap(eps[h], r) for h, r in zip(out.hook, out.ratio, strict=True)]
    out["hook"] = out["hook"].astype(str)
    return out[["hook", "layer", "baseline", "ratio", "ci_low", "ci_high", "kl_sae", "kl_baseline", "share_of_gap"]]


def split_table(loaded: Loaded, fitted: baselines.Fitted, df: pd.DataFrame, tokens: torch.Tensor, *,
                seed: int = 0) -> pd.DataFrame:
    """Engels et al.'s split per hook: how much of the error e = x - x_sae is linear in x (R^2 of x A + b on
    the fit contexts and on the evaluation ones, the linear part's share of |e|^2, and the R^2 of |e| predicted
    linearly from x), and what each part does when spliced: the KL of x_sae + the linear part (error n left)
    and of x_sae + n (linear part left), each against eps-random at its own error size (ratio, 95% CI).

    Columns: hook, layer, r2_fit, r2_eval, linear_norm_share, norm_r2, error_norm, linear_error_norm,
    nonlinear_error_norm, then per part (linear / nonlinear restored): kl, kl_eps, ratio, ci_low, ci_high."""
    from saenb.studies.nfm import activations  # reconstruction of the evaluation tokens, as the fit computed it

    rows = []
    for hook in df["hook"].cat.categories:
        f = fitted.hooks[hook]
        x, _, x_sae, _ = activations(loaded, hook, tokens)
        e = (x - x_sae).double()
        lin = f.linear_part(x.to(f.A.device)).double().cpu()
        # |e| from x by least squares: Engels et al.'s "norm" figure
        norm_A, norm_b = baselines.lstsq(x, e.norm(dim=-1, keepdim=True), intercept=True)
        norm_hat = (x.double() @ norm_A + norm_b).squeeze(-1)
        norm = e.norm(dim=-1)
        row = {"hook": hook, "layer": sae_layer(hook), "r2_fit": f.info["linear_r2"],
               "r2_eval": baselines.r_squared(e, lin), "linear_norm_share": float(lin.square().sum() / e.square().sum()),
               "norm_r2": float(1 - (norm - norm_hat).square().sum() / (norm - norm.mean()).square().sum()),
               "error_norm": float(norm.mean()), "linear_error_norm": float((e - lin).norm(dim=-1).mean()),
               "nonlinear_error_norm": float(lin.norm(dim=-1).mean())}
        sub = df[df.hook == hook]
        for part, splice in (("linear", "sae_plus_linear"), ("nonlinear", "sae_plus_nonlinear")):
            r = metrics.ratio_table(sub, splice, f"eps_random_like({splice})", values=("kl",), seed=seed).iloc[0]
            row.update({f"{part}_restored_kl": r.num_mean, f"{part}_restored_kl_eps": r.den_mean,
                        f"{part}_restored_ratio": r.ratio, f"{part}_restored_ci_low": r.ci_low,
                        f"{part}_restored_ci_high": r.ci_high})
        row["kl_sae"] = float(sub[sub.intervention == "sae"].kl.mean())
        rows.append(row)
    return pd.DataFrame(rows)


def robustness_table(df: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """The robustness curves: mean KL (95% CI over contexts) of theta-random at the true norm per cosine to x,
    and the SAE's own point (its mean cosine to x, its mean KL) and theta-random at the SAE's cosine.

    Columns: hook, layer, series, cos, mean, ci_low, ci_high."""
    theta = df[df.intervention.astype(str).str.startswith("theta_random_cos")].copy()
    theta["cos"] = theta.intervention.astype(str).str.extract(r"cos=([-\d.]+)")[0].astype(float)
    curve = metrics.mean_table(theta, "kl", by=("hook", "layer", "cos"), seed=seed).assign(series="theta_random_cos")
    points = []
    for name in ("sae", "theta_random_sae_norm"):
        sub = df[df.intervention == name]
        m = metrics.mean_table(sub, "kl", by=("hook", "layer"), seed=seed)
        m["cos"] = m.hook.map(sub.groupby("hook", observed=True).cos_sae.mean())
        points.append(m.assign(series=name))
    out = pd.concat([curve, *points], ignore_index=True)
    out["hook"] = out["hook"].astype(str)
    return out[["hook", "layer", "series", "cos", "mean", "ci_low", "ci_high"]]


# ------------------------------------------------------------------------------------------ curvature
def curvature_specs(fitted: baselines.Fitted, scales=SCALES) -> tuple[list[iv.Spec], list[iv.Spec]]:
    """(deterministic splices, random ones) of the curvature study: the SAE and its error scaled down; eps-random
    (also scaled), cov_random and error_shuffled."""
    fixed = [iv.Spec.of("sae"), *(iv.spec("sae_scaled", scale=float(s)) for s in scales)]
    random = [iv.Spec.of("eps_random"), *(iv.spec("eps_random", scale=float(s)) for s in scales),
              fitted.spec("cov_random"), fitted.spec("error_shuffled")]
    return fixed, random


def _patched(loaded: Loaded, hook: str, specs, tokens: torch.Tensor, x: torch.Tensor, position: int,
             n_samples: int, seed: int) -> torch.Tensor:
    """The engine's own patched activations at `position` [n, k, samples, d] for clean activations `x` [n, d]
    there (same generators, so the same draws as `measure`)."""
    req = patching.make_request(loaded, hook, specs, tokens, positions=position, n_samples=n_samples, seed=seed)
    with torch.inference_mode():
        patched, _ = patching.perturb(loaded, req, hook, x[:, None].to(loaded.device), list(range(len(tokens))), None)
    return patched[:, :, :, 0].cpu()


def _span_kl(frame: pd.DataFrame, position: int, fitted: baselines.Fitted) -> pd.DataFrame:
    """Per (seq, intervention, sample): KL summed over the measured positions, and KL at the patched one."""
    frame = frame.assign(intervention=frame.intervention.astype(str).map(lambda c: _short(c, fitted)))
    g = frame.groupby(["seq", "intervention", "sample"])
    out = pd.DataFrame({"kl": g.kl.sum()})
    out["kl_at"] = frame[frame.pos == position].set_index(["seq", "intervention", "sample"]).kl
    return out.reset_index()


def curvature_study(loaded: Loaded, hook: str, tokens: torch.Tensor, fitted: baselines.Fitted, *,
                    position: int = 48, n_samples: int = 64, scales=SCALES, top_k=TOP_K, seed: int = 0,
                    progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """F per token (`curvature.fisher`, one token per context at `position`, measured there and at the 16 after)
    against what the engine measures in the same single-token mode.

    Returns (splices, per_token). splices: one row per (seq, intervention, sample) with the measured KL (summed
    over the measured positions; `kl_at`: at the patched position), the quadratic model's (`quadratic`,
    `quadratic_at`), the curvature quotient (`quotient`, `quotient_at`), the change's norm, and the share of its
    energy in F's top-k eigenvectors (`fisher_k`) and in the activations' top-k principal components (`pca_k`).
    per_token: hook, layer, seq, tr(F), F's top eigenvalue share and participation ratio, the mean quotient of
    the token's active latents' decoder directions and of all latents', the SAE's z-score and percentile among
    its eps-random draws (summed KL; `_at`: at the patched position only, notebook 03's), eps, cos_sae, l0."""
    fixed, random = curvature_specs(fitted, scales)
    kw = dict(positions=position, seed=seed, progress=progress)
    measured = pd.concat([_span_kl(measure_cached(loaded, hook, fixed, tokens, **kw), position, fitted),
                          _span_kl(measure_cached(loaded, hook, random, tokens, n_samples=n_samples, **kw),
                                   position, fitted)], ignore_index=True)
    curv = curvature.fisher(loaded, hook, tokens, position, progress=progress)
    rows = torch.tensor(curv.seqs)
    x = patching.clean_activations(loaded.model, hook, tokens[:, :position + 1])[:, position]  # [n, d]
    p_fixed = _patched(loaded, hook, fixed, tokens, x, position, 1, seed)
    p_random = _patched(loaded, hook, random, tokens, x, position, n_samples, seed)
    with torch.inference_mode():
        latents = loaded.saes[hook].encode(x[rows].to(loaded.device)).cpu()
    x = x[rows].double()
    values, vectors = curv.eigh()
    pcs = fitted.hooks[hook].components.cpu().double()
    frames = []
    for specs, patched in ((fixed, p_fixed), (random, p_random)):
        d = patched[rows].double() - x[:, None, None]  # [n, k, samples, width]
        cols = {"quadratic": curv.quadratic_kl(d), "quadratic_at": curv.quadratic_kl(d, at=True),
                "quotient": curv.quotient(d), "quotient_at": curv.quotient(d, at=True), "norm": d.norm(dim=-1)}
        for k in top_k:
            if k <= d.shape[-1]:
                cols[f"fisher_{k}"] = curvature.energy_share(d, vectors[..., :k])
                cols[f"pca_{k}"] = curvature.energy_share(d, pcs[:, :k])
        n, n_specs, n_samp = d.shape[:3]
        index = pd.MultiIndex.from_product([curv.seqs, [_short(s.label, fitted) for s in specs], range(n_samp)],
                                           names=["seq", "intervention", "sample"])
        frames.append(pd.DataFrame({c: v.reshape(-1).numpy() for c, v in cols.items()}, index=index).reset_index())
    splices = pd.concat(frames, ignore_index=True).merge(measured, on=["seq", "intervention", "sample"])
    splices.insert(0, "hook", hook)
    splices.insert(1, "layer", sae_layer(hook))

    # per token: F's spectrum, decoder directions' quotients, the SAE's place among its eps-random draws
    W_dec = loaded.saes[hook].W_dec.detach().cpu().double()
    W_unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    dec_q = curv.quotient(W_unit.expand(len(rows), *W_unit.shape))  # [n, d_sae]
    active = latents > 0
    trace = values.sum(-1)
    per_token = pd.DataFrame({
        "hook": hook, "layer": sae_layer(hook), "seq": curv.seqs, "trace": trace.numpy(),
        "top_eigen_share": (values[:, 0] / trace).numpy(),
        "participation_ratio": (trace.square() / values.square().sum(-1)).numpy(),
        "quotient_decoder_active": ((dec_q * active).sum(-1) / active.sum(-1).clamp_min(1)).numpy(),
        "quotient_decoder_all": dec_q.mean(-1).numpy(),
        "l0": active.sum(-1).numpy(),
    })
    for suffix, value in (("", "kl"), ("_at", "kl_at")):
        tails = metrics.tail_position(splices[splices.intervention == "eps_random"],
                                      splices[splices.intervention == "sae"], value, by=("seq",)).set_index("seq")
        per_token[f"z{suffix}"] = per_token.seq.map(tails.z)
        per_token[f"percentile{suffix}"] = per_token.seq.map(tails.percentile)
    sae_rows = splices[splices.intervention == "sae"].set_index("seq")
    per_token["quotient_sae"] = per_token.seq.map(sae_rows.quotient)
    per_token["quotient_sae_at"] = per_token.seq.map(sae_rows.quotient_at)
    per_token["eps"] = per_token.seq.map(sae_rows.norm)
    x_sae = p_fixed[rows, 0, 0].double()  # the first fixed splice is the SAE's
    per_token["cos_sae"] = torch.nn.functional.cosine_similarity(x, x_sae, dim=-1).numpy()
    return splices, per_token


def spearman_ci(a, b, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Spearman's rho of paired values with a percentile bootstrap CI over pairs (scipy.stats)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 4:
        return float("nan"), float("nan"), float("nan")

    def rho(x, y):
        return stats.spearmanr(x, y).statistic

    res = stats.bootstrap((a, b), rho, paired=True, vectorized=False, confidence_level=confidence,
                          n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed))
    return float(stats.spearmanr(a, b).statistic), float(res.confidence_interval.low), float(res.confidence_interval.high)


def curvature_summary(splices: pd.DataFrame, per_token: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Per hook: the measured SAE / eps-random ratio of the summed KL and the quadratic model's (95% paired
    bootstrap CIs over tokens), how well the quadratic model fits (median measured / predicted KL, SAE and
    eps-random, and for the error scaled down), mean curvature quotients per splice and of decoder directions,
    energy shares of the SAE's error and of eps-random at the largest k, and Spearman's rho between the SAE's
    z-score and its curvature quotient (notebook 03's z at the patched position against F at that position, and
    the summed ones), with CIs."""
    rows = []
    for hook, sp in splices.groupby("hook", sort=False):
        tok = per_token[per_token.hook == hook]
        sae = sp[sp.intervention == "sae"].set_index("seq").sort_index()
        eps = sp[sp.intervention == "eps_random"].groupby("seq")[["kl", "quadratic"]].mean().loc[sae.index]
        row = {"hook": hook, "layer": int(sp.layer.iloc[0]), "n_tokens": len(sae)}
        for name, col in (("measured", "kl"), ("quadratic", "quadratic")):
            r, lo, hi = metrics.ratio_ci(sae[col].to_numpy(), eps[col].to_numpy(), seed=seed)
            row.update({f"{name}_ratio": r, f"{name}_ci_low": lo, f"{name}_ci_high": hi})
        for label in pd.unique(sp.intervention):
            s = sp[sp.intervention == label]
            row[f"fit_{label}"] = float(np.median(s.kl / s.quadratic))
            row[f"quotient_{label}"] = float(s.quotient.mean())
        row["quotient_decoder_active"] = float(tok.quotient_decoder_active.mean())
        row["quotient_decoder_all"] = float(tok.quotient_decoder_all.mean())
        k = max(int(c.split("_")[1]) for c in sp.columns if c.startswith("fisher_"))
        for label in ("sae", "eps_random", "cov_random", "error_shuffled"):
            s = sp[sp.intervention == label]
            row[f"fisher_{k}_{label}"] = float(s[f"fisher_{k}"].mean())
            row[f"pca_{k}_{label}"] = float(s[f"pca_{k}"].mean())
        row["top_k"] = k
        for name, z, q in (("at", "z_at", "quotient_sae_at"), ("span", "z", "quotient_sae")):
            rho, lo, hi = spearman_ci(tok[z], tok[q], seed=seed)
            row.update({f"rho_z_quotient_{name}": rho, f"rho_{name}_ci_low": lo, f"rho_{name}_ci_high": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def energy_curves(splices: pd.DataFrame, labels=("sae", "eps_random", "cov_random", "error_shuffled")) -> pd.DataFrame:
    """Mean share of each splice's energy in the top-k Fisher eigenvectors and principal components, per k.

    Columns: hook, layer, basis ("Fisher" / "PCA"), k, intervention, share."""
    rows = []
    for (hook, layer, label), s in splices[splices.intervention.isin(labels)].groupby(
            ["hook", "layer", "intervention"], sort=False):
        for c in s.columns:
            if c.startswith(("fisher_", "pca_")):
                basis, k = c.split("_")
                rows.append({"hook": hook, "layer": layer, "basis": "Fisher" if basis == "fisher" else "PCA",
                             "k": int(k), "intervention": label, "share": float(s[c].mean())})
    return pd.DataFrame(rows)


def accounting(gap: pd.DataFrame, split: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """One row per hook and explanation: the ratio left when the explanation is taken into account and the share
    of the SAE's gap to eps-random it accounts for (module docstring). The linear part's row compares the KL the
    ratio of the error's nonlinear part n alone (x_sae + the linear part against eps-random at |n|); curvature's compares the quadratic model's predicted ratio
    with the measured one (single-token mode).

    Columns: hook, layer, explanation, ratio_eps, ratio_left, share_of_gap."""
    rows = []
    names = {"cov_random": "anisotropy (cov_random)", "error_shuffled": "error directions in general (error_shuffled)",
             "theta_random_sae_norm": "cosine to x (theta-random)"}
    for hook, g in gap.groupby("hook", sort=False):
        g = g.set_index("baseline")
        r_eps = g.loc["eps_random", "ratio"]
        layer = int(g.layer.iloc[0])
        for b, label in names.items():
            rows.append({"hook": hook, "layer": layer, "explanation": label, "ratio_eps": r_eps,
                         "ratio_left": g.loc[b, "ratio"], "share_of_gap": g.loc[b, "share_of_gap"]})
        s = split[split.hook == hook].iloc[0]
        # with the linear part restored only n is left: is n still worse than a random error of its size?
        left = s.linear_restored_ratio
        rows.append({"hook": hook, "layer": layer, "explanation": "nonlinear error only (linear part restored)",
                     "ratio_eps": r_eps, "ratio_left": left, "share_of_gap": share_of_gap(r_eps, left)})
        c = summary[summary.hook == hook]
        if len(c):
            c = c.iloc[0]
            rows.append({"hook": hook, "layer": layer, "explanation": "curvature (quadratic model, single-token)",
                         "ratio_eps": c.measured_ratio, "ratio_left": c.measured_ratio / c.quadratic_ratio,
                         "share_of_gap": 1 - share_of_gap(c.measured_ratio, c.quadratic_ratio)})
    return pd.DataFrame(rows)


def quadratic_fit_table(splices: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """How far the quadratic model holds: per hook, for the SAE's error and for eps-random at each fraction of
    their size, the measured KL over 0.5 d^T F d (ratio of token means, 95% paired bootstrap CI over tokens;
    1 where the KL is quadratic in the change).

    Columns: hook, layer, family ("sae" / "eps_random"), scale, ratio, ci_low, ci_high."""
    rows = []
    for (hook, layer, label), s in splices.groupby(["hook", "layer", "intervention"], sort=False):
        family = "sae" if label.startswith("sae") else "eps_random" if label.startswith("eps_random") else None
        if family is None:
            continue
        scale = float(label.split("scale=")[1].rstrip(")")) if "scale=" in label else 1.0
        per_seq = s.groupby("seq")[["kl", "quadratic"]].mean()
        r, lo, hi = metrics.ratio_ci(per_seq.kl.to_numpy(), per_seq.quadratic.to_numpy(), seed=seed)
        rows.append({"hook": hook, "layer": layer, "family": family, "scale": scale, "ratio": r, "ci_low": lo,
                     "ci_high": hi})
    return pd.DataFrame(rows).sort_values(["layer", "family", "scale"], ignore_index=True)


def quotient_table(splices: pd.DataFrame, per_token: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Mean curvature quotient (95% bootstrap CI over tokens) per hook of each splice's change at full size and of
    unit decoder directions (the token's active latents', and all latents'); eps-random's is 1 in expectation.

    Columns: hook, layer, direction, mean, ci_low, ci_high."""
    full = splices[~splices.intervention.str.contains("scale=")]
    a = metrics.mean_table(full, "quotient", by=("hook", "layer", "intervention"), seed=seed)
    a = a.rename(columns={"intervention": "direction"})
    dec = per_token.melt(id_vars=["hook", "layer", "seq"], value_vars=["quotient_decoder_active", "quotient_decoder_all"],
                         var_name="direction", value_name="quotient")
    dec["direction"] = dec.direction.map({"quotient_decoder_active": "decoder (active latents)",
                                          "quotient_decoder_all": "decoder (all latents)"})
    b = metrics.mean_table(dec, "quotient", by=("hook", "layer", "direction"), seed=seed)
    return pd.concat([a, b], ignore_index=True)[["hook", "layer", "direction", "mean", "ci_low", "ci_high"]]
