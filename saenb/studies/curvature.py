"""The curvature of the next-token distributions with respect to one patched activation (notebook 09).

For a token at position p and hook h, let x be its clean activation and P_q(x) the next-token distributions at
the measured positions q = p..p+16 (single-token mode). Then, for a small change d of x,

    sum_q KL(P_q(x) || P_q(x + d)) = 0.5 d^T F d + O(|d|^3),
    F = sum_q J_q^T (diag(p_q) - p_q p_q^T) J_q,

J_q the Jacobian of position q's logits with respect to x and p_q its clean probabilities: F is the Fisher
information of the measured distributions in x. Under this quadratic model a random direction u (uniform on the
sphere) costs 0.5 eps^2 tr(F) / d in expectation, so the SAE error e's KL ratio to eps-random is its
**curvature quotient** e^T F e / (|e|^2 tr(F) / d): how much more than an average direction of its length the
error loads on the directions the output is sensitive to.

`fisher` computes F exactly. The logits are W_U^T h_q + b with h_q the final residual stream (after the final
norm), so J_q = W_U^T K_q with K_q = dh_q/dx, and F = sum_q K_q^T G_q K_q, G_q = W_U (diag(p_q) - p_q p_q^T) W_U^T.
K comes from one forward-mode product per basis vector of x (`torch.func.jvp`, vectorised with `torch.func.vmap`),
each a forward of the patched position and the ones after it from the hook's block on, the clean prefix read from
a frozen key/value cache, as the engine's single-token mode runs it; G_q costs d_model^2 d_vocab per position.
On 2 CPU cores a tiny-stdlib token takes about 0.2 s; a SmolLM2 token (d_model 576, 49,152 tokens) about 11 s.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import jvp, vmap
from transformer_lens.utilities import get_act_name

from saenb.engine import kernels, patching
from saenb.models.presets import Loaded


@dataclass
class Curvature:
    """F per token at one hook (float64, on the CPU), with what it was computed at."""

    hook: str
    position: int
    measured: tuple[int, ...]
    seqs: list[int]
    """Index of each token's context in the `tokens` given (contexts whose patched token is special are left out)."""
    x: Float[Tensor, "n d"]
    fisher: Float[Tensor, "n d d"]
    """F summed over the measured positions (special tokens among them left out, as the engine leaves them)."""
    fisher_at: Float[Tensor, "n d d"]
    """F of the patched position's own next-token distribution only."""

    def quadratic_kl(self, d: Float[Tensor, "n ... d"], at: bool = False) -> Float[Tensor, "n ..."]:
        """0.5 d^T F d per token for changes d of x (any number of them per token)."""
        F = self.fisher_at if at else self.fisher
        d = d.double().cpu()
        flat = d.reshape(len(d), -1, d.shape[-1])
        return 0.5 * torch.einsum("nkd,nde,nke->nk", flat, F, flat).reshape(d.shape[:-1])

    def quotient(self, d: Float[Tensor, "n ... d"], at: bool = False) -> Float[Tensor, "n ..."]:
        """The curvature quotient d^T F d / (|d|^2 tr(F) / width) per token; a random direction's mean is 1."""
        F = self.fisher_at if at else self.fisher
        width = F.shape[-1]
        trace = F.diagonal(dim1=-2, dim2=-1).sum(-1)
        trace = trace.reshape(len(trace), *([1] * (d.dim() - 2)))
        return 2 * self.quadratic_kl(d, at) / (d.double().cpu().square().sum(-1) * trace / width)

    def eigh(self, at: bool = False) -> tuple[Float[Tensor, "n d"], Float[Tensor, "n d d"]]:
        """Eigenvalues (decreasing) and eigenvectors (columns) of F per token."""
        values, vectors = torch.linalg.eigh(self.fisher_at if at else self.fisher)
        return values.flip(-1), vectors.flip(-1)


def energy_share(d: Float[Tensor, "n ... d"], basis: Float[Tensor, "n d k"] | Float[Tensor, "d k"]
                 ) -> Float[Tensor, "n ..."]:
    """The share of |d|^2 in the span of `basis`'s orthonormal columns (one basis per token, or one for all)."""
    d = d.double().cpu()
    flat = d.reshape(len(d), -1, d.shape[-1])
    basis = basis.double().cpu()
    proj = flat @ basis if basis.dim() == 2 else torch.einsum("nkd,ndj->nkj", flat, basis)
    return (proj.square().sum(-1) / flat.square().sum(-1)).reshape(d.shape[:-1])


