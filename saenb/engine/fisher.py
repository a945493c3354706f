"""The Fisher information of a model's next-token distributions with respect to one activation at a hook.

For a token at position p and hook h, let x be its clean activation and P_q(x) the next-token distributions at
the measured positions q (single-token mode: p..p+16). Then, for a small change d of x,

    sum_q KL(P_q(x) || P_q(x + d)) = 0.5 d^T F d + O(|d|^3),
    F = sum_q J_q^T (diag(p_q) - p_q p_q^T) J_q,

J_q the Jacobian of position q's logits with respect to x and p_q its clean probabilities.

The logits are W_U^T h_q + b with h_q the final residual stream (after the final norm), so J_q = W_U^T K_q with
K_q = dh_q/dx, and F = sum_q K_q^T G_q K_q with the output Fisher G_q = W_U (diag(p_q) - p_q p_q^T) W_U^T =
sum_y p_y (w_y - m_q)(w_y - m_q)^T, m_q = W_U p_q. Two ways to compute it:

- `token_fisher`, exact, per token (notebook 09): K from one forward-mode product per basis vector of x
  (`torch.func.jvp` under `torch.func.vmap`), each a forward of the patched position and those after it from the
  hook's block on, the clean prefix read from a frozen key/value cache as the engine's single-token mode runs it;
  then G_q written out (d_model^2 d_vocab per position). Forward mode is the cheap direction: d products give K
  at every measured position, where reverse mode needs d per position. Its cost is that of d forwards of the
  window plus the G_q: at SmolLM2's layer 15 (d 576, 49,152 words) about 11 s per token on 2 cores, a third of
  it in the G_q; a tiny-stdlib token about 0.3 s of one core. Batching contexts changes neither (measured).
- `token_fisher(samples=S)`, per token, exact where most of F is and sampled where little is (notebook 09 on
  SmolLM2): F = F_p + F_after, F_p the patched position's own term (its K_p needs a window of one position, 1/17 of
  the exact products) computed exactly, F_after the 16 positions after it by the sampled estimator below with S
  draws, keyed by the context. Unbiased; F_p held 68% to 99.96% of tr(F) on 6 SmolLM2 tokens at layers 15 and 24.
  Measured on 2 cores at position 48, 3 tokens per layer, against the exact F: S = 32 took 5.2 / 4.0 / 2.3 s per
  token at layers 6 / 15 / 24 (exact 20.6 / 13.1 / 6.8 s), with a mean |relative error| of 200 random directions'
  quadratic forms of 0-9% per token (trace within 6%; the top-32 eigenvectors' subspaces overlap 0.88-1.0). F_p's
  one-position forward now writes its attention out (`_one_position_final`: the prefix's keys and values read once
  and shared by every basis vector): 1.37 / 0.81 / 0.48 s per token there against TransformerLens's cached attention's
  6.1 / 3.8 / 1.7 (8 tokens, 2 cores, the same F to 2.4e-5 in float32). The draws after it run for a batch of
  contexts at once, each context's from its own generator (the draws a call for it alone makes): 8 tokens,
  2.03 / 1.46 / 0.91 s a token in all at layers 6 / 15 / 24 against 2.84 / 2.00 / 1.32 one context at a time (F the
  same to 6.2e-6 in float32).
- `fisher_gradients` / `mean_fisher`, sampled, for a mean over many tokens (the curvature-aware fine-tune):
  with A_q = diag(p_q) - p_q p_q^T = B_q B_q^T, B_q = diag(sqrt p_q) - p_q sqrt(p_q)^T, and xi_q standard normal
  in the vocabulary, g = sum_q K_q^T W_U B_q xi_q has E[g g^T] = F (independent xi_q: the cross terms vanish).
  g is one reverse-mode product (`torch.func.vjp`) with the cotangents W_U B_q xi_q at every measured position
  at once, so S samples cost about 2S forwards of the window instead of d. Measured on one core at position 48
  with 16 positions after it: tiny-stdlib 0.03 s per token at S = 16 (exact: 0.35 s), SmolLM2 layer 15 1.3 s
  (exact: about 23 core-seconds). The draws add noise to each token's F (at S = 16 about 80% of its Frobenius
  norm on tiny-stdlib) but not to the mean's expectation, and the mean over tokens is dominated by how much F
  varies between tokens (two halves of 32 tiny-stdlib tokens differ by 100% of the mean's norm): for a mean, ten
  times the tokens at S = 16 beats the exact F per unit of time. Keeping only the most probable words instead
  (those holding 1 - 1e-3 of the mass) is not an option: on tiny-stdlib it lost up to 26% of tr(F) (1 - 1e-4:
  2.5%), since rare words with far-off unembeddings carry much of it.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.func import jvp, vjp, vmap
from tqdm.auto import tqdm
from transformer_lens.utilities import get_act_name

from saenb.engine import kernels, patching
from saenb.hooks import flat, splice_point


@dataclass
class TokenFisher:
    """F per token at one hook and position (float64, on the CPU)."""

    seqs: list[int]
    """Index of each token's context in the tokens given (contexts whose patched token is not kept are left out)."""
    x: Float[Tensor, "n d"]
    fisher: Float[Tensor, "n d d"]
    """F summed over the measured positions (positions not kept left out)."""
    fisher_at: Float[Tensor, "n d d"]
    """F of the patched position's own next-token distribution only."""


