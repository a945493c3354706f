"""Notebook 09's parts: the fitted baselines (covariance, error bank, linear split) held to numpy and to the naive
path, and the Fisher information held to finite differences of the KL in float64."""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import pandas as pd
import pytest
import torch

from saenb.checks import UsageError
from saenb.engine import interventions as iv
from saenb.engine import store
from saenb.engine.draws import Draws
from saenb.engine.patching import measure, measure_naive
from saenb.studies import baselines, curvature, why

from .test_patching import assert_fast_equals_naive


def synthetic_fit(d: int = 16, seed: int = 0) -> tuple[str, baselines.HookFit, np.ndarray]:
    """A fit with a known, strongly anisotropic covariance (eigenvalues 2^-k), with a key of its own."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    var = 2.0 ** -np.arange(d)
    cov = (q * var) @ q.T
    bank = torch.nn.functional.normalize(torch.randn(32, d, generator=torch.Generator().manual_seed(seed)), dim=-1)
    fit = baselines.HookFit(mean=torch.zeros(d), components=torch.tensor(q, dtype=torch.float32),
                            variances=torch.tensor(var, dtype=torch.float32), bank=bank,
                            A=torch.randn(d, d, generator=torch.Generator().manual_seed(1)) * 0.1,
                            b=torch.randn(d, generator=torch.Generator().manual_seed(2)), info={})
    return f"synthetic-{d}-{seed}", fit, cov


def site(n: int, d: int, seed: int = 0) -> iv.Site:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3
    x_sae = x + torch.randn(n, d, generator=g)
    return iv.Site(x, x_sae, torch.zeros(n, 4), torch.zeros(4, d), None, "h")


def test_cov_random_is_at_eps_and_shaped_like_the_covariance():
    d, n = 16, 40_000
    key, fit, cov = synthetic_fit(d)
    s = site(n, d)
    patched = iv.cov_random(s, draws=Draws(0), key=key, fitted=fit)
    step = (patched - s.x).double()
    torch.testing.assert_close(step.norm(dim=-1), s.eps.double(), rtol=1e-5, atol=0)
    u = (step / step.norm(dim=-1, keepdim=True)).numpy()
    # the reference: numpy's own multivariate normal draws with that covariance, scaled to length 1
    ref = np.random.default_rng(1).multivariate_normal(np.zeros(d), cov, size=n)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    m, m_ref = u.T @ u / n, ref.T @ ref / n
    # Tolerance: each entry of the two second-moment estimates is a mean of n i.i.d. terms, so their difference has
    # variance 2 Var(u_i u_j) / n; the squared Frobenius norm of the difference, a sum of d^2 such terms, concentrates
    # at its expectation (relative spread about sqrt(2 / d^2) = 9% here): allow twice the expectation.
    expected = 2 * ((ref[:, :, None] * ref[:, None, :]).var(0) / n).sum()
    assert ((m - m_ref) ** 2).sum() < 2 * expected
    # and the check has power: the isotropic second moment (eps-random's) is far outside it
    assert ((np.eye(d) / d - m_ref) ** 2).sum() > 100 * expected


def test_error_shuffled_and_linear_split():
    d = 16
    key, fit, _ = synthetic_fit(d)
    s = site(500, d, seed=3)
    step = iv.error_shuffled(s, draws=Draws(0), key=key, fitted=fit) - s.x
    torch.testing.assert_close(step.norm(dim=-1), s.eps, rtol=1e-5, atol=0)
    unit = step / step.norm(dim=-1, keepdim=True)
    nearest = (unit @ fit.bank.T).max(-1).values
    torch.testing.assert_close(nearest, torch.ones(500), rtol=0, atol=1e-5)  # every direction is a bank row
    assert len(torch.unique((unit @ fit.bank.T).argmax(-1))) == len(fit.bank)  # drawn from the whole bank
    linear = fit.linear_part(s.x)
    n = (s.x - s.x_sae) - linear
    torch.testing.assert_close(s.x - iv.sae_plus_linear(s, draws=None, key=key, fitted=fit), n)
    torch.testing.assert_close(s.x - iv.sae_plus_nonlinear(s, draws=None, key=key, fitted=fit), linear)
    like = iv.intervention("eps_random_like", of="sae_plus_linear", key=key, fitted={"h": fit})
    like = like(s, Draws(0))
    torch.testing.assert_close((like - s.x).norm(dim=-1), n.norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_lstsq_equals_numpy():
    rng = np.random.default_rng(0)
    x, e = rng.normal(size=(300, 12)), rng.normal(size=(300, 5)) + 0.5
    for intercept in (True, False):
        A, b = baselines.lstsq(torch.tensor(x), torch.tensor(e), intercept)
        design = np.hstack([x, np.ones((300, 1))]) if intercept else x
        ref = np.linalg.lstsq(design, e, rcond=None)[0]
        np.testing.assert_allclose(A.numpy(), ref[:12], rtol=0, atol=1e-10)
        np.testing.assert_allclose(b.numpy(), ref[12] if intercept else np.zeros(5), rtol=0, atol=1e-10)


def test_bad_arguments_name_the_fix(tiny, tmp_path):
    s = site(4, 16)
    with pytest.raises(ValueError, match=r"baselines\.fit\(loaded, hooks, tokens\)\.intervention\('cov_random'\)"):
        iv.intervention("cov_random", key="never-fitted")
    key, fit, _ = synthetic_fit(16)
    with pytest.raises(ValueError, match=r"no fit at hook 'h'.*fitted at \['other'\]"):
        iv.intervention("cov_random", key=key, fitted={"other": fit})(s, Draws(0))
    with pytest.raises(ValueError, match=r"cos=1.5 must lie in \[-1, 1\]"):
        iv.theta_random_cos(s, draws=Draws(0), cos=1.5)
    with pytest.raises(ValueError, match="deterministic"):
        iv.eps_random_like(s, draws=Draws(0), of="eps_random")
    with pytest.raises(ValueError, match="no SAE at hook"):
        baselines.fit(tiny, ["blocks.9.hook_resid_pre"], tiny.tokens(2), root=tmp_path)
    with pytest.raises(ValueError, match="more fit contexts"):
        baselines.fit(tiny, ["blocks.3.hook_resid_pre"], tiny.tokens(1), root=tmp_path)
    assert why.fisher_samples("exact") is None and why.fisher_samples(32) == 32
    for bad in (0, -3, 2.5, True, "sampled", None):
        with pytest.raises(ValueError, match="fisher must be 'exact' or a positive number of draws"):
            why.fisher_samples(bad)
    with pytest.raises(ValueError, match="samples must be None"):
        curvature.fisher(tiny, "blocks.3.hook_resid_pre", tiny.tokens(1), 40, samples=0, root=None)


@pytest.fixture(scope="module")
def fit_root(tmp_path_factory):
    return tmp_path_factory.mktemp("baselines")


@pytest.fixture(scope="module")
def fitted(tiny, fit_root):
    hooks = ["blocks.1.hook_resid_pre", "blocks.2.attn.hook_z"]
    return baselines.fit(tiny, hooks, tiny.tokens_excluding(24, tiny.tokens(4)), root=fit_root)


def test_fit_matches_torch_and_is_read_back(tiny, fitted, fit_root, monkeypatch):
    hook = "blocks.1.hook_resid_pre"
    f = fitted.hooks[hook]
    x, _, x_sae, _ = baselines.activations(tiny, hook, tiny.tokens_excluding(24, tiny.tokens(4)))
    # the principal components and variances are the covariance's eigen-decomposition (torch.cov, independent)
    cov = torch.cov(x.double().T)
    torch.testing.assert_close((f.components.double() * f.variances.double()) @ f.components.double().T, cov,
                               rtol=1e-4, atol=1e-4 * float(cov.diagonal().max()))
    assert torch.all(f.variances[:-1] >= f.variances[1:])
    assert f.info["linear_r2"] == pytest.approx(baselines.r_squared(x - x_sae, f.linear_part(x)), abs=1e-5)
    assert 0 < f.info["linear_r2"] < 1 and f.info["fit_tokens"] == len(x)
    # a second fit of the same configuration reads the files: no activation is computed
    monkeypatch.setattr(baselines, "activations", lambda *a, **k: pytest.fail("recomputed a cached fit"))
    again = baselines.fit(tiny, list(fitted.hooks), tiny.tokens_excluding(24, tiny.tokens(4)), root=fit_root)
    assert again.key == fitted.key
    torch.testing.assert_close(again.hooks[hook].A, f.A)


@pytest.mark.parametrize("mode", ["all", "single"])
def test_new_interventions_fast_equals_naive(tiny, fitted, mode):
    interventions = [*(fitted.intervention(n) for n in baselines.INTERVENTIONS),
                     fitted.eps_intervention("sae_plus_nonlinear"), iv.intervention("theta_random_cos", cos=0.9),
                     iv.intervention("sae_scaled", scale=0.5), iv.intervention("eps_random", scale=0.5)]
    kw = dict(hooks=list(fitted.hooks), interventions=interventions, tokens=tiny.tokens(3), seed=5, progress=False)
    if mode == "single":
        kw.update(positions=40, n_samples=3)
    fast, naive = measure(tiny, **kw), measure_naive(tiny, **kw)
    assert_fast_equals_naive(fast, naive)
    assert (fast.groupby("intervention", observed=True).size() > 0).all()


def test_robustness_curves_on_fewer_contexts_are_those_contexts_of_a_full_measurement(tiny, fitted, tmp_path,
                                                                                      monkeypatch):
    """`n_robustness_contexts`: the curves' splices on the first n contexts (with the draws a measurement of every
    context gives them), the accounted splices on all; the table's SAE points on the curves' contexts."""
    monkeypatch.setattr(why, "measure_cached", functools.partial(store.measure_cached, root=tmp_path))
    hooks, tokens, grid = ["blocks.1.hook_resid_pre"], tiny.tokens(5), (0.8, 0.95)
    full = why.measure_baselines(tiny, hooks, tokens, fitted, cos_grid=grid, progress=False)
    part = why.measure_baselines(tiny, hooks, tokens, fitted, cos_grid=grid, n_robustness_contexts=2, progress=False)
    assert list(part.intervention.cat.categories) == list(full.intervention.cat.categories)

    def rows(df, curve):
        on = df.intervention.astype(str).str.startswith("theta_random_cos") == curve
        return df[on].sort_values(["intervention", "seq", "pos"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(rows(part, False), rows(full, False), check_exact=False, rtol=1e-5)
    want = rows(full, True)
    pd.testing.assert_frame_equal(rows(part, True), want[want.seq < 2].reset_index(drop=True), check_exact=False,
                                  rtol=1e-5)
    assert set(rows(part, True).seq) == {0, 1}
    rob = why.robustness_table(part)
    assert (rob.n_contexts == 2).all() and (why.robustness_table(full).n_contexts == 5).all()
    sae = full[(full.intervention == "sae") & (full.seq < 2)]
    assert rob[rob.series == "sae"]["mean"].iloc[0] == pytest.approx(float(sae.kl.mean()), rel=1e-5)
    with pytest.raises(UsageError, match="n_robustness_contexts"):
        why.measure_baselines(tiny, hooks, tokens, fitted, cos_grid=grid, n_robustness_contexts=0, progress=False)


def test_theta_random_cos_and_sae_scaled_geometry():
    s = site(200, 16, seed=4)
    out = iv.theta_random_cos(s, draws=Draws(0), cos=0.9)
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(out, s.x, dim=-1), torch.full((200,), 0.9))
    torch.testing.assert_close(out.norm(dim=-1), s.x.norm(dim=-1))
    half = iv.sae_scaled(s, draws=None, scale=0.5)
    torch.testing.assert_close((half - s.x).norm(dim=-1), 0.5 * s.eps)
    step = iv.eps_random(s, draws=Draws(0), scale=0.5) - s.x
    torch.testing.assert_close(step.norm(dim=-1), 0.5 * s.eps)


def float64(loaded):
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to(torch.float64))


def kl_naive(model, tokens, hook, position, measured, delta):
    """Sum over `measured` of KL(clean || patched) with `delta` added at `position` by a plain run_with_hooks."""
    def add(act, hook):
        act = act.clone()
        act[:, position] += delta.view(act.shape[2:])
        return act

    with torch.no_grad():
        clean = model(tokens).log_softmax(-1)[0, measured]
        patched = model.run_with_hooks(tokens, fwd_hooks=[(hook, add)]).log_softmax(-1)[0, measured]
    return float((clean.exp() * (clean - patched)).sum())


@pytest.mark.parametrize("which, hook", [("tiny", "blocks.3.hook_resid_pre"), ("tiny", "blocks.1.attn.hook_z"),
                                         ("llama", "blocks.1.hook_resid_pre")])
def test_fisher_equals_finite_differences_of_the_kl(request, which, hook):
    """On GPT-2's architecture (both hook kinds) and on Llama's (rotary positions read through the frozen prefix
    cache, grouped key/value heads, RMSNorm)."""
    loaded = request.getfixturevalue(which)
    t64 = float64(loaded)
    tokens = loaded.tokens(2)[:1]
    c = curvature.fisher(t64, hook, tokens, 40, progress=False, root=None)  # computed, never read back
    F = c.fisher[0]
    measured = list(c.measured)
    U = torch.randn(4, F.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-3

    def kl(delta):
        return kl_naive(t64.model, tokens, hook, 40, measured, delta)

    for i in range(4):
        for j in range(i, 4):
            # central differences of the mixed second derivative of KL(x + s u_i + t u_j) at 0: O(h^2) error
            fd = (kl(h * U[i] + h * U[j]) - kl(h * U[i] - h * U[j]) - kl(-h * U[i] + h * U[j])
                  + kl(-h * U[i] - h * U[j])) / (4 * h * h)
            exact = float(U[i] @ F @ U[j])
            assert fd == pytest.approx(exact, rel=1e-4, abs=1e-7 * float(F.diagonal().sum())), (i, j, fd, exact)
    # the quadratic model matches the KL as the change shrinks: the relative error falls about linearly in |d|
    u = U[0] / U[0].norm()
    errors = []
    for size in (1.0, 0.1, 0.01):
        d = size * u
        errors.append(abs(kl(d) / float(c.quadratic_kl(d[None, None])[0, 0]) - 1))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3, errors
    # F at the patched position alone is its own next-token distribution's: a term of the sum, PSD
    assert torch.linalg.eigvalsh(c.fisher_at[0]).min() > -1e-10
    assert torch.linalg.eigvalsh(F - c.fisher_at[0]).min() > -1e-10


def test_fisher_is_kept_per_token_read_back_and_recomputed_when_its_file_is_damaged(tiny, tmp_path, monkeypatch,
                                                                                    caplog):
    """Each token's F is written as soon as its batch is done: a run stopped after the first batch keeps that
    token, the next computes only the rest, and a third computes nothing; a truncated file and one with a flipped
    byte are reported and computed again. Every outcome equals the uncached F bit for bit."""
    hook, tokens = "blocks.3.hook_resid_pre", tiny.tokens(3)
    plain = curvature.fisher(tiny, hook, tokens, 40, progress=False, root=None)
    engine_fisher, calls = curvature.engine_fisher, []

    def counted(model, hook, tokens, *args, **kwargs):
        calls.append(len(tokens))
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        return real(model, hook, tokens, *args, **kwargs)

    real, stop_after = engine_fisher.token_fisher, 1
    monkeypatch.setattr(engine_fisher, "token_fisher", counted)
    with pytest.raises(KeyboardInterrupt):
        curvature.fisher(tiny, hook, tokens, 40, progress=False, root=tmp_path, batch_size=1)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    stop_after, calls[:] = None, []

    def same(c):
        assert c.seqs == plain.seqs
        for name in ("x", "fisher", "fisher_at"):
            assert torch.equal(getattr(c, name), getattr(plain, name)), name

    same(curvature.fisher(tiny, hook, tokens, 40, progress=False, root=tmp_path))
    assert calls == [len(plain.seqs) - 1]  # the rest, in one batch
    calls.clear()
    same(curvature.fisher(tiny, hook, tokens, 40, progress=False, root=tmp_path))
    assert calls == []
    first, second = sorted(tmp_path.glob("*.safetensors"))[:2]
    first.write_bytes(first.read_bytes()[:-100])
    data = bytearray(second.read_bytes())
    data[-10] ^= 0xFF
    second.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="saenb.studies.curvature"):
        same(curvature.fisher(tiny, hook, tokens, 40, progress=False, root=tmp_path))
    assert calls == [2] and sum("computing it again" in r.message for r in caplog.records) == 2


def test_sampled_fisher_is_kept_apart_from_the_exact_one(tiny, tmp_path):
    """The sampled F (exact at the patched position, sampled after it) is cached under its own key (draws, seed),
    beside the exact F's, read back unchanged, and says what it is."""
    hook, tokens = "blocks.3.hook_resid_pre", tiny.tokens(2)
    exact = curvature.fisher(tiny, hook, tokens, 40, progress=False, root=tmp_path)
    sampled = curvature.fisher(tiny, hook, tokens, 40, samples=8, progress=False, root=tmp_path)
    assert exact.samples is None and sampled.samples == 8
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 * len(exact.seqs)
    # float32: the one-position window rounds differently from the 17-position one
    torch.testing.assert_close(sampled.fisher_at, exact.fisher_at, rtol=1e-4,
                               atol=1e-5 * float(exact.fisher_at.abs().max()))
    assert not torch.allclose(sampled.fisher, exact.fisher)
    again = curvature.fisher(tiny, hook, tokens, 40, samples=8, progress=False, root=tmp_path)
    assert torch.equal(again.fisher, sampled.fisher)
    other = curvature.fisher(tiny, hook, tokens, 40, samples=8, seed=1, progress=False, root=tmp_path)
    assert not torch.equal(other.fisher, sampled.fisher)


