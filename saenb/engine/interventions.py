"""Perturbations of an activation at one hook, per token: pure functions, randomness passed in.

Each intervention maps a `Site` (the clean activation `x`, its SAE reconstruction `x_sae`, the SAE
latents, decoder and the hook's mean activation) and a `Draws` (`saenb.engine.draws`: counter-based random numbers,
made on the site's device, the same on every device) to a new tensor shaped like `x`.
Nothing here runs a model: `saenb.engine.patching` splices the results in. Names follow DESIGN.md; the original
study's function names are given in each docstring. What is spliced is an `Intervention`: a registered name, its
parameters and, for the fitted ones (`cov_random`, `error_shuffled`, `sae_plus_linear`, `sae_plus_nonlinear`,
`sae_nfm`, `nfm_eps_random`), the parts fitted at each hook (`saenb.studies.baselines`, `saenb.studies.nfm`), carried
with it: no process holds fitted state of its own, so a Ray worker or a fresh kernel runs any of them.

Random interventions draw their noise in a fixed order from the `Draws` they are given, whose numbers are a
function of (seed, hook, stream, sequence, position, sample): each intervention draws from its own stream
(`stream`), except where a comparison needs shared draws: `sae_plus_random` gets exactly the latent perturbation
that `latent_perturb` applied, and `eps_random_like` and `nfm_eps_random` the direction `eps_random` drew.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from saenb.engine.draws import Draws

Act = Float[Tensor, "... d"]


@dataclass(frozen=True)
class Site:
    """What an intervention may read at one hook, for a batch of tokens (any leading shape)."""

    x: Float[Tensor, "... d"]
    x_sae: Float[Tensor, "... d"]
    latents: Float[Tensor, "... d_sae"]
    """SAE latent activations (`hook_sae_acts_post`)."""
    W_dec: Float[Tensor, "d_sae d"]
    mean: Float[Tensor, "d"] | None
    """Mean clean activation at the hook (over a reference set of non-BOS tokens); None when no intervention of
    the request needs it."""
    hook: str = ""
    """The hook's name, for interventions with per-hook learned parts (`sae_nfm`)."""

    @property
    def eps(self) -> Float[Tensor, "..."]:
        return (self.x_sae - self.x).norm(dim=-1)


InterventionFn = Callable[..., Act]
_REGISTRY: dict[str, InterventionFn] = {}
_DETERMINISTIC: set[str] = set()
_CONSTANT: set[str] = set()
_NEEDS_FIT: dict[str, str] = {}
"""Interventions that read a part fitted at each hook -> the call that fits it (named in errors)."""
_STREAMS: dict[str, str] = {}
"""Interventions that draw from another's stream -> that one (`stream`)."""


def register(name: str, *, deterministic: bool = False, constant: bool = False, fitted_by: str | None = None,
             shares_draws_of: str | None = None) -> Callable[[InterventionFn], InterventionFn]:
    """Register an intervention under `name`; `deterministic` ones never draw (the engine
    may then apply them to many sequences at once); `constant` ones put the same activation at every token,
    whatever it was (the engine reduces their logits as those of streams far from the clean ones, which
    several sequences may share). `fitted_by` marks one that reads a part fitted at each hook (its keyword
    argument `fitted`), naming the call that fits it: it runs only as an `Intervention` carrying its fits.
    `shares_draws_of` names the intervention whose random stream it draws from (its first draws are then that
    one's), for comparisons on the same noise; others draw from a stream of their own name."""

    def wrap(fn: InterventionFn) -> InterventionFn:
        if name in _REGISTRY:
            raise ValueError(f"an intervention named {name!r} is already registered")
        _REGISTRY[name] = fn
        if deterministic or constant:
            _DETERMINISTIC.add(name)
        if constant:
            _CONSTANT.add(name)
        if fitted_by is not None:
            _NEEDS_FIT[name] = fitted_by
        if shares_draws_of is not None:
            _STREAMS[name] = shares_draws_of
        return fn

    return wrap


def is_deterministic(name: str) -> bool:
    get(name)
    return name in _DETERMINISTIC


def is_constant(name: str) -> bool:
    get(name)
    return name in _CONSTANT


def needs_fit(name: str) -> bool:
    get(name)
    return name in _NEEDS_FIT


def stream(name: str) -> str:
    """The random stream `name` draws from: its own, or the one it shares (`register(shares_draws_of=...)`).
    Parameters do not enter it: eps_random(scale=0.5) draws the directions eps_random draws."""
    get(name)
    return _STREAMS.get(name, name)


