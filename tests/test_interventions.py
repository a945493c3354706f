"""interventions: the geometry each one promises, checked on random sites."""

from __future__ import annotations

import pytest
import torch

from saenb.engine import interventions as iv
from saenb.engine.draws import Draws
from saenb.studies import baselines

D, D_SAE = 48, 192
NEED_A_TRAINED_NFM = {"sae_nfm", "nfm_eps_random"}  # carry a trained NFM: tested in test_nfm.py


def baselines_fit() -> baselines.HookFit:
    """A fitted-baselines part (saenb.studies.baselines) for the sites below: its interventions can run."""
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    return baselines.HookFit(
        mean=torch.zeros(D), components=q, variances=torch.linspace(2, 0.1, D),
        bank=torch.nn.functional.normalize(torch.randn(16, D, generator=g), dim=-1),
        A=torch.randn(D, D, generator=g) * 0.05, b=torch.zeros(D), info={})


PARAMS = {"theta_random_cos": {"cos": 0.8}, "eps_random_like": {"of": "sae_scaled", "scale": 0.5},
          **{name: {"key": "test", "fitted": baselines_fit()} for name in baselines.INTERVENTIONS}}
"""Keyword parameters the interventions without defaults need (the fitted baselines: a fit made above)."""


@pytest.fixture
def site() -> iv.Site:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, D, generator=g) * 3
    W_dec = torch.randn(D_SAE, D, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * 0.7  # decoder rows not unit-norm on purpose
    latents = torch.relu(torch.randn(5, 7, D_SAE, generator=g) - 1.5)
    x_sae = latents @ W_dec + 0.1 * torch.randn(D, generator=g)
    return iv.Site(x, x_sae, latents, W_dec, mean=torch.randn(D, generator=g))


def gen(seed: int = 0) -> Draws:
    """Draws for the site's rows, numbered in order (the engine names them by sequence, position and sample)."""
    return Draws(seed, "test", "stream")


def test_unknown_intervention_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown intervention 'sea'.*'eps_random'.*'sae'"):
        iv.get("sea")
    with pytest.raises(ValueError, match="unknown intervention"):
        iv.Intervention.of("sea")
    with pytest.raises(ValueError, match="already registered"):
        iv.register("sae")(lambda site, draws: site.x)


def test_deterministic_ones(site):
    torch.testing.assert_close(iv.get("identity")(site, draws=gen()), site.x)
    torch.testing.assert_close(iv.get("sae")(site, draws=gen()), site.x_sae)
    out = iv.get("sae_norm_corrected")(site, draws=gen())
    torch.testing.assert_close(out.norm(dim=-1), site.x.norm(dim=-1))
    torch.testing.assert_close(torch.cosine_similarity(out, site.x_sae, dim=-1), torch.ones(5, 7))
    out = iv.get("sae_norm")(site, draws=gen())
    torch.testing.assert_close(out.norm(dim=-1), site.x_sae.norm(dim=-1))
    torch.testing.assert_close(torch.cosine_similarity(out, site.x, dim=-1), torch.ones(5, 7))
    assert (iv.get("zero")(site, draws=gen()) == 0).all()
    torch.testing.assert_close(iv.get("mean")(site, draws=gen()), site.mean.expand_as(site.x))


def test_eps_random_lands_at_distance_eps(site):
    out = iv.get("eps_random")(site, draws=gen())
    torch.testing.assert_close((out - site.x).norm(dim=-1), site.eps, rtol=1e-5, atol=1e-5)
    # directions are isotropic: mean cosine with x near 0 over many draws
    many = iv.Site(site.x[:1, :1].expand(4000, 1, D), site.x_sae[:1, :1].expand(4000, 1, D),
                   site.latents[:1, :1].expand(4000, 1, D_SAE), site.W_dec, site.mean)
    cos = torch.cosine_similarity(iv.get("eps_random")(many, draws=gen()) - many.x, many.x, dim=-1)
    assert abs(cos.mean()) < 4 / (4000 * D) ** 0.5 * 3


@pytest.mark.parametrize("name,norm_of", [("theta_random_sae_norm", "x_sae"), ("theta_random_true_norm", "x")])
def test_theta_random_keeps_cosine_and_norm(site, name, norm_of):
    out = iv.get(name)(site, draws=gen())
    want_cos = torch.cosine_similarity(site.x, site.x_sae, dim=-1)
    torch.testing.assert_close(torch.cosine_similarity(out, site.x, dim=-1), want_cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm(dim=-1), getattr(site, norm_of).norm(dim=-1), rtol=1e-5, atol=1e-5)
    rescaled = site.x_sae * (out.norm(dim=-1, keepdim=True) / site.x_sae.norm(dim=-1, keepdim=True))
    assert not torch.allclose(out, rescaled)


def test_latent_perturb_keeps_support_and_l0(site):
    z = gen(3).normal(site.latents)
    new_latents = site.latents * torch.exp(0.1 * z)
    assert torch.equal(new_latents > 0, site.latents > 0)
    out = iv.get("latent_perturb")(site, draws=gen(3), scale=0.1)
    torch.testing.assert_close(out, site.x_sae + (new_latents - site.latents) @ site.W_dec)
    assert not torch.allclose(out, site.x_sae)


def test_sae_plus_random_matches_latent_perturb_change_norm(site):
    perturbed = iv.get("latent_perturb")(site, draws=gen(5), scale=0.2)
    plus = iv.get("sae_plus_random")(site, draws=gen(5), scale=0.2)
    torch.testing.assert_close((plus - site.x_sae).norm(dim=-1), (perturbed - site.x_sae).norm(dim=-1),
                               rtol=1e-5, atol=1e-6)
    cos = torch.cosine_similarity((plus - site.x_sae).flatten(0, 1), (perturbed - site.x_sae).flatten(0, 1), dim=-1)
    assert cos.abs().mean() < 0.5  # a different direction


@pytest.mark.parametrize("which", ["active", "inactive", "any"])
def test_feature_aligned_moves_eps_along_a_decoder_direction(site, which):
    out = iv.get("feature_aligned")(site, draws=gen(), which=which)
    step = out - site.x
    torch.testing.assert_close(step.norm(dim=-1), site.eps, rtol=1e-5, atol=1e-5)
    unit_dec = site.W_dec / site.W_dec.norm(dim=-1, keepdim=True)
    cos = (step / step.norm(dim=-1, keepdim=True)) @ unit_dec.T  # [5, 7, d_sae]
    best = cos.abs().max(-1)
    torch.testing.assert_close(best.values, torch.ones(5, 7), atol=1e-5, rtol=1e-5)
    active = (site.latents > 0).gather(-1, best.indices.unsqueeze(-1)).squeeze(-1)
    if which == "active":
        assert active.all()
    elif which == "inactive":
        assert not active.any()


def test_random_draws_follow_the_seed(site):
    a = iv.get("eps_random")(site, draws=gen(7))
    b = iv.get("eps_random")(site, draws=gen(7))
    c = iv.get("eps_random")(site, draws=gen(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("name", [n for n in iv.names() if n not in NEED_A_TRAINED_NFM])
def test_deterministic_flag_tells_which_ones_ignore_the_draws(site, name):
    """The engine applies deterministic interventions to a whole batch at once: the flag must be right."""
    params = PARAMS.get(name, {})
    a, b = iv.get(name)(site, draws=gen(1), **params), iv.get(name)(site, draws=gen(2), **params)
    assert torch.equal(a, b) == iv.is_deterministic(name)


def test_spec_parameters_and_label(site):
    s = iv.intervention("latent_perturb", scale=0.3)
    assert s.label == "latent_perturb(scale=0.3)"
    torch.testing.assert_close(s(site, gen(1)), iv.get("latent_perturb")(site, draws=gen(1), scale=0.3))
    assert iv.Intervention.of("sae").label == "sae"


def test_orthogonal_splices_remove_the_error_along_x(site):
    """sae_orthogonal = x + (e minus its projection on x); eps_random_orthogonal lands orthogonal to x at that
    part's norm. Checked against a float64 projection computed independently (numpy)."""
    import numpy as np

    x, e = site.x.double().numpy(), (site.x_sae - site.x).double().numpy()
    x_unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    e_perp = e - (e * x_unit).sum(-1, keepdims=True) * x_unit
    out = iv.get("sae_orthogonal")(site, draws=gen())
    np.testing.assert_allclose((out - site.x).double().numpy(), e_perp, atol=1e-4)
    rnd = iv.get("eps_random_orthogonal")(site, draws=gen()) - site.x
    torch.testing.assert_close(rnd.norm(dim=-1).double(), torch.from_numpy(np.linalg.norm(e_perp, axis=-1)),
                               rtol=1e-5, atol=1e-5)
    assert torch.cosine_similarity(rnd, site.x, dim=-1).abs().max() < 1e-5
    # the random part is a fresh direction, not e_perp itself
    assert torch.cosine_similarity(rnd, out - site.x, dim=-1).abs().mean() < 0.5


def test_splitmix64_equals_its_definition():
    """The int64 hash wraps and shifts as SplitMix64 does on unsigned 64-bit integers (Python ints here)."""
    mask = (1 << 64) - 1

    def reference(x: int) -> int:
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        return z - (1 << 64) if z >= 1 << 63 else z

    xs = [0, 1, 2, -1, 12345678987654321, 2**62, -2**63, 2**63 - 1]
    assert iv.splitmix64(torch.tensor(xs)).tolist() == [reference(x & mask) for x in xs]


@pytest.mark.parametrize("dense", [False, True])
def test_uniform_choice_is_uniform_and_stable(dense):
    """Each allowed index is chosen equally often (chi-square against uniform, scipy), none that is refused is;
    and refusing an allowed index that was not chosen changes no choice (what keeps fast == naive when rounding
    flips a latent at the edge of being active)."""
    from scipy import stats

    allowed = torch.zeros(60000, 12, dtype=torch.bool)
    allowed[:, [0, 3, 5, 11]] = True
    allowed[:30000, 7] = True
    pick = iv.uniform_choice(allowed, Draws(0), dense=dense)
    assert allowed.gather(1, pick[:, None]).all()
    for rows, columns in ((slice(0, 30000), [0, 3, 5, 7, 11]), (slice(30000, None), [0, 3, 5, 11])):
        counts = torch.bincount(pick[rows], minlength=12)[columns].numpy()
        assert stats.chisquare(counts).pvalue > 1e-3, counts

    mask = torch.rand(2000, 40, generator=torch.Generator().manual_seed(1)) > (0.1 if dense else 0.8)
    mask[:, 0] = True  # no empty row
    before = iv.uniform_choice(mask, Draws(2), dense=dense)
    fewer = mask.clone()
    for r, chosen in enumerate(before.tolist()):
        others = [j for j in mask[r].nonzero().flatten().tolist() if j != chosen]
        if others:
            fewer[r, others[r % len(others)]] = False
    assert torch.equal(iv.uniform_choice(fewer, Draws(2), dense=dense), before)
    none = iv.uniform_choice(torch.zeros(3, 7, dtype=torch.bool), Draws(0), dense=dense)
    assert none.tolist() == [0, 0, 0]
