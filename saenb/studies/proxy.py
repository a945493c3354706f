"""The proxy gap (seed 002, notebook 07): reconstruction metrics against behaviour for a bundle's TopK SAE
sweep (two model sizes x early / middle / late depth x k, plus a budget check).

    sweep = load_sweep("tiny-stdlib")
    table = evaluate(sweep, tokens)          # one row per SAE: R^2, cosine, CE_rec [CI], KL [CI], rate, ...
    pr = participation_ratios(sweep.models["base"], tokens)

Every splice replaces `blocks.L.hook_resid_post` at every non-special position with the SAE's reconstruction
and runs the model on from there (the next block, or the unembedding after the last one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Int
from sae_lens import SAE
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name

from saenb import files, saes
from saenb.engine import metrics, store
from saenb.files import sha256_file
from saenb.models import bundle_io
from saenb.models.data import non_special
from saenb.models.loaded import resolve_device
from saenb.models.presets import Preset, get_preset
from saenb.studies import readings as rd

RESULTS = files.RESULTS / "proxy"
"""`evaluate_cached`'s tables, one parquet per configuration (`SAENB_RESULTS` overrides data/results)."""


@dataclass
class Sweep:
    """The sweep's models ("base", "small"), its SAEs keyed by (model, layer, k, budget factor), the
    manifest's record of each (training tokens, seconds), and the manifest's sha256 (the exact weights)."""

    models: dict[str, HookedTransformer]
    saes: dict[tuple[str, int, int, int], SAE]
    records: pd.DataFrame
    bundle_sha256: str = ""


def load_sweep(preset: str | Preset = "tiny-stdlib", device: str | torch.device = "cpu") -> Sweep:
    """Both models and every TopK SAE of a bundle's sweep (`saenb.saes.sets.topk_sweep`, read from the bundle)."""
    preset = get_preset(preset)
    if preset.bundle is None:
        raise ValueError(f"preset {preset.name!r} loads from the hub and has no TopK sweep: notebook 07's SAEs are "
                         "a bundle's `topk_sweep` set. Use preset='tiny-stdlib', or a Preset whose bundle= names a "
                         "bundle with that set trained (`python -m saenb.saes build --set topk_sweep`).")
    root, device = preset.bundle_path, resolve_device(device)
    manifest = bundle_io.read_manifest(root)
    bundle_io.verify(root, manifest)
    # seconds of SAEs trained by the bundle build before specs existed are in its manifest
    legacy = {(e["model"], e["layer"], e["k"], e["training_tokens"]): e["seconds"]
              for e in manifest.get("topk_sweep", [])}
    models = {"base": bundle_io.load_model(root, device),
              "small": bundle_io.load_model(root, device, folder=bundle_io.SMALL_MODEL_DIR)}
    sweep, rows = {}, []
    for key, spec in saes.sets.topk_sweep(preset).items():
        model, layer, k, factor = key
        sweep[key] = saes.load(spec, device, train=False, root=root)
        record = saes.record(spec, root)
        seconds = record["training"]["seconds"] if "training" in record else \
            legacy[(model, layer, k, spec.training_tokens)]
        rows.append({"model": model, "d_model": models[model].cfg.d_model, "layer": layer, "k": k, "budget": factor,
                     "training_tokens": spec.training_tokens, "d_sae": sweep[key].cfg.d_sae, "train_seconds": seconds})
    return Sweep(models, sweep, pd.DataFrame(rows), sha256_file(root / bundle_io.MANIFEST))