def test_quotient_and_energy_share_of_random_directions():
    g = torch.Generator().manual_seed(0)
    d, n = 24, 20_000
    root = torch.randn(d, d, generator=g, dtype=torch.float64)
    F = (root @ root.T)[None]
    c = curvature.Curvature("h", 1, (1,), [0], torch.zeros(1, d), F, F)
    u = torch.randn(1, n, d, generator=g, dtype=torch.float64)
    q = c.quotient(u)[0]
    # E[u^T F u / |u|^2] = tr(F) / d for u uniform on the sphere: mean quotient 1 (Monte Carlo error ~ 0.01)
    assert float(q.mean()) == pytest.approx(1.0, abs=0.03)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    share = curvature.energy_share(u, basis[:, :6])[0]
    assert float(share.mean()) == pytest.approx(6 / d, abs=0.01)
    torch.testing.assert_close(curvature.energy_share(u, basis)[0], torch.ones(n, dtype=torch.float64))


def test_share_of_gap():
    assert why.share_of_gap(2.0, 1.0) == pytest.approx(1.0)
    assert why.share_of_gap(2.0, 2.0) == pytest.approx(0.0)
    assert why.share_of_gap(4.0, 2.0) == pytest.approx(0.5)
    assert np.isnan(why.share_of_gap(1.0, 1.2))


