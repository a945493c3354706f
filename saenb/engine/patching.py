"""The engine: splice perturbed activations into the model and measure the next-token distribution.

`measure` (fast) and `measure_naive` (the plain reference) take the same arguments and return the same
tidy frame, one row per sequence x position x hook x intervention x sample:

    seq pos patch_pos token target hook layer intervention sample kl ce_clean ce_patched ce_delta
    norm_x norm_sae eps cos_sae l0 dist_sae

`kl` is KL(clean || patched) of the next-token distribution at `pos`, in nats; `ce_*` the cross-entropy
of the true next token `target`. The geometry columns describe the activation that was patched (at
`patch_pos`; equal to `pos` in all-token mode); `dist_sae` is the splice's own distance from x_sae
(0 for `sae`; the perturbation's norm for `latent_perturb` and `sae_plus_random`).

Modes: all-token (`positions="all"`: every position but BOS patched at once, every position measured);
single-token (`positions=p`: only p patched, measured at p..p+16 by default); many-sample
(`n_samples=N` perturbations of the same tokens).

Fast path (DESIGN.md, engine principles): one clean forward per batch caches every hook's activation,
the clean log-probs and the clean keys/values; patched forwards start at the hooked layer
(`start_at_layer`) and, in single-token mode, only at the patched position, reading the clean prefix
from a frozen key/value cache; interventions and samples are stacked along the batch and run in chunks
sized to a memory budget, each chunk reduced to per-token scalars at once (blocks of the rows of consecutive
sequences, each compared with its clean distribution by broadcasting; KL from one pass over the vocabulary and a d_model-long
product, `metrics.CleanDistribution`, on a CPU one vocabulary slice at a time while it is in cache, every
block's logits written into one reused buffer). Rows whose whole input is the same (zero and mean ablation at a residual
hook, in every sequence of a batch) are forwarded once. A splice after a block's attention (at `attn.hook_z`,
`hook_attn_out`, ...) starts that block from its clean input, so the block's attention is the clean run's and is
not recomputed (`kernels.CleanAttention`). LayerNorms, the MLP
activation and attention run as torch's fused kernels for the same functions (`kernels.fused_kernels`);
there the clean prefix's keys and values are held once per sequence and every patched row of it attends
to them by broadcasting (`kernels.SharedPrefix`), instead of a key/value cache copied per row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.utilities import get_act_name
from transformer_lens.utilities.activation_functions import apply_softcap

from saenb.checks import UsageError, positive_int
from saenb.engine import interventions as iv
from saenb.engine.draws import Draws
from saenb.engine.graphs import captured_blocks
from saenb.engine.kernels import CLEAN_ATTENTION_HOOKS, CleanAttention, SharedPrefix, fused_kernels
from saenb.engine.metrics import (
    CENTRED_KL_MAX,
    VOCAB_SLICE,
    CleanDistribution,
    ce_per_token,
    geometry,
    kl_per_token,
)
from saenb.hooks import clean_activations, flat, sae_layer, splice_point
from saenb.models.data import non_special, special_ids
from saenb.models.loaded import Loaded

SINGLE_TOKEN_SPAN = 16
"""Single-token mode measures the patched position and this many after it, by default."""
MEAN_REFERENCE_SEQS = 64
"""Mean ablation uses the mean activation over the first this-many sequences (special tokens excluded)."""
NOTEBOOK1 = ("sae", "sae_norm_corrected", "sae_norm", "eps_random", "theta_random_sae_norm",
             "theta_random_true_norm", "zero", "mean", "feature_aligned")
"""The interventions of notebook 1 (the study's eight, plus feature-aligned at the same eps)."""

COLUMNS = ["seq", "pos", "patch_pos", "token", "target", "hook", "layer", "intervention", "sample", "kl",
           "ce_clean", "ce_patched", "ce_delta", "norm_x", "norm_sae", "eps", "cos_sae", "l0", "dist_sae"]


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated measurement request (what `measure` and `measure_naive` both compute)."""

    hooks: tuple[str, ...]
    specs: tuple[iv.Intervention, ...]
    patch: tuple[int, ...]
    """Candidate positions to patch (the same in every sequence; special tokens are then skipped)."""
    measured: tuple[int, ...]
    """Positions measured: each one's next-token distribution (the last position has no CE target)."""
    n_samples: int
    seed: int
    n_ctx: int
    special: tuple[int, ...]
    """Token ids never patched nor measured (empty when `include_special`)."""

    @property
    def single(self) -> bool:
        return len(self.patch) == 1

    def keep(self, tokens: Int[Tensor, "b pos"]) -> Bool[Tensor, "b pos"]:
        """Where a token may be patched and measured: not a special token."""
        mask = torch.ones_like(tokens, dtype=torch.bool)
        for token_id in self.special:
            mask &= tokens != token_id
        return mask


def make_request(
    loaded: Loaded, hooks, interventions, tokens: Tensor, *, positions: int | Literal["all"] = "all",
    measure_positions=None, n_samples: int = 1, seed: int = 0, include_special: bool = False,
) -> Request:
    """Check every argument against the loaded preset; errors say what was wrong and what is allowed."""
    hooks = tuple(loaded.saes) if hooks is None else ((hooks,) if isinstance(hooks, str) else _sequence("hooks", hooks))
    if not hooks:
        raise UsageError(f"hooks is empty; hooks with SAEs: {list(loaded.saes)}")
    for hook in hooks:
        if hook not in loaded.saes:
            raise UsageError(f"no SAE at hook {hook!r}; hooks with SAEs: {list(loaded.saes)}")
    if isinstance(interventions, (str, iv.Intervention)):
        interventions = (interventions,)
    specs = tuple(iv.Intervention.of(i) for i in _sequence("interventions", interventions))
    if not specs:
        raise UsageError("interventions is empty; choose from " + str(iv.names()))
    validate_tokens(loaded, tokens)
    n_ctx = tokens.shape[1]
    last = n_ctx - 2  # default measurements stop here: the last position has no next token to score
    if positions == "all":
        patch = tuple(range(n_ctx))
        measured = tuple(range(1, last + 1)) if measure_positions is None else _positions(measure_positions)
    else:
        if isinstance(positions, bool) or not isinstance(positions, int) or not 0 <= positions < n_ctx:
            raise UsageError(f"positions={positions!r} must be 'all' or a position in 0..{n_ctx - 1}")
        patch = (positions,)
        if not include_special:
            patchable = non_special(tokens, loaded.model.tokenizer)
            if not patchable[:, positions].any():
                later = [q for q in range(n_ctx) if patchable[:, q].any()]
                raise UsageError(
                    f"positions={positions} holds a special token (e.g. BOS) in every sequence, and special tokens "
                    f"are never patched: nothing would be measured. The first position that can be patched is "
                    f"{later[0] if later else 'none'} (or pass include_special=True)")
        if measure_positions is None:
            measured = tuple(range(positions, max(positions, min(positions + SINGLE_TOKEN_SPAN, last)) + 1))
        else:
            measured = _positions(measure_positions)
            if any(q < positions for q in measured):
                raise UsageError(f"measure_positions {measured} must not precede the patched position {positions}: "
                                 "patching cannot change earlier positions")
    if not measured or any(not 0 <= q < n_ctx for q in measured) or len(set(measured)) != len(measured):
        raise UsageError(f"measure_positions must be distinct positions in 0..{n_ctx - 1}; got {measured}")
    n_samples = positive_int("n_samples", n_samples)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise UsageError(f"seed={seed!r} must be an integer")
    special = () if include_special else tuple(special_ids(loaded.model.tokenizer))
    return Request(hooks, specs, patch, tuple(sorted(measured)), n_samples, int(seed), n_ctx, special)


def validate_tokens(loaded: Loaded, tokens: Tensor) -> None:
    cfg = loaded.model.cfg
    if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError("tokens must be an integer tensor [n_seqs, n_ctx], e.g. loaded.tokens(64)")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise UsageError(f"tokens must be [n_seqs >= 1, n_ctx >= 2]; got shape {tuple(tokens.shape)}")
    if tokens.shape[1] > cfg.n_ctx:
        raise UsageError(f"contexts of {tokens.shape[1]} tokens exceed the model's n_ctx={cfg.n_ctx}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= cfg.d_vocab:
        raise UsageError(f"token ids must lie in 0..{cfg.d_vocab - 1} (the model's vocabulary); got {low}..{high}")


def _sequence(name: str, value) -> tuple:
    """`value` (a list, tuple or other iterable) as a tuple, or a `UsageError` naming it."""
    try:
        return tuple(value)
    except TypeError:
        raise UsageError(f"{name}={value!r} must be a name or a list of them") from None


def _positions(value) -> tuple[int, ...]:
    """measure_positions as a tuple of ints, or a `UsageError`."""
    try:
        out = tuple(value)
    except TypeError:
        out = None
    if out is None or not all(isinstance(q, numbers.Integral) and not isinstance(q, bool) for q in out):
        raise UsageError(f"measure_positions={value!r} must be a list of positions (integers)")
    return tuple(int(q) for q in out)


def check_sizes(**sizes) -> None:
    """Each keyword a positive integer (batch_size, memory_mb, chunk_seqs, ...), or a `UsageError` naming it."""
    for name, value in sizes.items():
        positive_int(name, value)


def hook_means(loaded: Loaded, hooks, tokens: Tensor) -> dict[str, Float[Tensor, "d"]]:
    """Mean clean activation at each hook over the first MEAN_REFERENCE_SEQS sequences, special tokens excluded."""
    ref = tokens[:MEAN_REFERENCE_SEQS].to(loaded.device)
    keep = non_special(ref, loaded.model.tokenizer)
    with torch.inference_mode():  # blocks after the last hooked one are not needed
        _, cache = loaded.model.run_with_cache(ref, names_filter=list(hooks),
                                               stop_at_layer=max(sae_layer(h) for h in hooks) + 1)
    return {h: flat(cache[h], h)[keep].mean(0) for h in hooks}


def hook_activations(loaded: Loaded, hook: str, tokens: Tensor, batch_size: int = 32) -> Float[Tensor, "n d"]:
    """`clean_activations` of every non-special token of `tokens`, batch by batch: [n_tokens, d]."""
    return torch.cat([clean_activations(loaded.model, hook, chunk)[non_special(chunk, loaded.model.tokenizer)]
                      for chunk in tokens.split(batch_size)])


def means_for(loaded: Loaded, req: Request, tokens: Tensor,
              means: dict[str, Tensor] | None = None) -> dict[str, Tensor | None]:
    """The mean-ablation reference per hook: `means` when given, `hook_means` of `tokens` when an intervention
    uses it (`mean`), else nothing (no forward pass is spent on it)."""
    if means is not None:
        return means
    if any(spec.name == "mean" for spec in req.specs):
        return hook_means(loaded, req.hooks, tokens)
    return dict.fromkeys(req.hooks)


DRAW_ELEMENTS = 1 << 24
"""At most this many numbers are drawn by one call of a random intervention (`perturb` splits the sequences to keep
to it: an all-token `latent_perturb` at 24,576 latents draws that many per token)."""


def perturb(loaded: Loaded, req: Request, hook: str, x: Float[Tensor, "b p d"], seqs: list[int],
            mean: Float[Tensor, "d"] | None, positions=None) -> tuple[Float[Tensor, "b k n p d"], dict[str, Tensor]]:
    """Every intervention's patched activations at the candidate positions (`positions`, default `req.patch`: the
    token positions of x's second axis), and the tokens' geometry.

    Random interventions draw from counter-based streams (`saenb.engine.draws.Draws`) keyed by (seed, hook, the
    intervention's `stream`) and counted by (sequence, position, sample): the draws are made on x's device, in one
    call over every sequence of the batch, and do not depend on batching, chunking or device.
    """
    sae = loaded.saes[hook]
    latents = sae.encode(x)
    x_sae = sae.decode(latents)
    W_dec = sae.W_dec.detach()
    n = req.n_samples
    b, p = x.shape[:2]
    positions = req.patch if positions is None else positions
    if len(positions) != p:
        raise ValueError(f"perturb: {len(positions)} positions for activations at {p}")
    out = torch.empty((b, len(req.specs), n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    random = [k for k, spec in enumerate(req.specs) if not iv.is_deterministic(spec.name)]
    # deterministic interventions see every sequence at once, without a samples axis
    whole = iv.Site(x, x_sae, latents, W_dec, mean, hook)
    for k, spec in enumerate(req.specs):
        if k not in random:
            out[:, k] = spec(whole, None).unsqueeze(1)
    if random:
        dev = x.device
        seq = torch.as_tensor(seqs, dtype=torch.int64, device=dev).view(b, 1, 1)
        pos = torch.as_tensor(positions, dtype=torch.int64, device=dev).view(1, 1, p)
        sample = torch.arange(n, device=dev).view(1, n, 1)
        step = max(1, DRAW_ELEMENTS // (n * p * max(latents.shape[-1], x.shape[-1])))
        for s0 in range(0, b, step):
            s1 = min(b, s0 + step)
            rows = (s1 - s0, n, p)
            site = iv.Site(x[s0:s1, None].expand(*rows, -1), x_sae[s0:s1, None].expand(*rows, -1),
                           latents[s0:s1, None].expand(*rows, -1), W_dec, mean, hook)
            for k in random:
                spec = req.specs[k]
                draws = Draws(req.seed, hook, iv.stream(spec.name), seq=seq[s0:s1], pos=pos, sample=sample)
                out[s0:s1, k] = spec(site, draws)
    geo = geometry(x, x_sae, latents)
    geo["dist_sae"] = (out - x_sae[:, None, None]).norm(dim=-1)  # [b, k, n, p]: how far each splice is from x_sae
    return out, geo


def check_finite(patched: Tensor, keep: Tensor, req: Request, hook: str) -> None:
    """Patched activations where they will be spliced in must be finite (a zero-norm x makes NaNs)."""
    finite = (torch.isfinite(patched).all(-1) | ~keep[:, None, None, :]).flatten(2).all(-1).all(0)  # [k]
    bad = [s.label for s, ok in zip(req.specs, finite.tolist(), strict=True) if not ok]
    if bad:
        raise FloatingPointError(f"non-finite patched activations at {hook} from {bad}: an activation of zero norm? "
                                 "Leave that position out (measure_positions / positions) or use another intervention.")


def _frame(req: Request, hook: str, seqs: list[int], tokens: Tensor, kl: Tensor, ce_clean: Tensor,
           ce_patched: Tensor, geo: dict[str, Tensor]) -> pd.DataFrame:
    """Tidy rows from [b, k, n, m] results (m measured positions); geometry is [b, p] over candidate positions.

    Rows at special tokens (and, in single-token mode, whole sequences whose patched token is special) are
    dropped: nothing was patched or measured there.
    """
    b, k, n, m = kl.shape
    measured = np.asarray(req.measured)
    patch_idx = measured if not req.single else np.zeros(m, int)
    patch_pos = np.asarray(req.patch)[patch_idx]
    tok = tokens.cpu().numpy()
    keep = req.keep(tokens).cpu().numpy()
    keep_bm = keep[:, measured] & keep[:, patch_pos]  # [b, m]
    grid = np.meshgrid(np.arange(b), np.arange(k), np.arange(n), np.arange(m), indexing="ij")
    rows = np.broadcast_to(keep_bm[:, None, None, :], (b, k, n, m)).ravel()
    bi, ki, ni, mi = (g.ravel()[rows] for g in grid)
    next_pos = np.minimum(measured[mi] + 1, req.n_ctx - 1)
    has_next = measured[mi] + 1 < req.n_ctx
    data = {
        "seq": np.asarray(seqs, dtype=np.int32)[bi],
        "pos": measured[mi].astype(np.int16),
        "patch_pos": patch_pos[mi].astype(np.int16),
        "token": tok[bi, measured[mi]].astype(np.int32),
        "target": np.where(has_next, tok[bi, next_pos], -1).astype(np.int32),
        "hook": pd.Categorical.from_codes(np.zeros(len(bi), dtype=np.int8), categories=[hook]),
        "layer": np.full(len(bi), sae_layer(hook), dtype=np.int16),
        "intervention": pd.Categorical.from_codes(ki, categories=[s.label for s in req.specs]),
        "sample": ni.astype(np.int32),
        "kl": kl.cpu().numpy()[bi, ki, ni, mi].astype(np.float32),
        "ce_clean": ce_clean.cpu().numpy()[bi, mi].astype(np.float32),
        "ce_patched": ce_patched.cpu().numpy()[bi, ki, ni, mi].astype(np.float32),
    }
    data["ce_delta"] = data["ce_patched"] - data["ce_clean"]
    for name, values in geo.items():  # per token [b, p], or per splice [b, k, n, p]
        values = values.cpu().numpy()
        picked = values[bi, patch_idx[mi]] if values.ndim == 2 else values[bi, ki, ni, patch_idx[mi]]
        data[name] = picked.astype(np.float32)
    return pd.DataFrame(data)[COLUMNS]


def finish(frames: list[pd.DataFrame], req: Request) -> pd.DataFrame:
    """One frame from per-batch frames: request-ordered categories, rows sorted by the frame's key."""
    df = pd.concat(frames, ignore_index=True)
    df["hook"] = pd.Categorical(df["hook"].astype(str), categories=list(req.hooks))
    df["intervention"] = pd.Categorical(df["intervention"].astype(str), categories=[s.label for s in req.specs])
    return df.sort_values(["hook", "intervention", "sample", "seq", "pos"], kind="stable").reset_index(drop=True)


def _targets(batch: Tensor, measured: Tensor) -> Tensor:
    """The next token at each measured position; the last position has none (0 here, NaN CE later)."""
    return batch[:, (measured + 1).clamp_max(batch.shape[1] - 1)]


def _nan_last(ce: Tensor, measured: Tensor, n_ctx: int) -> Tensor:
    return ce.masked_fill(measured + 1 >= n_ctx, float("nan"))


def _batches(tokens: Tensor, batch_size: int, seq_offset: int, desc: str, progress: bool):
    starts = range(0, len(tokens), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        batch = tokens[start:start + batch_size]
        yield batch, list(range(seq_offset + start, seq_offset + start + len(batch)))


# ------------------------------------------------------------------------------------------------ fast
def measure(
    loaded: Loaded, hooks=None, interventions=NOTEBOOK1, tokens: Tensor | None = None, *,
    positions: int | Literal["all"] = "all", measure_positions=None, n_samples: int = 1, seed: int = 0,
    include_special: bool = False, batch_size: int = 16, memory_mb: int = 256, seq_offset: int = 0,
    means: dict[str, Tensor] | None = None, progress: bool = True, fused: bool = True, graphs: bool = False,
) -> pd.DataFrame:
    """Per-token KL and CE of every (hook, intervention, sample) splice; see the module docstring.

    tokens:          [n_seqs, n_ctx] contexts (default: the preset's default held-out contexts).
    positions:       "all" (all-token mode) or one position (single-token / many-sample modes).
    measure_positions: default 1..n_ctx-2 (all-token) or p..p+16 (single-token); the last position may be
                     asked for (its CE is NaN: no next token).
    include_special: patch and measure special tokens too (BOS, document separators). Off by default, as in
                     sae_lens's evals.
    batch_size:      sequences per clean forward.
    memory_mb:       budget for one chunk of patched forwards (logits included); sets the chunk size.
    seq_offset:      index of tokens[0] among all sequences (the `seq` column and the random draws follow
                     it), so a measurement split into pieces equals the whole one.
    means:           mean activation per hook for mean ablation (default: `hook_means` of these tokens).
    fused:           run LayerNorms, MLP activations and attention as torch's fused kernels
                     (`kernels.fused_kernels`); same functions, rounding differs.
    graphs:          on a CUDA device, run the patched forwards' blocks compiled and replayed as CUDA graphs
                     (`graphs.captured_blocks`: fewer kernel launches; same functions, rounding differs); a no-op
                     on a CPU.
    """
    check_sizes(batch_size=batch_size, memory_mb=memory_mb)
    if isinstance(seq_offset, bool) or not isinstance(seq_offset, numbers.Integral) or seq_offset < 0:
        raise UsageError(f"seq_offset={seq_offset!r} must be a non-negative integer (the index of tokens[0])")
    tokens = loaded.tokens() if tokens is None else tokens
    req = make_request(loaded, hooks, interventions, tokens, positions=positions, measure_positions=measure_positions,
                       n_samples=n_samples, seed=seed, include_special=include_special)
    means = means_for(loaded, req, tokens, means)
    model = loaded.model
    # single-token work starts at the patched position (the clean prefix comes from the key/value cache);
    # nothing after the last measured position is ever computed
    window = (req.patch[0] if req.single else 0, req.measured[-1] + 1)
    # the clean run covers the window and every candidate position (the random draws are made for all
    # candidates, so that they do not depend on the window)
    clean_end = max(window[1], req.patch[-1] + 1)
    names = {*req.hooks, *(splice_point(h)[0] for h in req.hooks)}
    frames = []
    kernels = fused_kernels(model, keep=req.hooks) if fused else contextlib.nullcontext(False)
    with torch.inference_mode(), kernels as shared, captured_blocks(model, graphs):
        if window[0] > 0:  # the clean prefix's keys (as attention consumes them: rotated, for a shared prefix)
            names |= {get_act_name(kind, layer) for kind in (_key_name(model, shared), "v")
                      for layer in range(model.cfg.n_layers)}
        if shared:  # the clean z of blocks whose attention the patched rows need not recompute
            names |= {get_act_name("z", sae_layer(h)) for h in req.hooks if _clean_attention(h)}
        unembed = _Unembed(model)
        for batch, seqs in _batches(tokens, batch_size, seq_offset, "measure", progress):
            batch = batch.to(loaded.device)
            # the clean run stops where nothing more is needed and is unembedded at the measured positions only
            final, cache = model.run_with_cache(batch[:, :clean_end], names_filter=sorted(names),
                                                stop_at_layer=model.cfg.n_layers)
            measured = torch.tensor(req.measured, device=batch.device)
            h_clean = unembed.normalize(final[:, measured])  # [b, m, d_model]
            clean = CleanDistribution(h_clean, _targets(batch, measured), unembed.weight, unembed.bias,
                                      soft_cap=0.0 if unembed.linear else model.cfg.output_logits_soft_cap,
                                      vocab_slice=None if batch.is_cuda else VOCAB_SLICE)
            ce_clean = _nan_last(clean.ce, measured, req.n_ctx)
            del final
            keep = req.keep(batch)[:, list(req.patch)]  # [b, p]
            for hook in req.hooks:
                x = flat(cache[hook], hook)[:, list(req.patch)]  # [b, p, d]
                patched, geo = perturb(loaded, req, hook, x, seqs, means[hook])
                check_finite(patched, keep, req, hook)
                kl, ce = _run_patched(loaded, req, hook, cache, patched, keep, clean, unembed, batch, window,
                                      memory_mb, shared)
                frames.append(_frame(req, hook, seqs, batch, kl, ce_clean, _nan_last(ce, measured, req.n_ctx), geo))
            del cache, clean  # before the next batch's clean run: two batches' worth is never held at once
    return finish(frames, req)


def _run_patched(loaded: Loaded, req: Request, hook: str, cache, patched: Float[Tensor, "b k n p d"],
                 keep: Bool[Tensor, "b p"], clean: CleanDistribution, unembed: _Unembed, batch: Tensor,
                 window: tuple[int, int], memory_mb: int,
                 shared: bool) -> tuple[Float[Tensor, "b k n m"], Float[Tensor, "b k n m"]]:
    """Forward every stacked (sequence, intervention, sample) row from the hooked layer over `window`, in
    chunks within `memory_mb`, each reduced at once to KL and CE at the measured positions. With `shared`
    (every attention fused), the clean prefix is passed as `SharedPrefix` entries, else as a per-row cache."""
    model, cfg = loaded.model, loaded.model.cfg
    start, layer, direct = splice_point(hook)
    w0, w1 = window
    # candidate positions at or after w1 cannot change a measured position (causal attention): dropped
    kept = [i for i, q in enumerate(req.patch) if q < w1]
    patched, keep = patched[:, :, :, kept], keep[:, kept]
    b, k, n, p, d = patched.shape
    rel_patch = torch.tensor([req.patch[i] for i in kept], device=batch.device) - w0
    measured = torch.tensor(req.measured, device=batch.device)
    resid = cache[start][:, w0:w1]  # [b, w, d_model]
    clean_at_patch = flat(cache[hook], hook)[:, w0 + rel_patch]  # [b, p, d]
    # special tokens keep their clean activation: nothing is spliced there
    rows = torch.where(keep[:, None, None, :, None], patched, clean_at_patch[:, None, None]).reshape(b * k * n, p, d)
    seq_of_row = torch.arange(b, device=batch.device).repeat_interleave(k * n)
    # bytes per row alive inside one block: residual, layer-norm, q/k/v, z and output (8 d_model), the MLP
    # hidden and its activation's temporaries (6 d_mlp), attention scores/mask/pattern over the keys
    per_row = (w1 - w0) * (8 * cfg.d_model + 6 * (cfg.d_mlp or 0) + 3 * cfg.n_heads * w1) * 4
    chunk = max(1, int(memory_mb * 2**20 // per_row))
    m = len(req.measured)
    if direct and w0 == 0:
        # The whole input of the patched forward is the spliced residual stream, so rows whose inputs are
        # equal give equal outputs: each distinct input is forwarded once. Zero and mean ablation at a
        # residual hook give every sequence of a batch the same input (BOS, left clean, is the same token).
        inputs = _splice(resid[seq_of_row], None, rows=rows, rel_patch=rel_patch)  # [rows, w, d_model]
        distinct, inverse = distinct_rows(inputs)
        del inputs
        final = torch.cat([
            model(distinct[a:a + chunk], start_at_layer=layer, stop_at_layer=cfg.n_layers)[:, measured - w0]
            for a in range(0, len(distinct), chunk)
        ])  # [distinct rows, m, d_model]: measured positions only; row r's is final[inverse[r]]
    else:
        inverse = None
        final = torch.empty(len(rows), m, cfg.d_model, device=batch.device)
        for r0, r1, s0, s1 in _row_chunks(b, k * n, chunk):
            idx = seq_of_row[r0:r1]
            rows_chunk = rows[r0:r1]
            inp = resid[idx]
            fwd_hooks = []
            if direct:
                inp = _splice(inp, None, rows=rows_chunk, rel_patch=rel_patch)
            else:
                fwd_hooks.append((hook, functools.partial(_splice, rows=rows_chunk, rel_patch=rel_patch)))
            if w0 == 0:
                kv = None
            elif shared:
                kv = [SharedPrefix(cache[get_act_name(_key_name(model, True), i)][s0:s1, :w0],
                                   cache[get_act_name("v", i)][s0:s1, :w0]) for i in range(cfg.n_layers)]
            else:
                kv = _prefix_cache(cache, idx, w0, cfg)
            if shared and _clean_attention(hook):
                kv = kv or [None] * cfg.n_layers
                kv[layer] = CleanAttention(cache[get_act_name("z", layer)][s0:s1, w0:w1])
            with model.hooks(fwd_hooks=fwd_hooks) if fwd_hooks else contextlib.nullcontext():
                out = model(inp, start_at_layer=layer, stop_at_layer=cfg.n_layers, past_kv_cache=kv)
            final[r0:r1] = out[:, measured - w0]
    kl_out = torch.empty(b * k * n, m, device=batch.device)
    ce_out = torch.empty_like(kl_out)
    # a constant intervention spliced straight into the residual stream at every position (whose rows were
    # deduplicated above) is far from the clean run everywhere
    far = torch.tensor([inverse is not None and iv.is_constant(spec.name) for spec in req.specs], device=batch.device)
    _reduce_logits(unembed, final, inverse, clean, seq_of_row, kl_out, ce_out, memory_mb,
                   far=far.repeat_interleave(n).repeat(b))
    shape = (b, k, n, len(req.measured))
    return kl_out.view(shape), ce_out.view(shape)


LOGIT_BLOCK = 512
"""Tokens unembedded at once on a CPU: their logits over one vocabulary slice (`metrics.VOCAB_SLICE`, with a
linear readout) or the whole vocabulary (soft-capped) are reduced at once. (On a GPU, blocks fill the memory
budget.)"""


def _reduce_logits(unembed: _Unembed, final: Float[Tensor, "f m d_model"], source: Int[Tensor, "r"] | None,
                   clean: CleanDistribution, seq: Int[Tensor, "r"], kl_out: Float[Tensor, "r m"],
                   ce_out: Float[Tensor, "r m"], memory_mb: int,
                   far: Bool[Tensor, "r"] | None = None) -> None:
    """ln_final, unembed and KL/CE (`CleanDistribution`) of every row r, a copy of sequence seq[r] whose final
    residual stream is `final[source[r]]` (`final[r]` when `source` is None).

    Rows of one sequence are contiguous (`seq` is sorted): a block holds the rows of consecutive sequences with as many
    rows each (`_sequence_groups`), compared with each one's clean distribution by broadcasting, with no per-token
    copy of it. Rows marked `far` (zero and mean ablation of the
    whole residual stream: far from the clean run at every position, and one stream shared by every sequence of
    a batch) take the log-sum-exp of their stream's logits, once per distinct stream, less the clean one:
    rounding of about 1e-6 of a logit, small against their KLs of nats. Which formula a row gets depends on the
    request, not on the batch around it, so a measurement split into pieces is bit-identical to the whole."""
    streams = unembed.normalize(final)  # [f, m, d_model]
    source = torch.arange(len(seq), device=seq.device) if source is None else source
    dlse, dot, dlt = (torch.empty_like(kl_out) for _ in range(3))  # lse(l) - lse(c), p . delta, delta at target
    m, d_vocab = streams.shape[1], unembed.weight.shape[1]
    block = max(1, (memory_mb * 2**20 // (8 * d_vocab) if streams.is_cuda else LOGIT_BLOCK) // m)
    # every block's logits are written into one buffer: a fresh one per block (100 MB at GPT-2's vocabulary)
    # would be mapped from the system and page-faulted in each time, which took a sixth of a CPU run
    buffer = torch.empty(0, device=streams.device)

    def view(h: Float[Tensor, "r m d_model"], width: int = d_vocab) -> Float[Tensor, "r m width"]:
        """The buffer as h's logits (or a `width`-wide slice of them); h has at most `block` rows."""
        nonlocal buffer
        size = h.numel() // h.shape[-1] * width
        if buffer.numel() < size:
            buffer = torch.empty(min(block, len(seq)) * m * width, device=streams.device)
        return buffer[:size].view(*h.shape[:-1], width)

    def logsumexp(h: Float[Tensor, "r m d_model"]) -> Float[Tensor, "r m"]:
        """lse of h's logits, block by block in the buffer: torch.logsumexp's steps, written out in place because
        torch.logsumexp allocates its own vocabulary-long temporaries for every block."""
        out = torch.empty(h.shape[:-1], device=h.device)
        for a in range(0, len(h), block):
            blk = unembed.logits(h[a:a + block], out=view(h[a:a + block]))
            top = blk.amax(-1, keepdim=True)
            top.masked_fill_(top.abs() == math.inf, 0)
            out[a:a + block] = blk.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))
        return out

    rows = torch.arange(len(seq), device=seq.device)
    if far is not None and unembed.linear and bool(far.any()):
        r, s = rows[far], seq[far]
        distinct, inverse = source[r].unique(return_inverse=True)
        delta_h = streams[source[r]] - clean.h[s]
        dlse[r] = logsumexp(streams[distinct])[inverse] - clean.lse[s]
        dot[r] = clean.dot(s, delta_h)
        dlt[r] = clean.delta_target(s, delta_h)
        kl_out[r] = dlse[r] - dot[r]
        rows = rows[~far]
    h = streams[source[rows]]  # [rows, m, d_model], in row order
    seqs, counts = torch.unique_consecutive(seq[rows], return_counts=True)
    i0 = 0
    for s0, s1, count in _sequence_groups(seqs.tolist(), counts.tolist(), block):
        # consecutive sequences with as many rows each, as many as fill a block: one matmul per vocabulary slice for
        # all of them (a sequence's rows alone, 51 tokens in single-token mode, ran the unembedding at half the rate)
        g, end = s1 - s0, i0 + (s1 - s0) * count
        for a in range(i0, end, block):  # (more than one block only for one sequence's rows)
            z, idx = min(a + block, end), rows[a:min(a + block, end)]
            # delta = delta_h W_U (capped: `CleanDistribution._capped`): the bias cancels
            delta_h = h[a:z].view(g, -1, m, h.shape[-1]) - clean.h[s0:s1, None]  # [g, rows, m, d_model]
            out = clean.reduce(slice(s0, s1), delta_h, view(delta_h, 2 * clean.vocab_slice).view(-1))
            kl_out[idx], dlse[idx], dot[idx] = (x.reshape(-1, m) for x in out)
            dlt[idx] = clean.delta_target(slice(s0, s1), delta_h).reshape(-1, m)
        i0 = end
    bad = (~(kl_out < CENTRED_KL_MAX)).any(-1).nonzero().squeeze(-1)
    if len(bad):  # a patched distribution far from the clean one (an expm1 term may have overflowed)
        dlse[bad] = logsumexp(streams[source[bad]]) - clean.lse[seq[bad]]
        kl_out[bad] = dlse[bad] - dot[bad]
    kl_out.clamp_min_(0)
    torch.sub(clean.ce[seq] + dlse, dlt, out=ce_out)


def _sequence_groups(seqs: list[int], counts: list[int], block: int):
    """(first sequence, end sequence, rows per sequence) of runs of consecutive sequences with the same number of
    rows, each run at most `block` rows (a sequence with more rows than that is a run of its own)."""
    j = 0
    while j < len(seqs):
        k = j + 1
        while (k < len(seqs) and seqs[k] == seqs[k - 1] + 1 and counts[k] == counts[j]
               and (k - j + 1) * counts[j] <= block):
            k += 1
        yield seqs[j], seqs[j] + k - j, counts[j]
        j = k


class _Unembed:
    """ln_final + unembed + soft-cap as HookedTransformer.forward computes them (TransformerLens's Unembed calls
    `F.linear(residual, W_U.T.contiguous(), b_U)`): here one matmul with W_U as it is stored, and the bias added
    in place (a fused addmm first copies the broadcast bias into the output, a slower pass than the add on the
    CPUs measured), skipped when it is all zero (GPT-2's). The engine unembeds many small blocks."""

    def __init__(self, model):
        self.model = model
        self.weight = model.unembed.W_U.detach()  # [d_model, d_vocab]
        bias = model.unembed.b_U.detach()
        self.bias = bias if bool(bias.any()) else None
        self.linear = not model.cfg.output_logits_soft_cap > 0
        """Whether the logits are h @ W_U + b_U (no soft-cap)."""

    def normalize(self, final: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """ln_final: the readout's input h."""
        return final if self.model.cfg.normalization_type is None else self.model.ln_final(final)

    def logits(self, h: Float[Tensor, "... d_model"], out: Tensor | None = None) -> Float[Tensor, "... d_vocab"]:
        logits = torch.matmul(h, self.weight, out=out)
        if self.bias is not None:
            logits.add_(self.bias)
        return apply_softcap(logits, self.model.cfg.output_logits_soft_cap)


@functools.lru_cache(maxsize=8)
def _hash_weights(n: int, device: torch.device) -> Int[Tensor, "n"]:
    """`distinct_rows`'s fixed random int32 weights for rows of n elements, drawn once per (n, device)."""
    return torch.randint(-2**31, 2**31 - 1, (n,), generator=torch.Generator().manual_seed(0),
                         dtype=torch.int32).to(device)


def distinct_rows(x: Tensor) -> tuple[Tensor, Int[Tensor, "r"]]:
    """The distinct rows of `x` ([r, ...], compared bit for bit) and each row's index among them: what
    `torch.unique(x.flatten(1), dim=0, return_inverse=True)` gives, up to the order of the distinct rows.

    Written here because torch.unique(dim=0) sorts whole rows with a lexicographic comparator: on a GPU a merge
    sort whose every comparison walks a row, 0.54 s per call at GPT-2's width (80% of the engine's GPU time,
    measured on an H100). Here each row gets an exact hash (its float bits times random int32 weights, summed
    in wrapping integer arithmetic, so equal rows always hash equal), rows are grouped by the 1-d unique of the
    hashes, and every row is checked equal to its group's first; a collision (never seen) falls back to
    torch.unique. (-0.0 and 0.0 count as different: a missed sharing, never a wrong one.)"""
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    bits = x.reshape(len(x), -1).contiguous().view(width)
    _, inverse = torch.unique(bits.mul(_hash_weights(bits.shape[1], x.device)).sum(-1), return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(x), device=x.device).scatter_reduce_(
        0, inverse, torch.arange(len(x), device=x.device), "amin")
    if not torch.equal(bits, bits[first[inverse]]):  # a hash collision: two different rows in one group
        distinct, inverse = torch.unique(x.flatten(1), dim=0, return_inverse=True)
        return distinct.view(-1, *x.shape[1:]), inverse
    return x[first], inverse


def _splice(act: Tensor, hook, *, rows: Float[Tensor, "r p d"], rel_patch: Tensor) -> Tensor:
    """`act` ([r, w, d] or hook_z's [r, w, head_index, d_head]) with `rows` written at `rel_patch`."""
    act = act.clone()
    act[:, rel_patch] = rows.view(rows.shape[0], rows.shape[1], *act.shape[2:])
    return act


def _row_chunks(n_seqs: int, per_seq: int, chunk: int):
    """(first row, end row, first sequence, end sequence) of each chunk of at most `chunk` rows, rows of a
    sequence being `per_seq` consecutive ones: whole sequences at a time, or part of one sequence's rows (so that
    every chunk is `SharedPrefix`'s equal groups of rows per sequence)."""
    if per_seq <= chunk:
        step = chunk // per_seq
        for s0 in range(0, n_seqs, step):
            s1 = min(n_seqs, s0 + step)
            yield s0 * per_seq, s1 * per_seq, s0, s1
    else:
        for s in range(n_seqs):
            for a in range(0, per_seq, chunk):
                yield s * per_seq + a, s * per_seq + min(a + chunk, per_seq), s, s + 1


def _clean_attention(hook: str) -> bool:
    """Whether a splice at `hook` leaves its block's attention clean (`kernels.CleanAttention`)."""
    return hook.split(".", 2)[-1] in CLEAN_ATTENTION_HOOKS


def _key_name(model, shared: bool) -> str:
    """The cached keys a patched forward reads: rotated (`rot_k`) for a shared prefix of a rotary model, which
    `SharedPrefix` holds as attention consumes them; TL's cache stores them unrotated (`k`)."""
    return "rot_k" if shared and model.cfg.positional_embedding_type == "rotary" else "k"


def _prefix_cache(cache, idx: Tensor, w0: int, cfg) -> TransformerLensKeyValueCache:
    """A frozen key/value cache holding the clean keys and values of positions < w0, one per stacked row."""
    entries = [
        TransformerLensKeyValueCacheEntry(cache[get_act_name("k", layer)][idx, :w0],
                                          cache[get_act_name("v", layer)][idx, :w0], frozen=True)
        for layer in range(cfg.n_layers)
    ]
    mask = torch.ones(len(idx), w0, dtype=torch.int, device=idx.device)
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask, frozen=True)


# ----------------------------------------------------------------------------------------------- naive
def measure_naive(
    loaded: Loaded, hooks=None, interventions=NOTEBOOK1, tokens: Tensor | None = None, *,
    positions: int | Literal["all"] = "all", measure_positions=None, n_samples: int = 1, seed: int = 0,
    include_special: bool = False, batch_size: int = 16, seq_offset: int = 0,
    means: dict[str, Tensor] | None = None, progress: bool = True, **_engine_only,
) -> pd.DataFrame:
    """The plain reference, as the original study ran it: per hook a clean `run_with_cache`, then one full
    `run_with_hooks` forward from the embedding per intervention and sample, with full-vocabulary logits
    and log-softmax in memory and torch's `kl_div`; the log-softmax and KL in float64 (in float32 they lose up to 1%
    of a KL of 1e-4), so that the reference's digits are right. Same arguments and frame as `measure`."""
    check_sizes(batch_size=batch_size)
    tokens = loaded.tokens() if tokens is None else tokens
    req = make_request(loaded, hooks, interventions, tokens, positions=positions, measure_positions=measure_positions,
                       n_samples=n_samples, seed=seed, include_special=include_special)
    means = means_for(loaded, req, tokens, means)
    model = loaded.model
    measured = torch.tensor(req.measured, device=loaded.device)
    patch = list(req.patch)
    frames = []
    with torch.inference_mode():
        for batch, seqs in _batches(tokens, batch_size, seq_offset, "measure (naive)", progress):
            batch = batch.to(loaded.device)
            targets = _targets(batch, measured)
            keep = req.keep(batch)[:, patch]
            for hook in req.hooks:
                logits, cache = model.run_with_cache(batch, names_filter=[hook])
                clean_logp = logits[:, measured].double().log_softmax(-1)
                ce_clean = _nan_last(ce_per_token(clean_logp, targets, normalized=True), measured, req.n_ctx)
                x = flat(cache[hook], hook)[:, patch]
                patched, geo = perturb(loaded, req, hook, x, seqs, means[hook])
                check_finite(patched, keep, req, hook)
                kl = torch.empty(len(batch), len(req.specs), req.n_samples, len(measured))
                ce = torch.empty_like(kl)
                for k in range(len(req.specs)):
                    for s in range(req.n_samples):
                        values = torch.where(keep[..., None], patched[:, k, s], x)
                        splice = functools.partial(_splice, rows=values, rel_patch=patch)
                        logits = model.run_with_hooks(batch, fwd_hooks=[(hook, splice)])
                        out = logits[:, measured].double().log_softmax(-1)
                        kl[:, k, s] = kl_per_token(clean_logp, out).cpu()
                        ce[:, k, s] = _nan_last(ce_per_token(out, targets, normalized=True), measured, req.n_ctx).cpu()
                frames.append(_frame(req, hook, seqs, batch, kl, ce_clean, ce, geo))
    return finish(frames, req)


# ------------------------------------------------------------------------------------------ inspection
def next_token_logprobs(
    loaded: Loaded, hook: str, tokens: Tensor, seq: int, pos: int, interventions=("sae", "eps_random"), *,
    seed: int = 0, means: dict[str, Tensor] | None = None,
) -> dict[str, Float[Tensor, "d_vocab"]]:
    """The clean and patched next-token log-probs at one (sequence, position), all-token mode (every
    non-special position of `tokens[seq]` patched, as `measure` does, with the same random draws), by the
    plain `run_with_hooks` path, in float64. Keys: "clean" and each intervention's label."""
    if not 0 <= seq < len(tokens):
        raise ValueError(f"seq={seq} must be in 0..{len(tokens) - 1} (an index into tokens)")
    req = make_request(loaded, hook, interventions, tokens[seq:seq + 1], positions="all", measure_positions=[pos],
                       seed=seed)
    means = means_for(loaded, req, tokens, means)
    model = loaded.model
    batch = tokens[seq:seq + 1].to(loaded.device)
    with torch.inference_mode():
        logits, cache = model.run_with_cache(batch, names_filter=[hook])
        x = flat(cache[hook], hook)
        patched, _ = perturb(loaded, req, hook, x, [seq], means[hook])
        check_finite(patched, req.keep(batch), req, hook)
        keep = req.keep(batch)[..., None]
        dists = {"clean": logits[0, pos].double().log_softmax(-1)}
        for k, spec in enumerate(req.specs):
            splice = functools.partial(_splice, rows=torch.where(keep, patched[:, k, 0], x), rel_patch=list(req.patch))
            dists[spec.label] = model.run_with_hooks(batch, fwd_hooks=[(hook, splice)])[0, pos].double().log_softmax(-1)
    return dists


def next_token_distributions(
    loaded: Loaded, hook: str, tokens: Tensor, seq: int, pos: int, interventions=("sae", "eps_random"), *,
    seed: int = 0, top_k: int = 25, means: dict[str, Tensor] | None = None,
) -> pd.DataFrame:
    """`next_token_logprobs` on the clean model's top_k next tokens, as a frame.

    Rows: the clean model's top_k next tokens, for "clean" and each intervention. Columns: intervention,
    rank (in the clean distribution), token_id, token_str, logp, kl (KL(clean || patched) at `pos`, the whole
    vocabulary; 0 for clean).
    """
    dists = next_token_logprobs(loaded, hook, tokens, seq, pos, interventions, seed=seed, means=means)
    clean = dists["clean"]
    top = clean.topk(top_k).indices
    frames = []
    for label, logp in dists.items():
        frames.append(pd.DataFrame({
            "intervention": label, "rank": np.arange(top_k), "token_id": top.cpu().numpy(),
            "token_str": token_strings(loaded, top.tolist()),
            "logp": logp[top].cpu().numpy(), "kl": float(kl_per_token(clean, logp)),
        }))
    return pd.concat(frames, ignore_index=True)


def token_strings(loaded: Loaded, ids) -> list[str]:
    """Each token id decoded alone, escaped (a newline shows as \\n)."""
    return [repr(loaded.model.tokenizer.decode([t]))[1:-1] for t in ids]
