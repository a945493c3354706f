"""The frame reductions behind the figures, against plain numpy / scipy computations on a synthetic frame."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from saenb import metrics


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """A measure-shaped frame: 40 sequences of uneven length, 2 layers, SAE ~3x eps-random."""
    rng = np.random.default_rng(0)
    rows = []
    for seq in range(40):
        n = rng.integers(20, 40)
        for layer in (0, 1):
            base = rng.lognormal(-3, 1, n)
            for label, scale in (("sae", 3.0 + layer), ("eps_random", 1.0)):
                kl = base * scale * rng.lognormal(0, 0.3, n)
                rows.append(pd.DataFrame({"seq": seq, "pos": np.arange(1, n + 1), "layer": layer, "intervention": label,
                                          "kl": kl, "ce_delta": kl * 0.5 + rng.normal(0, 0.01, n)}))
    return pd.concat(rows, ignore_index=True)


def test_mean_table_is_the_token_mean_with_scipy_bootstrap_ci(frame):
    table = metrics.mean_table(frame, "kl", by=("layer", "intervention"), seed=3)
    assert len(table) == 4
    for row in table.itertuples():
        sub = frame[(frame.layer == row.layer) & (frame.intervention == row.intervention)]
        assert row.mean == pytest.approx(sub.kl.mean())
        assert row.n_tokens == len(sub) and row.n_seqs == 40
        sums, counts = sub.groupby("seq").kl.sum().to_numpy(), sub.groupby("seq").size().to_numpy(float)
        ref = stats.bootstrap((sums, counts), lambda s, c, axis=-1: s.sum(axis) / c.sum(axis), paired=True,
                              n_resamples=2000, random_state=np.random.default_rng(3))
        assert row.ci_low == pytest.approx(ref.confidence_interval.low)
        assert row.ci_low < row.mean < row.ci_high


def test_ratio_table_is_the_ratio_of_token_means(frame):
    table = metrics.ratio_table(frame, "sae", "eps_random", values=("kl", "ce_delta"), by=("layer",))
    assert set(zip(table.layer, table.metric, strict=True)) == {(0, "kl"), (1, "kl"), (0, "ce_delta"), (1, "ce_delta")}
    for row in table.itertuples():
        sub = frame[frame.layer == row.layer]
        value = row.metric
        want = sub[sub.intervention == "sae"][value].mean() / sub[sub.intervention == "eps_random"][value].mean()
        assert row.ratio == pytest.approx(want)
        assert row.ci_low < row.ratio < row.ci_high
    kl = table[table.metric == "kl"].set_index("layer").ratio
    assert 2.5 < kl[0] < 3.5 and 3.5 < kl[1] < 4.5  # the frame was built with 3x and 4x


def test_histogram_table_bins_every_value_and_clamps_the_tails(frame):
    hist = metrics.histogram_table(frame, "kl", by=("layer", "intervention"), low=0.0, high=0.2, bins=10)
    counts = hist.groupby(["layer", "intervention"])["count"].sum()
    assert (counts == frame.groupby(["layer", "intervention"]).size()).all()
    sub = frame[(frame.layer == 1) & (frame.intervention == "sae")].kl
    last = hist[(hist.layer == 1) & (hist.intervention == "sae")].iloc[-1]
    assert last["count"] == ((sub >= last.bin_left)).sum()  # everything above the range lands in the last bin
    np.testing.assert_allclose(hist.bin_right - hist.bin_left, 0.02)


def test_tail_and_position_tables(frame):
    tails = metrics.tail_table(frame, "kl", by=("layer", "intervention"), q=0.999)
    sub = frame[(frame.layer == 0) & (frame.intervention == "sae")].kl
    row = tails[(tails.layer == 0) & (tails.intervention == "sae")].iloc[0]
    assert row["quantile"] == pytest.approx(np.quantile(sub, 0.999)) and row["max"] == sub.max()
    pos = metrics.position_table(frame, "kl", by=("layer", "intervention"))
    at5 = frame[(frame.layer == 0) & (frame.intervention == "sae") & (frame.pos == 5)].kl
    got = pos[(pos.layer == 0) & (pos.intervention == "sae") & (pos.pos == 5)].iloc[0]
    assert got["mean"] == pytest.approx(at5.mean())
    assert got.ci_high - got["mean"] == pytest.approx(1.96 * at5.std(ddof=1) / np.sqrt(len(at5)))


def test_tail_position_and_paired_test_against_numpy_and_scipy(frame):
    rng = np.random.default_rng(1)
    samples = pd.DataFrame({"seq": np.repeat(np.arange(30), 200), "kl": rng.lognormal(-2, 0.5, 6000)})
    reference = pd.DataFrame({"seq": np.arange(30), "kl": rng.lognormal(-1.5, 0.5, 30)})
    tails = metrics.tail_position(samples, reference, by=("seq",)).set_index("seq")
    for seq in (0, 17):
        draws, ref = samples[samples.seq == seq].kl.to_numpy(), reference.kl[seq]
        assert tails.loc[seq, "z"] == pytest.approx((ref - draws.mean()) / draws.std(ddof=1))
        assert tails.loc[seq, "percentile"] == pytest.approx(stats.percentileofscore(draws, ref, kind="strict") / 100)
    test = metrics.paired_test(frame, "sae", "eps_random", by=("layer",)).set_index("layer")
    sub = frame[frame.layer == 1].groupby(["seq", "intervention"]).kl.mean().unstack()
    ref = stats.ttest_rel(sub["sae"], sub["eps_random"])
    assert test.loc[1, "t"] == pytest.approx(ref.statistic) and test.loc[1, "p_value"] == pytest.approx(ref.pvalue)
    assert test.loc[1, "ratio"] > 1 and test.loc[1, "n_seqs"] == 40