def get(name: str) -> InterventionFn:
    if name not in _REGISTRY:
        raise ValueError(f"unknown intervention {name!r}. Known interventions: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class Intervention:
    """What is spliced at a hook: a registered intervention with keyword parameters, e.g.
    `intervention("latent_perturb", scale=0.3)`, and for a fitted one (`needs_fit`) its fitted parts.

    Everything it needs travels with it (pickled to a Ray worker, say): a fitted one carries `fitted`, hook -> the
    part fitted there (an NFM, a baselines fit), and names it in `params` by its key, a hash of what decided the fit
    (`saenb.engine.store.fit_key`); the label and every cache key hold that key, never the tensors."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    fitted: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    """hook -> fitted part, for the interventions that need one (None for the others)."""

    def __post_init__(self):
        get(self.name)  # an unknown name fails here, listing the known ones
        of = dict(self.params).get("of")  # eps_random_like of a fitted splice needs that splice's fits
        for name in (self.name, *([of] if isinstance(of, str) and of in _REGISTRY else [])):
            if name in _NEEDS_FIT and self.fitted is None:
                raise ValueError(f"intervention {name!r} splices parts fitted at each hook; make it with "
                                 f"{_NEEDS_FIT[name]}")

    @classmethod
    def of(cls, item: str | Intervention) -> Intervention:
        if isinstance(item, Intervention):
            return item
        return cls(item)

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in self.params) + ")"

    def part(self, hook: str) -> Any:
        """The part fitted at `hook`."""
        if hook not in self.fitted:
            raise ValueError(f"{self.label} has no fit at hook {hook!r}; it was fitted at {sorted(self.fitted)}: fit "
                             f"it at that hook too ({_NEEDS_FIT.get(self.name, 'the fit that made it')})")
        return self.fitted[hook]

    def to(self, device: torch.device | str) -> Intervention:
        """The same intervention with its fitted parts on `device`."""
        if self.fitted is None:
            return self
        return dataclasses.replace(self, fitted={h: p.to(device) for h, p in self.fitted.items()})

    def __call__(self, site: Site, draws: Draws) -> Act:
        fitted = {} if self.fitted is None else {"fitted": self.part(site.hook)}
        return get(self.name)(site, draws=draws, **dict(self.params), **fitted)


def intervention(name: str, *, fitted: Mapping[str, Any] | None = None, **params: Any) -> Intervention:
    """`Intervention(name, params)`, the parameters sorted by name; `fitted`: hook -> part, for a fitted one."""
    return Intervention(name, tuple(sorted(params.items())), fitted)


def _unit(v: Act) -> Act:
    return v / v.norm(dim=-1, keepdim=True)


def random_unit(like: Act, draws: Draws) -> Act:
    """Directions uniform on the unit sphere (normalised Gaussians), one per row of `like`."""
    return draws.unit(like)


# ------------------------------------------------------------------------------------- interventions
@register("identity", deterministic=True)
def identity(site: Site, *, draws: Draws) -> Act:
    """x itself: the patched model must equal the clean one (a check of the engine)."""
    return site.x.clone()


@register("sae", deterministic=True)
def sae(site: Site, *, draws: Draws) -> Act:
    """x <- x_sae (substitution)."""
    return site.x_sae.clone()


@register("sae_norm_corrected", deterministic=True)
def sae_norm_corrected(site: Site, *, draws: Draws) -> Act:
    """x_sae rescaled to ||x|| (norm_corrected_substitution): is the gap feature suppression?"""
    return site.x_sae * (site.x.norm(dim=-1, keepdim=True) / site.x_sae.norm(dim=-1, keepdim=True))


@register("sae_norm", deterministic=True)
def sae_norm(site: Site, *, draws: Draws) -> Act:
    """x rescaled to ||x_sae|| (cos_corrected_substitution, the post's SAE-norm substitution)."""
    return site.x * (site.x_sae.norm(dim=-1, keepdim=True) / site.x.norm(dim=-1, keepdim=True))


@register("eps_random")
def eps_random(site: Site, *, draws: Draws, scale: float = 1.0) -> Act:
    """x + eps * u, u uniform on the unit sphere, eps = ||x_sae - x|| (l2_error_preserving_substitution);
    `scale` multiplies the distance (`sae_scaled`'s baseline)."""
    return site.x + scale * site.eps.unsqueeze(-1) * random_unit(site.x, draws)


@register("sae_scaled", deterministic=True)
def sae_scaled(site: Site, *, draws: Draws | None, scale: float = 1.0) -> Act:
    """x + scale * (x_sae - x): the SAE's error shrunk (or grown) along its own direction; scale 1 is `sae`."""
    return site.x + scale * (site.x_sae - site.x)


@register("eps_random_like", shares_draws_of="eps_random")
def eps_random_like(site: Site, *, draws: Draws, of: str, **params: Any) -> Act:
    """x + ||x' - x|| * u with x' the deterministic intervention `of` (with `params`): a random error as large as
    that splice's own (u is the direction `eps_random` draws: the same stream)."""
    if not is_deterministic(of):
        raise ValueError(f"eps_random_like(of={of!r}) needs a deterministic intervention; deterministic ones: "
                         f"{sorted(_DETERMINISTIC)}")
    x_other = get(of)(site, draws=None, **params)
    return site.x + (x_other - site.x).norm(dim=-1, keepdim=True) * random_unit(site.x, draws)


def _theta_random(site: Site, draws: Draws, cos: Tensor | float | None = None) -> Act:
    """A unit vector whose cosine to x equals `cos` (default: cos(x, x_sae)), its orthogonal part uniform at
    random."""
    x_hat = _unit(site.x)
    if cos is None:
        cos = (x_hat * _unit(site.x_sae)).sum(-1, keepdim=True)
    cos = torch.as_tensor(cos, dtype=x_hat.dtype, device=x_hat.device)
    g = draws.normal(site.x)
    ortho = _unit(g - (g * x_hat).sum(-1, keepdim=True) * x_hat)
    return cos * x_hat + (1 - cos**2).clamp_min(0).sqrt() * ortho


@register("theta_random_sae_norm")
def theta_random_sae_norm(site: Site, *, draws: Draws) -> Act:
    """Same cosine to x as x_sae, norm ||x_sae|| (cos_preserving_substitution_w_sae_norm)."""
    return _theta_random(site, draws) * site.x_sae.norm(dim=-1, keepdim=True)


@register("theta_random_true_norm")
def theta_random_true_norm(site: Site, *, draws: Draws) -> Act:
    """Same cosine to x as x_sae, norm ||x|| (cos_preserving_substitution_w_true_norm)."""
    return _theta_random(site, draws) * site.x.norm(dim=-1, keepdim=True)


@register("theta_random_cos")
def theta_random_cos(site: Site, *, draws: Draws, cos: float) -> Act:
    """A random direction at cosine `cos` to x, norm ||x||: one point of a robustness curve, KL against the
    cosine to the clean activation at a fixed norm (Logan Riggs' curves in seed 001)."""
    if not -1.0 <= cos <= 1.0:
        raise ValueError(f"cos={cos!r} must lie in [-1, 1]")
    return _theta_random(site, draws, cos) * site.x.norm(dim=-1, keepdim=True)


def orthogonal_error(site: Site) -> Float[Tensor, "... d"]:
    """The SAE error's part orthogonal to x: e - (e . x^) x^, e = x_sae - x."""
    x_hat = _unit(site.x)
    e = site.x_sae - site.x
    return e - (e * x_hat).sum(-1, keepdim=True) * x_hat


@register("sae_orthogonal", deterministic=True)
def sae_orthogonal(site: Site, *, draws: Draws) -> Act:
    """x + the SAE error's part orthogonal to x: the splice without its shrinkage along x, which a following
    LayerNorm largely undoes and which flatters heavily shrunk SAEs (e.g. end-to-end ones)."""
    return site.x + orthogonal_error(site)


@register("eps_random_orthogonal")
def eps_random_orthogonal(site: Site, *, draws: Draws) -> Act:
    """x + ||e_perp|| * u, u a random unit direction orthogonal to x: `sae_orthogonal`'s random baseline."""
    x_hat = _unit(site.x)
    g = draws.normal(site.x)
    u = _unit(g - (g * x_hat).sum(-1, keepdim=True) * x_hat)
    return site.x + orthogonal_error(site).norm(dim=-1, keepdim=True) * u


@register("zero", constant=True)
def zero(site: Site, *, draws: Draws) -> Act:
    """Zero ablation (zero_ablation)."""
    return torch.zeros_like(site.x)


@register("mean", constant=True)
def mean(site: Site, *, draws: Draws) -> Act:
    """Mean ablation (mean_ablation): the hook's mean activation over a reference set of tokens."""
    return site.mean.expand_as(site.x).clone()


def latent_delta(site: Site, draws: Draws, scale: float) -> Float[Tensor, "... d"]:
    """The change in x_sae when each active latent f_i is multiplied by exp(scale * z_i), z_i ~ N(0, 1).

    A multiplicative log-normal factor keeps every active latent positive and every inactive one zero,
    so the support (and L0) are kept, as seed 004's prediction requires.
    """
    z = draws.normal(site.latents)
    new_latents = site.latents * torch.exp(scale * z)
    return (new_latents - site.latents) @ site.W_dec


@register("latent_perturb")
def latent_perturb(site: Site, *, draws: Draws, scale: float = 0.1) -> Act:
    """Decode the active latents perturbed (support and L0 kept): x_sae + delta (seed 004)."""
    return site.x_sae + latent_delta(site, draws, scale)


@register("sae_plus_random", shares_draws_of="latent_perturb")
def sae_plus_random(site: Site, *, draws: Draws, scale: float = 0.1) -> Act:
    """x_sae + a uniformly random vector of the norm of `latent_perturb`'s change (same draws, same seed)."""
    norm = latent_delta(site, draws, scale).norm(dim=-1, keepdim=True)
    return site.x_sae + norm * random_unit(site.x, draws)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_SPLITMIX = [_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> on int64 is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """SplitMix64's output function on int64 tensors (wrapping arithmetic): a well-mixed 64-bit hash of x."""
    z = x + _SPLITMIX[0]
    z = (z ^ _shr(z, 30)) * _SPLITMIX[1]
    z = (z ^ _shr(z, 27)) * _SPLITMIX[2]
    return z ^ _shr(z, 31)


DENSE_TRIES = 16
"""Candidates tried per row by `uniform_choice(dense=True)` before the sparse rule."""


def uniform_choice(allowed: Tensor, draws: Draws, *, dense: bool = False) -> Tensor:
    """One allowed index per row of `allowed` ([..., d] bool), uniformly at random; index 0 where none is.

    `draws` gives one 64-bit key per row; everything else is a hash of (key, counter). Sparse rows
    (`dense=False`): the allowed index of highest score hash(key, index), scored on the allowed entries only.
    Dense rows (`dense=True`, most indices allowed): the first allowed of the candidates hash(key, t) mod d,
    t = 0, 1, ... (a rejection sampler; a row whose first DENSE_TRIES candidates are all refused takes the sparse
    rule). Both give a uniform choice, and a stable one: allowing or refusing an index that ranks after the chosen
    one leaves the choice unchanged, so a latent at the edge of being active, which rounding can flip between
    two equal computations, changes the choice only in the rare case that it ranks first.

    Written here because the library samplers draw d numbers per row from a generator (torch.multinomial, or
    uniform scores over all latents: 17 ms per sequence at 24,576 latents on the CPU) and are not stable."""
    shape, d = allowed.shape[:-1], allowed.shape[-1]
    allowed = allowed.reshape(-1, d)
    keys = draws.bits(shape, allowed.device).reshape(-1)
    pick = torch.zeros_like(keys)
    todo = torch.ones_like(keys, dtype=torch.bool)
    if dense:
        tries = torch.arange(DENSE_TRIES, device=keys.device)
        candidates = (splitmix64(keys[:, None] ^ splitmix64(tries)) & (2**63 - 1)) % d  # [rows, tries]
        ok = allowed.gather(1, candidates)
        pick = candidates.gather(1, ok.int().argmax(1, keepdim=True)).squeeze(1)  # the first allowed candidate
        todo = ~ok.any(1)
        if not todo.any():
            return pick.view(shape)
    row, index = (allowed & todo[:, None]).nonzero(as_tuple=True)
    score = splitmix64(keys[row] ^ splitmix64(index))
    best = torch.full_like(keys, -2**63).scatter_reduce_(0, row, score, "amax")
    won = torch.where(score == best[row], index, d)  # d: not the row's best
    sparse = torch.full_like(keys, d).scatter_reduce_(0, row, won, "amin")
    pick = torch.where(todo, sparse.masked_fill_(sparse == d, 0), pick)
    return pick.view(shape)


@register("feature_aligned")
def feature_aligned(site: Site, *, draws: Draws, which: str = "active") -> Act:
    """x + eps * (+/- a unit decoder direction): seed 004's "spikes along feature directions" test.

    `which="active"` picks, per token, one of its active latents uniformly (a token with none falls back
    to any latent); `"inactive"` one of its inactive latents; `"any"` any latent. The sign is random.
    """
    if which not in ("active", "inactive", "any"):
        raise ValueError(f"which={which!r} must be one of ('active', 'inactive', 'any')")
    active = site.latents > 0
    if which == "active":
        allowed = active | ~active.any(-1, keepdim=True)
    elif which == "inactive":
        allowed = ~active
    else:
        allowed = torch.ones_like(active)
    pick = uniform_choice(allowed, draws, dense=which != "active")
    sign = draws.integers(2, pick.shape, site.x.device)
    directions = _unit(site.W_dec[pick]) * (2 * sign - 1).to(site.x.dtype).unsqueeze(-1)
    return site.x + site.eps.unsqueeze(-1) * directions


# ---------------------------------------------------------------------- fitted (their parts carried in)
_BASELINES = "saenb.studies.baselines.fit(loaded, hooks, tokens).intervention({name!r})"
_NFM = "saenb.studies.nfm.fit(loaded, hooks, tokens, cfg).intervention"


@register("cov_random", fitted_by=_BASELINES.format(name="cov_random"))
def cov_random(site: Site, *, draws: Draws, key: str, fitted) -> Act:
    """x + eps * u, u ~ N(0, Sigma) scaled to length 1, Sigma the held-in activations' covariance at the hook
    (`fitted.variances`, `fitted.components`: its eigendecomposition; `key` names the fit)."""
    g = random_unit(site.x, draws)  # a Gaussian's direction; its length cancels in the normalisation
    u = (g * fitted.variances.sqrt().to(g.dtype)) @ fitted.components.T.to(g.dtype)
    return site.x + site.eps.unsqueeze(-1) * u / u.norm(dim=-1, keepdim=True)


@register("error_shuffled", fitted_by=_BASELINES.format(name="error_shuffled"))
def error_shuffled(site: Site, *, draws: Draws, key: str, fitted) -> Act:
    """x + eps * the unit SAE-error direction of a held-in token drawn uniformly from the fit's bank
    (`fitted.bank`)."""
    bank = fitted.bank
    pick = draws.integers(len(bank), site.x.shape[:-1], bank.device)
    return site.x + site.eps.unsqueeze(-1) * bank.to(site.x.dtype)[pick.to(bank.device)]


@register("sae_plus_linear", deterministic=True, fitted_by=_BASELINES.format(name="sae_plus_linear"))
def sae_plus_linear(site: Site, *, draws: Draws | None, key: str, fitted) -> Act:
    """x_sae + (x A + b): the error's linear part restored, its nonlinear part n left (`fitted.linear_part`)."""
    return site.x_sae + fitted.linear_part(site.x)


@register("sae_plus_nonlinear", deterministic=True, fitted_by=_BASELINES.format(name="sae_plus_nonlinear"))
def sae_plus_nonlinear(site: Site, *, draws: Draws | None, key: str, fitted) -> Act:
    """x_sae + n = x - (x A + b): the error's nonlinear part restored, its linear part left."""
    return site.x - fitted.linear_part(site.x)


@register("sae_nfm", deterministic=True, fitted_by=_NFM)
def sae_nfm(site: Site, *, draws: Draws | None, key: str, fitted, variant: str = "both") -> Act:
    """x_sae + NFM(latents) (seed 003's "feature integration"): `fitted` is the hook's NFM, `key` names the NFMs
    trained together (`variant` is recorded in the label only)."""
    return site.x_sae + fitted(site.latents).to(site.x_sae.dtype)


@register("nfm_eps_random", fitted_by=_NFM, shares_draws_of="eps_random")
def nfm_eps_random(site: Site, *, draws: Draws, key: str, fitted, variant: str = "both") -> Act:
    """x + ||x_hat - x|| * u with x_hat = x_sae + NFM(latents): a random error as large as the SAE + NFM
    splice's own (u is the direction `eps_random` draws: the same stream)."""
    x_hat = sae_nfm(site, draws=None, key=key, fitted=fitted, variant=variant)
    return site.x + (x_hat - site.x).norm(dim=-1, keepdim=True) * random_unit(site.x, draws)