def _suffix_final(model, hook: str, cache, b: int, window: tuple[int, int], measured_rel: Tensor):
    """x -> the final residual stream (after the final norm) at the measured positions of sequence `b`, x spliced at
    the window's first position (`hook`'s activation there, heads concatenated for hook_z), the rest of the window
    clean and the prefix read from the clean keys and values. The unembedding is left out: it is linear, and
    `fisher` applies it to the Jacobian once (under `vmap` it would be repeated per basis vector)."""
    start, layer, direct = patching.splice_point(hook)
    w0, w1 = window
    resid = cache[start][b:b + 1, w0:w1]  # [1, w, d_model]
    idx = torch.tensor([b], device=resid.device)
    kv = patching._prefix_cache(cache, idx, w0, model.cfg) if w0 > 0 else None

    def splice(act: Tensor, x: Tensor) -> Tensor:
        # functional (no in-place write): torch.func transforms x
        first = x.reshape(1, 1, *act.shape[2:]).to(act.dtype)
        return torch.cat([first, act[:, 1:]], dim=1)

    def f(x: Float[Tensor, "d"]) -> Float[Tensor, "m d_model"]:
        inp = splice(resid, x) if direct else resid
        hooks = [] if direct else [(hook, lambda act, hook: splice(act, x))]
        with model.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext():
            final = model(inp, start_at_layer=layer, stop_at_layer=model.cfg.n_layers, past_kv_cache=kv)
        final = final[0, measured_rel]
        return model.ln_final(final) if model.cfg.normalization_type is not None else final

    return f


def output_fisher(W_U: Float[Tensor, "d_model d_vocab"], p: Float[Tensor, "d_vocab"]) -> Float[Tensor, "d_model d_model"]:
    """W_U (diag(p) - p p^T) W_U^T: the Fisher information of softmax(h W_U + b) in the final residual h, as
    sum_y p_y (w_y - mean)(w_y - mean)^T (centred first: the uncentred form cancels most digits in float32)."""
    centred = (W_U - (W_U @ p)[:, None]) * p.sqrt()
    return centred @ centred.T


def fisher(loaded: Loaded, hook: str, tokens: Tensor, position: int, *, measure_positions=None,
           include_special: bool = False, chunk: int = 128, batch_size: int = 8, fused: bool = True,
           progress: bool = True) -> Curvature:
    """F (module docstring) for the token at `position` of every context in `tokens` whose token there is not
    special, measured as `patching.measure(..., positions=position)` measures (same positions, same special
    tokens left out). `chunk` basis vectors are pushed forward at once; `fused` runs the engine's fused kernels
    (`kernels.fused_kernels`: the same functions)."""
    req = patching.make_request(loaded, hook, "identity", tokens, positions=position,
                                measure_positions=measure_positions, include_special=include_special)
    model = loaded.model
    window = (position, req.measured[-1] + 1)
    names = {hook, patching.splice_point(hook)[0]}
    if position > 0:
        names |= {get_act_name(kind, layer) for kind in ("k", "v") for layer in range(model.cfg.n_layers)}
    if model.cfg.output_logits_soft_cap > 0:
        raise NotImplementedError("fisher assumes logits linear in the final residual stream; this model soft-caps "
                                  f"them (output_logits_soft_cap={model.cfg.output_logits_soft_cap})")
    measured = torch.tensor(req.measured, device=loaded.device)
    W_U = model.unembed.W_U.detach()  # [d_model, d_vocab]
    unembed = patching._Unembed(model)
    out: dict[str, list] = {"seqs": [], "x": [], "fisher": [], "fisher_at": []}
    with kernels.fused_kernels(model, keep=(hook,)) if fused else contextlib.nullcontext():
        for batch, seqs in patching._batches(tokens, batch_size, 0, f"fisher {hook}", progress):
            batch = batch.to(loaded.device)
            keep = req.keep(batch)  # [b, pos]: special tokens are neither patched nor measured
            with torch.no_grad():
                _, cache = model.run_with_cache(batch[:, :window[1]], names_filter=sorted(names))
            for b, seq in enumerate(seqs):
                if not keep[b, position]:
                    continue
                x = patching.flat(cache[hook], hook)[b, position]  # [d]
                f = _suffix_final(model, hook, cache, b, window, measured - window[0])
                with torch.no_grad():
                    p = unembed.logits(f(x)).softmax(-1)  # [m, d_vocab]
                basis = torch.eye(len(x), dtype=x.dtype, device=x.device)
                with torch.no_grad():  # forward-mode AD only: no backward graph is recorded
                    K = vmap(lambda v: jvp(f, (x,), (v,))[1], chunk_size=chunk)(basis)  # [d, m, d_model]: dh/dx_i
                per_pos = torch.zeros(len(req.measured), len(x), len(x), dtype=torch.float64)
                for q in range(len(req.measured)):
                    if keep[b, req.measured[q]]:  # special tokens are not measured: they add nothing
                        per_pos[q] = (K[:, q] @ output_fisher(W_U, p[q]) @ K[:, q].T).double().cpu()
                out["fisher"].append(per_pos.sum(0))
                out["fisher_at"].append(per_pos[0])
                out["x"].append(x.double().cpu())
                out["seqs"].append(seq)
    if not out["seqs"]:
        raise ValueError(f"every context holds a special token at position {position}: nothing to compute")
    return Curvature(hook, position, req.measured, out["seqs"], torch.stack(out["x"]), torch.stack(out["fisher"]),
                     torch.stack(out["fisher_at"]))
