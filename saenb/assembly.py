"""Assembly: a `Loaded` (model, SAEs, tokens) built from a preset and its SAE sets, or from anyone's model and SAEs.

    loaded = saenb.load_preset("tiny-stdlib", device="auto")
    loaded.model           # HookedTransformer, eval mode
    loaded.saes            # {"blocks.L.hook_resid_pre": SAE, "blocks.L.attn.hook_z": SAE, ...}
    loaded.tokens(256)     # LongTensor [256, n_ctx], BOS first, the same 256 contexts every call

    loaded = from_model(model, {"blocks.3.hook_resid_pre": sae})   # any HookedTransformer and {hook: SAE}
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_official_model_name

from saenb.files import sha256_file
from saenb.hooks import HOOK_FAMILIES, PresetError
from saenb.models import bundle_io, hub
from saenb.models.loaded import Loaded, heads_concatenated, resolve_device, validate
from saenb.models.presets import Preset, get_preset
from saenb.saes import library, sets

__all__ = ["Loaded", "from_model", "load_preset", "missing_from_hub_cache"]


def load_preset(
    preset: str | Preset,
    device: str | torch.device = "auto",
    *,
    layers: list[int] | tuple[int, ...] | None = None,
    families: tuple[str, ...] = HOOK_FAMILIES,
) -> Loaded:
    """Load a preset's model and SAEs, validated; `layers` and `families` pick a subset of its SAEs."""
    preset = get_preset(preset)
    device = resolve_device(device)
    for family in families:
        if family not in HOOK_FAMILIES:
            raise PresetError(f"family {family!r} unknown; families are {HOOK_FAMILIES}")
    if layers is not None:
        unknown = sorted(set(layers) - set(preset.layers))
        if unknown:
            raise PresetError(
                f"layers {unknown} out of range for preset {preset.name!r}: its SAEs cover layers "
                f"{min(preset.layers)}..{max(preset.layers)}"
            )
    chosen = dataclasses.replace(preset, layers=tuple(sorted(layers))) if layers is not None else preset
    if preset.is_bundle:
        loaded = _load_bundle(chosen, device, families)
    else:
        loaded = _load_hub(chosen, device, families)
    validate(loaded)
    return loaded


def _load_bundle(preset: Preset, device: torch.device, families: tuple[str, ...]) -> Loaded:
    """The bundle's model, and its SAE per hook: the specs of its recipe (`saenb.saes.sets.base`), read from the
    bundle (never trained here: a missing one raises, naming the command that trains it)."""
    root = preset.bundle_path
    manifest = bundle_io.read_manifest(root)
    bundle_io.verify(root, manifest)
    model = bundle_io.load_model(root, device)
    specs = sets.base(preset)
    found = {}
    for source in preset.sae_sources:
        if source.family not in families:
            continue
        for layer in source.at(preset.layers):
            hook = source.hook_name(layer)
            if hook not in specs:
                raise PresetError(f"bundle {root} declares no SAE at {hook!r}; its SAEs sit at {sorted(specs)}")
            found[hook] = library.load(specs[hook], device, train=False, root=root)
    return Loaded(preset, model, heads_concatenated(found), device, sha256_file(root / bundle_io.MANIFEST))


# ------------------------------------------------------------------------------------------------- hub
def missing_from_hub_cache(preset: Preset, families: tuple[str, ...] = HOOK_FAMILIES) -> list[str]:
    """What `load_preset` needs from the hub that the local HF cache lacks (model config, SAE files)."""
    missing = []
    repo = get_official_model_name(preset.model_name)
    if not hub.cached(repo, "config.json"):
        missing.append(f"model {repo}")
    directory = get_pretrained_saes_directory()
    for source in preset.sae_sources:
        if source.family not in families:
            continue
        if source.release not in directory:
            raise PresetError(
                f"release {source.release!r} is not in sae_lens's pretrained directory; see "
                "sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory()"
            )
        lookup = directory[source.release]
        for layer in source.at(preset.layers):
            if source.sae_id(layer) not in lookup.saes_map:
                raise PresetError(f"SAE id {source.sae_id(layer)!r} not in release {source.release!r}; valid ids: "
                                  f"{sorted(lookup.saes_map)}")
            path = lookup.saes_map[source.sae_id(layer)]
            if not (hub.cached(lookup.repo_id, path) or hub.cached(lookup.repo_id, f"{path}/cfg.json")):
                missing.append(f"SAE {source.release}/{source.sae_id(layer)}")
    return missing


def _load_hub(preset: Preset, device: torch.device, families: tuple[str, ...]) -> Loaded:
    hub.require(f"preset {preset.name!r}", missing_from_hub_cache(preset, families))
    saes = {}
    model_kwargs = dict(preset.model_kwargs)
    for source in preset.sae_sources:
        if source.family not in families:
            continue
        for layer in source.at(preset.layers):
            with hub.sae_loading():
                sae = SAE.from_pretrained(source.release, source.sae_id(layer), device=str(device))
            saes[source.hook_name(layer)] = sae.eval()
            model_kwargs.update(sae.cfg.metadata.model_from_pretrained_kwargs or {})
    model = HookedTransformer.from_pretrained(preset.model_name, device=str(device), **model_kwargs)
    return Loaded(preset, model.eval(), heads_concatenated(saes), device)


# ------------------------------------------------------------------------------------------ anyone's model
def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes): what names its weights in cache keys."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def from_model(model: HookedTransformer, saes: dict[str, SAE], *, n_ctx: int = 128) -> Loaded:
    """A `Loaded` of any HookedTransformer and `{hook: SAE}` (hook names of the model; hook_z SAEs take heads
    concatenated), validated as a preset's. It has no token source: pass tokens to what measures it. Model and SAEs
    are named in cache keys by the sha256 of their weights."""
    if not isinstance(saes, dict) or not saes:
        raise PresetError(f"saes must be a non-empty {{hook name: SAE}} dict; got {type(saes).__name__}")
    name = model.cfg.model_name
    preset = Preset(name=f"model:{name}@{weights_sha256(model)[:16]}", model_name=name, dataset="(local tokens)",
                    sae_sources=(), layers=(0,), n_ctx=n_ctx, description=f"{name}, passed in")
    loaded = Loaded(preset, model, {}, torch.device(model.cfg.device))
    return loaded.with_saes(saes, {hook: f"sha256:{weights_sha256(sae)[:16]}" for hook, sae in saes.items()})
