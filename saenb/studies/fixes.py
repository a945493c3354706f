"""Notebook 08: the pathology ratio of many SAEs at one hook, and of each proposed fix, on one footing.

    table = fixes.evaluate(loaded, saes.sets.get("fixes"), tokens, fit_tokens=...)

Every SAE is measured the same way, on the same evaluation contexts, by the engine (`store.measure_cached`,
all-token splices, special tokens excluded): the SAE splice and eps-random at its error size (the pathology
ratio, with a paired bootstrap CI over contexts), the splice of the error's part orthogonal to x and a random
direction orthogonal to x at that part's size (the ratio without the shrinkage along x that a following
LayerNorm largely undoes), CE deltas, and sae_lens's ce_loss_score against zero ablation (measured once per
hook). Reconstruction figures (explained variance, L0, the error's energy along x, ||x_sae|| / ||x||) come
from the SAE on the same tokens. The NFM of seed 003 and its linear part (a linear adapter x_sae + A z) are
fixes that are not SAEs: they are measured as interventions on the base SAE (`saenb.studies.nfm`), against eps-random
at their own error size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from saenb import saes
from saenb.engine import metrics
from saenb.engine.patching import hook_activations
from saenb.engine.store import measure_cached
from saenb.models.presets import Loaded
from saenb.saes.sets import NamedSpec
from saenb.studies import nfm

SPLICES = ("sae", "eps_random", "sae_orthogonal", "eps_random_orthogonal")
NFM_FIXES = {"NFM": "both", "linear adapter": "linear"}
"""Fixes that are interventions on the base SAE: name -> `nfm.NFMConfig.variant`."""

REFERENCES = {
    "braun_ce_delta": {"local": 0.228, "e2e": 0.099, "e2e+ds": 0.124},
    "braun_ratio": {"local (L0 43)": 2.39, "local (L0 513)": 0.80, "e2e+ds": 0.2, "e2e": 0.01},
    "karvonen_ce_gap_cut": (0.20, 0.50),
    "wright_sharkey_ppl_cut": 0.24,
    "seed003_nfm_kl_cut": 0.30,
}
"""Published figures the notebook prints beside its own: Braun et al. 2024 Table 3 (GPT-2 small layer 6,
L0 about 40: CE delta) and the SAE / eps-random KL ratio on their SAEs; Karvonen 2025 (KL + MSE fine-tuning
cuts the CE-delta gap 20-50%); Wright & Sharkey (the suppression fine-tune cuts the perplexity increase 24%,
Pythia-70M); seed 003 (the NFM cuts KL 30%)."""


def describe(named: list[NamedSpec]) -> pd.DataFrame:
    """One row per declared SAE: name, group, key and the spec's fields that vary in the sweep."""
    rows = []
    for n in named:
        s = n.spec
        rows.append({"name": n.name, "group": n.group, "key": s.key, "architecture": s.architecture,
                     "objective": s.objective, "finetune": s.finetune.kind if s.finetune else "",
                     "expansion": s.expansion, "knob": s.knob, "sparsity": s.sparsity,
                     "training_tokens": s.training_tokens})
    return pd.DataFrame(rows)