def output_fisher(W_U: Float[Tensor, "d_model d_vocab"], p: Float[Tensor, "d_vocab"],
                  buffer: Float[Tensor, "d_model d_vocab"] | None = None) -> Float[Tensor, "d_model d_model"]:
    """W_U (diag(p) - p p^T) W_U^T: the Fisher information of softmax(h W_U + b) in the final residual h, as
    sum_y p_y (w_y - mean)(w_y - mean)^T (centred first: the uncentred form cancels most digits in float32).
    `buffer` (W_U's shape) takes the centred, weighted copy of W_U: at SmolLM2's 49,152 words two fresh 113 MB
    tensors per call, mapped and page-faulted in afresh, took a third as long as the product itself."""
    centred = torch.sub(W_U, (W_U @ p)[:, None], out=buffer).mul_(p.sqrt())
    return _gram(centred)


def _gram(a: Float[Tensor, "d v"]) -> Float[Tensor, "d d"]:
    """a a^T from its diagonal blocks and the blocks above them (the ones below are their transposes): 3/4 of the
    multiplications of `a @ a.T`, which BLAS's general product does not halve (torch has no symmetric rank-k
    product). Measured at SmolLM2's d_model 576 and 49,152 words: 0.26 s against 0.33 s on one core, 0.15 against
    0.18 on two."""
    h = a.shape[0] // 2
    top, bottom = a[:h], a[h:]
    out = torch.empty(a.shape[0], a.shape[0], dtype=a.dtype, device=a.device)
    out[:h, :h] = top @ top.T
    out[:h, h:] = top @ bottom.T
    out[h:, :h] = out[:h, h:].T
    out[h:, h:] = bottom @ bottom.T
    return out


def _suffix_final(model, hook: str, cache, rows: Int[Tensor, "b"], window: tuple[int, int],
                  measured_rel: Int[Tensor, "m"]):
    """X [b, d] -> the final residual stream (after the final norm) at the measured positions of the contexts
    `rows` [b, m, d_model], X spliced at the window's first position (`hook`'s activation there, heads concatenated
    for hook_z), the rest of the window clean and the prefix read from the clean keys and values. The unembedding
    is left out: it is linear, and `token_fisher` applies it to the Jacobian once (under `vmap` it would be
    repeated per basis vector)."""
    start, layer, direct = splice_point(hook)
    w0, w1 = window
    resid = cache[start][rows, w0:w1]  # [b, w, d_model]
    kv = patching._prefix_cache(cache, rows, w0, model.cfg) if w0 > 0 else None

    def splice(act: Tensor, X: Tensor) -> Tensor:
        # functional (no in-place write): torch.func transforms X
        first = X.reshape(len(X), 1, *act.shape[2:]).to(act.dtype)
        return torch.cat([first, act[:, 1:]], dim=1)

    def f(X: Float[Tensor, "b d"]) -> Float[Tensor, "b m d_model"]:
        inp = splice(resid, X) if direct else resid
        hooks = [] if direct else [(hook, lambda act, hook: splice(act, X))]
        with model.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext():
            final = model(inp, start_at_layer=layer, stop_at_layer=model.cfg.n_layers, past_kv_cache=kv)
        final = final[:, measured_rel]
        return model.ln_final(final) if model.cfg.normalization_type is not None else final

    return f


