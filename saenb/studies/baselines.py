"""Random baselines and error parts fitted on held-in activations (notebook 09): what a fair random error is.

    fitted = baselines.fit(loaded, hooks, fit_tokens)          # one pass over held-in contexts, cached
    measure_cached(loaded, hooks, ["sae", fitted.intervention("cov_random"), ...], eval_tokens)

Per hook, from the activations x of the fit contexts (special tokens excluded) and the SAE's error there:
- the covariance of x (its eigenvectors, the principal components, and their variances): `cov_random`
  draws u ~ N(0, Sigma), scales it to length 1 and splices x + eps * u, a random error shaped like the
  data's own variation at the SAE's distance (the anisotropy objection of seed 001's readers; Lee &
  Heimersheim 2024 built their "cov-random" baseline the same way, from the activations' covariance);
- a bank of unit SAE-error directions (x_sae - x) / eps of held-in tokens: `error_shuffled` splices
  x + eps * one of them drawn at random, so the direction comes from another token of other contexts (the
  evaluation contexts are never in the bank): are SAE-error directions harmful in general, or only for
  the token they belong to?
- the error's linear part (Engels et al. 2024): e = x - x_sae = x A + b + n with A, b by least squares;
  `sae_plus_linear` splices x_sae + (x A + b), leaving only n as error, `sae_plus_nonlinear` splices
  x_sae + n = x - (x A + b), leaving only the linear part. Each has eps-random at its own error size
  (`interventions.eps_random_like`).

The fit is cached under a key of its configuration, preset and fit contexts (`RESULTS`); the interventions
(`saenb.engine.interventions`) carry the fitted parts and name them by that key (as `saenb.studies.nfm`'s NFMs).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from saenb import files
from saenb.engine import interventions as iv
from saenb.engine import store
from saenb.models.loaded import Loaded
from saenb.studies.nfm import activations

RESULTS = files.RESULTS / "baselines"
"""Fitted statistics, one folder per configuration (`SAENB_RESULTS` overrides data/results)."""

INTERVENTIONS = ("cov_random", "error_shuffled", "sae_plus_linear", "sae_plus_nonlinear")
"""The engine's interventions (`saenb.engine.interventions`) a fit carries its parts into."""
TENSORS = ("mean", "components", "variances", "bank", "A", "b")


@dataclass(frozen=True)
class BaselineConfig:
    """Everything that decides a fit but the hook and the fit contexts (the cache key)."""

    bank_size: int = 4096
    """Held-in SAE-error directions kept for `error_shuffled` (fewer when the fit has fewer tokens)."""
    intercept: bool = True
    """Fit e = x A + b + n (True) or e = x A + n."""
    seed: int = 0
    """Which held-in tokens enter the bank."""


@dataclass
class HookFit:
    """What `fit` found at one hook; tensors on the loaded model's device."""

    mean: Float[Tensor, "d"]
    components: Float[Tensor, "d d"]
    """Principal components of x (eigenvectors of the covariance), as columns, by decreasing variance."""
    variances: Float[Tensor, "d"]
    """The covariance's eigenvalues, decreasing (clamped at 0)."""
    bank: Float[Tensor, "bank d"]
    """Unit SAE-error directions (x_sae - x) / ||x_sae - x|| of held-in tokens."""
    A: Float[Tensor, "d d"]
    b: Float[Tensor, "d"]
    info: dict[str, Any]

    def linear_part(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """x A + b: the part of the error e = x - x_sae that is linear in x."""
        return x @ self.A.to(x.dtype) + self.b.to(x.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k).contiguous().cpu() for k in TENSORS}

    def to(self, device: torch.device | str) -> HookFit:
        """The same fit with its tensors on `device`."""
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in TENSORS})