def _gap_frame(n_seqs: int, seed: int = 0) -> pd.DataFrame:
    """An all-token frame: per context, KL of the SAE ~2x eps-random's, cov-random between them (share ~0.6)."""
    rng = np.random.default_rng(seed)
    rows = []
    for seq in range(n_seqs):
        base = rng.lognormal(-3, 0.5, 20)
        for name, scale in (("sae", 2.0), ("eps_random", 1.0), ("cov_random", 1.5), ("error_shuffled", 2.2),
                            ("theta_random_sae_norm", 1.0)):
            rows.append(pd.DataFrame({"hook": "blocks.1.hook_resid_pre", "layer": 1, "seq": seq, "pos": range(20),
                                      "intervention": name, "kl": base * scale * rng.lognormal(0, 0.3, 20)}))
    df = pd.concat(rows, ignore_index=True)
    return df.astype({"hook": "category", "intervention": "category"})


def test_shares_of_the_gap_carry_bootstrap_cis_on_the_same_contexts():
    df = _gap_frame(40)
    gap = why.gap_table(df).set_index("baseline")
    for b in ("cov_random", "error_shuffled", "theta_random_sae_norm"):
        r = gap.loc[b]
        # the point share is read against eps-random's ratio on the same contexts
        assert r.share_of_gap == pytest.approx(why.share_of_gap(gap.loc["eps_random", "ratio"], r.ratio))
        assert r.share_ci_low < r.share_of_gap < r.share_ci_high
    assert 0.3 < gap.loc["cov_random", "share_of_gap"] < 0.9 and gap.loc["error_shuffled", "share_of_gap"] > 1
    # resampling contexts moves both ratios together: by hand, the same draws give the same interval
    sums = df.groupby(["intervention", "seq"], observed=True).kl.sum().unstack(0)
    idx = np.random.default_rng(0).integers(0, 40, size=(2000, 40))
    t = {c: sums[c].to_numpy()[idx].sum(-1) for c in ("sae", "eps_random", "cov_random")}
    boot = 1 - np.log(t["sae"] / t["cov_random"]) / np.log(t["sae"] / t["eps_random"])
    assert (gap.loc["cov_random", "share_ci_low"], gap.loc["cov_random", "share_ci_high"]) == pytest.approx(
        tuple(np.quantile(boot, [0.025, 0.975])))
    # four times the contexts: about half the width
    wide = gap.loc["cov_random", "share_ci_high"] - gap.loc["cov_random", "share_ci_low"]
    big = why.gap_table(_gap_frame(160, seed=1)).set_index("baseline").loc["cov_random"]
    assert 0.3 < (big.share_ci_high - big.share_ci_low) / wide < 0.8


