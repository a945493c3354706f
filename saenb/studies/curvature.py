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

`fisher` computes F per token by the engine (`saenb.engine.fisher`, which says how and what it costs): exactly, or
(`samples`) its term at the patched position exactly and the positions after it by an unbiased sampled estimator,
at a fraction of the cost. It keeps each token's F on disk as soon as its batch is done (`FISHER_RESULTS`): a
SmolLM2 token costs seconds, so an interrupted run (notebook 09 at its smollm2 defaults runs for a quarter of an hour
on 2 CPU cores, 7 minutes of it the curvature study) loses at most one batch, and a second run reads every token back.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from saenb import files
from saenb.engine import fisher as engine_fisher
from saenb.engine import patching, store
from saenb.models.loaded import Loaded

log = logging.getLogger(__name__)

FISHER_RESULTS = files.RESULTS / "fisher"
"""Each token's F, x and F at the patched position (`fisher`), one safetensors file per token, named by the key of
everything that decides it (`store.config_key`: preset, bundle, model, version; hook, position, measured positions,
fused kernels; the context's tokens)."""


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
    samples: int | None = None
    """None: `fisher` is exact; else the draws per token of its part after the patched position (`fisher_at` is
    exact either way)."""

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


def fisher(loaded: Loaded, hook: str, tokens: Tensor, position: int, *, samples: int | None = None, seed: int = 0,
           measure_positions=None, include_special: bool = False, chunk: int = 128, batch_size: int = 8,
           fused: bool = True, progress: bool = True, root: Path | None = FISHER_RESULTS) -> Curvature:
    """F (module docstring; `saenb.engine.fisher.token_fisher`) for the token at `position` of every context in
    `tokens` whose token there is not special, measured as `patching.measure(..., positions=position)` measures
    (same positions, same special tokens left out). `samples` None: F exactly; a number: F at the patched position
    exactly and the positions after it sampled (`token_fisher`, `samples` draws per token, keyed by `seed` and the
    context). Each token's F is read from `root` when there, else computed (`batch_size` contexts at a time) and
    written there at once; `root=None` computes every token and keeps none."""
    if samples is not None and not is_draw_count(samples):
        raise ValueError(f"samples must be None (the exact F) or a positive number of draws per token, not {samples!r}")
    req = patching.make_request(loaded, hook, "identity", tokens, positions=position,
                                measure_positions=measure_positions, include_special=include_special)
    keep = req.keep(tokens)
    dtype = str(next(loaded.model.parameters()).dtype)
    config = {"fisher": {"hook": hook, "position": position, "measured": list(req.measured), "fused": fused,
                         "dtype": dtype}}
    if samples is not None:  # the exact F's key is unchanged: files computed before `samples` existed still match
        config["fisher"].update(samples=samples, seed=seed)
    paths = {i: None if root is None else Path(root) / (
        store.config_key(loaded, {**config, "tokens": store.tokens_sha256(tokens[i])})[0] + ".safetensors")
        for i in range(len(tokens)) if keep[i, position]}
    done = {i: part for i, path in paths.items() if path is not None and (part := _read(path)) is not None}
    todo = [i for i in paths if i not in done]
    batches = range(0, len(todo), batch_size)
    for start in tqdm(batches, desc=f"fisher {hook}", disable=not progress or not todo, unit="batch"):
        rows = todo[start:start + batch_size]
        f = engine_fisher.token_fisher(loaded.model, hook, tokens[rows], position, req.measured, keep[rows],
                                       samples=samples, seed=seed, chunk=chunk, batch_size=batch_size, fused=fused,
                                       progress=False)
        for j, seq in enumerate(f.seqs):
            done[rows[seq]] = part = {"x": f.x[j], "fisher": f.fisher[j], "fisher_at": f.fisher_at[j]}
            if paths[rows[seq]] is not None:
                with files.atomic_path(paths[rows[seq]]) as tmp:
                    save_file(part, str(tmp), metadata={"sha256": _digest(part)})
    if not done:
        raise ValueError(f"no context may be patched at position {position} (a special token in every one)")
    seqs = sorted(done)
    return Curvature(hook, position, req.measured, seqs, *(torch.stack([done[i][k] for i in seqs])
                                                           for k in ("x", "fisher", "fisher_at")), samples=samples)


def is_draw_count(n) -> bool:
    """Whether `n` is a positive whole number of draws (a bool is not)."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def _read(path: Path) -> dict[str, Tensor] | None:
    """A token's cached F (None when there is none, or it cannot be read: then it is reported and computed again)."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            part = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            written = (f.metadata() or {}).get("sha256")
        if set(part) != {"x", "fisher", "fisher_at"} or written != _digest(part):
            raise ValueError("its content is not what was written (checksum)")
        return part
    except (OSError, ValueError, SafetensorError) as exc:  # truncated, corrupted or of another kind
        log.warning("cached Fisher information %s cannot be read (%s): computing it again", path.name, exc)
        return None


def _digest(part: dict[str, Tensor]) -> str:
    """sha256 of a token's tensors' bytes, in name order (kept in the file's metadata, checked on reading)."""
    h = hashlib.sha256()
    for name in sorted(part):
        h.update(part[name].contiguous().numpy().tobytes())
    return h.hexdigest()
