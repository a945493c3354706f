"""Fused kernels for the engine's patched forwards: the same functions as TransformerLens's modules, fewer passes.

Inside `fused_kernels(model)`:
- float32 LayerNorms and RMSNorms run as torch's one-kernel `layer_norm` / `rms_norm` (on a CPU, where torch's
  rms_norm is six passes, RMSNorm in three: `_rms_norm`), and gelu_new in four passes (`FUSED_EQUIVALENTS`);
- rotary positions in three passes, rounded as TransformerLens's eight (`_rotary`);
- the weights are read as they are stored: TL's gated MLP (Llama's) makes a contiguous transposed copy of each of its
  three matrices on every call, and its attention rearranges W_Q, W_K and W_V into a copy on every call, which in
  a forward of a few rows (a many-sample chunk at one position) cost as much as the matmuls; here the MLP multiplies
  by the stored matrices (`_gated_mlp`) and q, k and v come from one matmul by their weights laid side by side once
  on entry (`_qkv`), the block applying ln1 once (`_block`: TL's normalises its input three times, into three
  tensors);
- attention runs as torch's `scaled_dot_product_attention` (`_attention`): TransformerLens computes the scores, a
  causal mask by `where`, a NaN scrub, the softmax and the weighted sum as separate full-size tensors; the fused
  kernel never materialises the pattern. Where the attention has a clean prefix shared by many patched rows
  (single-token and many-sample modes), `SharedPrefix` holds its keys and values once per sequence and every row
  of that sequence attends to them by broadcasting, instead of a copy per row in a key/value cache; where it is
  the clean run's (a splice later in the block), `CleanAttention` hands it the clean z and it is not recomputed.

Only what the engine does not use is given up: the hook points on attention scores and patterns (and the norms'
hook_scale / hook_normalized) do not fire; an attention module with a hook already attached there on entry, or with
a feature the fused path does not cover (soft-capped scores, ALiBi, attention sinks, QK-norm, local windows, ...),
keeps TransformerLens's own forward (and the engine then passes a key/value cache). Everything is restored on exit.
The fast == naive tests hold the results together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre, TransformerBlock
from transformer_lens.components.abstract_attention import AbstractAttention
from transformer_lens.components.mlps.can_be_used_as_mlp import CanBeUsedAsMLP
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.utilities.activation_functions import gelu_new, gelu_pytorch_tanh
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

_GELU_K = math.sqrt(2 / math.pi)


@functools.lru_cache(maxsize=32)
def constant(value: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A 0-d tensor of `value` on a device, made once (a new one per call is a copy to a GPU that the host waits
    for): the fused kernels' constants that torch takes as a tensor operand (`torch.addcmul`'s input)."""
    with torch.inference_mode(False):  # a plain tensor, usable by autograd too, whichever mode it is first made in
        return torch.tensor(value, device=device, dtype=dtype)


def gelu_tanh(x: Tensor) -> Tensor:
    """gelu_new, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))
    (the same function: 0.5 (1 + tanh(u)) = sigmoid(2u)) in four passes over memory. Written here because
    torch's own `gelu(approximate="tanh")` runs 1.5x slower than this on the CPUs measured (an MLP hidden of
    6144 x 512: 3.0 ms against 2.0 ms); both are within 5e-7 of the float64 function."""
    u = torch.addcmul(constant(2 * _GELU_K, x.device, x.dtype), x, x, value=2 * _GELU_K * 0.044715)
    return u.mul_(x).sigmoid_().mul_(x)


FUSED_EQUIVALENTS = {gelu_new: gelu_tanh, gelu_pytorch_tanh: gelu_tanh}
"""Activation functions swapped for a kernel computing the same function in fewer passes: TL's gelu_new is
that formula in seven tensor ops (and its gelu_pytorch_tanh torch's tanh gelu); `gelu_tanh` is four. They differ
by rounding only."""


def _fused_norm(norm, x: Tensor) -> Tensor:
    """TL's LayerNorm / LayerNormPre ((x - mean) / sqrt(var + eps) [* w + b], biased variance) and RMSNorm /
    RMSNormPre (x / sqrt(mean(x^2) + eps) [* w]) as torch's one-kernel layer_norm and rms_norm (TL's are four
    to six tensor ops each; the Pre forms are what `fold_ln` leaves, as in GPT-2's preset). On a CPU, torch's
    rms_norm is itself six passes (pow, mean, add, rsqrt, two products); `_rms_norm` is three."""
    if isinstance(norm, (LayerNorm, LayerNormPre)):
        return F.layer_norm(x, x.shape[-1:], getattr(norm, "w", None), getattr(norm, "b", None), norm.eps)
    if x.device.type == "cpu":
        return _rms_norm(x, getattr(norm, "w", None), norm.eps)
    return F.rms_norm(x, x.shape[-1:], getattr(norm, "w", None), norm.eps)


