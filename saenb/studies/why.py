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
Each share carries a 95% bootstrap CI over the contexts (or tokens) its two ratios were measured on, resampled
together (`share_ci`); it is read against the ratio measured on the same tokens in the same mode, per layer (never
averaged over layers); the largest is named only where its CI clears the others' (`largest_share`), and a share
outside [0, 1] is said to be what it is (`share_note`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats

from saenb.checks import positive_int
from saenb.engine import interventions as iv
from saenb.engine import metrics, patching
from saenb.engine.store import measure_cached
from saenb.hooks import clean_activations, sae_layer
from saenb.models.loaded import Loaded
from saenb.studies import baselines, curvature, literature
from saenb.studies import readings as rd
from saenb.studies.nfm import activations

COS_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
"""Cosines to x of the robustness curves (theta-random at the true norm)."""
SCALES = (0.25, 0.5)
"""Fractions of the SAE's error (and of eps) at which the quadratic model is checked besides the full error."""
TOP_K = (1, 2, 4, 8, 16, 32)
"""Numbers of top Fisher eigenvectors / principal components whose share of the error's energy is reported."""
BASELINES = ("eps_random", "cov_random", "error_shuffled", "theta_random_sae_norm")
"""The random errors the SAE is compared with at its own size, in the order of the gap table."""


def _short(label: str, fitted: baselines.Fitted) -> str:
    return fitted.labels().get(label, label)


def baseline_interventions(fitted: baselines.Fitted, cos_grid=COS_GRID) -> list[iv.Intervention]:
    """The all-token splices of notebook 09: the SAE, its random baselines, the linear / nonlinear split with
    their eps-random, and the robustness curves' theta-random points."""
    return [iv.Intervention.of("sae"), iv.Intervention.of("eps_random"), fitted.intervention("cov_random"),
            fitted.intervention("error_shuffled"), iv.Intervention.of("theta_random_sae_norm"),
            fitted.intervention("sae_plus_linear"), fitted.eps_intervention("sae_plus_linear"),
            fitted.intervention("sae_plus_nonlinear"), fitted.eps_intervention("sae_plus_nonlinear"),
            *(iv.intervention("theta_random_cos", cos=float(c)) for c in cos_grid)]


def measure_baselines(loaded: Loaded, hooks, tokens: torch.Tensor, fitted: baselines.Fitted, *, cos_grid=COS_GRID,
                      n_robustness_contexts: int | None = None, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """The engine's all-token frame of `baseline_interventions` (cached), interventions under their short names.

    The robustness curves' theta-random points (`cos_grid`, a figure only) are measured on the first
    `n_robustness_contexts` contexts (None: all of them), with the draws they get in a measurement of all: at the
    true norm of x their KLs are nats, and 128 SmolLM2 contexts put their 95% CIs within 2-6% of the mean, where
    the six of them were 40% of the all-token work."""
    n = len(tokens) if n_robustness_contexts is None else positive_int("n_robustness_contexts", n_robustness_contexts)
    specs = baseline_interventions(fitted, cos_grid)
    if n >= len(tokens) or not cos_grid:
        df = measure_cached(loaded, hooks, specs, tokens, seed=seed, progress=progress)
    else:
        n_accounted = len(specs) - len(cos_grid)  # the curves' points come last, one per cosine
        main = measure_cached(loaded, hooks, specs[:n_accounted], tokens, seed=seed, progress=progress)
        curve = measure_cached(loaded, hooks, specs[n_accounted:], tokens[:n], seed=seed, progress=progress)
        df = pd.concat([main, curve], ignore_index=True)  # hook: the same categories in both, kept
        df["intervention"] = pd.Categorical(df["intervention"].astype(str), categories=[s.label for s in specs])
    df["intervention"] = df["intervention"].cat.rename_categories(lambda c: _short(c, fitted))
    return df


def share_of_gap(ratio_eps: float, ratio_baseline: float) -> float:
    """1 - log(r_baseline) / log(r_eps) (module docstring); NaN when there is no gap to account for."""
    if not ratio_eps > 0 or abs(np.log(ratio_eps)) < 1e-9 or not ratio_baseline > 0:
        return float("nan")
    return float(1 - np.log(ratio_baseline) / np.log(ratio_eps))


def _shares(ratio_eps: np.ndarray, ratio_left: np.ndarray) -> np.ndarray:
    """`share_of_gap` elementwise (NaN where there is no gap)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1 - np.log(ratio_left) / np.log(ratio_eps)
    return np.where(np.abs(np.log(ratio_eps)) < 1e-9, np.nan, out)


def share_ci(sums: np.ndarray, share, *, confidence: float = 0.95, n_resamples: int = 2000,
             seed: int = 0) -> tuple[float, float, float]:
    """A share of the gap with its percentile bootstrap CI: `sums` [k, n] holds k per-context (or per-token) sums
    measured on the same n contexts, `share(totals)` maps their totals [k, ...] to the share (`_shares` of the
    ratios they make); each resample draws n contexts with replacement, all k sums together, so the share and the
    ratio it is read against move together. Resamples without a gap (NaN) are left out."""
    sums = np.asarray(sums, float)
    point = float(share(sums.sum(-1)))
    idx = np.random.default_rng(seed).integers(0, sums.shape[1], size=(n_resamples, sums.shape[1]))
    boot = share(sums[:, idx].sum(-1))
    boot = boot[np.isfinite(boot)]
    if len(boot) < 2:
        return point, float("nan"), float("nan")
    low, high = np.quantile(boot, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return point, float(low), float(high)


def _seq_kl(df: pd.DataFrame) -> pd.DataFrame:
    """KL summed per context (rows) and intervention (columns)."""
    return metrics.seq_sums(df, "kl", ["intervention"]).pivot(index="seq", columns="intervention", values="sum")


def gap_table(df: pd.DataFrame, baselines_=BASELINES, *, seed: int = 0) -> pd.DataFrame:
    """Per hook and baseline: the SAE's KL over the baseline's (token means, 95% paired bootstrap CI over
    contexts), both means, and the share of the SAE's gap to eps-random the baseline accounts for.

    Columns: hook, layer, baseline, ratio, ci_low, ci_high, num (the SAE's mean KL), den (the baseline's),
    share_of_gap with its 95% bootstrap CI over contexts (`share_ci`: the baseline's ratio and eps-random's
    resampled together), share_ci_low, share_ci_high."""
    rows = []
    for b in baselines_:
        t = metrics.ratio_table(df, "sae", b, values=("kl",), by=("hook", "layer"), seed=seed)
        rows.append(t.assign(baseline=b))
    out = pd.concat(rows, ignore_index=True)
    shares = {}
    for hook, sub in df.groupby("hook", observed=True):
        sums = _seq_kl(sub)
        for b in baselines_:
            cols = sums[["sae", "eps_random", b]].to_numpy().T
            shares[(hook, b)] = share_ci(cols, lambda t: _shares(t[0] / t[1], t[0] / t[2]), seed=seed)
    cis = [shares[(h, b)] for h, b in zip(out.hook, out.baseline, strict=True)]
    out["share_of_gap"], out["share_ci_low"], out["share_ci_high"] = zip(*cis, strict=True)
    out["hook"] = out["hook"].astype(str)
    return out[["hook", "layer", "baseline", "ratio", "ci_low", "ci_high", "num", "den", "share_of_gap",
                "share_ci_low", "share_ci_high"]]


def split_table(loaded: Loaded, fitted: baselines.Fitted, df: pd.DataFrame, tokens: torch.Tensor, *,
                seed: int = 0) -> pd.DataFrame:
    """Engels et al.'s split per hook: how much of the error e = x - x_sae is linear in x (R^2 of x A + b on
    the fit contexts and on the evaluation ones, the linear part's share of |e|^2, and the R^2 of |e| predicted
    linearly from x), and what each part does when spliced: the KL of x_sae + the linear part (error n left)
    and of x_sae + n (linear part left), each against eps-random at its own error size (ratio, 95% CI).

    Columns: hook, layer, r2_fit, r2_eval, linear_norm_share, norm_r2, error_norm, linear_error_norm,
    nonlinear_error_norm, then per part (linear / nonlinear restored): kl, kl_eps, ratio, ci_low, ci_high; and
    nonlinear_only_share (ci_low, ci_high): the share of the SAE's gap to eps-random on the same contexts that
    restoring the linear part accounts for (`share_of_gap` of the nonlinear error's ratio, 95% bootstrap CI)."""
    rows = []
    for hook in df["hook"].cat.categories:
        f = fitted.hooks[hook]
        x, _, x_sae, _ = activations(loaded, hook, tokens)  # as the fit computed them
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
            row.update({f"{part}_restored_kl": r.num, f"{part}_restored_kl_eps": r.den,
                        f"{part}_restored_ratio": r.ratio, f"{part}_restored_ci_low": r.ci_low,
                        f"{part}_restored_ci_high": r.ci_high})
        row["kl_sae"] = float(sub[sub.intervention == "sae"].kl.mean())
        cols = _seq_kl(sub)[["sae", "eps_random", "sae_plus_linear", "eps_random_like(sae_plus_linear)"]]
        share, low, high = share_ci(cols.to_numpy().T, lambda t: _shares(t[0] / t[1], t[2] / t[3]), seed=seed)
        row.update(nonlinear_only_share=share, nonlinear_only_share_ci_low=low, nonlinear_only_share_ci_high=high)
        rows.append(row)
    return pd.DataFrame(rows)


def robustness_table(df: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """The robustness curves: mean KL (95% CI over contexts) of theta-random at the true norm per cosine to x,
    and the SAE's own point (its mean cosine to x, its mean KL) and theta-random at the SAE's cosine, on the
    contexts the curves were measured on (`measure_baselines`' `n_robustness_contexts`).

    Columns: hook, layer, series, cos, mean, ci_low, ci_high, n_contexts."""
    theta = df[df.intervention.astype(str).str.startswith("theta_random_cos")].copy()
    theta["cos"] = theta.intervention.astype(str).str.extract(r"cos=([-\d.]+)")[0].astype(float)
    curve = metrics.mean_table(theta, "kl", by=("hook", "layer", "cos"), seed=seed).assign(series="theta_random_cos")
    seqs = theta.seq.unique() if len(theta) else df.seq.unique()
    points = []
    for name in ("sae", "theta_random_sae_norm"):
        sub = df[(df.intervention == name) & df.seq.isin(seqs)]
        m = metrics.mean_table(sub, "kl", by=("hook", "layer"), seed=seed)
        m["cos"] = m.hook.map(sub.groupby("hook", observed=True).cos_sae.mean())
        points.append(m.assign(series=name))
    out = pd.concat([curve, *points], ignore_index=True).assign(n_contexts=len(seqs))
    out["hook"] = out["hook"].astype(str)
    return out[["hook", "layer", "series", "cos", "mean", "ci_low", "ci_high", "n_contexts"]]


# ------------------------------------------------------------------------------------------ curvature
def fisher_samples(fisher: int | str) -> int | None:
    """Notebook 09's `fisher` parameter as `curvature.fisher`'s `samples`: "exact" -> None, a positive number of
    draws -> itself; anything else is an error that says what is accepted."""
    if fisher == "exact":
        return None
    if not curvature.is_draw_count(fisher):
        raise ValueError(f"fisher must be 'exact' or a positive number of draws per token, not {fisher!r}")
    return fisher


def curvature_interventions(fitted: baselines.Fitted, scales=SCALES
                            ) -> tuple[list[iv.Intervention], list[iv.Intervention]]:
    """(deterministic splices, random ones) of the curvature study: the SAE and its error scaled down; eps-random
    (also scaled), cov_random and error_shuffled."""
    fixed = [iv.Intervention.of("sae"), *(iv.intervention("sae_scaled", scale=float(s)) for s in scales)]
    random = [iv.Intervention.of("eps_random"), *(iv.intervention("eps_random", scale=float(s)) for s in scales),
              fitted.intervention("cov_random"), fitted.intervention("error_shuffled")]
    return fixed, random


def _patched(loaded: Loaded, hook: str, specs, tokens: torch.Tensor, x: torch.Tensor, position: int,
             n_samples: int, seed: int) -> torch.Tensor:
    """The engine's own patched activations at `position` [n, k, samples, d] for clean activations `x` [n, d]
    there (the same counter-based draws as `measure`)."""
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
                    position: int = 48, n_samples: int = 64, fisher: int | str = "exact", scales=SCALES,
                    top_k=TOP_K, seed: int = 0, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """F per token (`curvature.fisher`, one token per context at `position`, measured there and at the 16 after)
    against what the engine measures in the same single-token mode. `fisher`: "exact", or a number of draws per
    token for the positions after the patched one (F at the patched position stays exact; `curvature.fisher`).

    Returns (splices, per_token). splices: one row per (seq, intervention, sample) with the measured KL (summed
    over the measured positions; `kl_at`: at the patched position), the quadratic model's (`quadratic`,
    `quadratic_at`), the curvature quotient (`quotient`, `quotient_at`), the change's norm, and the share of its
    energy in F's top-k eigenvectors (`fisher_k`) and in the activations' top-k principal components (`pca_k`).
    per_token: hook, layer, seq, tr(F), F's top eigenvalue share and participation ratio, the mean quotient of
    the token's active latents' decoder directions and of all latents', the SAE's z-score and percentile among
    its eps-random draws (summed KL; `_at`: at the patched position only, notebook 03's), eps, cos_sae, l0."""
    fixed, random = curvature_interventions(fitted, scales)
    kw = dict(positions=position, seed=seed, progress=progress)
    measured = pd.concat([_span_kl(measure_cached(loaded, hook, fixed, tokens, **kw), position, fitted),
                          _span_kl(measure_cached(loaded, hook, random, tokens, n_samples=n_samples, **kw),
                                   position, fitted)], ignore_index=True)
    curv = curvature.fisher(loaded, hook, tokens, position, samples=fisher_samples(fisher), seed=seed,
                            progress=progress)
    rows = torch.tensor(curv.seqs)
    x = clean_activations(loaded.model, hook, tokens[:, :position + 1])[:, position]  # [n, d]
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
        "fisher": "exact" if curv.samples is None else f"exact at the patched position, {curv.samples} draws after",
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
    the summed ones), with CIs; curvature_share (ci_low, ci_high): log(quadratic ratio) / log(measured ratio), the
    share of the measured gap on these tokens the quadratic model accounts for (95% bootstrap CI over tokens)."""
    rows = []
    for hook, sp in splices.groupby("hook", sort=False):
        tok = per_token[per_token.hook == hook]
        sae = sp[sp.intervention == "sae"].set_index("seq").sort_index()
        eps = sp[sp.intervention == "eps_random"].groupby("seq")[["kl", "quadratic"]].mean().loc[sae.index]
        row = {"hook": hook, "layer": int(sp.layer.iloc[0]), "n_tokens": len(sae), "fisher": tok.fisher.iloc[0]}
        for name, col in (("measured", "kl"), ("quadratic", "quadratic")):
            r, lo, hi = metrics.ratio_ci(sae[col].to_numpy(), eps[col].to_numpy(), seed=seed)
            row.update({f"{name}_ratio": r, f"{name}_ci_low": lo, f"{name}_ci_high": hi})
        # the quadratic model's share of the measured (log) gap: log(quadratic ratio) / log(measured ratio)
        cols = np.stack([sae.kl.to_numpy(), eps.kl.to_numpy(), sae.quadratic.to_numpy(), eps.quadratic.to_numpy()])
        share, low, high = share_ci(cols, lambda t: _shares(t[0] / t[1], (t[0] / t[1]) / (t[2] / t[3])), seed=seed)
        row.update(curvature_share=share, curvature_share_ci_low=low, curvature_share_ci_high=high)
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
            row.update({f"rho_z_quotient_{name}": rho, f"rho_z_quotient_{name}_ci_low": lo,
                        f"rho_z_quotient_{name}_ci_high": hi})
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
    of the SAE's gap to eps-random it accounts for (module docstring), each share with its 95% bootstrap CI and
    read against the ratio measured on the same tokens in the same mode: the baselines' and the linear part's
    against the all-token ratio on the evaluation contexts (`gap_table`, `split_table`: the nonlinear error n
    alone, x_sae + the linear part, against eps-random at |n|), curvature's against the single-token ratio on the
    curvature tokens (`curvature_summary`: the quadratic model's predicted ratio against the measured one). Shares
    are per layer: they are never averaged over layers. `note` says what a share outside [0, 1] means.

    Columns: hook, layer, explanation, mode, ratio_eps, ratio_left, share_of_gap, share_ci_low, share_ci_high,
    note."""
    rows = []
    names = {"cov_random": "anisotropy (cov_random)", "error_shuffled": "error directions in general (error_shuffled)",
             "theta_random_sae_norm": "cosine to x (theta-random)"}
    for hook, g in gap.groupby("hook", sort=False):
        g = g.set_index("baseline")
        r_eps = g.loc["eps_random", "ratio"]
        layer = int(g.layer.iloc[0])
        for b, label in names.items():
            rows.append({"hook": hook, "layer": layer, "explanation": label, "mode": "all-token", "ratio_eps": r_eps,
                         "ratio_left": g.loc[b, "ratio"], "share_of_gap": g.loc[b, "share_of_gap"],
                         "share_ci_low": g.loc[b, "share_ci_low"], "share_ci_high": g.loc[b, "share_ci_high"],
                         "note": share_note(g.loc[b, "share_of_gap"], "baseline")})
        s = split[split.hook == hook].iloc[0]
        # with the linear part restored only n is left: is n still worse than a random error of its size?
        rows.append({"hook": hook, "layer": layer, "explanation": "nonlinear error only (linear part restored)",
                     "mode": "all-token", "ratio_eps": r_eps, "ratio_left": s.linear_restored_ratio,
                     "share_of_gap": s.nonlinear_only_share, "share_ci_low": s.nonlinear_only_share_ci_low,
                     "share_ci_high": s.nonlinear_only_share_ci_high,
                     "note": share_note(s.nonlinear_only_share, "nonlinear")})
        c = summary[summary.hook == hook]
        if len(c):
            c = c.iloc[0]
            rows.append({"hook": hook, "layer": layer, "explanation": "curvature (quadratic model, single-token)",
                         "mode": "single-token", "ratio_eps": c.measured_ratio,
                         "ratio_left": c.measured_ratio / c.quadratic_ratio, "share_of_gap": c.curvature_share,
                         "share_ci_low": c.curvature_share_ci_low, "share_ci_high": c.curvature_share_ci_high,
                         "note": share_note(c.curvature_share, "curvature")})
    return pd.DataFrame(rows)


def largest_share(shares: pd.DataFrame) -> str:
    """Which explanation accounts for the largest share at one layer (`accounting`'s rows there): named only where
    its CI clears every other's, else "not separated" with those it overlaps."""
    est = shares.set_index("explanation")
    top, others = rd.largest(est.share_of_gap, est.share_ci_low, est.share_ci_high)
    if not others:
        return f"largest: {top} (its CI clears every other's)"
    return f"not separated: {top} and {', '.join(others)} (overlapping CIs)"


def share_claims(account: pd.DataFrame) -> list[dict]:
    """Per layer, each explanation's share of the gap with its 95% CI, the ratio and mode it is read against, what a
    share outside [0, 1] means, and the largest (or "not separated")."""
    rows = []
    for layer, shares in account.groupby("layer", sort=True):
        parts = []
        for r in shares.itertuples():
            note = f"; {r.note}" if r.note else ""
            parts.append(f"{r.explanation} {r.share_of_gap:.0%} [{r.share_ci_low:.0%}, {r.share_ci_high:.0%}] "
                         f"(of {r.ratio_eps:.2f}x, {r.mode}{note})")
        rows.append(rd.claim(f"layer {layer}: the share of the SAE's gap to eps-random each explanation accounts for "
                             "(95% CIs)", "; ".join(parts) + "; " + largest_share(shares)))
    return rows


def share_note(share: float, kind: str) -> str:
    """What a share of the gap outside [0, 1] means, for a baseline, the nonlinear error alone or the quadratic
    model ("" inside [0, 1]; a share is never "all of the gap and more")."""
    if share != share:
        return "no gap to account for (ratio to eps-random 1)"
    if 0 <= share <= 1:
        return ""
    above = {"baseline": "the baseline is more harmful than the SAE itself (ratio left below 1)",
             "nonlinear": "the nonlinear error alone is less harmful than eps-random at its size (ratio left below 1)",
             "curvature": "the quadratic model predicts a larger ratio than the one measured (it over-predicts)"}
    below = {"baseline": "the baseline is less harmful than eps-random (the SAE is further above it)",
             "nonlinear": "the nonlinear error alone is worse, relative to eps-random, than the whole error",
             "curvature": "the quadratic model predicts the SAE's error less harmful than eps-random"}
    return (above if share > 1 else below)[kind]


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


# ------------------------------------------------------------------------------- notebook 09's frames
CAPTIONS = {
    "gap_by_baseline": "The SAE splice's mean KL over each random baseline's at the same distance (all-token mode; "
                       "95% paired bootstrap CIs over contexts): isotropic (eps-random), shaped by the activations' "
                       "covariance (cov-random), another token's SAE-error direction (shuffled), and theta-random at "
                       "the SAE's cosine.",
    "linear_nonlinear": "The SAE with its error's linear part restored (only the nonlinear part n left) and with n "
                        "restored (only the linear part left), each against eps-random at its own error size (95% "
                        "CIs).",
    "linear_nonlinear_table": "The linear fit's R^2 (fit and evaluation tokens), the linear part's share of |e|^2, the "
                              "R^2 of |e| predicted linearly from x, mean error norms, and mean KLs of the splices.",
    "robustness_curves": "Mean KL (95% CIs over contexts) of random directions at a fixed cosine to x (true norm) per "
                         "layer, with the SAE splice's point and theta-random at the SAE's cosine and norm, on the "
                         "same contexts (`n_robustness_contexts`).",
    "quadratic_vs_measured": "Measured KL (summed over the patched position and the 16 after) against the quadratic "
                             "model's, per splice: the SAE's error, eps-random and cov-random draws (4 per token "
                             "shown); dashed: y = x.",
    "quadratic_fit": "Measured over quadratic-model KL (ratio of token means, 95% CIs) for the SAE's error and "
                     "eps-random at 1/4, 1/2 and all of their size: 1 where the KL is quadratic in the change.",
    "curvature_quotients": "Mean curvature quotient d^T F d / (|d|^2 tr(F) / d_model) (95% CIs over tokens) of each "
                           "splice's change and of unit decoder directions; a uniformly random direction's is 1.",
    "energy_in_top_directions": "Share of each change's energy in the top-k eigenvectors of F (per token) and in "
                                "the top-k principal components of the activations (held-in tokens); eps-random's "
                                "is k / d.",
    "predicted_vs_measured_ratio": "The SAE / eps-random KL ratio on the curvature tokens, measured and predicted by "
                                   "the quadratic model (95% paired bootstrap CIs over tokens).",
    "z_vs_quotient": "Per token: the SAE splice's z-score among its eps-random draws at the patched position (notebook "
                     "03's) against the curvature quotient of its error under that position's Fisher information.",
    "accounting": "Per layer and explanation: the SAE's ratio left once the explanation is taken into account, and the "
                  "share of the log gap to eps-random it accounts for.",
}
"""Notebook 09's figure and table captions, by name."""


def energy_panels(splices: pd.DataFrame) -> pd.DataFrame:
    """`energy_curves` with a panel per basis and layer ("Fisher top-k, layer L")."""
    energy = energy_curves(splices)
    return energy.assign(panel=energy.basis + " top-k, layer " + energy.layer.astype(str))


def fit(loaded: Loaded, hooks, n_contexts: int, exclude: list[torch.Tensor], *, seed: int = 0
        ) -> tuple[baselines.Fitted, torch.Tensor]:
    """The fitted baselines (`baselines.fit`: covariance, error bank, linear part; cached) on `n_contexts` held-in
    contexts disjoint from every context in `exclude`, and those contexts."""
    fit_tokens = loaded.tokens_excluding(n_contexts, torch.cat(exclude))
    return baselines.fit(loaded, hooks, fit_tokens, baselines.BaselineConfig(seed=seed)), fit_tokens


def with_panel(df: pd.DataFrame) -> pd.DataFrame:
    """The frame with a column panel, "layer L" (one figure panel per layer)."""
    return df.assign(panel="layer " + df.layer.astype(str))


def split_parts(split: pd.DataFrame) -> pd.DataFrame:
    """`split_table`'s two splices in long form: per layer and splice, the ratio to eps-random at its own size (CI)."""
    return pd.concat([
        split.assign(splice="sae_plus_linear", ratio=split.linear_restored_ratio, ci_low=split.linear_restored_ci_low,
                     ci_high=split.linear_restored_ci_high),
        split.assign(splice="sae_plus_nonlinear", ratio=split.nonlinear_restored_ratio,
                     ci_low=split.nonlinear_restored_ci_low, ci_high=split.nonlinear_restored_ci_high),
    ])[["layer", "splice", "ratio", "ci_low", "ci_high"]]


def split_shown(split: pd.DataFrame) -> pd.DataFrame:
    """`split_table`'s fit quality, error norms and mean KLs (the table beside the figure)."""
    return split[["layer", "r2_fit", "r2_eval", "linear_norm_share", "norm_r2", "error_norm", "linear_error_norm",
                  "nonlinear_error_norm", "kl_sae", "linear_restored_kl", "nonlinear_restored_kl"]]


def curvature_studies(loaded: Loaded, hooks, tokens: torch.Tensor, fitted: baselines.Fitted, *, position: int = 48,
                      n_samples: int = 64, fisher: int | str = "exact", seed: int = 0
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`curvature_study` at every hook, concatenated: (splices, per_token)."""
    runs = [curvature_study(loaded, hook, tokens, fitted, position=position, n_samples=n_samples, fisher=fisher,
                            seed=seed) for hook in hooks]
    return pd.concat([r[0] for r in runs], ignore_index=True), pd.concat([r[1] for r in runs], ignore_index=True)


def quadratic_points(splices: pd.DataFrame, n_samples: int = 4) -> pd.DataFrame:
    """The SAE's, eps-random's and cov-random's splices (the first `n_samples` draws of each token): measured KL
    against the quadratic model's, with a panel per layer."""
    shown = splices[splices.intervention.isin(["sae", "eps_random", "cov_random"]) & (splices["sample"] < n_samples)]
    return with_panel(shown[["layer", "seq", "intervention", "sample", "quadratic", "kl"]])


def predicted_vs_measured(summary: pd.DataFrame) -> pd.DataFrame:
    """Per layer, the single-token SAE / eps-random ratio measured and predicted by the quadratic model (CIs)."""
    return pd.concat([
        summary.assign(which="measured", ratio=summary.measured_ratio, ci_low=summary.measured_ci_low,
                       ci_high=summary.measured_ci_high),
        summary.assign(which="quadratic model", ratio=summary.quadratic_ratio, ci_low=summary.quadratic_ci_low,
                       ci_high=summary.quadratic_ci_high),
    ])[["layer", "which", "ratio", "ci_low", "ci_high"]]


def z_quotients(per_token: pd.DataFrame) -> pd.DataFrame:
    """Per token: the SAE's z-score among its eps-random draws and its error's curvature quotient (at the patched
    position, and summed over the measured ones), with a panel per layer."""
    return with_panel(per_token[["layer", "seq", "quotient_sae_at", "z_at", "quotient_sae", "z"]])


def rho_notes(summary: pd.DataFrame) -> dict:
    """Per layer panel: Spearman's rho of the SAE's z-score with its curvature quotient at the patched position."""
    return {f"layer {r.layer}": f"Spearman rho {r.rho_z_quotient_at:.2f} [{r.rho_z_quotient_at_ci_low:.2f}, "
                                f"{r.rho_z_quotient_at_ci_high:.2f}]" for r in summary.itertuples()}


def readings(gap: pd.DataFrame, split: pd.DataFrame, summary: pd.DataFrame, account: pd.DataFrame) -> pd.DataFrame:
    """Notebook 09's verdicts, from `gap_table`, `split_table`, `curvature_summary` and `accounting`. A share of
    the gap outside [0, 100%] is said to be one (a baseline more harmful than the SAE, or less than eps-random)."""
    g = gap.set_index(["layer", "baseline"])
    s, c = split.set_index("layer"), summary.set_index("layer")
    layers = list(s.index)

    def ratio(layer: int, baseline: str) -> str:  # the SAE over a baseline, its CI and the share of the gap
        r = g.loc[(layer, baseline)]
        return f"{r.ratio:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] ({rd.share(r.share_of_gap)})"

    cov_not_worse = [layer for layer in layers if g.loc[(layer, "cov_random"), "ci_low"] <= 1]
    k = int(c.top_k.iloc[0])
    per = lambda col, fmt="{:.2f}": ", ".join(fmt.format(c[col][layer]) for layer in layers)  # noqa: E731
    not_quadratic = (c.fit_sae > 1.1 * c.fit_eps_random).all()
    rows = [rd.claim(
        f"layer {layer}: the SAE's KL against each baseline at its distance (share of the gap to eps-random)",
        f"/ eps-random {g.loc[(layer, 'eps_random'), 'ratio']:.2f} [{g.loc[(layer, 'eps_random'), 'ci_low']:.2f}, "
        f"{g.loc[(layer, 'eps_random'), 'ci_high']:.2f}], / cov-random {ratio(layer, 'cov_random')}, / shuffled error "
        f"{ratio(layer, 'error_shuffled')}, / theta-random {ratio(layer, 'theta_random_sae_norm')}")
        for layer in layers]
    rows.append(rd.claim("the SAE is no more harmful than cov-random (CI reaching 1 or below) at every layer",
                         f"CI reaching 1 or below at layers {cov_not_worse or 'none'} of {layers}",
                         holds=len(cov_not_worse) == len(layers),
                         published=literature.LEE_HEIMERSHEIM_COV.value + " (Lee & Heimersheim 2024)"))
    rows += [rd.claim(
        f"layer {layer}: the error's linear part (x A + b)",
        f"explains {s.r2_eval[layer]:.0%} of its variance on the evaluation tokens ({s.r2_fit[layer]:.0%} on the fit "
        f"ones), |e| predicted with R^2 {s.norm_r2[layer]:.2f}; the nonlinear error alone is "
        f"{s.linear_restored_ratio[layer]:.2f}x [{s.linear_restored_ci_low[layer]:.2f}, "
        f"{s.linear_restored_ci_high[layer]:.2f}] eps-random at its size, the linear part alone "
        f"{s.nonlinear_restored_ratio[layer]:.2f}x [{s.nonlinear_restored_ci_low[layer]:.2f}, "
        f"{s.nonlinear_restored_ci_high[layer]:.2f}]",
        published=f"about {literature.ENGELS_VARIANCE.value:.0%} of the variance, R^2 > "
                  f"{literature.ENGELS_NORM_R2.value} for the norm (Engels et al. 2024)") for layer in layers]
    rows += share_claims(account)
    rows += [
        rd.claim(f"the SAE error's curvature quotient (cov-random's, decoder directions of active latents'; F "
                 f"{c.fisher.iloc[0] if 'fisher' in c else 'exact'})",
                 f"{per('quotient_sae')} ({per('quotient_cov_random')}; {per('quotient_decoder_active')}); its energy "
                 f"in F's top {k} eigenvectors {per(f'fisher_{k}_sae', '{:.0%}')} against eps-random's "
                 f"{per(f'fisher_{k}_eps_random', '{:.0%}')}, in the top {k} principal components "
                 f"{per(f'pca_{k}_sae', '{:.0%}')}"),
        rd.claim("the SAE's z-score goes with its curvature quotient (Spearman rho's CI above 0) at every layer",
                 ", ".join(f"{c.rho_z_quotient_at[layer]:.2f} [{c.rho_z_quotient_at_ci_low[layer]:.2f}, "
                           f"{c.rho_z_quotient_at_ci_high[layer]:.2f}]" for layer in layers),
                 holds=(c.rho_z_quotient_at_ci_low > 0).all()),
        rd.claim("the quadratic model fits eps-random draws but not the SAE's error (its measured / predicted KL more "
                 "than 1.1 times eps-random's at every layer): the SAE's excess KL comes from higher-order terms",
                 f"measured / predicted: eps-random {per('fit_eps_random')}, the SAE {per('fit_sae')}; quadratic-model "
                 f"ratio {per('quadratic_ratio')} against {per('measured_ratio')} measured", holds=not_quadratic),
    ]
    return rd.frame(rows)