def test_accounting_reads_each_share_against_its_own_mode_and_says_what_outside_zero_one_means():
    gap = why.gap_table(_gap_frame(40))
    split = pd.DataFrame({"hook": ["blocks.1.hook_resid_pre"], "linear_restored_ratio": [1.8],
                          "nonlinear_only_share": [0.15], "nonlinear_only_share_ci_low": [0.05],
                          "nonlinear_only_share_ci_high": [0.25]})
    summary = pd.DataFrame({"hook": ["blocks.1.hook_resid_pre"], "measured_ratio": [1.17], "quadratic_ratio": [1.59],
                            "curvature_share": [np.log(1.59) / np.log(1.17)], "curvature_share_ci_low": [1.5],
                            "curvature_share_ci_high": [4.0]})
    account = why.accounting(gap, split, summary).set_index("explanation")
    curv = account.loc["curvature (quadratic model, single-token)"]
    assert curv["mode"] == "single-token" and curv.ratio_eps == 1.17 and curv.share_of_gap == pytest.approx(2.95, 0.01)
    assert "over-predicts" in curv.note  # issue 33's example: stated as what it is, not "all of the gap and more"
    shuffled = account.loc["error directions in general (error_shuffled)"]
    assert shuffled["mode"] == "all-token" and "more harmful than the SAE" in shuffled.note
    assert account.loc["anisotropy (cov_random)", "note"] == ""
    assert set(account.columns) >= {"share_ci_low", "share_ci_high", "ratio_eps", "ratio_left"}
    assert "not separated" in why.largest_share(account.reset_index()) or "largest" in why.largest_share(
        account.reset_index())


def test_report_summary_names_the_largest_share_per_layer_only_where_cis_separate(tmp_path):
    """Issue 33's example: no share averaged over layers, none called "all of the gap and more"."""
    from saenb.output import report

    (tmp_path / "09_why").mkdir()
    rows = [(6, "anisotropy", 0.4, 0.2, 0.6, ""), (6, "curvature", 2.95, 1.5, 4.0, "the model over-predicts"),
            (15, "anisotropy", 0.5, 0.3, 0.7, ""), (15, "curvature", 0.45, 0.1, 0.8, "")]
    columns = ["layer", "explanation", "share_of_gap", "share_ci_low", "share_ci_high", "note"]
    pd.DataFrame(rows, columns=columns).to_csv(tmp_path / "09_why" / "accounting.csv", index=False)
    text = report._why(tmp_path)
    assert "at layer 6 curvature 295% [150%, 400%]: the model over-predicts accounts for the largest share" in text
    assert "at layer 15 the largest is not separated from the next (anisotropy 50% [30%, 70%]; curvature 45%" in text
    assert "average" not in text and "and more" not in text
