"""The frame reductions behind the figures, against plain numpy / scipy computations on a synthetic frame."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from saenb.engine import metrics


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


# ------------------------------------------------------------------------------ seed 002's proxy-gap metrics
def test_r2_is_one_minus_sse_over_centred_sst():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (500, 8)) * np.arange(1, 9)  # an offset and unequal variances per dimension
    x_hat = x + rng.normal(0, 1.5, x.shape)
    sse, sst = ((x - x_hat) ** 2).sum(), ((x - x.mean(0)) ** 2).sum()
    assert metrics.explained_variance(torch.tensor(x), torch.tensor(x_hat)) == pytest.approx(1 - sse / sst, rel=1e-12)
    # the same as the variance-weighted average of per-dimension R^2 (scikit-learn's "variance_weighted")
    per_dim_sst = ((x - x.mean(0)) ** 2).sum(0)
    r2_dims = 1 - ((x - x_hat) ** 2).sum(0) / per_dim_sst
    assert metrics.explained_variance(torch.tensor(x), torch.tensor(x_hat)) == pytest.approx(
        (r2_dims * per_dim_sst).sum() / per_dim_sst.sum(), rel=1e-12)


def test_participation_ratio_from_the_covariance_eigenvalues():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(400, 12)) * np.geomspace(10, 0.1, 12) + 5.0)
    lam = torch.linalg.eigvalsh(torch.cov(x.T)).flip(0)  # descending
    assert metrics.participation_ratio(x) == pytest.approx(float(lam.sum() ** 2 / (lam ** 2).sum()), rel=1e-9)
    assert metrics.participation_ratio(x, deflate=1) == pytest.approx(float(lam[1:].sum() ** 2 / (lam[1:] ** 2).sum()),
                                                                      rel=1e-9)
    iso = torch.tensor(rng.normal(size=(20000, 6)))
    assert metrics.participation_ratio(iso) == pytest.approx(6, rel=0.02)  # isotropic: every direction counts


def test_k_star_interpolates_linearly_on_the_grid():
    ks, ce = [8, 16, 32, 64, 128], [0.30, 0.55, 0.80, 0.88, 0.93]
    assert metrics.k_star(ks, ce, 0.85) == pytest.approx(32 + (0.85 - 0.80) / (0.88 - 0.80) * 32)
    assert metrics.k_star(ks, ce, 0.90) == pytest.approx(64 + (0.90 - 0.88) / (0.93 - 0.88) * 64)
    assert metrics.k_star(ks, ce, 0.2) == 8 and np.isnan(metrics.k_star(ks, ce, 0.95))
    assert metrics.k_star(ks[::-1], ce[::-1], 0.85) == metrics.k_star(ks, ce, 0.85)  # grid order does not matter


def test_ce_rec_and_its_ci_cover_the_true_value():
    assert metrics.ce_rec(2.0, 3.0) == pytest.approx(0.5) and metrics.ce_rec(2.0, 4.0) == pytest.approx(0.0)
    covered, truth = 0, 2 - 3.3 / 3.0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        clean = rng.gamma(30, 0.1, 120) * 128  # per-sequence loss sums; mean 3.0 per token
        patched = clean * 1.1 + rng.normal(0, 20, 120)
        _, low, high = metrics.ce_rec_ci(patched, clean, n_resamples=1000, seed=seed)
        covered += low <= truth <= high
    assert covered >= 34, f"the 95% CI covered the true CE_rec in only {covered} of 40 simulations"


def test_rate_bits_entropy_codes_the_active_indices():
    latents = torch.zeros(4, 8)
    latents[0, [0, 1]] = 1.0
    latents[1, [0, 1]] = 2.0
    latents[2, [0, 2]] = 1.0
    latents[3, [0, 3]] = 0.5
    # index frequencies 4/8, 2/8, 1/8, 1/8: entropy 1.75 bits; 2 active latents per token, 8 bits per value
    assert metrics.rate_bits(latents) == pytest.approx(2 * (1.75 + 8))
    assert metrics.alive_fraction(latents) == 0.5 and metrics.mse(latents, latents).sum() == 0


def _seed_simulation(sd_between: float, sd_within: float, *, sd_shared: float = 0.0, n_seeds: int = 3,
                     n_seqs: int = 64, sims: int = 400, truth: float = 2.0):
    """Per-sequence sums of S seeds' SAE (num) and baseline (den): seed s's true ratio is truth + a_s, a_s ~
    N(0, sd_between^2); each sequence adds noise of its own per seed (sd_within, in the seed's ratio) and, with
    sd_shared, noise common to every seed (the seeds measured on the same sequences). Returns the CIs of
    `seed_ratio_ci` and of a context-only CI of the pooled sequences, and the analytic Var(R)."""
    out = {"covered": 0, "pooled_covered": 0, "boot_var": [], "width": []}
    for sim in range(sims):
        rng = np.random.default_rng(1000 + sim)
        shared_den = rng.gamma(20, 0.05, n_seqs)  # mean 1
        common = rng.normal(0, sd_shared * np.sqrt(n_seqs), n_seqs)
        nums, dens = [], []
        for _ in range(n_seeds):
            den = shared_den if sd_shared else rng.gamma(20, 0.05, n_seqs)
            a = rng.normal(0, sd_between)
            nums.append((truth + a) * den + common + rng.normal(0, sd_within * np.sqrt(n_seqs), n_seqs))
            dens.append(den)
        r = metrics.seed_ratio_ci(nums, dens, same_seqs=sd_shared > 0, n_resamples=500, seed=sim)
        out["covered"] += r["ci_low"] <= truth <= r["ci_high"]
        out["boot_var"].append(((r["ci_high"] - r["ratio"]) / stats.t.ppf(0.975, r["df"])) ** 2)
        out["width"].append(r["ci_high"] - r["ci_low"])
        _, low, high = metrics.ratio_ci(np.concatenate(nums), np.concatenate(dens), n_resamples=500, seed=sim)
        out["pooled_covered"] += low <= truth <= high
    analytic = (sd_between ** 2 + sd_within ** 2) / n_seeds + sd_shared ** 2  # Var(R), R the seeds' mean ratio
    return {k: v / sims if k.endswith("covered") else np.mean(v) for k, v in out.items()}, analytic


def test_seed_ratio_ci_covers_with_known_between_and_within_seed_variance():
    """Seeds that differ (between-seed sd 0.3, within 0.05): the two-level bootstrap's variance is Var(R) =
    (0.3^2 + 0.05^2) / 3, its interval (Student's t at 2 degrees of freedom) covers the truth 95% of the time, as
    a normal interval at 2 degrees of freedom would; the contexts alone (pooled) cover far less."""
    got, analytic = _seed_simulation(0.3, 0.05)
    assert got["boot_var"] == pytest.approx(analytic, rel=0.12), (got, analytic)
    assert abs(got["covered"] - 0.95) < 0.035, got
    assert got["pooled_covered"] < 0.5, got
    # expected width: 2 t_2 E[sd*], E[sd*] = c4(3) sqrt(Var(R)) for a normal sample variance on 2 degrees of freedom
    c4 = np.sqrt(2 / 2) * np.exp(math.lgamma(3 / 2) - math.lgamma(1))
    assert got["width"] == pytest.approx(2 * stats.t.ppf(0.975, 2) * c4 * np.sqrt(analytic), rel=0.1)


def test_seed_ratio_ci_without_seed_spread_is_the_contexts():
    """Seeds that do not differ (within-seed sd 0.05 only): the bootstrap variance is max(b, v) / 3, v = 0.05^2 the
    within part and b ~ v chi2_2 / 2 the seeds' sample variance, so its mean is (1 + 1/e) v / 3; the interval covers
    at least 95% (Student's t where b exceeds v)."""
    got, analytic = _seed_simulation(0.0, 0.05)
    assert got["boot_var"] == pytest.approx((1 + np.exp(-1)) * analytic, rel=0.1), (got, analytic)
    assert got["covered"] >= 0.93, got
    num, den = np.random.default_rng(0).gamma(20, 0.1, (2, 30))
    one = metrics.seed_ratio_ci([num], [den])
    with pytest.raises(ValueError, match="same sequences"):
        metrics.seed_ratio_ci([num, num[:5]], [den, den[:5]], same_seqs=True)
    assert one["n_seeds"] == 1 and np.isnan(one["seed_sd"])
    assert (one["ratio"], one["ci_low"], one["ci_high"]) == metrics.ratio_ci(num, den)


def test_seed_ratio_ci_with_the_seeds_on_the_same_sequences():
    """Seeds measured on the same sequences share their noise (sd 0.1, against 0.2 between seeds and 0.03 of their
    own): their spread does not show the shared part, the joint resampling of sequences does. The bootstrap
    variance is Var(R) = (0.2^2 + 0.03^2) / 3 + 0.1^2, and the interval covers 95% (Satterthwaite's degrees of
    freedom); resampling each seed's sequences on their own would miss the shared part."""
    got, analytic = _seed_simulation(0.2, 0.03, sd_shared=0.1)
    assert got["boot_var"] == pytest.approx(analytic, rel=0.12), (got, analytic)
    assert abs(got["covered"] - 0.95) < 0.035, got


@pytest.mark.parametrize("case", ["all small", "mostly small", "mostly large"])
@pytest.mark.parametrize("peak", [1e-3, 1e-2, 0.1, metrics.SMALL_T])
def test_centred_terms_keep_float64s_digits_at_every_size_of_the_change(case, peak):
    """sum_v p_v (expm1(t_v) - t_v) per (row, position) against float64, whichever of its routes the block takes
    (the Taylor polynomial of the degree the largest small |t| needs, expm1 for the rest)."""
    g = torch.Generator().manual_seed(0)
    r, m, n = 6, 5, 512
    p = torch.softmax(3 * torch.randn(m, n, generator=g), -1)
    u = 2 * torch.rand(r, m, n, generator=g) - 1
    t = peak * u / u.abs().amax(-1, keepdim=True)  # every (row, position)'s largest |t| is `peak`
    large = {"all small": 0, "mostly small": 1, "mostly large": r - 1}[case]
    t[:large] *= 8 / peak  # rows with |t| up to 8: expm1's terms
    t -= (t * p).sum(-1, keepdim=True)  # centred, as CleanDistribution.reduce centres them
    want = ((torch.expm1(t.double()) - t.double()) * p.double()).sum(-1)
    got = metrics._centred_terms(t.clone(), p, torch.empty_like(t))
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
    assert metrics._taylor_degree(metrics.SMALL_T) == 5 and metrics._taylor_degree(0.01) == 2


@pytest.mark.parametrize("degree", range(6))
def test_taylor_polynomial_of_each_degree_equals_its_float64_sum(degree):
    """`_taylor` (Horner's rule, one fused pass per step) at every degree equals t^2 sum_k t^k / (k + 2)! in float64."""
    t = torch.linspace(-metrics.SMALL_T, metrics.SMALL_T, 4001).view(1, 1, -1)
    want = sum(t.double() ** (k + 2) / math.factorial(k + 2) for k in range(degree + 1))
    got = metrics._taylor(t, torch.empty_like(t), degree)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("n", [10, 64, 130, 4096, 50257])
def test_float64_sums_and_column_gathers_of_the_clean_distribution(n):
    """`metrics._sum_float64` (float32 block sums added in float64) is within two float32 roundings (1.2e-7) of the
    float64 sum of the same numbers at every size (multiples of its block or not, shorter than one), and within
    2e-8 at a vocabulary's (the blocks' roundings average out); `metrics._columns` gathers exactly weight.T[index]."""
    g = torch.Generator().manual_seed(n)
    x = torch.rand(3, 5, n, generator=g) ** 4  # probabilities' spread of sizes
    want = x.double().sum(-1)
    assert ((metrics._sum_float64(x) - want).abs() / want).max() < (2e-8 if n >= 4096 else 1.2e-7)
    weight = torch.randn(16, n, generator=g)
    index = torch.randint(0, n, (2, 3, 4), generator=g)
    assert torch.equal(metrics._columns(weight, index), weight.T[index])