def lstsq(x: Float[Tensor, "n d"], e: Float[Tensor, "n d_out"], intercept: bool = True
          ) -> tuple[Float[Tensor, "d d_out"], Float[Tensor, "d_out"]]:
    """A and b minimising ||e - (x A + b)||^2 (torch.linalg.lstsq in float64, column-pivoted QR)."""
    design = x.double()
    if intercept:
        design = torch.cat([design, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, e.double(), driver="gelsy").solution
    if intercept:
        return solution[:-1], solution[-1]
    return solution, torch.zeros(e.shape[1], dtype=torch.float64)


def r_squared(y: Float[Tensor, "n d"], y_hat: Float[Tensor, "n d"]) -> float:
    """1 - sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 (variance explained, pooled over dimensions)."""
    y, y_hat = y.double(), y_hat.double()
    return float(1 - (y - y_hat).square().sum() / (y - y.mean(0)).square().sum())


def fit_hook(x: Float[Tensor, "n d"], x_sae: Float[Tensor, "n d"], cfg: BaselineConfig) -> HookFit:
    """The covariance, error bank and linear fit of one hook from its held-in activations and reconstructions."""
    x64 = x.double()
    mean = x64.mean(0)
    variances, components = torch.linalg.eigh(torch.cov(x64.T))
    order = variances.argsort(descending=True)
    variances, components = variances[order].clamp_min(0), components[:, order]
    error = x_sae - x
    eps = error.norm(dim=-1)
    usable = (eps > 0).nonzero().squeeze(1)
    g = torch.Generator().manual_seed(cfg.seed)
    pick = usable[torch.randperm(len(usable), generator=g)[:cfg.bank_size]]
    bank = error[pick] / eps[pick, None]
    e = x - x_sae  # the convention of Engels et al.: the error is what the SAE misses
    A, b = lstsq(x, e, cfg.intercept)
    linear = x64 @ A + b
    info = {"fit_tokens": len(x), "bank_size": len(bank), "d": x.shape[1],
            "linear_r2": r_squared(e, linear),
            "linear_norm_share": float(linear.square().sum(-1).mean() / e.double().square().sum(-1).mean()),
            "top_pc_variance_share": float(variances[0] / variances.sum())}
    return HookFit(mean.float(), components.float(), variances.float(), bank.float(), A.float(), b.float(), info)


# ------------------------------------------------------------------------------------------------ fits
@dataclass
class Fitted:
    """Fits of one configuration at some hooks; `intervention(name)` is one of INTERVENTIONS carrying them."""

    key: str
    cfg: BaselineConfig
    hooks: dict[str, HookFit]

    def intervention(self, name: str, **params: Any) -> iv.Intervention:
        if name not in INTERVENTIONS:
            raise ValueError(f"{name!r} is not a fitted baseline; choose from {INTERVENTIONS}")
        return iv.intervention(name, key=self.key, fitted=self.hooks, **params)

    def eps_intervention(self, name: str) -> iv.Intervention:
        """eps-random at the error size of the deterministic splice `name` (sae_plus_linear / sae_plus_nonlinear)."""
        return iv.intervention("eps_random_like", of=name, key=self.key, fitted=self.hooks)

    def labels(self) -> dict[str, str]:
        """The engine's labels of this fit's interventions -> short names for tables and figures."""
        out = {self.intervention(n).label: n for n in INTERVENTIONS}
        out.update({self.eps_intervention(n).label: f"eps_random_like({n})"
                    for n in ("sae_plus_linear", "sae_plus_nonlinear")})
        return out


def fit(loaded: Loaded, hooks, tokens: Tensor, cfg: BaselineConfig = BaselineConfig(), *, root: Path = RESULTS
        ) -> Fitted:
    """Fit every hook on `tokens` (held-in contexts, disjoint from the evaluation ones), or read the fit from
    the cache; each hook is saved as soon as it is fitted (`store.load_or_fit`)."""

    def make(hook: str) -> tuple[HookFit, dict[str, Tensor], dict]:
        t0 = time.time()
        x, _, x_sae, _ = activations(loaded, hook, tokens)
        if len(x) <= x.shape[1]:
            raise ValueError(f"{len(x)} held-in tokens at {hook} cannot fit a {x.shape[1]}-wide covariance and "
                             f"linear map: give more fit contexts (at least {x.shape[1] + 1} tokens)")
        part = fit_hook(x, x_sae, cfg)
        part.info["seconds"] = round(time.time() - t0, 1)
        return part, part.tensors(), part.info

    key, fits, _ = store.load_or_fit(loaded, hooks, "baselines", cfg, tokens, root,
                                     read=lambda hook, t, info: HookFit(**t, info=info), make=make)
    return Fitted(key, cfg, {hook: part.to(loaded.device) for hook, part in fits.items()})
