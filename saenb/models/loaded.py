"""A loaded preset: the model, its SAEs keyed by the model's hook name, and the preset's token source.

`saenb.assembly.load_preset` builds one from a preset and its SAE sets; the engine takes it for its model, SAEs,
device and tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from saenb import checks
from saenb.hooks import HOOK_FAMILIES, PresetError, hook_family, hook_width, sae_layer
from saenb.models import bundle_io, data
from saenb.models.presets import Preset

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' (CUDA when present, else the CPU) or a device this machine has; else a `UsageError` naming the fix."""
    return checks.device(device)


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
