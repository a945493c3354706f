"""Named sets of SAE specs: what each notebook uses, declared as data.

    sets.get("fixes")        # notebook 08's sweep and fixes, [NamedSpec(name, group, spec), ...]
    sets.BASE                # the bundle's twelve original SAEs, {hook: spec}
    sets.TOPK_SWEEP          # notebook 07's TopK sweep (34 SAEs)

The original SAEs were trained by the bundle build before specs existed (sae_lens's runner streaming the
model's activations over the training contexts that `data_seed` shuffles); `LEGACY` maps their specs to the
committed folders, so loading them reads the same files (no retraining). A spec trained now reads the shared
activation cache instead: the same recipe, not the same bits.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from saenb.saes.spec import FineTune, SAESpec


class NamedSpec(NamedTuple):
    name: str
    """Unique within its set (a row label in notebook tables)."""
    group: str
    """What the spec varies: "l1", "topk", "width", "tokens", "fix", ..."""
    spec: SAESpec


# --------------------------------------------------------------------------------- the bundle's originals
_N_LAYERS = 6
_HOOKS = [f"blocks.{layer}.hook_resid_pre" for layer in range(_N_LAYERS)] + [
    f"blocks.{layer}.attn.hook_z" for layer in range(_N_LAYERS)]
_L1 = {"blocks.0.attn.hook_z": 2.0, "blocks.5.attn.hook_z": 2.0}  # raised by the build's quality check

BASE = {hook: SAESpec(hook=hook, sparsity=_L1.get(hook, 1.0), data_seed=i) for i, hook in enumerate(_HOOKS)}
"""tiny-stdlib's original SAEs: standard (ReLU + L1), x4, 1M tokens, lr 1e-3, seed 0, contexts shuffled by
data_seed = hook index (the bundle's manifest records each one's training)."""

TOPK_SWEEP = {
    (model, layer, k, factor): SAESpec(model=model, hook=f"blocks.{layer}.hook_resid_post", architecture="topk",
                                       sparsity=k, training_tokens=400_000 * factor, data_seed=1000 + layer)
    for model in ("base", "small") for layer, k, factor in
    [(layer, k, 1) for layer in (1, 3, 5) for k in (8, 16, 32, 64, 128)] + [(3, 8, 5), (3, 32, 5)]
}
"""Notebook 07's TopK SAEs at hook_resid_post: (model, layer, k, budget factor) -> spec."""


def _legacy() -> dict[str, str]:
    from saenb import bundle_io

    out = {spec.key: f"{bundle_io.SAE_DIR}/{hook}" for hook, spec in BASE.items()}
    for (model, layer, k, factor), spec in TOPK_SWEEP.items():
        out[spec.key] = f"{bundle_io.TOPK_DIR}/{model}/blocks.{layer}.hook_resid_post/" + (
            f"k{k}" if factor == 1 else f"k{k}-x{factor}")
    return out


LEGACY = _legacy()
"""spec key -> folder of an original SAE, relative to the tiny-stdlib bundle."""


# ---------------------------------------------------------------------------------- notebook 08: fixes
FIXES_HOOK = "blocks.3.hook_resid_pre"
FIXES_BASE = BASE[FIXES_HOOK]
"""The base ReLU + L1 SAE every fix is applied to (data_seed 3: the sweep shares its contexts)."""
_TOPK32 = dataclasses.replace(FIXES_BASE, architecture="topk", sparsity=32)


def _fixes() -> list[NamedSpec]:
    b = FIXES_BASE
    out = [NamedSpec("base", "l1", b)]
    out += [NamedSpec(f"l1={c:g}", "l1", dataclasses.replace(b, sparsity=c)) for c in (0.125, 0.25, 0.5, 2, 4, 8)]
    out += [NamedSpec(f"topk k={k}", "topk", dataclasses.replace(_TOPK32, sparsity=k)) for k in (8, 16, 32, 64, 128)]
    out += [NamedSpec(f"batchtopk k={k}", "batchtopk", dataclasses.replace(b, architecture="batchtopk", sparsity=k))
            for k in (16, 32, 64)]
    out += [NamedSpec(f"jumprelu l0={c:g}", "jumprelu", dataclasses.replace(b, architecture="jumprelu", sparsity=c))
            for c in (0.03, 0.1, 0.3, 1.0)]
    out += [NamedSpec(f"gated l1={c:g}", "gated", dataclasses.replace(b, architecture="gated", sparsity=c))
            for c in (1.0, 4.0)]
    out += [NamedSpec(f"topk k=32 x{e}", "width", dataclasses.replace(_TOPK32, expansion=e)) for e in (2, 8, 16, 32)]
    out += [NamedSpec(f"topk k=32 {n / 1e6:g}M", "tokens", dataclasses.replace(_TOPK32, training_tokens=n))
            for n in (250_000, 500_000, 2_000_000, 4_000_000, 8_000_000)]
    out += [
        NamedSpec("scale fine-tune", "fix", dataclasses.replace(b, finetune=FineTune("scale", lr=1e-3))),
        NamedSpec("decoder fine-tune", "fix", dataclasses.replace(b, finetune=FineTune("decoder", lr=1e-4))),
        NamedSpec("KL+MSE fine-tune", "fix", dataclasses.replace(b, finetune=FineTune("kl_mse", lr=1e-4))),
    ]
    e2e = dataclasses.replace(b, lr=3e-3, training_tokens=2_000_000)
    out += [NamedSpec(f"e2e l1={c:g}", "e2e", dataclasses.replace(e2e, objective="e2e", sparsity=c)) for c in E2E_L1]
    out += [NamedSpec(f"e2e+ds l1={c:g}", "e2e_ds", dataclasses.replace(e2e, objective="e2e_ds", sparsity=c))
            for c in E2E_L1[-1:]]
    return out


E2E_L1 = (0.05, 0.1)
"""Sparsity coefficients of the end-to-end SAEs (KL is about 100x smaller than the MSE of a standard SAE's
normalised activations, so its coefficients are too). They train at lr 3e-3 for 2M tokens: at the base recipe's
1e-3 and 1M tokens the spliced KL was still above 1.5 nats when training ended (a pilot run)."""

SETS = {"fixes": _fixes, "base": lambda: [NamedSpec(h, "base", s) for h, s in BASE.items()],
        "topk_sweep": lambda: [NamedSpec(f"{m} L{layer} k{k}" + ("" if f == 1 else f" x{f}"), "topk", s)
                               for (m, layer, k, f), s in TOPK_SWEEP.items()]}


def get(name: str) -> list[NamedSpec]:
    if name not in SETS:
        raise ValueError(f"unknown SAE set {name!r}; sets: {sorted(SETS)}")
    return SETS[name]()