def _ce_per_token(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy per position [b, pos-1]."""
    return metrics.ce_per_token(logits[:, :-1], tokens[:, 1:])


@torch.inference_mode()
def evaluate(sweep: Sweep, tokens: Int[Tensor, "n pos"], *, batch_size: int = 32, n_resamples: int = 5000,
             seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Every SAE of the sweep on `tokens`: reconstruction metrics at its hook and the behaviour of its splice.

    Columns (one row per SAE, `sweep.records` joined): r2 (mean-centred totals over all tokens) with its
    sse_per_token and sst_per_token (seed 002's "variance scale" mechanism), cosine,
    relative_error, mse (token means), l0, alive (fraction of latents selected on some token), rate_bits
    (`metrics.rate_bits`), ce_clean, ce_recon, ce_zero (zero ablation), ce_rec with ci_low/ci_high
    (`metrics.ce_rec_ci`, bootstrap over sequences), ce_loss_score, kl with kl_low/kl_high (token mean of
    KL(clean || spliced), bootstrap over sequences), n_tokens. Special tokens are never spliced; CE and KL
    are taken at every position with a next token.

    One clean forward per batch and model serves all of that model's SAEs, one zero-ablation run per layer;
    each SAE then costs only the continuation from its layer. Reconstruction statistics are accumulated as
    sums, so memory does not grow with the number of tokens.
    """
    acc = {key: _Accumulator(sae.cfg.d_sae) for key, sae in sweep.saes.items()}
    layer_stats: dict[tuple[str, int], _Moments] = {}
    ce = {name: {} for name in ("clean", "zero")}
    for model_key, model in sweep.models.items():
        keys = [key for key in sweep.saes if key[0] == model_key]
        layers = sorted({key[1] for key in keys})
        hooks = {layer: get_act_name("resid_post", layer) for layer in layers}
        batches = range(0, len(tokens), batch_size)
        for start in tqdm(batches, desc=f"sweep ({model_key})", unit="batch", disable=not progress):
            batch = tokens[start:start + batch_size]
            logits, cache = model.run_with_cache(batch, names_filter=list(hooks.values()))
            clean_logp = logits.log_softmax(-1)
            keep = non_special(batch, model.tokenizer)
            ce["clean"].setdefault(model_key, []).append(_ce_per_token(logits, batch).sum(-1))
            for layer, hook in hooks.items():
                x = cache[hook]
                layer_stats.setdefault((model_key, layer), _Moments()).add(x[keep])
                zero = torch.where(keep[..., None], torch.zeros_like(x), x)
                ce["zero"].setdefault((model_key, layer), []).append(
                    _ce_per_token(model(zero, start_at_layer=layer + 1), batch).sum(-1))
                for key in (k for k in keys if k[1] == layer):
                    sae = sweep.saes[key]
                    latents = sae.encode(x)
                    x_hat = torch.where(keep[..., None], sae.decode(latents), x)
                    # from the next block on (after the last one, start_at_layer = n_layers: ln_final + unembed)
                    recon_logits = model(x_hat, start_at_layer=layer + 1)
                    kl = metrics.kl_per_token(clean_logp, recon_logits.log_softmax(-1))[:, :-1]
                    acc[key].add(x[keep], x_hat[keep], latents[keep], _ce_per_token(recon_logits, batch).sum(-1),
                                 kl.sum(-1))
    rows = []
    n_pred = tokens.shape[1] - 1
    for key, a in acc.items():
        model_key, layer, k, factor = key
        clean = torch.cat(ce["clean"][model_key]).double().numpy()
        recon, kl = torch.cat(a.ce).double().numpy(), torch.cat(a.kl).double().numpy()
        ce_clean, ce_recon = clean.mean() / n_pred, recon.mean() / n_pred
        ce_zero = torch.cat(ce["zero"][(model_key, layer)]).double().mean().item() / n_pred
        ce_rec, low, high = metrics.ce_rec_ci(recon, clean, n_resamples=n_resamples, seed=seed)
        # token mean of KL = ratio of per-sequence sums to per-sequence token counts
        kl_mean, kl_low, kl_high = metrics.ratio_ci(kl, np.full(len(kl), n_pred), n_resamples=n_resamples, seed=seed)
        sst = layer_stats[(model_key, layer)].sst()
        rows.append({
            "model": model_key, "layer": layer, "k": k, "budget": factor,
            "r2": 1 - a.sse / sst, "sse_per_token": a.sse / a.n, "sst_per_token": sst / a.n,
            "cosine": a.cos / a.n, "relative_error": a.rel / a.n, "mse": a.sq / a.n,
            "l0": float(a.counts.sum()) / a.n, "alive": float((a.counts > 0).double().mean()),
            "rate_bits": metrics.rate_bits_from_counts(a.counts, a.n),
            "ce_clean": ce_clean, "ce_recon": ce_recon, "ce_zero": ce_zero,
            "ce_rec": ce_rec, "ci_low": low, "ci_high": high,
            "ce_loss_score": metrics.ce_loss_score(ce_clean, ce_recon, ce_zero),
            "kl": kl_mean, "kl_low": kl_low, "kl_high": kl_high, "n_tokens": a.n,
        })
    return sweep.records.merge(pd.DataFrame(rows), on=["model", "layer", "k", "budget"])


def evaluate_cached(sweep: Sweep, tokens: Int[Tensor, "n pos"], *, batch_size: int = 32, n_resamples: int = 5000,
                    seed: int = 0, progress: bool = True, root: Path = RESULTS) -> pd.DataFrame:
    """`evaluate`, read from `root` when the same bundle, tokens, resamples and seed were evaluated before
    (the batch size changes nothing but float summation order, so it is not part of the key)."""
    config = {"bundle_sha256": sweep.bundle_sha256, "tokens": store.tokens_sha256(tokens),
              "n_resamples": n_resamples, "seed": seed, "saenb_version": files.__version__}
    key = store.digest(config)
    path = root / key[:16] / "result.parquet"
    if store.intact(path, key):
        return pd.read_parquet(path)
    table = evaluate(sweep, tokens, batch_size=batch_size, n_resamples=n_resamples, seed=seed, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "config.json").write_text(json.dumps(config, indent=1))
    store.write_parquet(table, path, key)
    return table


class _Moments:
    """Running sums of x and ||x||^2 over tokens: SST = sum ||x - mean||^2 without keeping the tokens."""

    def __init__(self):
        self.n, self.sum, self.sq = 0, 0.0, 0.0

    def add(self, x: Tensor) -> None:
        x = x.double()
        self.n += len(x)
        self.sum = self.sum + x.sum(0)
        self.sq += float(x.pow(2).sum())

    def sst(self) -> float:
        return self.sq - float(self.sum.pow(2).sum()) / self.n


class _Accumulator:
    """Per-SAE running sums: squared error, cosine, relative error, per-dimension MSE, latent firing counts,
    and per-sequence CE / KL sums."""

    def __init__(self, d_sae: int):
        self.n, self.sse, self.cos, self.rel, self.sq = 0, 0.0, 0.0, 0.0, 0.0
        self.counts = torch.zeros(d_sae, dtype=torch.float64)
        self.ce, self.kl = [], []

    def add(self, x: Tensor, x_hat: Tensor, latents: Tensor, ce_per_seq: Tensor, kl_per_seq: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += len(x)
        self.sse += float((x - x_hat).pow(2).sum())
        self.cos += float(F.cosine_similarity(x, x_hat, dim=-1).sum())
        self.rel += float(metrics.relative_error(x, x_hat).sum())
        self.sq += float(metrics.mse(x, x_hat).sum())
        self.counts += (latents != 0).sum(0).double()
        self.ce.append(ce_per_seq)
        self.kl.append(kl_per_seq)


@torch.inference_mode()
def participation_ratios(model: HookedTransformer, tokens: Int[Tensor, "n pos"], *, batch_size: int = 32
                         ) -> pd.DataFrame:
    """PR of blocks.L.hook_resid_post at every layer over `tokens` (special tokens left out), raw and with
    the top eigen-direction removed. Columns: layer, pr, pr_deflated, pr_over_d_model."""
    hooks = [get_act_name("resid_post", layer) for layer in range(model.cfg.n_layers)]
    acts = {h: [] for h in hooks}
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size]
        _, cache = model.run_with_cache(batch, names_filter=hooks)
        keep = non_special(batch, model.tokenizer)
        for h in hooks:
            acts[h].append(cache[h][keep])
    rows = []
    for layer, h in enumerate(hooks):
        x = torch.cat(acts[h])
        pr = metrics.participation_ratio(x)
        rows.append({"layer": layer, "pr": pr, "pr_deflated": metrics.participation_ratio(x, deflate=1),
                     "pr_over_d_model": pr / model.cfg.d_model})
    return pd.DataFrame(rows)


def model_order(table: pd.DataFrame) -> tuple[str, str]:
    """(bigger, smaller) model of an `evaluate` table, by d_model."""
    sizes = table.groupby("model").d_model.first().sort_values(ascending=False)
    if len(sizes) != 2:
        raise ValueError(f"the proxy-gap tables compare two model sizes; this table has {list(sizes.index)}")
    return sizes.index[0], sizes.index[1]


def depths(table: pd.DataFrame) -> dict[int, str]:
    """The sweep's layers (of an `evaluate` table or `Sweep.records`) named by depth: early, middle, late."""
    return dict(zip(sorted(table.layer.unique()), ("early", "middle", "late")))


def sweep_table(table: pd.DataFrame) -> pd.DataFrame:
    """The budget-1 rows of an `evaluate` table as shown: CE_rec with its CI as text, alive as a percentage."""
    main = table[table.budget == 1].sort_values(["layer", "model", "k"])
    ce_rec = [f"{c:.3f} [{lo:.3f}, {hi:.3f}]" for c, lo, hi in zip(main.ce_rec, main.ci_low, main.ci_high)]
    return main.assign(**{"CE_rec [95% CI]": ce_rec, "alive %": (100 * main.alive).round(1)})[
        ["model", "d_model", "depth", "layer", "k", "r2", "CE_rec [95% CI]", "cosine", "relative_error", "alive %",
         "ce_loss_score", "kl", "rate_bits", "sse_per_token", "sst_per_token"]]


def metric_curves(table: pd.DataFrame) -> pd.DataFrame:
    """R^2, CE_rec, cosine and alive fraction per model, depth and k (budget 1), long form (metric, value)."""
    main = table[table.budget == 1].sort_values(["layer", "model", "k"])
    return main.melt(id_vars=["model", "depth", "layer", "k"], value_vars=["r2", "ce_rec", "cosine", "alive"],
                     var_name="metric", value_name="value")


def rate_distortion(table: pd.DataFrame) -> pd.DataFrame:
    """Per model, depth and k (budget 1): the rate proxy (bits / token) with the reconstruction distortion
    1 - R^2 and the behavioural one 1 - CE_rec, long form (distortion, value)."""
    main = table[table.budget == 1].sort_values(["layer", "model", "k"])
    return main.assign(reconstruction=1 - main.r2, behaviour=1 - main.ce_rec).melt(
        id_vars=["model", "depth", "layer", "k", "rate_bits"], value_vars=["reconstruction", "behaviour"],
        var_name="distortion", value_name="value")


def pr_profiles(sweep: Sweep, tokens: Int[Tensor, "n pos"]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`participation_ratios` of both models (column model), and the same long form: PR "raw" / "deflated"."""
    pr = pd.concat([participation_ratios(model, tokens).assign(model=m) for m, model in sweep.models.items()])
    long = pr.rename(columns={"pr": "raw", "pr_deflated": "deflated"}).melt(
        id_vars=["model", "layer"], value_vars=["raw", "deflated"], var_name="PR", value_name="value")
    return pr, long


def budget_check(table: pd.DataFrame) -> pd.DataFrame:
    """The middle layer's SAEs trained at more than one budget, at every budget."""
    layers = sorted(table.layer.unique())
    mid = layers[len(layers) // 2]
    check = table[(table.layer == mid) & table.k.isin(table[table.budget > 1].k)].sort_values(["k", "model", "budget"])
    return check[["model", "k", "training_tokens", "r2", "ce_rec", "ci_low", "ci_high", "alive", "cosine"]]


def size_deltas(table: pd.DataFrame) -> pd.DataFrame:
    """Bigger minus smaller model per layer and k (budget 1 rows): d_r2, d_ce_rec, d_cosine, d_relative_error,
    d_alive, and seed_pattern (seed 002's proxy gap: R^2 up while CE_rec goes down)."""
    bigger, smaller = model_order(table)
    cols = ["r2", "ce_rec", "cosine", "relative_error", "alive"]
    wide = table[table.budget == 1].pivot_table(index=["layer", "k"], columns="model", values=cols)
    delta = pd.DataFrame({f"d_{c}": wide[(c, bigger)] - wide[(c, smaller)] for c in cols}).reset_index()
    delta["seed_pattern"] = (delta.d_r2 > 0) & (delta.d_ce_rec < 0)
    return delta


def r2_correlations(table: pd.DataFrame) -> pd.DataFrame:
    """Pearson r of R^2 with CE_rec per layer (budget 1 rows): pooled over k and model, and within fixed k
    (each k's mean removed first, as seed 002 did: with two models, a sign diagnostic)."""
    rows = []
    for layer, g in table[table.budget == 1].groupby("layer"):
        demeaned = g[["r2", "ce_rec"]] - g.groupby("k")[["r2", "ce_rec"]].transform("mean")
        rows.append({"layer": layer, "pooled": stats.pearsonr(g.r2, g.ce_rec).statistic,
                     "within_k": stats.pearsonr(demeaned.r2, demeaned.ce_rec).statistic, "n": len(g)})
    return pd.DataFrame(rows)


def k_star_table(table: pd.DataFrame, targets=(0.85, 0.9)) -> pd.DataFrame:
    """k* (`metrics.k_star`) per layer, CE_rec target and model (budget 1 rows), and bigger / smaller."""
    bigger, smaller = model_order(table)
    main = table[table.budget == 1]
    rows = [{"layer": layer, "target": t,
             **{m: metrics.k_star(g[g.model == m].k, g[g.model == m].ce_rec, t) for m in (bigger, smaller)}}
            for layer, g in main.groupby("layer") for t in targets]
    out = pd.DataFrame(rows)
    out["ratio"] = out[bigger] / out[smaller]
    return out


def claims(table: pd.DataFrame, pr: pd.DataFrame, targets=(0.85, 0.9)) -> pd.DataFrame:
    """Seed 002's claims checked on an `evaluate` table and a `participation_ratios` frame of both models
    (column `model`): a readings frame (`saenb.studies.readings`), one row per claim with the seed's figure
    (`published`), this table's (`here`), and whether it holds here. The middle layer is the median evaluated
    layer; "low k" is the two smallest k."""
    bigger, smaller = model_order(table)
    layers = sorted(table.layer.unique())
    early, mid = layers[0], layers[len(layers) // 2]
    delta = size_deltas(table)
    dm = delta[delta.layer == mid]
    corr = r2_correlations(table).set_index("layer")
    kstar = k_star_table(table, targets)
    ratios = kstar.ratio.dropna()
    main = table[table.budget == 1]
    sst = main[main.layer == mid].groupby("model").sst_per_token.first()
    low_k = sorted(main.k.unique())[:2]
    alive = delta[delta.layer.isin(layers[:2]) & delta.k.isin(low_k)].d_alive
    raw = pr.pivot(index="layer", columns="model", values="pr")
    canyon = {m: raw[m].loc[mid] < raw[m].loc[early] / 2 for m in raw}
    cos_agree, rel_agree = (dm.d_cosine < 0) == (dm.d_ce_rec < 0), (dm.d_relative_error > 0) == (dm.d_ce_rec < 0)
    rows = [
        ("at the middle layer, the bigger model has higher R^2 and lower CE_rec at every k", "6 of 6 k",
         f"{int(dm.seed_pattern.sum())} of {len(dm)} k", dm.seed_pattern.all()),
        ("cosine and relative error agree with CE_rec on which model reconstructs worse (middle layer)",
         "yes (cosine lower, relative error higher for 410M at k = 8)",
         f"cosine at {int(cos_agree.sum())}, relative error at {int(rel_agree.sum())} of {len(dm)} k",
         bool(cos_agree.all() and rel_agree.all())),
        ("within fixed k, R^2 and CE_rec move in opposite directions at the middle layer", "r = -0.94",
         f"r = {corr.within_k[mid]:+.2f}", corr.within_k[mid] < 0),
        ("the bigger model's middle layer has a larger variance scale (SST per token)", "18x",
         f"{sst[bigger] / sst[smaller]:.1f}x", sst[bigger] > sst[smaller]),
        ("k* tax: the bigger model needs more active latents for a CE_rec target", "ratio 1.36-1.72",
         f"ratio {ratios.min():.2f}-{ratios.max():.2f}" if len(ratios) else "target not reached",
         bool(len(ratios)) and bool((ratios > 1).all())),
        ("a raw participation-ratio canyon: the middle layer's PR far below (< 1/2) the early layer's",
         "70M: 51.9 at L1, 4.0 at L3", ", ".join(f"{m}: {raw[m].loc[early]:.1f} at L{early}, {raw[m].loc[mid]:.1f} at "
                                                 f"L{mid}" for m in raw), all(canyon.values())),
        ("at low k, early and middle, the bigger model's SAEs have fewer alive latents (undertraining)",
         "alive % lower for 410M at most k", f"lower at {int((alive < 0).sum())} of {len(alive)}",
         bool((alive < 0).all())),
    ]
    budget = table[(table.layer == mid) & table.k.isin(table[table.budget > 1].k)]
    if len(budget):
        wide = budget.pivot_table(index=["model", "k"], columns="budget", values=["ce_rec", "alive"])
        top = wide.columns.get_level_values(1).max()
        gain = wide[("ce_rec", top)] - wide[("ce_rec", 1)]
        alive_gain = wide[("alive", top)] - wide[("alive", 1)]
        rows.append((f"{top}x the training tokens raises CE_rec", "10M -> 50M/100M: +0.17 to +0.33",
                     f"{gain.min():+.3f} to {gain.max():+.3f}", bool((gain > 0).all())))
        rows.append((f"{top}x the training tokens raises the alive fraction", "+31 to +44 points",
                     f"{100 * alive_gain.min():+.1f} to {100 * alive_gain.max():+.1f} points",
                     bool((alive_gain > 0).all())))
        at = wide[("ce_rec", top)].unstack("model")
        before = wide[("ce_rec", 1)].unstack("model")
        flips = (at[bigger] > at[smaller]) != (before[bigger] > before[smaller])
        rows.append((f"with {top}x the tokens the model ordering of CE_rec flips at k = 32",
                     "yes (410M 0.920 > 70M 0.898)",
                     ", ".join(f"k = {k}: {'flips' if f else 'same order'}" for k, f in flips.items()),
                     bool(flips.get(32, False))))
    return rd.frame([rd.claim(c, here, holds=holds, published=seed) for c, seed, here, holds in rows])
