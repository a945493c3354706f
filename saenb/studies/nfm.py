"""A Neural Factorization Machine over SAE latents (seed 003): predict what the SAE misses from its latents.

    x_hat = x_sae + NFM(z),   NFM(z) = (W z + b)  +  MLP(BI(z)),   BI(z) = 0.5 * ((z V)^2 - (z^2)(V^2))

z are the SAE's latents (`hook_sae_acts_post`), V one embedding per latent (d_sae x d_embed); BI(z) is the
bi-interaction pooling of He & Chua (2017): the sum over latent pairs i < j of (z_i v_i) * (z_j v_j), in
O(d_sae * d_embed). Variants (`NFMConfig.variant`): "both" (seed 003's model), "linear" (the linear term
alone), "interaction" (the bi-interaction MLP alone), and "linear_control": a plain linear map of z (two
stacked linear layers, no nonlinearity) with the parameter budget of "both", so that a gain of "both" over
it is not just extra capacity.

`fit` trains one NFM per hook on held-in contexts with the SAE frozen (minimising ||x - x_hat||^2, Adam,
early stopping on a held-out split of those contexts), caches the weights under a key of its whole
configuration, and returns a `TrainedNFM` whose `intervention` is the engine's `sae_nfm` carrying the NFMs (and
`eps_intervention` its random baseline at its own error size, `nfm_eps_random`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from saenb import files
from saenb.engine import interventions as iv
from saenb.engine import store
from saenb.engine.patching import hook_activations
from saenb.hooks import sae_layer
from saenb.models.data import non_special
from saenb.models.loaded import Loaded

VARIANTS = ("both", "linear", "interaction", "linear_control")
RESULTS = files.RESULTS / "nfm"
"""Trained weights, one folder per configuration (`SAENB_RESULTS` overrides data/results)."""


@dataclass(frozen=True)
class NFMConfig:
    """Everything that decides a trained NFM (the cache key), but the hook and the fit contexts."""

    variant: str = "both"
    """One of VARIANTS."""
    d_embed: int = 16
    """Size of each latent's embedding v_i."""
    d_hidden: int = 64
    """Hidden width of the MLP after the bi-interaction pooling."""
    val_fraction: float = 0.1
    """Share of the fit contexts (the last ones) held out for early stopping."""
    batch_size: int = 1024
    """Tokens per optimiser step."""
    lr: float = 3e-3
    max_epochs: int = 30
    patience: int = 3
    """Stop after this many epochs without a lower held-out error; the best epoch's weights are kept."""
    seed: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS}")
        for name in ("d_embed", "d_hidden", "batch_size", "max_epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must lie in (0, 1)")


def bi_interaction(z: Float[Tensor, "... d_sae"], V: Float[Tensor, "d_sae d_embed"]) -> Float[Tensor, "... d_embed"]:
    """sum_{i<j} (z_i v_i) * (z_j v_j) = 0.5 * ((sum_i z_i v_i)^2 - sum_i (z_i v_i)^2), elementwise in d_embed."""
    return 0.5 * ((z @ V).square() - z.square() @ V.square())


