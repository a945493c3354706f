"""The pathology score: its table agrees with the frame it summarises and with scipy's bootstrap."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from saenb import score
from saenb.engine.store import measure_cached

from .conftest import REPO

HOOKS = ["blocks.1.hook_resid_pre", "blocks.3.attn.hook_z"]


def test_score_table(tiny, tmp_path):
    table = score(tiny, hooks=HOOKS, n_tokens=8 * 128, progress=False, root=tmp_path)
    assert list(table.hook) == HOOKS
    df = measure_cached(tiny, HOOKS, ("sae", "eps_random", "zero"), tiny.tokens(8), root=tmp_path, progress=False)
    for row in table.itertuples():
        sub = df[df.hook == row.hook]
        # token means; the bootstrap resamples whole sequences (their KL sums)
        assert row.kl_sae == pytest.approx(sub[sub.intervention == "sae"].kl.mean(), rel=1e-5)
        sae = sub[sub.intervention == "sae"].groupby("seq").kl.sum().to_numpy(np.float64)
        eps = sub[sub.intervention == "eps_random"].groupby("seq").kl.sum().to_numpy(np.float64)
        assert row.kl_ratio == pytest.approx(sae.sum() / eps.sum(), rel=1e-6)
        assert row.kl_ratio_ci_low < row.kl_ratio < row.kl_ratio_ci_high
        ref = stats.bootstrap((sae, eps), lambda a, b, axis=-1: a.mean(axis) / b.mean(axis), paired=True,
                              n_resamples=2000, random_state=np.random.default_rng(0))
        assert row.kl_ratio_ci_low == pytest.approx(ref.confidence_interval.low)
        ce = sub.groupby("intervention", observed=True).ce_patched.mean()
        ce_clean = sub.ce_clean.mean()
        assert row.ce_loss_score == pytest.approx((ce["zero"] - ce["sae"]) / (ce["zero"] - ce_clean), rel=1e-5)
        assert 0 < row.l0 < tiny.saes[row.hook].cfg.d_sae


def test_score_command_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "saenb", "score", "--preset", "tiny-stdlib", "--n-tokens", "512",
                          "--hooks", "blocks.0.hook_resid_pre"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "blocks.0.hook_resid_pre" in out.stdout and "ratio (95% CI)" in out.stdout


def test_score_takes_any_model_and_its_saes(tiny, tmp_path):
    """`score(model, {hook: sae}, tokens)`: no preset, the same table as the loaded preset's; the SAEs are named
    in cache keys by their weights, so other SAEs at the same hook are measured afresh."""
    tokens = tiny.tokens(4)
    own = score(tiny, hooks=HOOKS[:1], tokens=tokens, progress=False, root=tmp_path / "own")
    anyone = score(tiny.model, {HOOKS[0]: tiny.saes[HOOKS[0]]}, tokens, progress=False, root=tmp_path / "any")
    pd.testing.assert_frame_equal(anyone, own)
    other = score(tiny.model, {HOOKS[0]: tiny.saes["blocks.3.hook_resid_pre"]}, tokens, progress=False,
                  root=tmp_path / "any")
    assert other.kl_sae.item() != own.kl_sae.item()
    with pytest.raises(ValueError, match="pass tokens"):
        score(tiny.model, {HOOKS[0]: tiny.saes[HOOKS[0]]})