def _rms_norm(x: Float[Tensor, "... d"], w: Float[Tensor, "d"] | None, eps: float) -> Float[Tensor, "... d"]:
    """x / sqrt(mean(x^2) + eps) [* w] in three passes over x: its norm (one reduction, no temporary), then two
    products (1.7x faster than torch's rms_norm on a CPU at SmolLM2's widths, the same to 2e-6). In place only
    where autograd needs no values (Fisher's products run through it)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    scale = torch.rsqrt(norm * norm / x.shape[-1] + eps)
    out = x * scale
    return out if w is None else out.mul_(w)


FUSED_NORMS = (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)


@dataclasses.dataclass(frozen=True)
class SharedPrefix:
    """One layer's clean keys and values of the positions before a patched window, held once per sequence.

    The rows of a patched forward are grouped by sequence: `rows // len(keys)` consecutive rows per sequence (all
    rows of a chunk may also belong to one sequence). Keys are stored as the attention consumes them (after
    rotary embeddings: `hook_rot_k`), so they are rotated once, not once per row."""

    keys: Float[Tensor, "seq prefix kv_head d_head"]
    values: Float[Tensor, "seq prefix kv_head d_head"]

    @property
    def length(self) -> int:
        return self.keys.shape[1]


@dataclasses.dataclass(frozen=True)
class CleanAttention:
    """One layer whose attention is clean in every patched row: the heads' outputs z (before W_O) over the
    window, held once per sequence (the rows grouped by sequence as for `SharedPrefix`).

    A splice in a block after its attention's z (at `attn.hook_z`, `hook_attn_out`, `hook_resid_mid`,
    `hook_mlp_out`) starts that block from its clean input, so its queries, keys, values and attention are the
    clean run's: the attention skips them, fires hook_z on the clean z (where an SAE at `attn.hook_z` is
    spliced in) and applies W_O."""

    z: Float[Tensor, "seq w head d_head"]


CLEAN_ATTENTION_HOOKS = ("attn.hook_z", "hook_attn_out", "hook_resid_mid", "hook_mlp_out")
"""Hooks of a block (the name after `blocks.L.`) read after its attention has run on the clean input."""


def supports_fused_attention(attn: AbstractAttention) -> bool:
    """Whether `_attention` computes exactly what TL's forward does for this module (else TL's forward runs)."""
    cfg = attn.cfg
    return (
        cfg.positional_embedding_type in ("standard", "rotary")
        and not (cfg.attn_scores_soft_cap and cfg.attn_scores_soft_cap > 0)
        and not cfg.use_attention_sinks and not cfg.use_logn_attn and cfg.clip_qkv is None
        and not cfg.use_dynamic_ntk_rope and not cfg.use_attn_result and not cfg.load_in_4bit
        and cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
        and (attn._attention_dir_override or cfg.attention_dir) == "causal" and attn.attn_type == "global"
    )


def _attention(attn: AbstractAttention, query_input: Tensor, key_input: Tensor, value_input: Tensor,
               past_kv_cache_entry=None, additive_attention_mask=None, attention_mask=None,
               position_bias=None) -> Float[Tensor, "batch pos d_model"]:
    """TL's attention forward with the scores, mask, softmax and weighted sum fused (module docstring).

    The hook points on q, k, v, rotated q/k and z fire as in TL (an SAE at `attn.hook_z` is spliced there)."""
    if (not isinstance(past_kv_cache_entry, (SharedPrefix, CleanAttention, type(None)))
            or additive_attention_mask is not None or attention_mask is not None
            or position_bias is not None):  # a TL key/value cache or a mask
        return type(attn).forward(attn, query_input, key_input, value_input, past_kv_cache_entry,
                                  additive_attention_mask, attention_mask, position_bias)
    if isinstance(past_kv_cache_entry, CleanAttention):
        z = past_kv_cache_entry.z
        z = attn.hook_z(z.repeat_interleave(len(query_input) // len(z), dim=0))  # [rows, pos, heads, d_head]
    else:
        z = attn.hook_z(_attend(attn, query_input, key_input, value_input, past_kv_cache_entry))
    # TL: F.linear(z, W_O as [d_model, (head d_head)], b_O), W_O rearranged per call; here W_O as it is stored
    return torch.matmul(z.reshape(*z.shape[:2], -1), attn.W_O.reshape(-1, attn.W_O.shape[-1])).add_(attn.b_O)


def _gated_mlp(mlp: GatedMLP, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
    """TL's GatedMLP forward, (act(x W_gate) * (x W_in) + b_in) W_out + b_out, by the stored matrices (TL transposes
    a copy of each per call, to match Hugging Face's bfloat16 rounding; the engine runs float32) and in place where
    TL allocates. Its hook points fire as in TL."""
    pre = mlp.hook_pre(torch.matmul(x, mlp.W_gate))
    pre_linear = mlp.hook_pre_linear(torch.matmul(x, mlp.W_in))
    post = mlp.hook_post(mlp.act_fn(pre).mul_(pre_linear).add_(mlp.b_in))
    return torch.matmul(post, mlp.W_out).add_(mlp.b_out)


def _block(block: TransformerBlock, resid_pre: Float[Tensor, "batch pos d_model"], shortformer_pos_embed=None,
           past_kv_cache_entry=None, attention_mask=None) -> Float[Tensor, "batch pos d_model"]:
    """TL's TransformerBlock forward for a pre-norm block whose attention and MLP run in sequence, with ln1 applied
    once: TL normalises the residual stream three times (for queries, keys and values, which some configurations
    hook apart) and adds 0.0 to two of the results, so its attention never receives one tensor three times and
    cannot compute q, k and v in one matmul (`_qkv`). Its hook points fire as in TL (ln1's once: the block keeps
    TL's forward when they have hooks, `fused_kernels`)."""
    if shortformer_pos_embed is not None:
        return type(block).forward(block, resid_pre, shortformer_pos_embed, past_kv_cache_entry, attention_mask)
    resid_pre = block.hook_resid_pre(resid_pre)
    x = block.ln1(resid_pre)
    attn_out = block.hook_attn_out(block.attn(query_input=x, key_input=x, value_input=x,
                                              past_kv_cache_entry=past_kv_cache_entry, attention_mask=attention_mask))
    resid_mid = block.hook_resid_mid(resid_pre + attn_out)
    mlp_in = block.hook_mlp_in(resid_mid.clone()) if block.cfg.use_hook_mlp_in else resid_mid
    return block.hook_resid_post(resid_mid + block.apply_mlp(block.ln2(mlp_in)))


def _fuses_block(block: TransformerBlock) -> bool:
    """Whether `_block` computes exactly what TL's forward does for this block (pre-norm, attention then MLP)."""
    cfg = block.cfg
    return not (cfg.use_attn_in or cfg.use_split_qkv_input or cfg.attn_only or cfg.parallel_attn_mlp
                or cfg.use_normalization_before_and_after or cfg.original_architecture in POST_NORM_ARCHITECTURES)


def _grouped(attn: AbstractAttention) -> bool:
    """Whether TL computes this module's keys and values from its grouped (unrepeated) weights _W_K, _W_V."""
    return hasattr(attn, "_W_K") and not attn.cfg.ungroup_grouped_query_attention


def _qkv_weights(attn: AbstractAttention) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """W_Q, W_K and W_V ([heads, d_model, d_head] each; the grouped ones for grouped-query attention) side by side
    as one [d_model, (heads + 2 kv_heads) d_head] matrix, their biases as one vector, and the head counts."""
    wk, bk, wv, bv = ((attn._W_K, attn._b_K, attn._W_V, attn._b_V) if _grouped(attn)
                      else (attn.W_K, attn.b_K, attn.W_V, attn.b_V))
    ws = (attn.W_Q, wk, wv)
    weight = torch.cat([w.permute(1, 0, 2).reshape(w.shape[1], -1) for w in ws], dim=1)
    bias = torch.cat([b.reshape(-1) for b in (attn.b_Q, bk, bv)])
    return weight, bias, tuple(w.shape[0] for w in ws)


def _qkv(attn: AbstractAttention, query_input: Tensor, key_input: Tensor, value_input: Tensor
         ) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [rows, pos, heads, d_head] as TL's `calculate_qkv_matrices` computes them (its hook points fire), from
    one matmul by the side-by-side weights made on entry (`_qkv_weights`) when the three inputs are one tensor."""
    packed = getattr(attn, "_saenb_qkv", None)
    if packed is None or not (query_input is key_input is value_input):
        return attn.calculate_qkv_matrices(query_input, key_input, value_input)
    weight, bias, heads = packed
    out = torch.matmul(query_input, weight).add_(bias)
    d_head = attn.cfg.d_head
    q, k, v = out.split([h * d_head for h in heads], dim=-1)
    return tuple(hook(t.unflatten(-1, (h, d_head)))
                 for hook, t, h in zip((attn.hook_q, attn.hook_k, attn.hook_v), (q, k, v), heads, strict=True))


def _packs_qkv(attn: AbstractAttention) -> bool:
    """Whether `_qkv` computes this module's q, k and v (else TL's own `calculate_qkv_matrices` runs)."""
    cfg = attn.cfg
    return not (cfg.use_split_qkv_input or cfg.use_attn_in or cfg.use_qk_norm or cfg.load_in_4bit)


def _attend(attn: AbstractAttention, query_input: Tensor, key_input: Tensor, value_input: Tensor,
            prefix: SharedPrefix | None) -> Float[Tensor, "rows pos heads d_head"]:
    """z: causal attention of the window's queries over its keys (and the shared prefix's, when given)."""
    q, k, v = _qkv(attn, query_input, key_input, value_input)  # [rows, pos, heads, d_head]
    offset = 0 if prefix is None else prefix.length
    if attn.cfg.positional_embedding_type == "rotary":
        q = attn.hook_rot_q(_rotary(attn, q, offset))
        k = attn.hook_rot_k(_rotary(attn, k, offset))
    scale = 1 / attn.attn_scale
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [rows, heads, pos, d_head]
    if prefix is None:
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    else:
        z = _attend_with_prefix(q, k, v, prefix, scale)
    return z.transpose(1, 2)


def _rotary(attn: AbstractAttention, x: Float[Tensor, "rows pos heads d_head"], offset: int
            ) -> Float[Tensor, "rows pos heads d_head"]:
    """TL's `apply_rotary` (positions offset.. ; halves rotated: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]) in
    three passes into one new tensor, rounded as TL's. TL's clones x, negates, writes both halves, multiplies
    twice, adds and concatenates the unrotated dimensions back: eight passes, 4-6x slower at SmolLM2's shapes.
    Interleaved pairs (GPT-J's), partial rotation and positions past TL's tables run TL's."""
    cfg, n = attn.cfg, x.shape[1]
    if cfg.rotary_adjacent_pairs or cfg.rotary_dim != x.shape[-1] or offset + n > attn.rotary_cos.shape[0]:
        return attn.apply_rotary(x, offset)
    half = cfg.rotary_dim // 2
    cos, sin = (t[offset:offset + n, None, :] for t in (attn.rotary_cos, attn.rotary_sin))  # [n, 1, d_head]
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]  # (not addcmul_: dynamo traces it as a product and a sum,
    out[..., half:] += x[..., :half] * sin[..., half:]  # which round otherwise; as written, TL's rounding exactly)
    return out


