"""proxy: the TopK sweep's metrics against the plain run_with_hooks splice and eigenvalues computed directly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens.utilities import get_act_name

from saenb.engine import metrics
from saenb.models import bundle_io
from saenb.models.presets import TINY_STDLIB, Preset
from saenb.studies import proxy

from .conftest import SMALL_PRESET


@pytest.fixture(scope="module")
def sweep(small_bundle):
    preset = Preset(name=SMALL_PRESET, bundle=str(small_bundle), sae_sources=TINY_STDLIB.sae_sources, layers=(0, 1))
    return proxy.load_sweep(preset)


def test_sweep_metrics_equal_the_naive_splice(sweep, small_bundle):
    tokens = bundle_io.load_tokens(small_bundle / bundle_io.HELDOUT_TOKENS)[:6]
    table = proxy.evaluate(sweep, tokens, batch_size=4, n_resamples=200, progress=False)
    assert len(table) == len(sweep.saes) == 10
    for row in table.itertuples():
        model, sae = sweep.models[row.model], sweep.saes[(row.model, row.layer, row.k, row.budget)]
        hook = get_act_name("resid_post", row.layer)

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
        x64 = x.double()
        assert row.sst_per_token == pytest.approx(float((x64 - x64.mean(0)).pow(2).sum(-1).mean()), rel=1e-6)
        assert row.sse_per_token == pytest.approx(float((x64 - x_hat.double()).pow(2).sum(-1).mean()), rel=1e-6)
        assert row.rate_bits == pytest.approx(metrics.rate_bits(latents), rel=1e-6)
        assert row.cosine == pytest.approx(float(torch.cosine_similarity(x, x_hat, dim=-1).mean()), rel=1e-5)


def test_participation_ratio_profile_equals_eigenvalues(sweep, small_bundle):
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


def test_a_hub_preset_has_no_sweep_and_says_what_to_use():
    with pytest.raises(ValueError, match="tiny-stdlib"):
        proxy.load_sweep("gpt2-small")


def synthetic_table(gap: bool) -> pd.DataFrame:
    """An `evaluate`-shaped table. With `gap`, the bigger model has higher R^2 but lower CE_rec at every k (seed
    002's pattern); without it, both lower. CE_rec rises linearly in log2 k, so k* is known in closed form."""
    rows = []
    for model, d_model in (("big", 128), ("little", 64)):
        for layer in (1, 3, 5):
            for k in (8, 16, 32, 64, 128):
                step = np.log2(k) - 3  # 0 .. 4
                ce = 0.6 + 0.08 * step - (0.05 if model == "big" else 0.0)
                r2 = 0.7 + 0.05 * step + (0.1 if model == "big" else 0.0) * (1 if gap else -1)
                for budget in (1, 5) if layer == 3 and k in (8, 32) else (1,):
                    rows.append({"model": model, "d_model": d_model, "layer": layer, "k": k, "budget": budget,
                                 "r2": r2, "ce_rec": ce + 0.1 * (budget > 1),
                                 "cosine": 0.8 + 0.02 * step - 0.01 * (model == "big"),
                                 "relative_error": 0.5 - 0.05 * step + 0.02 * (model == "big"),
                                 "alive": 0.5 + 0.1 * step - 0.1 * (model == "big") + 0.2 * (budget > 1),
                                 "sst_per_token": 4.0 * d_model})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("gap", [True, False])
def test_claims_read_the_seed_pattern_from_the_table(gap):
    table = synthetic_table(gap)
    delta = proxy.size_deltas(table)
    assert len(delta) == 15 and delta.d_r2.to_numpy() == pytest.approx(np.full(15, 0.1 if gap else -0.1))
    assert delta.d_ce_rec.to_numpy() == pytest.approx(np.full(15, -0.05)) and delta.seed_pattern.all() == gap
    # k*: the little model reaches 0.84 at k = 64 exactly; the big one (0.79 at 64, 0.87 at 128) 5/8 of the way on
    kstar = proxy.k_star_table(table, targets=(0.84,)).set_index("layer")
    assert kstar.little.tolist() == pytest.approx([64.0] * 3) and kstar.big.tolist() == pytest.approx([104.0] * 3)
    assert kstar.ratio.tolist() == pytest.approx([104 / 64] * 3)
    pr = pd.DataFrame([{"model": m, "layer": layer, "pr": 50.0 if layer < 2 else 4.0}
                       for m in ("big", "little") for layer in range(6)])
    holds = proxy.claims(table, pr, targets=(0.84,)).set_index("claim").holds
    assert holds.iloc[0] == gap and holds.iloc[1]            # the gap; cosine / relative error agree with CE_rec
    assert holds.iloc[3] and holds.iloc[4] and holds.iloc[5]  # SST 2x, k* ratio 1.6, the PR canyon
    assert holds.iloc[6] and holds.iloc[7] and holds.iloc[8] and not holds.iloc[9]  # alive, budget, no flip
    corr = proxy.r2_correlations(table).set_index("layer")
    assert (holds.iloc[2] == (corr.within_k[3] < 0)) and corr.within_k[3] == pytest.approx(1.0 if not gap else -1.0)


def test_evaluate_cached_computes_once_and_reads_back_the_same_table(sweep, small_bundle, tmp_path, monkeypatch):
    tokens = bundle_io.load_tokens(small_bundle / bundle_io.HELDOUT_TOKENS)[:4]
    first = proxy.evaluate_cached(sweep, tokens, batch_size=4, n_resamples=100, progress=False, root=tmp_path)
    pd.testing.assert_frame_equal(first, proxy.evaluate(sweep, tokens, batch_size=4, n_resamples=100, progress=False))

    def fail(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(proxy, "evaluate", fail)
    pd.testing.assert_frame_equal(first, proxy.evaluate_cached(sweep, tokens, n_resamples=100, root=tmp_path))
    with pytest.raises(AssertionError, match="evaluated again"):  # other tokens: a new key
        proxy.evaluate_cached(sweep, tokens[:2], n_resamples=100, root=tmp_path)
