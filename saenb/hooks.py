"""Hook sites: what a hook name says (layer, family), how wide its activation is, where a splice there starts,
and the clean activations at it. A leaf: every layer above `files` may use it.

Names are TransformerLens's (`get_act_name("resid_pre", 3)` is `blocks.3.hook_resid_pre`); hook_z activations are
taken with heads concatenated ([..., head_index, d_head] -> [..., head_index * d_head]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from saenb.checks import UsageError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

HOOK_FAMILIES = ("resid", "z")


class PresetError(UsageError):
    """A preset, hook, layer or request that cannot be served; the message names the fix."""


def hook_family(hook_name: str) -> str:
    return "z" if hook_name.endswith("hook_z") else "resid"


def sae_layer(hook_name: str) -> int:
    """Layer index of a `blocks.L....` hook name."""
    parts = hook_name.split(".")
    if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
        raise PresetError(f"hook {hook_name!r} is not a per-layer hook (expected 'blocks.L.<name>')")
    return int(parts[1])


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


def flat(act: Tensor, hook: str) -> Float[Tensor, "... d"]:
    """hook_z activations with heads concatenated ([..., head_index, d_head] -> [..., head_index*d_head])."""
    return act.flatten(-2) if hook_family(hook) == "z" else act


def splice_point(hook: str) -> tuple[str, int, bool]:
    """Where a patched forward starts for an SAE at `hook`: (the cached residual stream it starts from, the
    block it starts at, whether the spliced activation *is* that residual stream).

    `blocks.L.hook_resid_pre` is block L's input and `blocks.L.hook_resid_post` block L+1's (after the last
    block, the forward only applies the final norm and unembedding): the spliced activation is fed in directly.
    Any other hook of block L (`hook_resid_mid`, `hook_attn_out`, `hook_mlp_out`, `attn.hook_z`, ...) is spliced
    by a forward hook while block L runs from its clean input."""
    layer = sae_layer(hook)
    if hook == get_act_name("resid_post", layer):
        return hook, layer + 1, True
    return get_act_name("resid_pre", layer), layer, hook == get_act_name("resid_pre", layer)


def clean_activations(model, hook: str, tokens: Int[Tensor, "b pos"]) -> Float[Tensor, "b pos d"]:
    """Clean activations at `hook` (heads concatenated) for every position, float32, on the CPU; the forward
    stops after the hook's block."""
    return clean_activations_at(model, [hook], tokens)[hook]


def clean_activations_at(model, hooks: list[str], tokens: Int[Tensor, "b pos"]) -> dict[str, Float[Tensor, "b pos d"]]:
    """`clean_activations` at several hooks from one forward pass, which stops after the last hook's block."""
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=list(hooks),
                                        stop_at_layer=max(sae_layer(h) for h in hooks) + 1)
    return {hook: flat(cache[hook], hook).float().cpu() for hook in hooks}
