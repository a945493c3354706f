"""The patched forward's blocks compiled once and replayed: fewer kernel launches on a GPU.

On an H100 the engine's host was the bottleneck: a patched forward of GPT-2 is about 30 small kernels per block,
each launched from Python. Inside `captured_blocks(model)` on a CUDA device, each transformer block runs as one
`torch.compile`d function (`mode="reduce-overhead"`: inductor fuses the norms, rotary, activations and residual adds,
and CUDA graphs replay the block's kernels with one launch); blocks of one architecture share the compiled code (their
weights are its inputs). Only the patched forwards (those given `start_at_layer`) run compiled blocks, and each
marks a new CUDA-graph step: a block's output lives until the next patched forward (the engine copies the measured
positions out of each forward's output before it runs the next). A clean run (`run_with_cache`) keeps the eager
blocks: the activations it caches must outlive it.

A block runs its own eager forward whenever a hook point in it has a hook attached (the engine's splice at
`attn.hook_z`: torch.compile does not re-check hooks once compiled), or it is handed a TransformerLens key/value
cache entry (which it appends to) or a mask, or, when replayed as CUDA graphs, a prefix entry (`REPLAYED_ENTRIES`).
On a CPU, or with `enabled=False`, nothing changes: the flag is a no-op there. The same function is computed;
rounding may differ (fused kernels), as with `kernels.fused_kernels`.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from transformer_lens.components import TransformerBlock
from transformer_lens.components.abstract_attention import AbstractAttention
from transformer_lens.hook_points import HookPoint

from saenb.engine.kernels import CleanAttention, SharedPrefix


COMPILED_ENTRIES = (SharedPrefix, CleanAttention, type(None))
"""What a compiled block may be handed as its past_kv_cache_entry (a TL cache entry is appended to: eager)."""
REPLAYED_ENTRIES = (type(None),)
"""What a block replayed as a CUDA graph (mode "reduce-overhead") may be handed: none of the engine's prefix entries.
Measured on an H200 (torch 2.11, CUDA 13): with the prefix entries replayed, single-token KLs differed from the eager
path by up to 0.33 nats, while all-token (no entry) agreed to 1.4e-6; the traced function is the same (the tests
check it with dynamo's tracing on a CPU), so the fault lies in the replay, not in what was compiled."""


def _block_forward(block: TransformerBlock, resid: torch.Tensor, entry):
    return type(block).forward(block, resid, past_kv_cache_entry=entry)


def _hooked(points: list[HookPoint]) -> bool:
    return any(p._forward_hooks or p._forward_pre_hooks for p in points)


@contextlib.contextmanager
def captured_blocks(model, enabled: bool = True, *, mode: str | None = "reduce-overhead", backend="inductor",
                    force: bool = False):
    """Within the block, `model`'s transformer blocks run compiled (module docstring) where the model is on a CUDA
    device and `enabled`; elsewhere nothing changes. `force` compiles on any device (with `backend="eager"`, or a
    counting backend, on a CPU: dynamo's tracing alone, which the tests use to check that the blocks trace to the
    same function, without graph breaks, one compiled graph for every block). Yields whether the blocks are
    compiled."""
    on = enabled and (force or torch.device(model.cfg.device).type == "cuda")
    if not on:
        yield False
        return
    options = {"backend": backend, "dynamic": None}
    if backend == "inductor" and mode is not None:
        options["mode"] = mode
    compiled = torch.compile(_block_forward, **options)
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    previous = {block: vars(block).get("forward") for block in blocks}
    failed: list[BaseException] = []
    cudagraphs = backend == "inductor" and mode == "reduce-overhead"
    entries = REPLAYED_ENTRIES if cudagraphs else COMPILED_ENTRIES
    patched = [False]  # whether the forward under way is a patched one

    def wrap(block: TransformerBlock):
        points = [m for m in block.modules() if isinstance(m, HookPoint)]
        # the eager forward: the block's own, or the one already in place (`kernels.fused_kernels`'s), kept on exit
        own = previous[block] or functools.partial(type(block).forward, block)

        def forward(resid_pre, shortformer_pos_embed=None, past_kv_cache_entry=None, attention_mask=None):
            eager = (not patched[0] or failed or shortformer_pos_embed is not None or attention_mask is not None
                     or _hooked(points) or not isinstance(past_kv_cache_entry, entries))
            if eager:
                return own(resid_pre, shortformer_pos_embed, past_kv_cache_entry, attention_mask)
            try:
                out = compiled(block, resid_pre, past_kv_cache_entry)
            except Exception as error:  # noqa: BLE001 (a compiler failure: the eager forward computes the same)
                failed.append(error)
                warnings.warn(f"captured_blocks: torch.compile failed ({type(error).__name__}: {error}); the blocks "
                              "run eagerly (measure(graphs=False) avoids the attempt)", RuntimeWarning, stacklevel=2)
                return own(resid_pre, shortformer_pos_embed, past_kv_cache_entry, attention_mask)
            return out

        return forward

    def model_forward(*args, **kwargs):
        patched[0] = kwargs.get("start_at_layer") is not None
        if patched[0] and cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return type(model).forward(model, *args, **kwargs)
        finally:
            patched[0] = False

    # TL holds attn_scale as a NumPy scalar, which dynamo turns into a tensor whose guard fails under inference
    # mode; the same value as a Python float is traced as a constant
    scales = [(m, m.attn_scale) for m in model.modules() if isinstance(m, AbstractAttention)]
    try:
        for module, scale in scales:
            module.attn_scale = float(scale)
        for block in blocks:
            block.forward = wrap(block)
        model.forward = model_forward
        yield True
    finally:
        for module, scale in scales:
            module.attn_scale = scale
        for block in blocks:
            vars(block).pop("forward", None)
            if previous[block] is not None:
                block.forward = previous[block]
        vars(model).pop("forward", None)