class NFM(nn.Module):
    """NFM(z) for one hook; `parts(z)` gives the linear and interaction terms separately."""

    def __init__(self, d_sae: int, d_model: int, cfg: NFMConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.linear = self.embed = self.mlp = self.control = None
        if cfg.variant in ("both", "linear"):
            self.linear = nn.Linear(d_sae, d_model)
        if cfg.variant in ("both", "interaction"):
            self.embed = nn.Parameter(0.01 * torch.randn(d_sae, cfg.d_embed, generator=generator))
            self.mlp = nn.Sequential(nn.Linear(cfg.d_embed, cfg.d_hidden), nn.ReLU(), nn.Linear(cfg.d_hidden, d_model))
        if cfg.variant == "linear_control":
            width = control_width(d_sae, d_model, cfg)
            self.control = nn.Sequential(nn.Linear(d_sae, width, bias=False), nn.Linear(width, d_model))
        # every output layer starts at zero: before training, x_hat = x_sae
        for out in (self.linear, self.mlp[-1] if self.mlp is not None else None,
                    self.control[-1] if self.control is not None else None):
            if out is not None:
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)

    def parts(self, z: Float[Tensor, "... d_sae"]) -> dict[str, Float[Tensor, "... d_model"]]:
        out = {}
        if self.linear is not None:
            out["linear"] = self.linear(z)
        if self.control is not None:
            out["linear"] = self.control(z)
        if self.mlp is not None:
            out["interaction"] = self.mlp(bi_interaction(z, self.embed))
        return out

    def forward(self, z: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_model"]:
        return sum(self.parts(z).values())


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def control_width(d_sae: int, d_model: int, cfg: NFMConfig) -> int:
    """Width of the linear control's middle layer: its parameters match a "both" NFM's (to within one width)."""
    budget = n_parameters(NFM(d_sae, d_model, dataclasses.replace(cfg, variant="both")))
    return max(1, round((budget - d_model) / (d_sae + d_model)))


# --------------------------------------------------------------------------------------------- training
def activations(loaded: Loaded, hook: str, tokens: Tensor, batch_size: int = 32
                ) -> tuple[Float[Tensor, "n d"], Float[Tensor, "n d_sae"], Float[Tensor, "n d"], Tensor]:
    """x, the SAE's latents z and reconstruction x_sae at `hook` for every non-special token, and each
    token's context index."""
    sae = loaded.saes[hook]
    x = hook_activations(loaded, hook, tokens, batch_size)
    seqs = torch.arange(len(tokens))[:, None].expand_as(tokens)[non_special(tokens, loaded.model.tokenizer)]
    with torch.inference_mode():
        z = sae.encode(x.to(loaded.device))
        x_sae = sae.decode(z)
    return x, z.cpu(), x_sae.cpu(), seqs


def train(loaded: Loaded, hook: str, tokens: Tensor, cfg: NFMConfig, *, progress: bool = True
          ) -> tuple[NFM, dict[str, Any]]:
    """One NFM for `hook`, fitted to x - x_sae on `tokens` (the last `val_fraction` of them held out)."""
    t0 = time.time()
    x, z, x_sae, seqs = activations(loaded, hook, tokens)
    target = x - x_sae
    val = seqs >= len(tokens) - max(1, round(cfg.val_fraction * len(tokens)))
    z_fit, t_fit, z_val, t_val = z[~val], target[~val], z[val], target[val]
    g = torch.Generator().manual_seed(cfg.seed)
    model = NFM(z.shape[-1], x.shape[-1], cfg, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def val_error() -> float:  # mean squared error norm per token on the held-out split
        with torch.no_grad():
            return float((t_val - model(z_val)).square().sum(-1).mean())

    history = [val_error()]
    best, best_state, stale = history[0], {k: v.clone() for k, v in model.state_dict().items()}, 0
    epochs = tqdm(range(cfg.max_epochs), desc=f"NFM {cfg.variant} {hook}", unit="epoch", disable=not progress)
    for _ in epochs:
        order = torch.randperm(len(z_fit), generator=g)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            loss = (t_fit[idx] - model(z_fit[idx])).square().sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        history.append(val_error())
        epochs.set_postfix(val_mse=f"{history[-1]:.4f}")
        if history[-1] < best:
            best, best_state, stale = history[-1], {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval().requires_grad_(False)
    info = {"hook": hook, "variant": cfg.variant, "n_parameters": n_parameters(model),
            "fit_tokens": int((~val).sum()), "val_tokens": int(val.sum()), "epochs": len(history) - 1,
            "val_mse_sae": float(t_val.square().sum(-1).mean()), "val_mse_nfm": best, "val_history": history,
            "seconds": round(time.time() - t0, 1)}
    return model.to(loaded.device), info


# ----------------------------------------------------------------------------------------------- fits
@dataclass
class TrainedNFM:
    """NFMs of one configuration for some hooks; `intervention` splices x_sae + NFM(z), carrying them."""

    key: str
    cfg: NFMConfig
    models: dict[str, NFM]
    info: dict[str, dict[str, Any]]

    @property
    def intervention(self) -> iv.Intervention:
        return iv.intervention("sae_nfm", variant=self.cfg.variant, key=self.key, fitted=self.models)

    @property
    def eps_intervention(self) -> iv.Intervention:
        """eps-random at the SAE + NFM splice's own error size (`nfm_eps_random`)."""
        return iv.intervention("nfm_eps_random", variant=self.cfg.variant, key=self.key, fitted=self.models)


def fit(loaded: Loaded, hooks, tokens: Tensor, cfg: NFMConfig = NFMConfig(), *, root: Path = RESULTS,
        progress: bool = True) -> TrainedNFM:
    """An NFM per hook trained on `tokens` (read from the cache when this configuration was trained before;
    each hook is saved as soon as it is trained, so an interrupted run keeps what it finished)."""

    def read(hook: str, tensors: dict[str, Tensor], info: dict) -> NFM:
        sae = loaded.saes[hook]
        model = NFM(sae.cfg.d_sae, sae.cfg.d_in, cfg)
        model.load_state_dict(tensors)
        return model.eval().requires_grad_(False).to(loaded.device)

    def make(hook: str) -> tuple[NFM, dict[str, Tensor], dict]:
        model, info = train(loaded, hook, tokens, cfg, progress=progress)
        return model, model.state_dict(), info

    key, models, info = store.load_or_fit(loaded, hooks, "nfm", cfg, tokens, root, read=read, make=make)
    return TrainedNFM(key, cfg, models, info)


# ---------------------------------------------------------------------------------------- evaluation
def reconstruction_table(loaded: Loaded, trained: list[TrainedNFM], tokens: Tensor) -> pd.DataFrame:
    """Per hook and NFM variant, on `tokens`: the squared reconstruction error of the SAE and of SAE + NFM
    (token means of ||x - x_hat||^2), the relative reduction, and the share of the NFM's output from its
    interaction part (token mean of ||interaction|| / (||linear|| + ||interaction||)).

    Columns: hook, layer, variant, n_parameters, mse_sae, mse_nfm, error_reduction, interaction_share."""
    rows = []
    hooks = sorted({h for t in trained for h in t.models}, key=list(loaded.saes).index)
    for hook in hooks:
        x, z, x_sae, _ = activations(loaded, hook, tokens)
        mse_sae = float((x - x_sae).square().sum(-1).mean())
        for t in trained:
            if hook not in t.models:
                continue
            model = t.models[hook]
            with torch.no_grad():
                parts = {k: v.cpu() for k, v in model.parts(z.to(loaded.device)).items()}
            out = sum(parts.values())
            norms = {k: v.norm(dim=-1) for k, v in parts.items()}
            inter = norms.get("interaction", torch.zeros(len(z)))
            share = (inter / (norms.get("linear", torch.zeros(len(z))) + inter).clamp_min(1e-12)).mean()
            mse = float((x - x_sae - out).square().sum(-1).mean())
            rows.append({"hook": hook, "layer": sae_layer(hook), "variant": t.cfg.variant,
                         "n_parameters": n_parameters(model), "mse_sae": mse_sae, "mse_nfm": mse,
                         "error_reduction": 1 - mse / mse_sae, "interaction_share": float(share)})
    return pd.DataFrame(rows)
