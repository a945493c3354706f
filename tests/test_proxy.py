"""proxy: the TopK sweep's metrics against the plain run_with_hooks splice and eigenvalues computed directly."""

from __future__ import annotations

import pytest
import torch

from saenb import metrics, proxy
from saenb.presets import TINY_STDLIB, Preset


@pytest.fixture(scope="module")
def sweep(small_bundle):
    preset = Preset(name="small-sweep", bundle=str(small_bundle), sae_sources=TINY_STDLIB.sae_sources, layers=(0, 1))
    return proxy.load_sweep(preset)


def test_sweep_metrics_equal_the_naive_splice(sweep, small_bundle):
    from saenb import bundle_io

    tokens = bundle_io.load_tokens(small_bundle / bundle_io.HELDOUT_TOKENS)[:6]
    table = proxy.evaluate(sweep, tokens, batch_size=4, n_resamples=200, progress=False)
    assert len(table) == len(sweep.saes) == 10
    for row in table.itertuples():
        model, sae = sweep.models[row.model], sweep.saes[(row.model, row.layer, row.k, row.budget)]
        hook = f"blocks.{row.layer}.hook_resid_post"

        def splice(act, hook, sae=sae):  # BOS keeps its clean activation, as in the sweep
            return torch.cat([act[:, :1], sae.decode(sae.encode(act[:, 1:]))], dim=1)

        with torch.inference_mode():
            loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(hook, splice)])
            clean = model(tokens, return_type="loss")
        assert row.ce_recon == pytest.approx(float(loss), rel=1e-4)
        assert row.ce_clean == pytest.approx(float(clean), rel=1e-4)
        assert row.ce_rec == pytest.approx(metrics.ce_rec(row.ce_clean, row.ce_recon), abs=1e-9)
        assert row.ci_low <= row.ce_rec <= row.ci_high and row.kl > 0
        assert row.l0 == pytest.approx(row.k, rel=0.01) and 0 < row.alive <= 1 and row.r2 < 1
        # the streamed reconstruction statistics equal the metrics on all the tokens at once
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=[hook])
            x = cache[hook][:, 1:].flatten(0, 1)
            latents = sae.encode(x)
            x_hat = sae.decode(latents)
        assert row.r2 == pytest.approx(metrics.explained_variance(x, x_hat), rel=1e-6, abs=1e-6)
        assert row.rate_bits == pytest.approx(metrics.rate_bits(latents), rel=1e-6)
        assert row.cosine == pytest.approx(float(torch.cosine_similarity(x, x_hat, dim=-1).mean()), rel=1e-5)


def test_participation_ratio_profile_equals_eigenvalues(sweep, small_bundle):
    from saenb import bundle_io

    tokens = bundle_io.load_tokens(small_bundle / bundle_io.HELDOUT_TOKENS)[:4]
    model = sweep.models["small"]
    pr = proxy.participation_ratios(model, tokens)
    assert list(pr.layer) == list(range(model.cfg.n_layers))
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_post"])
    x = cache["blocks.0.hook_resid_post"][:, 1:].flatten(0, 1).double()  # BOS (position 0) left out
    lam = torch.linalg.eigvalsh(torch.cov(x.T)).flip(0)
    assert pr.pr[0] == pytest.approx(float(lam.sum() ** 2 / (lam ** 2).sum()), rel=1e-6)
    assert pr.pr_deflated[0] == pytest.approx(float(lam[1:].sum() ** 2 / (lam[1:] ** 2).sum()), rel=1e-6)