def _one_position_final(model, hook: str, cache, rows: Int[Tensor, "b"], position: int):
    """`_suffix_final` for a window of one position (F's term at the patched position, `token_fisher(samples=)`),
    its attention written out: X [b, d] -> the final residual stream at `position` [b, 1, d_model].

    Each block's query at `position` attends to the clean prefix's keys and values, read from the cache once (keys
    rotated once) and shared by every basis vector that `vmap` pushes forward, and to the position's own key and
    value. TransformerLens's cached attention would append the position's key and value to the prefix's, and rotate
    all of them again, in every block for every basis vector: on SmolLM2 at layer 6 that copying was 40% of F's term
    at the patched position. None when the model has a part this does not write out (`_one_position_supported`)."""
    _, layer, direct = splice_point(hook)
    if position == 0 or not direct or not _one_position_supported(model, layer):
        return None
    cfg = model.cfg
    prefix, weights = [], []
    for i in range(layer, cfg.n_layers):
        attn = model.blocks[i].attn
        # W_Q, W_K and W_V side by side (one matmul; grouped key/value heads unrepeated; the copy `fused_kernels`
        # made on entry when it runs) and W_O as [heads x d_head, d_model]: an einsum over heads would run one small
        # product per head
        packed = getattr(attn, "_saenb_qkv", None) or kernels._qkv_weights(attn)
        weights.append((*packed, attn.W_O.reshape(-1, attn.W_O.shape[-1])))
        k = cache[get_act_name("k", i)][rows, :position]  # [b, p, kv heads, d_head]
        v = cache[get_act_name("v", i)][rows, :position]
        if cfg.positional_embedding_type == "rotary":
            k = attn.apply_rotary(k, 0)
        # [b, kv heads, d_head, p] and [b, kv heads, p, d_head]: matmul's operands as they are, so that under vmap
        # the basis vectors fold into the query's rows rather than copy the prefix once each
        prefix.append((k.permute(0, 2, 3, 1).contiguous(), v.transpose(1, 2).contiguous()))

    def attend(attn, h: Tensor, pk: Tensor, pv: Tensor, weight: Tensor, bias: Tensor, heads: tuple[int, int, int],
               W_O: Tensor) -> Tensor:
        qkv = (h @ weight + bias).split([n * cfg.d_head for n in heads], dim=-1)
        q, k, v = (t.unflatten(-1, (n, cfg.d_head)) for t, n in zip(qkv, heads))  # [b, 1, heads, d_head]
        if cfg.positional_embedding_type == "rotary":
            q, k = attn.apply_rotary(q, position), attn.apply_rotary(k, position)
        n_kv = k.shape[2]
        q = q[:, 0].reshape(len(q), n_kv, -1, q.shape[-1])  # [b, kv heads, group, d_head]: head = kv head x group
        scores = torch.cat([_ConstantRight.apply(q, pk), (q * k[:, 0, :, None]).sum(-1, keepdim=True)],
                           dim=-1) / attn.attn_scale
        pattern = scores.softmax(-1)
        z = _ConstantRight.apply(pattern[..., :-1], pv) + pattern[..., -1:] * v[:, 0, :, None]
        return (z.reshape(len(z), -1) @ W_O)[:, None] + attn.b_O

    def f(X: Float[Tensor, "b d"]) -> Float[Tensor, "b 1 d_model"]:
        x = X[:, None].to(cfg.dtype)
        for block, (pk, pv), w in zip(model.blocks[layer:], prefix, weights):
            x = x + attend(block.attn, block.ln1(x), pk, pv, *w)
            x = x + block.mlp(block.ln2(x))
        return model.ln_final(x) if cfg.normalization_type is not None else x

    return f


class _ConstantRight(torch.autograd.Function):
    """a @ c for a constant c (the clean prefix's keys or values: no tangent, the same for every basis vector).

    Under `vmap` torch's matmul expands the unbatched c to every basis vector and copies it (measured: 12.5 ms
    against 0.65 for one layer's prefix scores at SmolLM2's shapes, 128 basis vectors x 8 contexts); the batching
    rule here folds the basis vectors into a's rows instead, one matmul. The tangent is c's product with a's
    tangent (c has none), itself batched the same way."""

    @staticmethod
    def forward(a: Tensor, c: Tensor) -> Tensor:
        return a @ c

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.c = inputs[1]

    @staticmethod
    def jvp(ctx, a_t: Tensor, c_t) -> Tensor:
        return _ConstantRight.apply(a_t, ctx.c)

    @staticmethod
    def vmap(info, in_dims, a: Tensor, c: Tensor):
        a_dim, c_dim = in_dims
        if c_dim is not None:  # not how the Fisher calls it: the plain batched product
            a = a.movedim(a_dim, 0) if a_dim is not None else a.expand(info.batch_size, *a.shape)
            return a @ c.movedim(c_dim, 0), 0
        a = a.movedim(a_dim, -3)  # [..., basis, rows, k]
        shape = a.shape
        out = a.reshape(*shape[:-3], shape[-3] * shape[-2], shape[-1]) @ c
        return out.reshape(*shape[:-1], out.shape[-1]), len(shape) - 3