def _attend_with_prefix(q: Float[Tensor, "r h w d"], k: Float[Tensor, "r hk w d"], v: Float[Tensor, "r hk w d"],
                        prefix: SharedPrefix, scale: float) -> Float[Tensor, "r h w d"]:
    """Causal attention of a window's queries over the shared clean prefix and the window's own keys.

    The two key blocks are attended separately and merged by their softmax normalisers (the split softmax of
    flash attention: out = (sum_prefix + sum_window) / (norm_prefix + norm_window), each block's exponentials
    taken against its own maximum and rescaled to the common one). torch's fused kernel returns no normaliser,
    so the blocks are written out here; the prefix block is one matmul per sequence over all its rows' queries,
    and reads the prefix's keys without copying them. A window of one position (many-sample mode) has one key,
    whose weight in its block is 1. The blocks merge in two passes over the prefix block's output, then one copy
    into the layout the output projection reads ([r, w, h, d]; returned as its [r, h, w, d] view)."""
    r, h, w, d = q.shape
    s, hk = prefix.keys.shape[0], prefix.keys.shape[2]
    g, group = h // hk, r // s  # query heads per key head; rows per sequence
    # prefix block: [s, hk, (rows, g, w) of the sequence, d] @ [s, hk, d, prefix]
    qp = q.view(s, group, hk, g, w, d).permute(0, 2, 1, 3, 4, 5).reshape(s, hk, group * g * w, d)
    scores = torch.matmul(qp, prefix.keys.permute(0, 2, 3, 1)).mul_(scale)
    m_pre = scores.amax(-1, keepdim=True)
    scores.sub_(m_pre).exp_()
    n_pre = scores.sum(-1, keepdim=True)
    o_pre = torch.matmul(scores, prefix.values.transpose(1, 2))  # [s, hk, group*g*w, d]
    del scores
    # everything below in the prefix block's layout [s, hk, group, g, w, x]; the window's [r, h(, w), ...] as views
    o_pre, m_pre, n_pre = (t.view(s, hk, group, g, w, -1) for t in (o_pre, m_pre, n_pre))

    def as_prefix(t: Tensor) -> Tensor:  # [r, heads, w', x] -> [s, hk, group, heads / hk, w', x] (a view)
        return t.view(s, group, hk, t.shape[1] // hk, *t.shape[2:]).transpose(1, 2)

    if w == 1:  # the window's one key: score q . k, weight 1, output v (shared by the g query heads of a key head)
        m_win = (q.view(r, hk, g, d) * k.view(r, hk, 1, d)).sum(-1).mul_(scale)  # [r, hk, g]
        m_win, n_win, o_win = as_prefix(m_win.view(r, h, 1, 1)), None, as_prefix(v)
    else:  # causal within the window
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [r, h, w, w]
        scores.masked_fill_(torch.ones(w, w, dtype=torch.bool, device=q.device).triu_(1), -math.inf)
        m_win = scores.amax(-1, keepdim=True)  # finite: the diagonal is never masked
        scores.sub_(m_win).exp_()
        n_win = scores.sum(-1, keepdim=True)
        m_win, n_win, o_win = as_prefix(m_win), as_prefix(n_win), as_prefix(torch.matmul(scores, v))
    m = torch.maximum(m_pre, m_win)
    a_pre, a_win = (m_pre - m).exp_(), (m_win - m).exp_()
    norm = n_pre * a_pre + (a_win if n_win is None else n_win * a_win)
    o_pre.mul_(a_pre.div_(norm)).addcmul_(o_win, a_win.div_(norm))
    out = q.new_empty(r, w, h, d)  # (a copy into a view, not `out=`: dynamo cannot trace a strided `out=`)
    out.view(s, group, w, hk, g, d).permute(0, 3, 1, 4, 2, 5).copy_(o_pre)
    return out.transpose(1, 2)


@contextlib.contextmanager
def fused_kernels(model, keep=()):
    """Within the block, the model's float32 norms, MLP activations and attention run as fused kernels for the
    same functions (module docstring). A module whose unfired hook points have hooks attached on entry, or are
    named in `keep` (hooks that will be attached inside the block, such as an SAE's at `ln2.hook_normalized`),
    keeps TL's forward. Yields whether every attention module is fused (then the engine may pass `SharedPrefix`
    entries instead of a key/value cache)."""
    swapped_act, swapped_fwd, packed = [], [], []
    attention = [m for m in model.modules() if isinstance(m, AbstractAttention)]

    def fires(name: str, module, points: tuple[str, ...]) -> bool:  # whether a hook must fire at these points
        return any(f"{name}.{p}" in keep or getattr(getattr(module, p, None), "_forward_hooks", None)
                   for p in points)

    try:
        for name, module in model.named_modules():
            fn = getattr(module, "act_fn", None)
            if isinstance(module, CanBeUsedAsMLP) and fn in FUSED_EQUIVALENTS:
                swapped_act.append((module, fn))
                module.act_fn = FUSED_EQUIVALENTS[fn]
            if (type(module) in FUSED_NORMS and model.cfg.dtype == torch.float32
                    and not fires(name, module, ("hook_scale", "hook_normalized"))):
                swapped_fwd.append(module)
                module.forward = types.MethodType(_fused_norm, module)
            elif (isinstance(module, AbstractAttention) and supports_fused_attention(module)
                  and not fires(name, module, ("hook_attn_scores", "hook_pattern"))):
                swapped_fwd.append(module)
                module.forward = types.MethodType(_attention, module)
                if _packs_qkv(module):
                    packed.append(module)
                    with torch.no_grad():
                        module._saenb_qkv = _qkv_weights(module)
            elif type(module) is GatedMLP and not module.cfg.is_layer_norm_activation():
                swapped_fwd.append(module)
                module.forward = types.MethodType(_gated_mlp, module)
            elif (type(module) is TransformerBlock and _fuses_block(module) and "forward" not in vars(module)
                  and not fires(f"{name}.ln1", module.ln1, ("hook_scale", "hook_normalized"))):
                # (a block whose forward is already replaced, `graphs.captured_blocks`'s, keeps it)
                swapped_fwd.append(module)
                module.forward = types.MethodType(_block, module)
        yield bool(attention) and all("forward" in vars(m) for m in attention)
    finally:
        for module, fn in swapped_act:
            module.act_fn = fn
        for module in swapped_fwd:
            del module.forward
        for module in packed:
            del module._saenb_qkv
