"""nfm: the bi-interaction pooling, the ablation switches, training, caching, and the sae_nfm splice."""

from __future__ import annotations

import itertools

import pytest
import torch

from saenb import score
from saenb.engine import patching
from saenb.engine.draws import Draws
from saenb.studies import nfm

HOOK = "blocks.3.hook_resid_pre"
SMALL = nfm.NFMConfig(max_epochs=3, patience=1, batch_size=256)


@pytest.mark.parametrize("d_sae", [7, 32])
def test_bi_interaction_is_the_pairwise_sum(d_sae):
    g = torch.Generator().manual_seed(d_sae)
    z = torch.relu(torch.randn(5, d_sae, generator=g, dtype=torch.float64))
    V = torch.randn(d_sae, 4, generator=g, dtype=torch.float64)
    explicit = torch.stack([sum(z[b, i] * V[i] * z[b, j] * V[j] for i, j in itertools.combinations(range(d_sae), 2))
                            for b in range(5)])
    torch.testing.assert_close(nfm.bi_interaction(z, V), explicit, rtol=1e-10, atol=1e-10)


def test_variants_switch_off_what_they_should():
    z = torch.relu(torch.randn(6, 40))
    models = {v: nfm.NFM(40, 12, nfm.NFMConfig(variant=v)) for v in nfm.VARIANTS}
    for model in models.values():  # output layers start at zero: x_hat = x_sae before training
        assert torch.count_nonzero(model(z)) == 0
        for p in model.parameters():
            torch.nn.init.normal_(p)
    assert set(models["both"].parts(z)) == {"linear", "interaction"}
    assert set(models["linear"].parts(z)) == {"linear"} and models["linear"].embed is None
    assert set(models["interaction"].parts(z)) == {"interaction"} and models["interaction"].linear is None
    # a single active latent has no partner: the interaction part sees zero pooled input
    one = torch.zeros(1, 40)
    one[0, 3] = 2.0
    inter = models["interaction"]
    torch.testing.assert_close(inter(one), inter.mlp(torch.zeros(1, inter.cfg.d_embed)))
    # the linear control is linear in z, with the parameter budget of "both"
    control = models["linear_control"]
    zero = control(torch.zeros(1, 40))
    torch.testing.assert_close(control(2 * z) - zero, 2 * (control(z) - zero), rtol=1e-4, atol=1e-4)
    budget = nfm.n_parameters(models["both"])
    assert abs(nfm.n_parameters(control) - budget) <= 40 + 12
    with pytest.raises(ValueError, match="variant='quadratic' must be one of"):
        nfm.NFMConfig(variant="quadratic")


def test_training_lowers_held_out_error_and_is_cached(tiny, tmp_path, monkeypatch):
    fit_tokens = tiny.tokens_excluding(24, tiny.tokens(8))
    assert not any((fit_tokens == row).all(-1).any() for row in tiny.tokens(8))
    trained = nfm.fit(tiny, [HOOK], fit_tokens, SMALL, root=tmp_path, progress=False)
    info = trained.info[HOOK]
    assert info["val_mse_nfm"] < 0.97 * info["val_mse_sae"], info
    assert info["val_history"][0] == pytest.approx(info["val_mse_sae"], rel=1e-5)  # it starts at the SAE

    monkeypatch.setattr(nfm, "train", None)  # a second fit must read the cache
    again = nfm.fit(tiny, [HOOK], fit_tokens, SMALL, root=tmp_path, progress=False)
    z = torch.relu(torch.randn(3, tiny.saes[HOOK].cfg.d_sae))
    torch.testing.assert_close(again.models[HOOK](z), trained.models[HOOK](z))

    # the splice is x_sae + NFM(z); fast and naive engine paths agree on it
    toks = tiny.tokens(2)
    fast = patching.measure(tiny, HOOK, [trained.intervention, "sae"], toks, progress=False)
    naive = patching.measure_naive(tiny, HOOK, [trained.intervention, "sae"], toks)
    torch.testing.assert_close(torch.tensor(fast.kl.to_numpy()), torch.tensor(naive.kl.to_numpy()), atol=5e-5,
                               rtol=1e-3)
    sae_rows = fast[fast.intervention == "sae"]
    nfm_rows = fast[fast.intervention == trained.intervention.label]
    assert (nfm_rows.dist_sae.to_numpy() > 0).all() and (sae_rows.dist_sae.to_numpy() == 0).all()
    # score takes it in place of the SAE splice, against eps-random at the SAE's error size
    table = score(tiny, hooks=[HOOK], n_tokens=2 * 128, intervention=trained.intervention, progress=False,
                  root=tmp_path / "m")
    eps = fast[fast.intervention == "sae"]  # same tokens: eps-random's KL is measured afresh, compare the numerator
    assert table.kl_sae.item() == pytest.approx(nfm_rows.kl.mean(), rel=1e-4) and len(eps) == table.n_tokens.item()

    # its random baseline: eps_random's direction, at the SAE + NFM splice's own distance from x
    x, z, x_sae, _ = nfm.activations(tiny, HOOK, toks[:1])
    site = patching.iv.Site(x, x_sae, z, tiny.saes[HOOK].W_dec.detach(), None, HOOK)
    with torch.no_grad():
        x_hat = patching.iv.get("sae_nfm")(site, draws=None, key=trained.key, fitted=trained.models[HOOK])
        own = trained.eps_intervention(site, Draws(5))
        sae_eps = patching.iv.intervention("eps_random")(site, Draws(5))
    torch.testing.assert_close((own - x).norm(dim=-1), (x_hat - x).norm(dim=-1))
    for splice in (trained.intervention, trained.eps_intervention):  # the engine batches deterministic ones
        with torch.no_grad():
            one, two = (splice(site, Draws(s)) for s in (1, 2))
        same = torch.equal(one, two)
        assert same == patching.iv.is_deterministic(splice.name)  # the flag must be right
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(own - x, sae_eps - x, dim=-1),
                               torch.ones(len(x)))

    table = nfm.reconstruction_table(tiny, [trained], toks)
    row = table.iloc[0]
    assert row.mse_nfm < row.mse_sae and 0 < row.interaction_share < 1


def test_an_nfm_splice_without_its_nfms_names_the_fix(tiny):
    with pytest.raises(ValueError, match=r"make it with saenb\.studies\.nfm\.fit\(loaded, hooks, tokens, cfg\)"):
        patching.iv.intervention("sae_nfm", key="nope", variant="both")
    with pytest.raises(ValueError, match=r"make it with saenb\.studies\.nfm\.fit"):
        patching.measure(tiny, HOOK, ["sae_nfm"], tiny.tokens(1), progress=False)