def _one_position_supported(model, layer: int) -> bool:
    """Whether every block from `layer` on is what `_one_position_final` writes out: the blocks and attention the
    engine's fused kernels compute as TransformerLens does (pre-norm, attention then MLP; causal global attention
    with standard or rotary positions, q, k and v from the residual stream), anything else running TransformerLens's
    own attention."""
    return all(kernels._fuses_block(b) and kernels.supports_fused_attention(b.attn) and kernels._packs_qkv(b.attn)
               for b in model.blocks[layer:])


def token_fisher(model, hook: str, tokens: Int[Tensor, "n pos"], position: int, measured, keep: Bool[Tensor, "n pos"],
                 *, samples: int | None = None, seed: int = 0, chunk: int = 128, batch_size: int = 8,
                 fused: bool = True, progress: bool = True) -> TokenFisher:
    """F (module docstring) of the token at `position` of every context of `tokens` where `keep` holds there,
    summed over the `measured` positions (each at least `position`) where `keep` holds. `chunk` basis vectors
    are pushed forward at once, for `batch_size` contexts together; `fused` runs the engine's fused kernels
    (`kernels.fused_kernels`: the same functions).

    `samples` None: F exactly. A number: F's term at `position` itself exactly (`fisher_at`, a window of one
    position, so 1/17 of the forward-mode products in single-token mode) plus the measured positions after it by
    the sampled estimator (`fisher_gradients`, `samples` draws per token from a generator keyed by `seed` and the
    context's tokens, so a token's F does not depend on the batch it was computed in): unbiased, and its noise is
    confined to the positions after the patched one, which hold the smaller part of tr(F) (on SmolLM2 at position
    48: 0.04% to 32% at layers 15 and 24, 6 tokens)."""
    if samples is None:
        return _exact(model, hook, tokens, position, measured, keep, chunk, batch_size, fused, progress)
    measured = sorted(int(q) for q in measured)
    at = _exact(model, hook, tokens, position, [position], keep, chunk, batch_size, fused, progress)
    after = [q for q in measured if q > position]
    fisher = at.fisher.clone()
    if after:  # each context's own generator: its draws are what a call for it alone would make
        generators = [torch.Generator().manual_seed(token_seed(seed, tokens[seq])) for seq in at.seqs]
        seqs, g = fisher_gradients(model, hook, tokens[at.seqs], position, after, keep[at.seqs], samples=samples,
                                   generator=generators, batch_size=batch_size, progress=progress)
        assert seqs == list(range(len(at.seqs)))  # kept at `position` already
        g = g.double()
        fisher += torch.einsum("nsd,nse->nde", g, g) / samples
    return TokenFisher(at.seqs, at.x, fisher, at.fisher_at)


