"""tokens: per-token gaps and their correlations, against pandas / scipy computed directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from saenb.engine import patching
from saenb.studies import tokens as tk

HOOK = "blocks.2.hook_resid_pre"


@pytest.fixture(scope="module")
def measured(tiny):
    toks = tiny.tokens(3)
    df = patching.measure(tiny, [HOOK, "blocks.4.hook_resid_pre"], ["sae", "eps_random"], toks, seed=0,
                          progress=False)
    return toks, df


def test_gap_frame_pairs_the_same_tokens(tiny, measured):
    toks, df = measured
    counts = torch.arange(tiny.model.cfg.d_vocab)
    gaps = tk.gap_frame(df, counts)
    assert len(gaps) == len(df) // 2
    wide = df.pivot_table(index=["hook", "seq", "pos"], columns="intervention", values="kl", observed=True)
    row = gaps.iloc[17]
    ref = wide.loc[(row.hook, row.seq, row.pos)]
    assert row.gap == pytest.approx(ref["sae"] - ref["eps_random"], abs=1e-7)
    assert row.log_ratio == pytest.approx(np.log(ref["sae"] / ref["eps_random"]), rel=1e-5)
    assert row.token == toks[row.seq, row.pos]
    assert row["count"] == row.token and row.frequency == pytest.approx(row.token / counts.sum().item())
    with pytest.raises(ValueError, match="no \\['mean'\\] rows"):
        tk.gap_frame(df, num="mean")


def test_rank_correlation_is_spearman_and_its_ci_covers_the_truth():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, 500)  # ties
    y = x + rng.normal(0, 5, 500)
    rho, low, high = tk.rank_correlation(x, y, np.arange(500) // 10)
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert low < rho < high
    # bivariate normal, r = 0.5: Spearman's rho is 6/pi * asin(r / 2); 95% CIs cover it in most draws
    truth = 6 / np.pi * np.arcsin(0.25)
    covered = 0
    for seed in range(30):
        xy = np.random.default_rng(seed).multivariate_normal([0, 0], [[1, 0.5], [0.5, 1]], 400)
        _, low, high = tk.rank_correlation(xy[:, 0], xy[:, 1], np.arange(400) // 4, n_resamples=500, seed=seed)
        covered += low <= truth <= high
    assert covered >= 25, f"the 95% CI covered the true rho in only {covered} of 30 draws"


def test_cluster_ci_widens_when_tokens_of_a_cluster_move_together():
    rng = np.random.default_rng(1)
    shared = np.repeat(rng.normal(size=(50, 2)), 20, axis=0)  # 50 clusters of 20 near-copies
    xy = shared + rng.normal(0, 0.1, shared.shape)
    clusters = np.arange(1000) // 20
    _, low_c, high_c = tk.rank_correlation(xy[:, 0], xy[:, 1], clusters)
    _, low_i, high_i = tk.rank_correlation(xy[:, 0], xy[:, 1], np.arange(1000))
    assert high_c - low_c > 2 * (high_i - low_i)


def test_tables_equal_direct_pandas(measured):
    _, df = measured
    gaps = tk.gap_frame(df, np.ones(4096, dtype=np.int64) + np.arange(4096))
    rho = tk.spearman_table(gaps, ("pos", "eps"), n_resamples=200)
    sub = gaps[gaps.layer == 2]
    got = rho[(rho.layer == 2) & (rho.predictor == "eps")].rho.item()
    assert got == pytest.approx(stats.spearmanr(sub.eps, sub.gap).statistic, abs=1e-12)

    layers = tk.layer_correlations(gaps)
    a, b = (gaps[gaps.layer == layer].set_index(["seq", "pos"]).gap for layer in (2, 4))
    assert layers.query("layer_a == 2 and layer_b == 4").rho.item() == pytest.approx(stats.spearmanr(a, b).statistic)

    binned = tk.binned_table(sub, ("pos",), bins=4)
    assert binned["n_tokens"].sum() == len(sub)
    first = sub[sub.pos <= sub.pos.quantile(0.25)]
    assert binned.iloc[0]["mean"] == pytest.approx(first.gap.mean(), rel=0.05)

    freq = tk.frequency_correlation(gaps, min_count=2, n_resamples=200)
    per_token = sub.groupby("token").agg(mean=("gap", "mean"), n=("gap", "size"), frequency=("frequency", "first"))
    per_token = per_token[per_token.n >= 2]
    assert freq.set_index("layer").rho[2] == pytest.approx(stats.spearmanr(per_token.frequency,
                                                                           per_token["mean"]).statistic)


def test_top_tokens_rank_by_mean_among_frequent_tokens(measured):
    _, df = measured
    gaps = tk.gap_frame(df)
    summary, rows = tk.top_tokens(gaps, {}, n=5, min_count=3)
    direct = gaps.groupby("token").gap.agg(["mean", "size"])
    direct = direct[direct["size"] >= 3].nlargest(5, "mean")
    assert summary.token.tolist() == direct.index.tolist()
    assert (summary["count"] >= 3).all() and len(rows) == summary["count"].sum()


def test_context_table_highlights_the_token_and_gives_the_models_top_predictions(tiny, measured):
    toks, df = measured
    gaps = tk.gap_frame(df)
    picks = gaps[gaps.hook == HOOK].nlargest(1, "gap")
    table = tk.context_table(tiny, toks, picks, window=8, top=3)
    row, pick = table.iloc[0], picks.iloc[0]
    assert "<mark>" in row.context and "\n" not in row.context
    with torch.inference_mode():
        logits = tiny.model(toks[pick.seq:pick.seq + 1])[0, pick.pos]
    best = logits.softmax(-1).max().item()
    assert row.clean_top.split("<br>")[0].endswith(f" {best:.2f}</span>") and row.clean_top.count("<br>") == 2
    assert row.gap == pytest.approx(pick.gap)
