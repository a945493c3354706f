"""The proxy gap (seed 002, notebook 07): reconstruction metrics against behaviour for a bundle's TopK SAE
sweep (two model sizes x early / middle / late depth x k, plus a budget check).

    sweep = load_sweep("tiny-stdlib")
    table = evaluate(sweep, tokens)          # one row per SAE: R^2, cosine, CE_rec [CI], KL [CI], rate, ...
    pr = participation_ratios(sweep.models["base"], tokens)

Every splice replaces `blocks.L.hook_resid_post` at every non-special position with the SAE's reconstruction
and runs the model on from there (the next block, or the unembedding after the last one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Int
from sae_lens import SAE
from sae_lens.util import get_special_token_ids
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from saenb import bundle_io, metrics
from saenb.presets import Preset, get_preset


@dataclass
class Sweep:
    """The sweep's models ("base", "small"), its SAEs keyed by (model, layer, k, budget factor), and the
    manifest's record of each (training tokens, seconds)."""

    models: dict[str, HookedTransformer]
    saes: dict[tuple[str, int, int, int], SAE]
    records: pd.DataFrame


def load_sweep(preset: str | Preset = "tiny-stdlib", device: str | torch.device = "cpu") -> Sweep:
    """Both models and every TopK SAE of a bundle's sweep (`python -m saenb.bundle build` stages 7-8)."""
    root = get_preset(preset).bundle_path
    manifest = bundle_io.read_manifest(root)
    bundle_io.verify(root, manifest)
    if not manifest.get("topk_sweep"):
        raise bundle_io.BundleError(f"the bundle at {root} has no TopK sweep (built before notebook 07 existed). "
                                    f"Resume its build to add it: `{manifest['build_command']}` (only the new "
                                    "stages run).")
    base = min(e["training_tokens"] for e in manifest["topk_sweep"])
    models = {"base": bundle_io.load_model(root, device),
              "small": bundle_io.load_model(root, device, folder=bundle_io.SMALL_MODEL_DIR)}
    saes, rows = {}, []
    for entry in manifest["topk_sweep"]:
        factor = entry["training_tokens"] // base
        key = (entry["model"], entry["layer"], entry["k"], factor)
        path = bundle_io.topk_path(root, entry["model"], entry["hook"], entry["k"], factor)
        saes[key] = SAE.load_from_disk(path, device=str(device)).eval()
        rows.append({"model": entry["model"], "d_model": models[entry["model"]].cfg.d_model, "layer": entry["layer"],
                     "k": entry["k"], "budget": factor, "training_tokens": entry["training_tokens"],
                     "d_sae": entry["d_sae"], "train_seconds": entry["seconds"]})
    return Sweep(models, saes, pd.DataFrame(rows))


