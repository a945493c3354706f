"""Readings: each study's verdicts follow from the frame they are read from, no stronger than its CIs (small
hand-made frames, so that every verdict can be set both ways)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from saenb.studies import fixes, hypersphere, literature, nfm_comparison, replication, single_token, why
from saenb.studies import readings as rd
from saenb.studies import tokens as tk


def holds(frame: pd.DataFrame, start: str):
    (row,) = [r for r in frame.itertuples() if r.claim.startswith(start)]
    return row.holds, row.here


def test_markdown_lists_each_claim_with_its_verdict_and_source():
    frame = rd.frame([rd.claim("a claim", "1.2x", holds=True, published="2x (someone)"), rd.claim("numbers", "3")])
    assert list(frame.columns) == ["claim", "published", "here", "holds"]
    text = rd.markdown(frame, lead="Lead.")
    assert text.startswith("**Reading.** Lead.")
    assert "- A claim: **holds**, 1.2x. Published: 2x (someone)." in text and "- Numbers: 3." in text


def test_shares_outside_zero_one_say_so_and_largest_needs_separate_cis():
    assert rd.share(0.4) == "40%" and "more than all" in rd.share(1.3) and "less than none" in rd.share(-0.2)
    est = pd.Series({"a": 3.0, "b": 2.0, "c": 1.0})
    assert rd.largest(est, est - 0.4, est + 0.4) == ("a", [])
    assert rd.largest(est, est - 0.7, est + 0.7) == ("a", ["b"])


def _means(sae_low: list[float]) -> pd.DataFrame:
    rows = []
    for layer, low in enumerate(sae_low):
        for name in replication.INTERVENTIONS:
            mean = {"sae": 1.0, "sae_norm_corrected": 1.05, "sae_norm": 0.2, "zero": 9.0, "mean": 5.0}.get(name, 0.5)
            lo, hi = (low, 1.2) if name == "sae" else (mean - 0.1, mean + 0.1)
            rows.append({"layer": layer, "intervention": name, "mean": mean, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def test_replication_readings_follow_the_cis():
    by_pos = pd.DataFrame({"layer": 0, "intervention": ["sae", "eps_random"] * 2, "pos": [1, 1, 100, 100],
                           "mean": [2.0, 1.0, 3.0, 1.0]})
    ratios = pd.DataFrame({"layer": [0, 1], "metric": "kl", "ratio": [2.5, 1.5], "ci_low": [2.0, 0.9],
                           "ci_high": [3.0, 2.0]})
    for sae_low, apart in (([0.8, 0.8], True), ([0.8, 0.55], False)):  # random baselines' CIs reach 0.6
        r = replication.readings(_means(sae_low), by_pos, ratios)
        assert holds(r, "the SAE splice costs more than every random")[0] == apart
    assert holds(r, "rescaling x")[0] and "at most 20%" in holds(r, "rescaling x")[1]
    above, here = holds(r, "the SAE splice moves")
    assert not above and "CI above 1 at 1 of 2 layers (not at layers [1])" in here
    assert holds(r, "the ratio lies")[1].startswith("1 of 2 layers inside, 1 below")
    assert "2.00x over the first 8 positions, 3.00x over the last 8" in holds(r, "the SAE / eps-random gap")[1]


def test_single_token_readings_and_half_life():
    table = pd.DataFrame({"offset": [0, 0, 1, 1], "layer": [0, 1, 0, 1], "intervention": "sae",
                          "ratio": [2.6, 1.4, 1.2, 1.1], "ratio_ci_low": [2.2, 1.1, 1.0, 0.9]})
    by_offset = pd.DataFrame([{"layer": layer, "intervention": i, "offset": o, "mean": m}
                              for layer in (0, 1) for i in ("sae", "eps_random")
                              for o, m in enumerate([1.0, 0.6, 0.4] if layer == 0 else [1.0, 0.9, 0.8])])
    assert single_token.half_life(by_offset) == {0: 2, 1: None}
    r = single_token.readings(table, by_offset)
    assert holds(r, "with one patched token")[0] and not holds(r, "the ratio at the patched token stays above")[0]
    assert "1 of 2 layers" in holds(r, "the ratio at the patched token stays above")[1]
    assert "more than 2 token(s) at layer 1" in holds(r, "the SAE's KL falls")[1]


def test_hypersphere_verdicts_follow_the_ratio_cis():
    tests = pd.DataFrame({"a": ["feature_aligned(which=active)", "feature_aligned(which=inactive)"], "ratio": [1.5, 0.9],
                          "ci_low": [1.2, 0.8], "ci_high": [1.8, 1.1], "p_value": [1e-5, 0.3]})
    latent = pd.DataFrame({"scale": [0.1, 0.2], "ratio": [0.5, 0.9], "ci_low": [0.4, 0.8], "ci_high": [0.6, 1.05]})
    tails = pd.DataFrame({"z": [3.0, 1.0], "percentile": [1.0, 0.5]})
    samples = pd.DataFrame({"intervention": list(hypersphere.SAMPLED), "kl": [0.1, 0.2, 0.3]})
    r = hypersphere.readings(tails, samples, pd.DataFrame({"kl": [0.5]}), tests, latent)
    assert holds(r, "a step along an active")[0] and "more than isotropic" in holds(r, "a step along an active")[1]
    assert "not distinguishable" in holds(r, "a step along an inactive")[1]
    assert not holds(r, "perturbing only")[0] and "below 1 at 1 of 2 scales" in holds(r, "perturbing only")[1]


def test_attention_readings_say_shares_outside_zero_one():
    ratios = pd.DataFrame({"family": ["resid"] * 2 + ["z"] * 2, "layer": [0, 1] * 2, "metric": "kl",
                           "ratio": [2.5, 2.0, 1.2, 1.0], "ci_low": [2.2, 1.8, 1.1, 0.9], "ci_high": [2.8, 2.2, 1.3, 1.1]})
    norm = pd.DataFrame({"family": ["resid"] * 2 + ["z"] * 2, "layer": [0, 1] * 2, "metric": "sae_norm / sae",
                         "ratio": [0.1, 0.2, 0.3, 0.4]})
    explained = pd.DataFrame({"gap_explained_by_norm": [0.1, 0.2, 0.5, 1.4]},
                             index=pd.MultiIndex.from_product([["resid", "z"], [0, 1]], names=["family", "layer"]))
    r = replication.attention_readings(ratios, norm, explained)
    assert not holds(r, "attention-output SAEs")[0] and "CI above 1 at 1 of 2" in holds(r, "attention-output SAEs")[1]
    assert holds(r, "their ratio lies")[0] and "2 of 2 layers" in holds(r, "their ratio lies")[1]
    assert holds(r, "the attention gap is smaller")[0]
    assert holds(r, "restoring the norm")[0] and "(more than all of it)" in holds(r, "restoring the norm")[1]


def test_token_readings_name_a_strongest_feature_only_where_cis_part():
    summary = pd.DataFrame({"share_positive": [0.6, 0.7], "median_log_ratio": [0.2, 0.3], "top_1pct_share": [0.2, 0.05]},
                           index=[0, 1])
    by_layer = pd.DataFrame({"layer_a": [0, 1, 0, 1], "layer_b": [0, 1, 1, 0], "rho": [1.0, 1.0, 0.9, 0.9]})
    top = pd.DataFrame({"std": [0.1, 0.2], "mean": [0.05, 0.06]})
    freq = pd.DataFrame({"layer": [0, 1], "rho": [0.1, 0.3], "ci_low": [-0.1, 0.1], "ci_high": [0.2, 0.5]})
    for width, apart in ((0.05, True), (0.3, False)):
        rho = pd.DataFrame({"layer": 1, "predictor": ["pos", "eps"], "rho": [0.5, -0.2]})
        rho["ci_low"], rho["ci_high"] = rho.rho - width, rho.rho + width
        r = tk.readings(summary, rho, by_layer, top, freq, layer=1)
        assert holds(r, "one token feature")[0] == apart
    assert holds(r, "the SAE splice is worse")[0] and not holds(r, "the excess is concentrated")[0]
    assert holds(r, "the same token's gap")[0] and not holds(r, "a token's mean gap")[0]


def test_nfm_readings():
    layers, names = [1, 3], ["sae", *nfm_comparison.NAMES]
    table = pd.DataFrame([{"intervention": n, "layer": layer, "ratio_to_eps_random": 2.0 - 0.2 * (n != "sae")}
                          for n in names for layer in layers])
    own = pd.DataFrame({"layer": layers, "ratio": [1.5, 1.2], "ci_low": [1.2, 0.95], "ci_high": [1.8, 1.4]})
    c = nfm_comparison.Comparison(None, None, None, own, table)
    kl = {"sae_nfm": 0.3, "sae_nfm_linear": 0.2, "sae_nfm_interaction": 0.05, "linear_control": 0.1}
    gains = pd.DataFrame([{"intervention": n, "variant": v, "layer": layer, "kl_reduction": kl[n],
                           "kl_reduction_ci_low": kl[n] - 0.02, "kl_reduction_ci_high": kl[n] + 0.02,
                           "error_reduction": 0.2, "interaction_share": 0.05}
                          for v, n in nfm_comparison.SHORT.items() for layer in layers])
    r = nfm_comparison.readings(c, gains)
    assert holds(r, "the NFM lowers")[0] and not holds(r, "against eps-random at its own")[0]
    assert holds(r, "the feature interactions do work")[0]
    gains.loc[gains.intervention == "sae_nfm_linear", "kl_reduction_ci_high"] = 0.29
    assert not holds(nfm_comparison.readings(c, gains), "the feature interactions do work")[0]


def test_fix_readings_name_the_largest_cut_only_where_cis_part():
    rows = [("base", "l1", "", 1.0, 2.0, 1.8, 2.2, 40), ("l1=2", "l1", "", 1.0, 1.5, 1.4, 1.6, 20),
            ("l1=4", "l1", "", 1.0, 1.2, 1.1, 1.3, 10), ("fine", "fix", "base", 0.5, 1.0, 0.9, 1.1, 40),
            ("other", "fix", "base", 0.8, 1.5, 1.2, 1.8, 40)]
    table = pd.DataFrame(rows, columns=["name", "group", "base", "kl_sae", "ratio", "ratio_ci_low", "ratio_ci_high",
                                        "l0"]).assign(explained_variance=0.9, ratio_orthogonal=1.1, ce_delta_sae=0.2,
                                                      ce_delta_eps_random=0.1, error_along_x=0.3, n_tokens=1000)
    effects = fixes.fix_effects(table)
    assert effects.set_index("fix").kl_change["fine"] == pytest.approx(-0.5)
    r = fixes.readings(table, effects)
    assert holds(r, "one fix cuts")[0] and holds(r, "one fix cuts")[1].startswith("fine (its CI clears")
    assert not holds(r, "the ratio falls")[0]  # l1: the ratio falls with L0 here (rho > 0 against L0)
    table.loc[table.name == "other", "ratio_ci_low"] = 0.95
    assert not holds(fixes.readings(table, fixes.fix_effects(table)), "one fix cuts")[0]


def test_fix_readings_give_a_near_zero_ce_gap_in_nats_not_as_a_relative_change():
    rows = [("base", "l1", "", 0.138, 0.1375), ("fine", "fix", "base", 0.120, 0.1180)]
    table = pd.DataFrame(rows, columns=["name", "group", "base", "ce_delta_sae", "ce_delta_eps_random"]).assign(
        kl_sae=1.0, ratio=1.5, ratio_ci_low=1.4, ratio_ci_high=1.6, l0=20, explained_variance=0.9)
    effect = fixes.fix_effects(table).set_index("fix").loc["fine"]
    assert effect.ce_gap_base == pytest.approx(0.0005) and effect.ce_gap == pytest.approx(0.002)
    assert np.isnan(effect.ce_gap_change)  # +300% of a gap a 276th of the base's CE delta is noise, not a finding
    assert "+0.0005 -> +0.0020 nats" in fixes._gap_change(effect)
    table.loc[table.name == "base", "ce_delta_eps_random"] = 0.038  # a gap of 0.1 nats: its change is stated
    effect = fixes.fix_effects(table).set_index("fix").loc["fine"]
    assert effect.ce_gap_change == pytest.approx(0.002 / 0.1 - 1) and fixes._gap_change(effect) == "-98%"


def test_why_readings_say_when_a_baseline_is_as_harmful():
    layers = [1, 3]
    gap = pd.DataFrame([{"layer": layer, "baseline": b, "ratio": r, "ci_low": r - 0.1, "ci_high": r + 0.1,
                         "share_of_gap": why.share_of_gap(2.0, r)}
                        for layer in layers for b, r in (("eps_random", 2.0), ("cov_random", 1.05 if layer == 1 else 1.5),
                                                         ("error_shuffled", 0.8), ("theta_random_sae_norm", 1.8))])
    split = pd.DataFrame({"layer": layers, "r2_fit": 0.5, "r2_eval": 0.4, "norm_r2": 0.9} | {
        f"{p}_restored_{c}": v for p in ("linear", "nonlinear") for c, v in (("ratio", 1.5), ("ci_low", 1.2),
                                                                           ("ci_high", 1.8))})
    summary = pd.DataFrame({"layer": layers, "top_k": 32, "rho_z_quotient_at": [0.5, 0.1],
                            "rho_z_quotient_at_ci_low": [0.2, -0.1], "rho_z_quotient_at_ci_high": [0.7, 0.3],
                            "fit_sae": [2.0, 2.0], "fit_eps_random": [1.0, 1.0], "quadratic_ratio": 1.5,
                            "measured_ratio": 2.0} | {c: 0.5 for c in ("quotient_sae", "quotient_cov_random",
                                                                       "quotient_decoder_active", "fisher_32_sae",
                                                                       "fisher_32_eps_random", "pca_32_sae")})
    shares = [0.9, 1.3, 0.4, -0.2]
    account = pd.DataFrame({"layer": np.repeat(layers, 2), "explanation": ["anisotropy", "shuffled"] * 2,
                            "mode": "all-token", "ratio_eps": 2.0, "share_of_gap": shares,
                            "share_ci_low": [0.8, 1.1, 0.1, -0.5], "share_ci_high": [1.0, 1.5, 0.7, 0.2],
                            "note": [why.share_note(v, "baseline") for v in shares]})
    r = why.readings(gap, split, summary, account)
    assert not holds(r, "the SAE is no more harmful")[0] and "at layers [1] of [1, 3]" in holds(r, "the SAE is no")[1]
    layer1, layer3 = holds(r, "layer 1: the share")[1], holds(r, "layer 3: the share")[1]
    assert "shuffled 130% [110%, 150%] (of 2.00x, all-token; the baseline is more harmful than the SAE" in layer1
    assert "largest: shuffled (its CI clears every other's)" in layer1
    assert "less harmful than eps-random" in layer3 and "not separated: anisotropy and shuffled" in layer3
    assert not holds(r, "the SAE's z-score goes")[0] and holds(r, "the quadratic model fits")[0]


def test_every_published_figure_names_its_source():
    table = literature.table()
    assert {"GURNEE_RESID", "GURNEE_Z", "BRAUN_RATIO", "KARVONEN_CE_GAP_CUT", "WRIGHT_SHARKEY_PPL_CUT",
            "LEE_HEIMERSHEIM_COV", "ENGELS_VARIANCE", "CLAFLIN_NFM"} <= set(table.name)
    assert (table.source.str.len() > 20).all() and (table.measured.str.len() > 10).all()


def test_fixes_evaluate_skips_or_names_the_sae_stored_nowhere(tiny):
    """A sweep still being trained: `missing="error"` names the build command before any work, `"skip"` scores the
    stored SAEs and its readings list the skipped one."""
    import dataclasses

    from saenb.saes import SpecError, sets

    named = [n for n in sets.get("fixes") if n.name == "base"]
    absent = sets.NamedSpec("not trained", "l1", dataclasses.replace(named[0].spec, sparsity=123.0))
    tokens = tiny.tokens(3)
    with pytest.raises(SpecError, match=r"\['not trained'\] are stored nowhere.*python -m saenb.saes build"):
        fixes.evaluate(tiny, [*named, absent], tokens)
    table = fixes.evaluate(tiny, [*named, absent], tokens, missing="skip", progress=False)
    assert list(table.name) == ["base"] and table.attrs["missing"] == ["not trained"]
    r = fixes.readings(table, fixes.fix_effects(table))
    assert r.here.str.contains("1: not trained").any()
