"""The engine's Fisher information: the sampled estimator held to the exact F (itself held to finite differences of the
KL by tests/test_why.py), on a small random model whose whole vocabulary can be enumerated."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from saenb.engine import fisher

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model():
    """3 layers, d_model 32, 100 words, float64: every (position, word) pair can be a cotangent."""
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=100, n_ctx=32,
                                  act_fn="gelu_new", normalization_type="LN", seed=0, dtype=torch.float64)
    torch.manual_seed(0)
    return HookedTransformer(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 100, (6, 32), generator=torch.Generator().manual_seed(1))


def _exact(model, tokens, position, measured, keep):
    return fisher.token_fisher(model, HOOK, tokens, position, measured, keep, progress=False, fused=False)


def test_enumerated_cotangents_give_the_exact_fisher(model, tokens):
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[2, 12] = False  # a measured position left out of one context
    measured = [10, 11, 12, 13]
    exact = _exact(model, tokens, 10, measured, keep)
    V = model.cfg.d_vocab
    noise = torch.zeros(len(measured) * V, len(measured), V, dtype=torch.float64)
    for q in range(len(measured)):
        noise[q * V + torch.arange(V), q, torch.arange(V)] = 1.0
    seqs, g = fisher.fisher_gradients(model, HOOK, tokens, 10, measured, keep, noise=noise, chunk=100, progress=False)
    assert seqs == exact.seqs and g.dtype == torch.float64
    torch.testing.assert_close(torch.einsum("nsd,nse->nde", g, g), exact.fisher, rtol=1e-9, atol=1e-12)


def test_sampled_fisher_is_unbiased(model, tokens):
    keep = torch.ones_like(tokens, dtype=torch.bool)
    measured = list(range(20, 26))
    exact = _exact(model, tokens[:2], 20, measured, keep[:2]).fisher
    S = 4000
    _, g = fisher.fisher_gradients(model, HOOK, tokens[:2], 20, measured, keep[:2], samples=S, chunk=500,
                                   generator=torch.Generator().manual_seed(0), progress=False)
    est = torch.einsum("nsd,nse->nde", g, g) / S
    # each entry's Monte Carlo error is about sqrt(F_ii F_jj + F_ij^2) / sqrt(S): the error's norm relative to F's
    # is a few times 1/sqrt(S) = 1.6%, and falls as samples are added
    rel = (est - exact).norm(dim=(1, 2)) / exact.norm(dim=(1, 2))
    assert (rel < 0.08).all(), rel
    fewer = torch.einsum("nsd,nse->nde", g[:, :250], g[:, :250]) / 250
    rel_fewer = (fewer - exact).norm(dim=(1, 2)) / exact.norm(dim=(1, 2))
    assert (rel_fewer > 2 * rel).all(), (rel_fewer, rel)


def test_token_fisher_sampled_after_the_patched_position_is_exact_there_and_unbiased_after(model, tokens):
    """`samples`: F at the patched position exact, the positions after it by the sampled estimator; a token's draws
    are keyed by its context, so its F is the same in any batch."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[1, 23] = False  # a measured position after the patched one left out
    measured = list(range(20, 26))
    exact = _exact(model, tokens[:3], 20, measured, keep[:3])
    after = exact.fisher - exact.fisher_at

    def sampled(rows, samples, seed=0):
        return fisher.token_fisher(model, HOOK, tokens[rows], 20, measured, keep[rows], samples=samples, seed=seed,
                                   progress=False, fused=False)

    many = sampled(slice(0, 3), 4000)
    assert many.seqs == exact.seqs
    torch.testing.assert_close(many.fisher_at, exact.fisher_at, rtol=1e-9, atol=1e-12)
    rel = (many.fisher - exact.fisher).norm(dim=(1, 2)) / after.norm(dim=(1, 2))
    assert (rel < 0.08).all(), rel  # a few times 1/sqrt(4000) of the part sampled
    few = sampled(slice(0, 3), 100)
    rel_few = (few.fisher - exact.fisher).norm(dim=(1, 2)) / after.norm(dim=(1, 2))
    assert (rel_few > 2 * rel).all(), (rel_few, rel)
    # the mean over seeds converges on the exact F (unbiased), and a token's F does not depend on its batch
    mean = torch.stack([sampled(slice(0, 1), 100, seed).fisher[0] for seed in range(40)]).mean(0)
    assert float((mean - exact.fisher[0]).norm() / after[0].norm()) < 0.5 * float(rel_few[0])
    torch.testing.assert_close(sampled(slice(1, 2), 100).fisher[0], few.fisher[1], rtol=1e-10, atol=1e-13)
    assert not torch.equal(sampled(slice(1, 2), 100, seed=1).fisher[0], few.fisher[1])


def test_mean_fisher_averages_one_token_per_context_over_spread_positions(model, tokens):
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    F, count = fisher.mean_fisher(model, HOOK, tokens, keep, span=3, n_positions=2, samples=3000, progress=False)
    assert count == len(tokens)
    # positions 1 and 30 (the last with a next token), dealt in turn: contexts 0, 2, 4 at 1 and 1, 3, 5 at 30
    at_1 = _exact(model, tokens[0::2], 1, range(1, 5), keep[0::2]).fisher
    at_30 = _exact(model, tokens[1::2], 30, [30], keep[1::2]).fisher
    exact = torch.cat([at_1, at_30]).mean(0)
    assert float((F - exact).norm() / exact.norm()) < 0.05


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2-like", "llama-like"])
def test_one_position_attention_written_out_equals_transformer_lens(llama, monkeypatch):
    """F's term at the patched position (`token_fisher(samples=)`) comes from a one-position forward whose attention
    is written out (`_one_position_final`); it equals the one through TransformerLens's own cached attention, also
    with rotary positions, grouped key/value heads and a gated MLP (SmolLM2's blocks), in float64."""
    extra = dict(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                 n_key_value_heads=2, gated_mlp=True, final_rms=True) if llama else \
        dict(act_fn="gelu_new", normalization_type="LN")
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=100, n_ctx=32,
                                  seed=0, dtype=torch.float64, **extra)
    torch.manual_seed(0)
    model = HookedTransformer(cfg).eval().requires_grad_(False)
    assert fisher._one_position_supported(model, 1)
    tokens = torch.randint(0, 100, (3, 32), generator=torch.Generator().manual_seed(1))
    keep = torch.ones_like(tokens, dtype=torch.bool)
    written = fisher.token_fisher(model, HOOK, tokens, 20, [20], keep, progress=False, fused=False)
    monkeypatch.setattr(fisher, "_one_position_final", lambda *args: None)  # TransformerLens's cached attention
    reference = fisher.token_fisher(model, HOOK, tokens, 20, [20], keep, progress=False, fused=False)
    assert reference.fisher.abs().max() > 0.01
    torch.testing.assert_close(written.fisher, reference.fisher, rtol=1e-10, atol=1e-13)
