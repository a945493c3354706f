"""Named sets of SAE specs: what each notebook uses, declared as data.

    sets.get("fixes")              # notebook 08's sweep and fixes, [NamedSpec(name, group, spec), ...]
    sets.get("fixes", "smollm2-135m")  # the same on SmolLM2-135M at layer 15
    sets.base("tiny-stdlib")       # the bundle's SAE per hook (notebooks 01-06), {hook: spec}
    sets.topk_sweep("tiny-stdlib") # notebook 07's TopK sweep, {(model, layer, k, budget factor): spec}

A bundle's own sets follow the SAE recipe in its manifest (`bundle.BuildConfig`'s sae_* and topk_* options).
tiny-stdlib's were trained by the bundle build before specs existed (sae_lens's runner streaming the model's
activations over the contexts that `data_seed` shuffles) and stay in their old folders (`legacy_folder`):
loading them reads the same files. A spec trained now reads the shared activation cache instead: the same
recipe, not the same bits.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

from transformer_lens.utilities import get_act_name

from saenb.models import bundle_io
from saenb.models.bundle import BuildConfig
from saenb.saes import sources
from saenb.saes.spec import FineTune, SAESpec


class NamedSpec(NamedTuple):
    name: str
    """Unique within its set (a row label in notebook tables)."""
    group: str
    """What the spec varies: "l1", "topk", "width", "tokens", "fix", ..."""
    spec: SAESpec


# ------------------------------------------------------------------------- a bundle's own SAEs (its recipe)
@functools.cache
def _recipe(root: Path) -> tuple[Any, dict[str, Any]]:
    """The BuildConfig of the bundle at `root`, and the L1 coefficient each original SAE ended with (the old
    build raised some by its quality check; bundles built since have none)."""
    manifest = bundle_io.read_manifest(root)
    trained = {h: t["l1_coefficient"] for h, t in manifest.get("sae_training", {}).items()}
    return BuildConfig.from_manifest(manifest["config"]), trained


def _name(preset) -> str:
    return preset if isinstance(preset, str) else preset.name


def base(preset="tiny-stdlib") -> dict[str, SAESpec]:
    """The bundle's SAE per hook (`hook_resid_pre` and `attn.hook_z` of the recipe's layers), from the recipe in its
    manifest: standard (ReLU + L1), `sae_expansion`, `sae_training_tokens`, `sae_lr`, the family's L1
    coefficient, seed, and contexts shuffled by data_seed = seed + hook index (or seed for every hook, with
    `sae_shared_data_seed`: one model pass fills every hook's activation cache)."""
    return _base(_name(preset), sources.bundle_root(preset))


def _base(name: str, root: Path) -> dict[str, SAESpec]:
    cfg, trained = _recipe(root)
    out = {}
    for i, hook in enumerate(cfg.hooks):
        l1 = trained.get(hook, cfg.sae_l1_z if hook.endswith("hook_z") else cfg.sae_l1_resid)
        out[hook] = SAESpec(preset=name, hook=hook, expansion=cfg.sae_expansion, sparsity=l1,
                            training_tokens=cfg.sae_training_tokens, lr=cfg.sae_lr, seed=cfg.seed,
                            data_seed=cfg.seed + (0 if cfg.sae_shared_data_seed else i),
                            batch_tokens=cfg.sae_batch_tokens)
    return out


def topk_sweep(preset="tiny-stdlib") -> dict[tuple[str, int, int, int], SAESpec]:
    """Notebook 07's TopK SAEs (at the recipe's `topk_hook`, hook_resid_post of both models for tiny-stdlib),
    from the bundle's recipe: (model, layer, k, budget factor) -> spec (contexts shuffled by data_seed =
    seed + 1000 + layer, or seed with `sae_shared_data_seed`)."""
    return _topk(_name(preset), sources.bundle_root(preset))


def _topk(name: str, root: Path) -> dict[tuple[str, int, int, int], SAESpec]:
    cfg, _ = _recipe(root)
    return {(model, layer, k, factor): SAESpec(
        preset=name, model=model, hook=get_act_name(cfg.topk_hook.removeprefix("hook_"), layer), architecture="topk",
        expansion=cfg.topk_expansion, sparsity=k, training_tokens=cfg.topk_training_tokens * factor, lr=cfg.sae_lr,
        seed=cfg.seed, data_seed=cfg.seed + (0 if cfg.sae_shared_data_seed else 1000 + layer),
        batch_tokens=cfg.sae_batch_tokens)
        for model, layer, k, factor in cfg.topk_jobs()}


def recipe(preset) -> Any:
    """The bundle's `BuildConfig` (its SAE recipe)."""
    return _recipe(sources.bundle_root(preset))[0]


def legacy_folder(spec: SAESpec, root: Path) -> Path | None:
    """The folder where a bundle built before specs existed keeps `spec` (saes/<hook>/ for its base SAEs,
    topk/<model>/<hook>/k<k>[-x<f>]/ for its TopK sweep), when it has it; such SAEs load from there unchanged."""
    if spec.finetune is not None or spec.objective != "mse":
        return None
    if spec.architecture == "standard" and (root / bundle_io.SAE_DIR / spec.hook).is_dir():
        if _base(spec.preset, root).get(spec.hook) == spec:
            return root / bundle_io.SAE_DIR / spec.hook
    if spec.architecture == "topk" and (root / bundle_io.TOPK_DIR).is_dir():
        for (model, layer, k, factor), candidate in _topk(spec.preset, root).items():
            if candidate == spec:
                path = bundle_io.topk_path(root, model, spec.hook, k, factor)
                return path if path.is_dir() else None
    return None


# ---------------------------------------------------------------------------------- notebook 08: fixes
FIXES_HOOK = "blocks.3.hook_resid_pre"
FIXES_BASE = SAESpec(hook=FIXES_HOOK, sparsity=1.0, data_seed=3)
"""The base ReLU + L1 SAE every fix is applied to: tiny-stdlib's original SAE at this hook (`base()`'s entry;
data_seed 3: the sweep shares its contexts)."""
_TOPK32 = dataclasses.replace(FIXES_BASE, architecture="topk", sparsity=32)


SEEDS = (1, 2)
"""The training seeds repeated at a set's seed points (seed 0 is the point's own entry)."""


def _seeds(points: list[NamedSpec]) -> list[NamedSpec]:
    """The points again at the training seeds `SEEDS` (spec.seed; same contexts, same data_seed), group "seed"."""
    return [NamedSpec(f"{n.name} seed={s}", "seed", dataclasses.replace(n.spec, seed=s)) for n in points for s in SEEDS]


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
    # added with notebook 08 on smollm2-135m (issue 33): the curvature-aware fine-tune and the seed points
    out += [NamedSpec("Fisher fine-tune", "fix", dataclasses.replace(b, finetune=FISHER_FINETUNE))]
    by_name = {n.name: n for n in out}
    out += _seeds([by_name["base"], by_name["topk k=32"], by_name["batchtopk k=32"]])
    return out


E2E_L1 = (0.05, 0.1)
"""Sparsity coefficients of the end-to-end SAEs (KL is about 100x smaller than the MSE of a standard SAE's
normalised activations, so its coefficients are too). They train at lr 3e-3 for 2M tokens: at the base recipe's
1e-3 and 1M tokens the spliced KL was still above 1.5 nats when training ended (a pilot run)."""
FISHER_FINETUNE = FineTune("fisher", lr=1e-4)
"""The curvature-aware fine-tune of both presets' base SAE: the decoder at the decoder fine-tune's lr, the
per-latent scale at the scale fine-tune's (`spec.FISHER_OPTIONS`' scale_lr), on 250k fresh tokens."""

# ------------------------------------------------------------------------- notebook 08 on smollm2-135m
SMOLLM2_HOOK = get_act_name("resid_pre", 15)
SMOLLM2_BASE = SAESpec(preset="smollm2-135m", hook=SMOLLM2_HOOK, sparsity=2.0, training_tokens=2_000_000,
                       data_seed=15)
"""The sweep's base on SmolLM2-135M: ReLU + L1 at the bundle recipe's coefficient (2, which gave L0 45 at 1M
tokens) for 2M tokens, x4, read from the activation cache of the whole training split in data_seed 15's order
(8.6M tokens: every point of the sweep, the 8M-token one included, reads a prefix of it)."""
SMOLLM2_E2E_L1 = 0.1
"""The end-to-end SAEs' sparsity coefficient on SmolLM2 (tiny-stdlib's larger one: L0 16 there, and SmolLM2's
SAEs run at about twice tiny-stdlib's L0 at equal coefficients). 2M tokens at lr 3e-3, as on tiny-stdlib."""


def _fixes_smollm2() -> list[NamedSpec]:
    """Notebook 08's sweep at SmolLM2's layer 15 (x4 and 2M tokens unless the group varies them): ReLU + L1 over
    seven coefficients (aiming at L0 about 10 to 300), TopK k 8-128, BatchTopK and Matryoshka BatchTopK k 16-64,
    JumpReLU and gated near tiny-stdlib's L0 range, widths x2-x16 and training tokens 0.25M-8M at TopK k=32,
    three training seeds at three points, and the fine-tunes and end-to-end SAEs of the base (the NFM and the
    linear adapter are fitted by `studies.fixes.evaluate` on the base)."""
    b = SMOLLM2_BASE
    topk32 = dataclasses.replace(b, architecture="topk", sparsity=32)
    out = [NamedSpec("base", "l1", b)]
    out += [NamedSpec(f"l1={c:g}", "l1", dataclasses.replace(b, sparsity=c)) for c in (0.25, 0.5, 1, 4, 8, 16)]
    out += [NamedSpec(f"topk k={k}", "topk", dataclasses.replace(topk32, sparsity=k)) for k in (8, 16, 32, 64, 128)]
    for arch in ("batchtopk", "matryoshka_batchtopk"):
        out += [NamedSpec(f"{arch} k={k}", arch, dataclasses.replace(b, architecture=arch, sparsity=k))
                for k in (16, 32, 64)]
    out += [NamedSpec(f"jumprelu l0={c:g}", "jumprelu", dataclasses.replace(b, architecture="jumprelu", sparsity=c))
            for c in (0.1, 0.3, 1.0)]
    out += [NamedSpec(f"gated l1={c:g}", "gated", dataclasses.replace(b, architecture="gated", sparsity=c))
            for c in (2.0, 8.0)]
    out += [NamedSpec(f"topk k=32 x{e}", "width", dataclasses.replace(topk32, expansion=e)) for e in (2, 8, 16)]
    out += [NamedSpec(f"topk k=32 {n / 1e6:g}M", "tokens", dataclasses.replace(topk32, training_tokens=n))
            for n in (250_000, 500_000, 1_000_000, 4_000_000, 8_000_000)]
    by_name = {n.name: n for n in out}
    out += _seeds([by_name["base"], by_name["topk k=32"], by_name["batchtopk k=32"]])
    out += [
        NamedSpec("scale fine-tune", "fix", dataclasses.replace(b, finetune=FineTune("scale", lr=1e-3))),
        NamedSpec("decoder fine-tune", "fix", dataclasses.replace(b, finetune=FineTune("decoder", lr=1e-4))),
        NamedSpec("KL+MSE fine-tune", "fix", dataclasses.replace(b, finetune=FineTune("kl_mse", lr=1e-4))),
        NamedSpec("Fisher fine-tune", "fix", dataclasses.replace(b, finetune=FISHER_FINETUNE)),
    ]
    e2e = dataclasses.replace(b, lr=3e-3, sparsity=SMOLLM2_E2E_L1)
    out += [NamedSpec(f"e2e l1={SMOLLM2_E2E_L1:g}", "e2e", dataclasses.replace(e2e, objective="e2e")),
            NamedSpec(f"e2e+ds l1={SMOLLM2_E2E_L1:g}", "e2e_ds", dataclasses.replace(e2e, objective="e2e_ds"))]
    return out


FIXES = {"tiny-stdlib": _fixes, "smollm2-135m": _fixes_smollm2}
"""Notebook 08's set per preset."""

WEIGHTS_COMMITTED = {"smollm2-135m": (
    "base", "base seed=1", "base seed=2", "topk k=32", "topk k=32 seed=1", "topk k=32 seed=2", "batchtopk k=32",
    "batchtopk k=32 seed=1", "batchtopk k=32 seed=2", "matryoshka_batchtopk k=32", "jumprelu l0=0.3", "gated l1=2",
    "scale fine-tune", "decoder fine-tune", "KL+MSE fine-tune", "Fisher fine-tune", "e2e l1=0.1", "e2e+ds l1=0.1")}
"""The points of a preset's "fixes" set whose weights its bundle holds, so that notebook 08 recomputes them: the
base SAE, its fixes, one SAE per architecture near L0 50 and the seeds (each about 5 MB in half precision on
SmolLM2). Every other point is committed as its record and its measurements (`saenb.studies.fixes.record`), which
the notebook reads. A preset not listed commits every point's weights (tiny-stdlib's are 0.2 MB each)."""


def weights_committed(preset) -> tuple[str, ...] | None:
    """`WEIGHTS_COMMITTED`'s names for `preset`, or None (every point's weights)."""
    return WEIGHTS_COMMITTED.get(_name(preset))


def _fixes_of(preset) -> list[NamedSpec]:
    if _name(preset) not in FIXES:
        raise ValueError(f"the 'fixes' set is declared on {sorted(FIXES)}, not {_name(preset)!r}")
    return FIXES[_name(preset)]()


def seed_groups(named: list[NamedSpec]) -> dict[str, list[str]]:
    """The points of `named` trained at several seeds: the seed-0 entry's name -> the names of all its seeds, in
    seed order (a seed-s entry is the seed-0 entry's spec with seed s)."""
    by_spec = {n.spec: n.name for n in named}
    groups: dict[str, list[tuple[int, str]]] = {}
    for n in named:
        if n.spec.seed != 0:
            first = by_spec.get(dataclasses.replace(n.spec, seed=0))
            if first is not None:
                groups.setdefault(first, [(0, first)]).append((n.spec.seed, n.name))
    return {first: [name for _, name in sorted(members)] for first, members in groups.items()}


SETS = {"fixes": _fixes_of,
        "base": lambda preset: [NamedSpec(h, "base", s) for h, s in base(preset).items()],
        "topk_sweep": lambda preset: [NamedSpec(f"{m} L{layer} k{k}" + ("" if f == 1 else f" x{f}"), "topk", s)
                                      for (m, layer, k, f), s in topk_sweep(preset).items()]}


def get(name: str, preset="tiny-stdlib") -> list[NamedSpec]:
    """The named set's specs: "fixes" (notebook 08: `FIXES`' presets), "base" and "topk_sweep" (a bundle's own)."""
    if name not in SETS:
        raise ValueError(f"unknown SAE set {name!r}; sets: {sorted(SETS)}")
    return SETS[name](preset)
