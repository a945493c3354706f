"""Quality figures of an SAE by sae_lens's own `run_evals` (an independent computation from saenb's engine)."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from sae_lens import ActivationsStore, run_evals
from sae_lens.evals import EvalConfig
from sae_lens.training.activation_scaler import ActivationScaler

from saenb.models import bundle_io
from saenb.saes import sources
from saenb.saes.library import load
from saenb.saes.sets import recipe
from saenb.saes.spec import SAESpec


def run_evals_figures(model, sae, tokens: torch.Tensor, *, batch_prompts: int = 32, n_recon_batches: int = 8,
                      n_sparsity_batches: int = 32) -> dict[str, Any]:
    """sae_lens's `run_evals` on `tokens` (in order, batches of `batch_prompts` contexts), special tokens
    excluded as sae_lens does by default: CE and KL of the splice, explained variance, cosine, L0, and the
    alive fraction (share of latents firing at least once on the sparsity batches)."""
    n_ctx = tokens.shape[1]
    store = ActivationsStore.from_sae(
        model, sae, dataset=Dataset.from_dict({"tokens": tokens.numpy()}), context_size=n_ctx,
        streaming=False, store_batch_size_prompts=batch_prompts, n_batches_in_buffer=4,
        train_batch_size_tokens=batch_prompts * n_ctx, device=str(model.cfg.device),
    )
    eval_cfg = EvalConfig(
        batch_size_prompts=batch_prompts, n_eval_reconstruction_batches=n_recon_batches,
        compute_kl=True, compute_ce_loss=True, n_eval_sparsity_variance_batches=n_sparsity_batches,
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=True,
    )
    with torch.no_grad():
        metrics, features = run_evals(sae, store, model, ActivationScaler(), eval_cfg, exclude_special_tokens=True)
    density = torch.tensor(features["feature_density"])
    perf, behaviour = metrics["model_performance_preservation"], metrics["model_behavior_preservation"]
    return {
        "ce_loss_score": round(float(perf["ce_loss_score"]), 4),
        "ce_loss_without_sae": round(float(perf["ce_loss_without_sae"]), 4),
        "ce_loss_with_sae": round(float(perf["ce_loss_with_sae"]), 4),
        "ce_loss_with_ablation": round(float(perf["ce_loss_with_ablation"]), 4),
        "kl_div_with_sae": round(float(behaviour["kl_div_with_sae"]), 5),
        "kl_div_score": round(float(behaviour["kl_div_score"]), 4),
        "explained_variance": round(float(metrics["reconstruction_quality"]["explained_variance"]), 4),
        "cossim": round(float(metrics["reconstruction_quality"]["cossim"]), 4),
        "l0": round(float(metrics["sparsity"]["l0"]), 2),
        "alive_fraction": round(float((density > 0).float().mean()), 4),
        "tokens_reconstruction": metrics["token_stats"]["total_tokens_eval_reconstruction"],
        "tokens_sparsity": metrics["token_stats"]["total_tokens_eval_sparsity_variance"],
    }


TARGETS = {
    "resid": {"ce_loss_score": 0.85, "explained_variance": 0.75, "l0": (4, 100), "alive_fraction": 0.60},
    "z": {"ce_loss_score": 0.75, "l0": (2, 100)},
}
"""Quality a bundle's own SAEs aim for (tiny-stdlib's were built to meet these: its manifest's quality_met)."""
PRESET_TARGETS = {
    "smollm2-135m": {"resid": {"ce_loss_score": 0.8, "explained_variance": 0.7, "l0": (1, 100)},
                     "z": {"ce_loss_score": 0.75, "l0": (1, 100)}},
}
"""Presets with targets of their own: a real model's SAEs, trained on 1M tokens, aim lower than a toy's."""


def targets(preset: str) -> dict[str, dict[str, Any]]:
    return PRESET_TARGETS.get(preset, TARGETS)


def meets(hook: str, q: dict[str, Any], preset: str = "tiny-stdlib") -> bool:
    """`q` (run_evals figures) against the preset's `targets` for the hook's family."""
    t = targets(preset)["z" if hook.endswith("hook_z") else "resid"]
    ok = q["ce_loss_score"] >= t["ce_loss_score"] and t["l0"][0] <= q["l0"] <= t["l0"][1]
    if "explained_variance" in t:
        ok = ok and q["explained_variance"] >= t["explained_variance"]
    if "alive_fraction" in t:
        ok = ok and q["alive_fraction"] >= t["alive_fraction"]
    return bool(ok)


def evaluate(spec: SAESpec, **kwargs) -> dict[str, Any]:
    """`run_evals_figures` of a stored spec on its preset's held-out contexts (the first ones, in order; batch
    sizes from the bundle's recipe unless given), with `meets_targets` (`targets`)."""
    root = sources.bundle_root(spec.preset)
    tokens = bundle_io.load_tokens(root / bundle_io.HELDOUT_TOKENS)
    cfg = recipe(spec.preset)
    kwargs = {"batch_prompts": cfg.eval_batch_prompts, "n_recon_batches": cfg.eval_reconstruction_batches,
              "n_sparsity_batches": cfg.eval_sparsity_batches, **kwargs}
    model = sources.load_model(spec.preset, spec.model)
    q = run_evals_figures(model, load(spec, model.cfg.device, train=False), tokens, **kwargs)
    return {**q, "meets_targets": meets(spec.hook, q, spec.preset)}
