"""The pathology score: how much more an SAE splice moves the next-token distribution than a random error
of the same size. `saenb.score(loaded)`, `saenb.score(model, {hook: sae}, tokens)` or
`python -m saenb score --preset tiny-stdlib`.
"""

from __future__ import annotations

import math

import pandas as pd

from saenb.assembly import from_model
from saenb.checks import UsageError, positive_int
from saenb.engine import interventions as iv
from saenb.engine import metrics
from saenb.engine.store import measure_cached
from saenb.models.loaded import Loaded

SCORE_INTERVENTIONS = ("sae", "eps_random", "zero")


def score(model, saes: dict | None = None, tokens=None, *, hooks=None, n_tokens: int = 65_536,
          intervention: str | iv.Intervention = "sae", seed: int = 0, confidence: float = 0.95, progress: bool = True,
          extra=(), **measure_kwargs) -> pd.DataFrame:
    """Per SAE: mean KL of the SAE splice and of eps-random (token means), their ratio with a bootstrap CI
    over sequences, the mean CE delta of both, sae_lens's ce_loss_score and kl_div_score (zero ablation as the
    reference), the CE losses behind them, and mean L0.

    `model` is a `Loaded` (`load_preset`; `hooks` picks some of its SAEs), or any HookedTransformer with `saes`,
    `{hook name: SAE}`, and `tokens` (`saenb.assembly.from_model`).

    `intervention` replaces the SAE splice in every column but eps-random's (e.g. an SAE + NFM splice,
    `saenb.studies.nfm.TrainedNFM.intervention`); eps-random stays at the SAE's own error size. `extra`
    interventions are measured too, as columns kl_<label>. All-token mode, BOS excluded; `tokens` (default: `n_tokens` rounded up
    to whole contexts of the preset's held-out set) are the contexts scored.
    """
    if isinstance(model, Loaded) and hooks is None and (isinstance(saes, str) or (
            isinstance(saes, (list, tuple)) and all(isinstance(h, str) for h in saes))):
        saes, hooks = None, saes  # score(loaded, [hook, ...]): hook names, as measure takes them
    if not 0 < confidence < 1:
        raise UsageError(f"confidence={confidence!r} must lie between 0 and 1 (e.g. 0.95)")
    if isinstance(model, Loaded):
        if saes is not None:
            raise TypeError("score(loaded) scores the loaded preset's SAEs: pass hooks= to pick some, or "
                            "score(loaded.model, {hook: sae}, tokens) for other SAEs")
        loaded = model
    else:
        if tokens is None:
            raise ValueError("score(model, saes, tokens): a model without a preset has no held-out contexts; pass "
                             "tokens, an integer tensor [n_contexts, n_ctx] with BOS first")
        loaded = from_model(model, saes, n_ctx=tokens.shape[1])
    if tokens is None:
        n_ctx = loaded.preset.n_ctx
        n = math.ceil(positive_int("n_tokens", n_tokens, f" (tokens scored, in contexts of {n_ctx})") / n_ctx)
        if n < 2:
            raise UsageError(f"n_tokens={n_tokens} gives {n} context of {n_ctx} tokens: the bootstrap CI over contexts "
                             f"needs at least two; pass n_tokens={2 * n_ctx} or more, or tokens")
        tokens = loaded.tokens(n)
    elif len(tokens) < 2:
        raise UsageError(f"tokens holds {len(tokens)} context(s): the bootstrap CI over contexts needs at least two")
    num = iv.Intervention.of(intervention)
    extra = [iv.Intervention.of(e) for e in extra
             if iv.Intervention.of(e).label not in (num.label, *SCORE_INTERVENTIONS)]
    interventions = [num, *SCORE_INTERVENTIONS[1:], *extra]  # the splice scored, eps-random, zero ablation, the rest
    df = measure_cached(loaded, hooks, interventions, tokens, seed=seed, progress=progress, **measure_kwargs)
    df["intervention"] = df["intervention"].cat.rename_categories({num.label: "sae"}) if num.label != "sae" \
        else df["intervention"]
    ratios = metrics.ratio_table(df, "sae", "eps_random", values=("kl",), by=("hook",), confidence=confidence,
                                 seed=seed).set_index("hook")
    rows = []
    for hook, sub in df.groupby("hook", observed=True, sort=False):
        by = sub.groupby("intervention", observed=True)
        ce_clean = by["ce_clean"].mean()["sae"]
        ce = by["ce_patched"].mean()
        ce_delta = by["ce_delta"].mean()
        kl = by["kl"].mean()
        sae_rows = sub[sub["intervention"] == "sae"]
        r = ratios.loc[hook]
        rows.append({
            "hook": hook,
            "kl_sae": r["num"],
            "kl_eps_random": r["den"],
            "kl_ratio": r["ratio"],
            "kl_ratio_ci_low": r["ci_low"],
            "kl_ratio_ci_high": r["ci_high"],
            "ce_delta_sae": ce_delta["sae"],
            "ce_delta_eps_random": ce_delta["eps_random"],
            "ce_loss_score": metrics.ce_loss_score(ce_clean, ce["sae"], ce["zero"]),
            "kl_div_score": (kl["zero"] - kl["sae"]) / kl["zero"],
            "kl_zero": kl["zero"],
            "ce_clean": ce_clean,
            "ce_sae": ce["sae"],
            "ce_zero": ce["zero"],
            **{f"kl_{e.label}": kl[e.label] for e in extra},
            "l0": sae_rows["l0"].mean(),
            "n_tokens": len(sae_rows),
        })
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame) -> str:
    shown = table.copy()
    shown["ratio (95% CI)"] = [f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in
                               zip(table.kl_ratio, table.kl_ratio_ci_low, table.kl_ratio_ci_high, strict=True)]
    cols = [*(["name"] if "name" in table else []), "hook", "kl_sae", "kl_eps_random", "ratio (95% CI)",
            "ce_delta_sae", "ce_delta_eps_random", "ce_loss_score", "l0", "n_tokens"]
    return shown[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}")