def reconstruction(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """Explained variance (1 - SSE / SST about the mean), the share of the error's energy along x
    (sum (e . x^)^2 / sum |e|^2) and the mean norm ratio ||x_hat|| / ||x|| (below 1: shrinkage)."""
    e = x_hat - x
    x_unit = x / x.norm(dim=-1, keepdim=True)
    along = (e * x_unit).sum(-1)
    return {"explained_variance": metrics.explained_variance(x, x_hat),
            "error_along_x": float(along.square().sum() / e.square().sum()),
            "norm_ratio": float((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean())}


def _ratio(df: pd.DataFrame, num: str, den: str, value: str, seed: int) -> dict[str, float]:
    r = metrics.ratio_table(df, num, den, values=(value,), by=("hook",), seed=seed).iloc[0]
    return {"ratio": r["ratio"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "num": r["num_mean"],
            "den": r["den_mean"]}


def _row(df: pd.DataFrame, num: str, den: str, ce_zero: float, seed: int, orthogonal: bool) -> dict[str, Any]:
    kl = _ratio(df, num, den, "kl", seed)
    ce = _ratio(df, num, den, "ce_delta", seed)
    sub = df[df.intervention == num]
    row = {"l0": sub["l0"].mean(), "kl": kl["num"], "kl_eps_random": kl["den"], "ratio": kl["ratio"],
           "ratio_low": kl["ci_low"], "ratio_high": kl["ci_high"], "ce_delta": ce["num"],
           "ce_delta_eps_random": ce["den"],
           "ce_loss_score": metrics.ce_loss_score(sub["ce_clean"].mean(), sub["ce_patched"].mean(), ce_zero),
           "n_tokens": len(sub)}
    if orthogonal:
        o = _ratio(df, "sae_orthogonal", "eps_random_orthogonal", "kl", seed)
        row.update(ratio_orthogonal=o["ratio"], orthogonal_low=o["ci_low"], orthogonal_high=o["ci_high"],
                   kl_orthogonal=o["num"])
    return row


def evaluate(loaded: Loaded, named: list[NamedSpec], tokens: torch.Tensor, *, fit_tokens: torch.Tensor | None = None,
             nfm_cfg: nfm.NFMConfig = nfm.NFMConfig(), seed: int = 0, train: bool = False,
             progress: bool = True) -> pd.DataFrame:
    """One row per SAE of `named` (all at one hook) and, with `fit_tokens`, per NFM fix of the base SAE (the set's
    "base" entry; trained on `fit_tokens`). SAEs not stored anywhere are trained when `train`, else an error
    names the command that trains them.

    Columns: name, group, key, base (the SAE a fix starts from, else ""), l0, explained_variance,
    error_along_x, norm_ratio, kl, kl_eps_random, ratio, ratio_low, ratio_high, ce_delta, ce_delta_eps_random,
    ce_loss_score, ratio_orthogonal, orthogonal_low, orthogonal_high, kl_orthogonal, n_tokens, and the spec's
    fields (`describe`)."""
    hooks = {n.spec.hook for n in named}
    if len(hooks) != 1:
        raise ValueError(f"fixes.evaluate compares SAEs at one hook; got {sorted(hooks)}")
    hook = hooks.pop()
    missing = [n.name for n in named if saes.find(n.spec) is None]
    if missing and not train:
        raise saes.SpecError(f"SAEs {missing} are stored nowhere: train them with `python -m saenb.saes build "
                             "--set fixes` (or pass train=True)")
    zero = measure_cached(loaded, [hook], ["zero"], tokens, seed=seed, progress=False)
    ce_zero = zero["ce_patched"].mean()
    x = hook_activations(loaded, hook, tokens)
    base_names = {n.spec.key: n.name for n in named if n.spec.finetune is None}
    rows = []
    for n in tqdm(named, desc="SAEs", disable=not progress):
        sae = saes.load(n.spec, loaded.device, progress=progress)
        spliced = loaded.with_saes({hook: sae}, {hook: n.spec.key})
        df = measure_cached(spliced, [hook], SPLICES, tokens, seed=seed, progress=False)
        with torch.no_grad():
            x_hat = sae.decode(sae.encode(x.to(loaded.device))).cpu()
        base = base_names.get(n.spec.base.key, "") if n.spec.finetune is not None else ""
        rows.append({"name": n.name, "group": n.group, "key": n.spec.key, "base": base,
                     **reconstruction(x, x_hat), **_row(df, "sae", "eps_random", ce_zero, seed, orthogonal=True)})
    if fit_tokens is not None:
        base = next(n for n in named if n.name == "base")
        base_loaded = loaded.with_saes({hook: saes.load(base.spec, loaded.device)}, {hook: base.spec.key})
        for name, variant in NFM_FIXES.items():
            trained = nfm.fit(base_loaded, [hook], fit_tokens, dataclasses.replace(nfm_cfg, variant=variant),
                              progress=progress)
            df = measure_cached(base_loaded, [hook], [trained.spec, trained.eps_spec], tokens, seed=seed,
                                progress=False)
            sae = base_loaded.saes[hook]
            with torch.no_grad():
                z = sae.encode(x.to(loaded.device))
                x_hat = (sae.decode(z) + trained.models[hook](z)).cpu()
            rows.append({"name": name, "group": "fix", "key": trained.key, "base": "base",
                         **reconstruction(x, x_hat),
                         **_row(df, trained.spec.label, trained.eps_spec.label, ce_zero, seed, orthogonal=False)})
    table = pd.DataFrame(rows)
    return table.merge(describe(named).drop(columns=["group", "key"]), on="name", how="left")


def fix_effects(table: pd.DataFrame) -> pd.DataFrame:
    """Each fix against its base SAE: relative change of KL, of the ratio, of the CE-delta gap to eps-random
    (ce_delta - ce_delta_eps_random), of the MSE (1 - explained variance) and of L0; and its ratio against the
    ReLU + L1 sweep's at the same L0 (`l1_curve_ratio`: interpolated linearly in log L0), since a fix that moves
    L0 moves along that curve too."""
    import numpy as np

    by_name = table.set_index("name")
    curve = table[table.group == "l1"].sort_values("l0")
    rows = []
    for _, fix in table[table.base != ""].iterrows():
        b = by_name.loc[fix.base]
        gap, base_gap = fix.ce_delta - fix.ce_delta_eps_random, b.ce_delta - b.ce_delta_eps_random
        rows.append({"fix": fix["name"], "base": fix.base, "kl_change": fix.kl / b.kl - 1,
                     "ratio_change": fix.ratio / b.ratio - 1, "ce_delta_change": fix.ce_delta / b.ce_delta - 1,
                     "ce_gap_change": gap / base_gap - 1 if base_gap != 0 else float("nan"),
                     "mse_change": (1 - fix.explained_variance) / (1 - b.explained_variance) - 1,
                     "l0_change": fix.l0 / b.l0 - 1,
                     "l1_curve_ratio": float(np.interp(np.log(fix.l0), np.log(curve.l0), curve.ratio))
                     if len(curve) > 1 else float("nan")})
    out = pd.DataFrame(rows)
    if len(out):
        out["ratio_vs_curve"] = out.fix.map(by_name.ratio) / out.l1_curve_ratio - 1
    return out


def dose_response(table: pd.DataFrame, groups=("l1", "topk", "batchtopk", "jumprelu", "gated", "e2e", "e2e_ds")
                  ) -> pd.DataFrame:
    """Spearman correlation of the ratio with L0 within each architecture group (scipy.stats.spearmanr), and
    the ratio at that group's lowest and highest L0."""
    from scipy import stats

    rows = []
    for group in groups:
        sub = table[table.group == group].sort_values("l0")
        if len(sub) < 2:
            continue
        rho = stats.spearmanr(sub.l0, sub.ratio).statistic if len(sub) > 2 else float("nan")
        rows.append({"group": group, "n": len(sub), "l0_low": sub.l0.iloc[0], "l0_high": sub.l0.iloc[-1],
                     "ratio_at_low_l0": sub.ratio.iloc[0], "ratio_at_high_l0": sub.ratio.iloc[-1],
                     "spearman_ratio_l0": rho})
    return pd.DataFrame(rows)