def token_seed(seed: int, tokens: Int[Tensor, "pos"]) -> int:
    """A generator seed from `seed` and a context's tokens (sha256): the same context gets the same draws in any
    batch, any run."""
    digest = hashlib.sha256(str(int(seed)).encode() + tokens.long().cpu().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _exact(model, hook: str, tokens: Int[Tensor, "n pos"], position: int, measured, keep: Bool[Tensor, "n pos"],
           chunk: int, batch_size: int, fused: bool, progress: bool) -> TokenFisher:
    """`token_fisher`'s exact F (forward-mode products of every basis vector, module docstring)."""
    measured, window, names = _window(model, hook, position, measured)
    device = model.cfg.device
    measured_rel = torch.tensor(measured, device=device) - position
    W_U = model.unembed.W_U.detach()  # [d_model, d_vocab]
    unembed = patching._Unembed(model)
    out: dict[str, list] = {"seqs": [], "x": [], "fisher": [], "fisher_at": []}
    buffer = torch.empty_like(W_U)  # output_fisher's centred copy of W_U, reused for every position
    with kernels.fused_kernels(model, keep=(hook,)) if fused else contextlib.nullcontext():
        for seqs, keep_m, cache in _contexts(model, tokens, keep, position, measured, window, names, batch_size,
                                             f"fisher {hook}", progress):
            rows = torch.arange(len(seqs), device=device)
            f = _one_position_final(model, hook, cache, rows, position) if window[1] == position + 1 else None
            f = f or _suffix_final(model, hook, cache, rows, window, measured_rel)
            X = flat(cache[hook], hook)[:, position]  # [b, d]
            with torch.no_grad():
                p = unembed.logits(f(X)).softmax(-1)  # [b, m, d_vocab]
                basis = torch.eye(X.shape[-1], dtype=X.dtype, device=device)
                # forward mode only (no backward graph): K[i, b, q] = dh_q / dx_i of context b
                K = vmap(lambda v: jvp(f, (X,), (v.expand_as(X),))[1], chunk_size=chunk)(basis)
                for b in range(len(seqs)):
                    per_pos = torch.zeros(len(measured), X.shape[-1], X.shape[-1], dtype=torch.float64)
                    for q in range(len(measured)):
                        if keep_m[b, q]:  # positions not kept are not measured: they add nothing
                            Kq = K[:, b, q]  # [d, d_model]
                            per_pos[q] = (Kq @ output_fisher(W_U, p[b, q], buffer) @ Kq.T).double().cpu()
                    out["fisher"].append(per_pos.sum(0))
                    out["fisher_at"].append(per_pos[0])
            out["x"].extend(X.double().cpu())
            out["seqs"].extend(seqs)
    if not out["seqs"]:
        raise ValueError(f"no context may be patched at position {position} (a special token in every one)")
    return TokenFisher(out["seqs"], torch.stack(out["x"]), torch.stack(out["fisher"]), torch.stack(out["fisher_at"]))


def fisher_gradients(model, hook: str, tokens: Int[Tensor, "n pos"], position: int, measured,
                     keep: Bool[Tensor, "n pos"], *, samples: int = 16,
                     generator: torch.Generator | list[torch.Generator] | None = None,
                     noise: Float[Tensor, "s m d_vocab"] | None = None, chunk: int = 8, batch_size: int = 8,
                     progress: bool = True) -> tuple[list[int], Float[Tensor, "n s d"]]:
    """Random vectors g per token (where `keep` holds at `position`) with E[g g^T] = F (module docstring, the
    sampled estimator): g = sum_q K_q^T W_U (sqrt(p_q) * xi_q - p_q (sqrt(p_q) . xi_q)) with xi_q standard normal
    in the vocabulary, one reverse-mode product per sample for every measured position at once. `noise` replaces
    the draws (the same for every context): with xi the unit vectors of every (measured position, word) pair,
    sum_s g_s g_s^T is F exactly. `generator` a list: one per context of `tokens`, each drawing that context's
    noise alone, in the order a call for that context alone draws it (so its g does not depend on the batch).
    Returns (context indices, g [n, samples, d], in the model's dtype). The model runs unfused: the engine's fused
    kernels work in place, which reverse mode cannot go back through.

    The cotangent is computed as W_U a - (sum a) m_q with a = sqrt(p_q) * xi_q and m_q = W_U p_q (the same vector):
    one pass over the vocabulary-long noise and a matmul, where the written-out form makes three more passes over it
    (they were a fifth of the time at SmolLM2's 49,152 words)."""
    measured, window, names = _window(model, hook, position, measured)
    device = model.cfg.device
    measured_rel = torch.tensor(measured, device=device) - position
    W_U = model.unembed.W_U.detach()  # [d_model, d_vocab]
    unembed = patching._Unembed(model)
    n_samples = samples if noise is None else len(noise)
    seqs_out, grads = [], []
    for seqs, keep_m, cache in _contexts(model, tokens, keep, position, measured, window, names, batch_size,
                                         f"fisher samples {hook}", progress):
        rows = torch.arange(len(seqs), device=device)
        f = _suffix_final(model, hook, cache, rows, window, measured_rel)
        X = flat(cache[hook], hook)[:, position].detach()  # [b, d]
        h, pull = vjp(f, X)  # h [b, m, d_model]
        with torch.no_grad():
            p = unembed.logits(h).softmax(-1) * keep_m[..., None]  # [b, m, d_vocab]: unmeasured positions add 0
            root = p.sqrt()
            mean_w = p @ W_U.T  # m_q [b, m, d_model]
            g = []
            for s0 in range(0, n_samples, chunk):
                s1 = min(s0 + chunk, n_samples)
                if noise is not None:
                    a = root * noise[s0:s1, None].to(device=device, dtype=p.dtype)  # [s, b, m, d_vocab]
                elif isinstance(generator, (list, tuple)):  # each context's [s, 1, m, d_vocab] from its own
                    a = torch.cat([torch.randn(s1 - s0, 1, *p.shape[1:], generator=generator[i], dtype=p.dtype,
                                               device="cpu") for i in seqs], dim=1).to(device).mul_(root)
                else:
                    a = torch.randn(s1 - s0, *p.shape, generator=generator, dtype=p.dtype, device="cpu"
                                    ).to(device).mul_(root)
                cot = torch.matmul(a, W_U.T).sub_(a.sum(-1, keepdim=True) * mean_w)  # [s, b, m, d_model]
                del a
                g.append(vmap(pull)(cot)[0])  # [s, b, d]
        grads.append(torch.cat(g).transpose(0, 1).cpu())
        seqs_out.extend(seqs)
    if not seqs_out:
        raise ValueError(f"no context may be patched at position {position} (a special token in every one)")
    return seqs_out, torch.cat(grads)


def mean_fisher(model, hook: str, tokens: Int[Tensor, "n pos"], keep: Bool[Tensor, "n pos"], *, span: int = 16,
                n_positions: int = 8, samples: int = 16, seed: int = 0, batch_size: int = 8,
                progress: bool = True) -> tuple[Float[Tensor, "d d"], int]:
    """F averaged over one token per context (the sampled estimator, `fisher_gradients`, `samples` draws per
    token): the contexts are dealt in turn to `n_positions` positions spread evenly over 1..n_ctx - 2, each
    measured there and at the `span` after it (no further than n_ctx - 2, as single-token mode measures). Returns
    (the mean, float64, the number of tokens it averages)."""
    n_ctx = tokens.shape[1]
    last = n_ctx - 2
    positions = torch.linspace(1, last, n_positions).round().long().unique().tolist()
    generator = torch.Generator().manual_seed(seed)
    total, count = None, 0
    for i, position in enumerate(positions):
        idx = torch.arange(i, len(tokens), len(positions))
        if not keep[idx, position].any():
            continue
        measured = range(position, min(position + span, last) + 1)
        _, g = fisher_gradients(model, hook, tokens[idx], position, measured, keep[idx], samples=samples,
                                generator=generator, batch_size=batch_size, progress=progress)
        g = g.double()
        part = torch.einsum("nsd,nse->de", g, g) / g.shape[1]
        total = part if total is None else total + part
        count += len(g)
    if total is None:
        raise ValueError("no context may be patched at any of the positions " + str(positions))
    return total / count, count


def _window(model, hook: str, position: int, measured) -> tuple[list[int], tuple[int, int], list[str]]:
    """The measured positions (sorted), the window of positions run (patched one to last measured) and the hooks
    the clean pass caches (the splice's, and every layer's keys and values for the prefix)."""
    measured = sorted(int(q) for q in measured)
    if not measured or measured[0] < position:
        raise ValueError(f"measured positions {measured} must be non-empty and not precede position {position}")
    if model.cfg.output_logits_soft_cap > 0:
        raise NotImplementedError("the Fisher assumes logits linear in the final residual stream; this model "
                                  f"soft-caps them (output_logits_soft_cap={model.cfg.output_logits_soft_cap})")
    names = {hook, splice_point(hook)[0]}
    if position > 0:
        names |= {get_act_name(kind, layer) for kind in ("k", "v") for layer in range(model.cfg.n_layers)}
    return measured, (position, measured[-1] + 1), sorted(names)


def _contexts(model, tokens, keep, position, measured, window, names, batch_size, desc, progress):
    """Per batch of contexts whose token at `position` is kept: their indices, `keep` at the measured positions
    [b, m] and the clean pass's cache of `names` over the window's prefix and the window."""
    device = model.cfg.device
    rows_kept = [int(i) for i in torch.nonzero(keep[:, position]).flatten()]
    for start in tqdm(range(0, len(rows_kept), batch_size), desc=desc, disable=not progress):
        seqs = rows_kept[start:start + batch_size]
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[seqs, :window[1]].to(device), names_filter=names)
        yield seqs, keep[seqs][:, measured].to(device), cache