def _ce_per_token(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy per position [b, pos-1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(
        tokens.shape[0], -1)


def _run_from(model: HookedTransformer, resid_post: Tensor, layer: int) -> Tensor:
    """Logits of the model continued from blocks.{layer}.hook_resid_post."""
    if layer + 1 < model.cfg.n_layers:
        return model(resid_post, start_at_layer=layer + 1)
    return model.unembed(model.ln_final(resid_post))


@torch.inference_mode()
def evaluate(sweep: Sweep, tokens: Int[Tensor, "n pos"], *, batch_size: int = 32, n_resamples: int = 5000,
             seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Every SAE of the sweep on `tokens`: reconstruction metrics at its hook and the behaviour of its splice.

    Columns (one row per SAE, `sweep.records` joined): r2 (mean-centred, over all tokens), cosine,
    relative_error, mse (token means), l0, alive (fraction of latents selected on some token), rate_bits
    (`metrics.rate_bits`), ce_clean, ce_recon, ce_zero (zero ablation), ce_rec with ci_low/ci_high
    (`metrics.ce_rec_ci`, bootstrap over sequences), ce_loss_score, kl with kl_low/kl_high (token mean of
    KL(clean || spliced), bootstrap over sequences), n_tokens. Special tokens are never spliced; CE and KL
    are taken at every position with a next token.
    """
    rows = []
    for key, sae in tqdm(sweep.saes.items(), desc="sweep", unit="SAE", disable=not progress):
        model_key, layer, k, factor = key
        model = sweep.models[model_key]
        hook = f"blocks.{layer}.hook_resid_post"
        special = torch.tensor(get_special_token_ids(model.tokenizer))
        xs, x_hats, latents_all = [], [], []
        sums = {name: [] for name in ("clean", "recon", "zero", "kl")}
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size]
            logits, cache = model.run_with_cache(batch, names_filter=[hook])
            x = cache[hook]
            keep = ~torch.isin(batch, special)
            latents = sae.encode(x)
            x_hat = torch.where(keep[..., None], sae.decode(latents), x)
            zero = torch.where(keep[..., None], torch.zeros_like(x), x)
            clean_logp = logits.log_softmax(-1)
            recon_logits = _run_from(model, x_hat, layer)
            recon_logp = recon_logits.log_softmax(-1)
            kl = (clean_logp.exp() * (clean_logp - recon_logp)).sum(-1)[:, :-1]
            sums["clean"].append(_ce_per_token(logits, batch).sum(-1))
            sums["recon"].append(_ce_per_token(recon_logits, batch).sum(-1))
            sums["zero"].append(_ce_per_token(_run_from(model, zero, layer), batch).sum(-1))
            sums["kl"].append(kl.sum(-1))
            xs.append(x[keep])
            x_hats.append(x_hat[keep])
            latents_all.append(latents[keep])
        x, x_hat, latents = torch.cat(xs), torch.cat(x_hats), torch.cat(latents_all)
        per_seq = {name: torch.cat(v).double().numpy() for name, v in sums.items()}
        n_tok = tokens.shape[0] * (tokens.shape[1] - 1)
        ce_clean, ce_recon, ce_zero = (per_seq[n].sum() / n_tok for n in ("clean", "recon", "zero"))
        ce_rec, low, high = metrics.ce_rec_ci(per_seq["recon"], per_seq["clean"], n_resamples=n_resamples, seed=seed)
        kl_mean, kl_low, kl_high = _mean_ci(per_seq["kl"], tokens.shape[1] - 1, n_resamples, seed)
        rows.append({
            "model": model_key, "layer": layer, "k": k, "budget": factor,
            "r2": metrics.explained_variance(x, x_hat),
            "cosine": float(F.cosine_similarity(x, x_hat, dim=-1).mean()),
            "relative_error": float(metrics.relative_error(x, x_hat).mean()),
            "mse": float(metrics.mse(x, x_hat).mean()),
            "l0": float((latents != 0).sum(-1).float().mean()),
            "alive": metrics.alive_fraction(latents),
            "rate_bits": metrics.rate_bits(latents),
            "ce_clean": ce_clean, "ce_recon": ce_recon, "ce_zero": ce_zero,
            "ce_rec": ce_rec, "ci_low": low, "ci_high": high,
            "ce_loss_score": metrics.ce_loss_score(ce_clean, ce_recon, ce_zero),
            "kl": kl_mean, "kl_low": kl_low, "kl_high": kl_high, "n_tokens": len(x),
        })
    return sweep.records.merge(pd.DataFrame(rows), on=["model", "layer", "k", "budget"])


def _mean_ci(per_seq_sums: np.ndarray, tokens_per_seq: int, n_resamples: int, seed: int) -> tuple[float, float, float]:
    from scipy import stats

    values = per_seq_sums / tokens_per_seq
    res = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=n_resamples,
                          random_state=np.random.default_rng(seed))
    return float(values.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


@torch.inference_mode()
def participation_ratios(model: HookedTransformer, tokens: Int[Tensor, "n pos"], *, batch_size: int = 32
                         ) -> pd.DataFrame:
    """PR of blocks.L.hook_resid_post at every layer over `tokens` (special tokens left out), raw and with
    the top eigen-direction removed. Columns: layer, pr, pr_deflated, pr_over_d_model."""
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    special = torch.tensor(get_special_token_ids(model.tokenizer))
    acts = {h: [] for h in hooks}
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size]
        _, cache = model.run_with_cache(batch, names_filter=hooks)
        keep = ~torch.isin(batch, special)
        for h in hooks:
            acts[h].append(cache[h][keep])
    rows = []
    for layer, h in enumerate(hooks):
        x = torch.cat(acts[h])
        pr = metrics.participation_ratio(x)
        rows.append({"layer": layer, "pr": pr, "pr_deflated": metrics.participation_ratio(x, deflate=1),
                     "pr_over_d_model": pr / model.cfg.d_model})
    return pd.DataFrame(rows)
