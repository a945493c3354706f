"""Notebooks: stored clean, run headlessly with papermill on tiny-stdlib, and every figure, frame and report
number they save agrees with an independent computation from the measured frame."""

from __future__ import annotations

import ast
import json
import re
import shutil

import nbformat
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from saenb.engine import metrics
from saenb.engine.patching import NOTEBOOK1
from saenb.output import reproduce as rep
from saenb.output.report import write_report

from .conftest import QUICK_RUNS, REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIGURES_01 = ["kl_by_intervention", "kl_histograms", "ce_delta_histograms", "kl_by_position", "ratio_by_layer",
              "intuition"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean_with_literal_parameters(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: commit without outputs"
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []), f"{path.name}: first code cell must be tagged parameters"
    for stmt in ast.parse(first.source).body:
        assert isinstance(stmt, ast.Assign), f"{path.name}: parameters cell holds assignments only"
        ast.literal_eval(stmt.value)  # raises on anything but a literal
    assert nb.cells[0].cell_type == "markdown" and "**Question.**" in nb.cells[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin(path):
    """Like a TransformerLens demo: one call and one figure or table per cell, the computation (and the readings) in
    saenb; the engine's store is reached through `saenb.measure_cached`."""
    code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    lines = [len(src.splitlines()) for src in code]
    assert max(lines) <= 12 and sum(lines) <= 80, f"{path.name}: {sum(lines)} code lines, longest cell {max(lines)}"
    assert not any("saenb.engine" in src for src in code), f"{path.name} reaches into saenb.engine"


def test_notebook_01_runs_and_saves_every_figure(run_notebooks):
    tmp, outcomes = run_notebooks
    assert [o.ok for o in outcomes] == [True] * 9, outcomes
    folder = tmp / "figures" / "tiny-stdlib" / "quick" / "01_replication"
    index = json.loads((folder / "figures.json").read_text())
    assert list(index) == FIGURES_01
    for name, entry in index.items():
        assert entry["caption"]
        for kind in ("png", "svg", "csv"):
            assert (folder / entry[kind]).stat().st_size > 0, f"{name}.{kind} is empty"
        assert len(pd.read_csv(folder / entry["csv"])) > 0


def measured_frame(tmp, positions="all", interventions=NOTEBOOK1, family="hook_resid_pre"):
    """The cached measurement of the run with these `positions` (01: "all", 02: 32, 03: 48), interventions
    (None: any) and hooks (names ending in `family`)."""
    (result,) = [p / "result.parquet" for p in (tmp / "results" / "measure").iterdir()
                 if (c := json.loads((p / "config.json").read_text()))["positions"] == positions
                 and (interventions is None or c["interventions"] == list(interventions))
                 and all(h.endswith(family) for h in c["hooks"])]
    return pd.read_parquet(result)


def test_report_headline_equals_the_ratio_recomputed_from_the_measured_frame(run_notebooks):
    tmp, _ = run_notebooks
    md, html = write_report("tiny-stdlib", root=tmp / "figures", quick=True, runs=QUICK_RUNS(tmp))
    text = md.read_text()
    sections = {s.split(")")[0]: s for s in text.split("## Headline numbers (")[1:]}
    assert list(sections) == ["01_replication", "05_attention_saes, family z"]
    for section, family in zip(sections.values(), ["hook_resid_pre", "hook_z"], strict=True):
        df = measured_frame(tmp, family=family)
        # independent of saenb.engine.metrics: plain pandas sums over the tokens of each layer
        kl = df.groupby(["layer", "intervention"], observed=True).kl.sum().unstack()
        rows = re.findall(r"\|\s*(\d+)\s*\|\s*([\d.]+) \[([\d.]+), ([\d.]+)\]", section.split("\n## ")[0])
        assert len(rows) == df.layer.nunique()
        for layer, ratio, low, high in rows:
            expected = kl.loc[int(layer), "sae"] / kl.loc[int(layer), "eps_random"]
            assert float(ratio) == pytest.approx(expected, abs=0.005)
            assert float(low) <= float(ratio) <= float(high)
    page = html.read_text()
    entries = [e for f in (tmp / "figures" / "tiny-stdlib" / "quick").glob("*/figures.json")
               for e in json.loads(f.read_text()).values()]
    n_figures = sum("png" in e for e in entries)
    assert page.count("data:image/png;base64,") == n_figures > len(FIGURES_01) and "<table>" in page
    # tables (5 from notebooks 04 and 06, 6 from 07, 2 from 08, 2 from 09) go in as HTML, the highlighted contexts
    # and claims included
    assert sum("html" in e for e in entries) == 15 and "<mark><b>" in page and "k* tax" in page


def test_report_reads_as_a_post_with_the_notebooks_questions_readings_and_numbers(run_notebooks):
    tmp, _ = run_notebooks
    md, html = write_report("tiny-stdlib", root=tmp / "figures", quick=True, runs=QUICK_RUNS(tmp))
    text, page = md.read_text(), html.read_text()
    assert text.startswith("# How pathological are SAE reconstruction errors? (tiny-stdlib)")
    assert "**A quick run**" in text, "a quick run's report says so"
    # the summary's numbers are the saved frames' (recomputed here from the CSVs with plain pandas)
    summary = text.split("**Summary.** ")[1].split("\n")[0]
    kl = pd.read_csv(tmp / "figures" / "tiny-stdlib" / "quick" / "01_replication" / "ratio_by_layer.csv")
    kl = kl[kl.metric == "kl"]
    assert f"**{kl.ratio.min():.2f}-{kl.ratio.max():.2f}x**" in summary and f"across {len(kl)} layers" in summary
    z = pd.read_csv(tmp / "figures" / "tiny-stdlib" / "quick" / "03_hypersphere" / "z_scores.csv")
    assert f"median z-score of {z.z.median():.1f} over {len(z)} tokens" in summary
    # a section per notebook, headed by its question, carrying every reading the executed notebook displayed
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        title = re.match(r"#\s+\d+\s*·\s*(.+)", nb.cells[0].source)[1].strip()
        assert f"## {path.name[:2]}. {title}" in text
        question = " ".join(nb.cells[0].source.split("**Question.**")[1].split("\n\n")[0].split())
        assert question in text
        executed = nbformat.read(QUICK_RUNS(tmp) / path.name, as_version=4)
        shown = [o.data["text/markdown"] for c in executed.cells if c.cell_type == "code" for o in c.outputs
                 if "text/markdown" in o.get("data", {}) and o.data["text/markdown"].startswith("**Reading")]
        assert shown, f"{path.name} displays no reading"
        for reading in shown:
            assert reading.strip() in text
    # figures under human titles (never the file name), with captions; a methods note with the versions
    assert "### kl by intervention" not in text and "### Mean KL of each intervention per layer" in text
    assert "## Methods" in text and f"torch {__import__('torch').__version__}" in text
    assert "| 01_replication | tiny-stdlib: 6 residual SAEs, 8 contexts x 128 tokens |" in text
    # the markdown pastes into LessWrong: no raw HTML, images as files beside it; the page is one file under 5 MB
    assert not re.search(r"<(table|mark|b|div|img|span)\b", text)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images and all((md.parent / src).exists() for src in images)
    assert html.stat().st_size < 5 * 2**20 and page.count("data:image/png;base64,") == len(images)


def test_quick_runs_keep_their_figures_and_report_apart_from_full_runs(tmp_path):
    import matplotlib.pyplot as plt

    from saenb.output import plots

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    frames = {}
    for quick, values in ((False, [1.0, 2.0]), (True, [3.0, 4.0])):
        frames[quick] = pd.DataFrame({"layer": [0, 1], "metric": ["kl", "kl"], "ratio": values,
                                      "ci_low": [v - 0.5 for v in values], "ci_high": [v + 0.5 for v in values]})
        plots.save_figure(fig, frames[quick], "ratio_by_layer", notebook="01_replication", preset="tiny-stdlib",
                          caption="SAE / eps-random ratio per layer (95% CIs).", quick=quick, root=tmp_path)
    plt.close(fig)
    full = tmp_path / "tiny-stdlib" / "01_replication" / "ratio_by_layer.csv"
    quick = tmp_path / "tiny-stdlib" / "quick" / "01_replication" / "ratio_by_layer.csv"
    pd.testing.assert_frame_equal(pd.read_csv(full), frames[False])
    pd.testing.assert_frame_equal(pd.read_csv(quick), frames[True])
    assert json.loads((full.parent / "figures.json").read_text())["ratio_by_layer"]["title"] == \
        "SAE / eps-random ratio per layer"
    full_md, _ = write_report("tiny-stdlib", root=tmp_path, runs=tmp_path / "none")
    quick_md, _ = write_report("tiny-stdlib", root=tmp_path, quick=True, runs=tmp_path / "none")
    assert full_md.parent == tmp_path / "tiny-stdlib" and quick_md.parent == tmp_path / "tiny-stdlib" / "quick"
    assert "**1.00-2.00x**" in full_md.read_text() and "quick run" not in full_md.read_text()
    assert "**3.00-4.00x**" in quick_md.read_text() and "**A quick run**" in quick_md.read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_as_jupyter_writes_it(path, tmp_path):
    """Load and save through Jupyter's own contents manager (what JupyterLab's save calls): the bytes do not change;
    and the stored language_info is the kernel's, which JupyterLab would otherwise write in on opening."""
    from jupyter_server.services.contents.filemanager import FileContentsManager

    shutil.copyfile(path, tmp_path / path.name)
    manager = FileContentsManager(root_dir=str(tmp_path))
    manager.save(manager.get(path.name), path.name)
    assert (tmp_path / path.name).read_bytes() == path.read_bytes()
    stored = nbformat.read(path, as_version=4).metadata.language_info
    assert set(stored) == set(rep.kernel_language_info()) and stored["name"] == "python"
    assert rep.stored_form(nbformat.read(path, as_version=nbformat.NO_CONVERT)) == path.read_text() or \
        stored["version"] != rep.kernel_language_info()["version"]


def test_saved_frames_agree_with_the_measured_frame(run_notebooks):
    tmp, _ = run_notebooks
    folder = tmp / "figures" / "tiny-stdlib" / "quick" / "01_replication"
    df = measured_frame(tmp)
    means = pd.read_csv(folder / "kl_by_intervention.csv")
    direct = df.groupby(["layer", "intervention"], observed=True).kl.mean()
    for row in means.itertuples():
        assert row.mean == pytest.approx(direct[(row.layer, row.intervention)], rel=1e-5)
        assert row.ci_low <= row.mean <= row.ci_high
    hist = pd.read_csv(folder / "kl_histograms.csv")
    pair = df[df.intervention.isin(["sae", "eps_random"])]
    counts = hist.groupby(["layer", "intervention"])["count"].sum()
    direct = pair.groupby(["layer", pair.intervention.astype(str)]).size()
    assert len(counts) == len(direct) and (counts == direct.reindex(counts.index)).all(), "every token binned"
    # the intuition figure's KL is the engine's KL for that token (same splice, same random draws)
    intuition = pd.read_csv(folder / "intuition.csv")
    layer = int(re.search(r"layer (\d+)", json.loads((folder / "figures.json").read_text())["intuition"]["caption"])[1])
    for (seq, pos, label), sub in intuition[intuition.intervention != "clean"].groupby(["seq", "pos", "intervention"]):
        engine = df[(df.seq == seq) & (df.pos == pos) & (df.layer == layer) & (df.intervention == label)].kl
        assert sub.kl.iloc[0] == pytest.approx(float(engine.iloc[0]), rel=1e-4, abs=1e-6)
    assert np.isfinite(intuition.logp).all()


def test_reproduce_leaves_out_notebooks_that_do_not_apply_to_the_preset(tmp_path, monkeypatch, capsys):
    """smollm2-135m runs every notebook but 07 (whose SAEs only tiny-stdlib's bundle holds), saying why; asking for
    07 there by number is an error that names the fix."""
    for k, v in {"SAENB_FIGURES": tmp_path / "figures", "SAENB_RUNS": tmp_path / "runs"}.items():
        monkeypatch.setenv(k, str(v))
    names = [p.name[:2] for p in rep.check("smollm2-135m")]
    assert names == ["01", "02", "03", "04", "05", "06", "08", "09"]
    assert "left out 07_proxy_gap.ipynb" in capsys.readouterr().out
    assert [p.name[:2] for p in rep.check("tiny-stdlib")] == [f"{i:02d}" for i in range(1, 10)]
    with pytest.raises(rep.UsageError, match=r"07_proxy_gap.ipynb does not apply to preset 'smollm2-135m'.*--only"):
        rep.check("smollm2-135m", ["07", "09"])


def test_reproduce_names_the_failing_notebook_and_cell_and_runs_the_others(tmp_path, monkeypatch):
    good = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("preset = 'x'\nquick = False"),
                                           nbformat.v4.new_code_cell("print(preset)")])
    good.cells[0].metadata["tags"] = ["parameters"]
    bad = nbformat.v4.new_notebook(cells=[good.cells[0], nbformat.v4.new_code_cell("x = 1"),
                                          nbformat.v4.new_code_cell("raise ValueError('broken on purpose')")])
    for nb in (good, bad):
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(bad, tmp_path / "01_bad.ipynb")
    nbformat.write(good, tmp_path / "02_good.ipynb")
    monkeypatch.setattr(rep, "NOTEBOOKS", tmp_path)
    monkeypatch.setenv("SAENB_RUNS", str(tmp_path / "runs"))
    outcomes = rep.reproduce("tiny-stdlib", report=False)
    assert [(o.notebook, o.ok) for o in outcomes] == [("01_bad.ipynb", False), ("02_good.ipynb", True)]
    assert "cell" in outcomes[0].error and "broken on purpose" in outcomes[0].error
    assert (tmp_path / "runs" / "tiny-stdlib" / "02_good.ipynb").exists()
    with pytest.raises(ValueError, match="no notebook numbered"):
        rep.notebooks(["07"])


def test_notebook_02_figures_agree_with_the_single_token_frame(run_notebooks):
    tmp, _ = run_notebooks
    folder = tmp / "figures" / "tiny-stdlib" / "quick" / "02_single_token"
    index = json.loads((folder / "figures.json").read_text())
    assert list(index) == ["kl_by_offset", "kl_at_offsets_0_1", "ce_delta_at_offsets_0_1"]
    df = measured_frame(tmp, positions=32, interventions=None)
    assert (df.patch_pos == 32).all() and sorted(df.pos.unique()) == list(range(32, 49))
    bars = pd.read_csv(folder / "kl_at_offsets_0_1.csv")
    for row in bars[bars.intervention == "sae"].itertuples():
        at = df[(df.pos == 32 + row.offset) & (df.layer == row.layer)]
        kl = at.groupby("intervention", observed=True).kl.sum()
        assert row.ratio == pytest.approx(kl["sae"] / kl["eps_random"], rel=1e-5)
        assert row.mean == pytest.approx(at[at.intervention == "sae"].kl.mean(), rel=1e-5)


def test_notebook_03_z_scores_and_ratios_agree_with_the_sampled_frames(run_notebooks):
    tmp, _ = run_notebooks
    folder = tmp / "figures" / "tiny-stdlib" / "quick" / "03_hypersphere"
    index = json.loads((folder / "figures.json").read_text())
    assert list(index) == ["samples_per_token", "z_scores", "feature_aligned", "feature_aligned_ratios",
                           "latent_perturbation", "latent_perturbation_ratios"]
    sae = measured_frame(tmp, 48, ["sae"]).set_index("seq").kl
    samples = measured_frame(tmp, 48, ["eps_random", "theta_random_sae_norm", "theta_random_true_norm"])
    eps = samples[samples.intervention == "eps_random"]
    assert eps.groupby("seq").size().nunique() == 1 and eps["sample"].nunique() > 1
    z = pd.read_csv(folder / "z_scores.csv").set_index("seq")
    for seq, draws in eps.groupby("seq").kl:
        want = (sae[seq] - draws.mean()) / draws.std(ddof=1)
        assert z.loc[seq, "z"] == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert z.loc[seq, "percentile"] == pytest.approx((draws < sae[seq]).mean())
    labels = ["feature_aligned(which=active)", "feature_aligned(which=inactive)", "eps_random"]
    aligned = measured_frame(tmp, 48, labels)
    counts = pd.read_csv(folder / "feature_aligned.csv").groupby("intervention")["count"].sum()
    assert (counts == aligned.groupby(aligned.intervention.astype(str)).size().reindex(counts.index)).all()
    ratios = pd.read_csv(folder / "feature_aligned_ratios.csv")
    kl = aligned.groupby("intervention", observed=True).kl.sum()
    for row in ratios.itertuples():
        assert row.b == "eps_random" and row.ratio == pytest.approx(kl[row.a] / kl["eps_random"], rel=1e-5)


def test_notebook_04_tables_agree_with_the_measured_frame(run_notebooks):
    """Notebook 04 reads notebook 01's measurement (no second one) and its numbers follow from it."""
    tmp, _ = run_notebooks
    folder = tmp / "figures" / "tiny-stdlib" / "quick" / "04_token_analysis"
    index = json.loads((folder / "figures.json").read_text())
    assert list(index) == ["predictor_correlations", "gap_by_predictor", "layer_correlations", "top_tokens",
                           "top_tokens_table", "gap_vs_frequency", "frequency_correlations", "top_contexts"]
    df = measured_frame(tmp)
    kl = df[df.intervention.isin(["sae", "eps_random"])].pivot_table(
        index=["layer", "seq", "pos", "token"], columns="intervention", values="kl", observed=True)
    gap = (kl["sae"] - kl["eps_random"]).rename("gap").reset_index()
    rho = pd.read_csv(folder / "predictor_correlations.csv").set_index(["layer", "predictor"]).rho
    for layer, sub in gap.groupby("layer"):
        assert rho[(layer, "pos")] == pytest.approx(stats.spearmanr(sub.pos, sub.gap).statistic, abs=1e-9)
    layer = int(re.search(r"layer (\d+)", index["top_tokens_table"]["caption"])[1])
    top = pd.read_csv(folder / "top_tokens_table.csv")
    per_token = gap[gap.layer == layer].groupby("token").gap.agg(["mean", "size"])
    per_token = per_token[per_token["size"] >= 5].nlargest(len(top), "mean")
    assert top.token.tolist() == per_token.index.tolist()
    np.testing.assert_allclose(top["mean"], per_token["mean"], rtol=1e-5)
    html = (folder / "top_contexts.html").read_text()
    assert html.count("<mark>") == len(pd.read_csv(folder / "top_contexts.csv")) > 0
    layers = pd.read_csv(folder / "layer_correlations.csv")
    assert np.allclose(layers[layers.layer_a == layers.layer_b].rho, 1.0)


def test_notebook_05_ratios_agree_with_the_attention_frame(run_notebooks):
    tmp, _ = run_notebooks
    folder = tmp / "figures" / "tiny-stdlib" / "quick" / "05_attention_saes"
    assert list(json.loads((folder / "figures.json").read_text())) == ["kl_by_intervention", "ratio_by_layer",
                                                                       "kl_histograms_z", "norm_share"]
    z = measured_frame(tmp, family="hook_z")
    assert z.hook.astype(str).str.endswith("attn.hook_z").all()
    ratios = pd.read_csv(folder / "ratio_by_layer.csv")
    sums = z.groupby(["layer", "intervention"], observed=True)[["kl", "ce_delta"]].sum()
    for row in ratios[ratios.family == "z"].itertuples():
        want = sums.loc[(row.layer, "sae"), row.metric] / sums.loc[(row.layer, "eps_random"), row.metric]
        assert row.ratio == pytest.approx(want, rel=1e-5)
    assert set(ratios.family) == {"resid", "z"}
    norm = pd.read_csv(folder / "norm_share.csv")
    row = norm[(norm.family == "z") & (norm.metric == "sae_norm / sae")].iloc[0]
    assert row.ratio == pytest.approx(sums.loc[(row.layer, "sae_norm"), "kl"] / sums.loc[(row.layer, "sae"), "kl"],
                                      rel=1e-5)


def test_notebook_06_trains_every_variant_and_its_reductions_follow_from_the_frame(run_notebooks):
    tmp, _ = run_notebooks
    folder = tmp / "figures" / "tiny-stdlib" / "quick" / "06_nfm_comparison"
    assert list(json.loads((folder / "figures.json").read_text())) == [
        "kl_by_variant", "kl_table", "reduction_scatter", "reconstruction_table", "kl_by_position"]
    # notebook 06's NFMs cover layers 1 and 3 (notebook 08's two fixes sit at layer 3 only)
    folders = [f for f in (tmp / "results" / "nfm").iterdir() if (f / "blocks.1.hook_resid_pre.safetensors").exists()]
    assert len(folders) == 4 and all(len(list(f.glob("*.safetensors"))) == 2 for f in folders), \
        "4 variants x 2 layers trained and cached"
    configs = {p: json.loads((p / "config.json").read_text()) for p in (tmp / "results" / "measure").iterdir()}
    # notebook 08's NFM fixes are measured too; they name their base SAE by its spec (sae_ids)
    (result,) = [p / "result.parquet" for p, c in configs.items()
                 if any(i.startswith("sae_nfm") for i in c["interventions"]) and "sae_ids" not in c]
    frame = pd.read_parquet(result)
    kl = frame.groupby(["layer", frame.intervention.astype(str)]).kl.sum()
    gains = pd.read_csv(folder / "reduction_scatter.csv")
    labels = {str(i) for i in frame.intervention.unique()}
    for row in gains.itertuples():
        (label,) = [lab for lab in labels if lab.startswith("sae_nfm(") and lab.endswith(f"variant={row.variant})")]
        assert row.kl_reduction == pytest.approx(1 - kl[(row.layer, label)] / kl[(row.layer, "sae")], abs=1e-6)
        # the SAE's squared error is the frame's eps^2 (its tokens lack only each context's last position)
        eps = frame[(frame.layer == row.layer) & (frame.intervention == "sae")].eps
        assert row.mse_sae == pytest.approx((eps.astype(float) ** 2).mean(), rel=0.03)


def test_notebook_07_tables_follow_from_the_sweep(run_notebooks):
    tmp, _ = run_notebooks
    folder = tmp / "figures" / "tiny-stdlib" / "quick" / "07_proxy_gap"
    index = json.loads((folder / "figures.json").read_text())
    assert list(index) == ["sweep_table", "delta_table", "r2_ce_rec_correlations", "metrics_by_k", "k_star",
                           "pr_profile", "rate_distortion", "budget_check", "claims"]
    delta = pd.read_csv(folder / "delta_table.csv")
    sweep = pd.read_csv(folder / "metrics_by_k.csv")
    r2 = sweep[sweep.metric == "r2"].pivot_table(index=["depth", "k"], columns="model", values="value")
    for row in delta.itertuples():
        assert row.d_r2 == pytest.approx(r2.loc[(row.depth, row.k), "base"] - r2.loc[(row.depth, row.k), "small"])
    kstar = pd.read_csv(folder / "k_star.csv")
    ce = sweep[sweep.metric == "ce_rec"]
    for row in kstar.itertuples():
        g = ce[(ce.depth == row.depth) & (ce.model == "base")].sort_values("k")
        want = metrics.k_star(g.k, g.value, row.target)
        assert (np.isnan(row.base) and np.isnan(want)) or row.base == pytest.approx(want)
    # the correlations: scipy's Pearson r on the same points, pooled and with each k's mean removed
    corrs = pd.read_csv(folder / "r2_ce_rec_correlations.csv").set_index("depth")
    wide = sweep.pivot_table(index=["depth", "model", "k"], columns="metric", values="value").reset_index()
    for depth, g in wide.groupby("depth"):
        assert corrs.pooled[depth] == pytest.approx(stats.pearsonr(g.r2, g.ce_rec).statistic, abs=1e-9)
        demeaned = g[["r2", "ce_rec"]] - g.groupby("k")[["r2", "ce_rec"]].transform("mean")
        assert corrs.within_k[depth] == pytest.approx(stats.pearsonr(demeaned.r2, demeaned.ce_rec).statistic,
                                                      abs=1e-9)


def test_notebook_08_scores_follow_from_the_measured_frames(run_notebooks):
    """Each SAE's ratio in the score table is the ratio of token means in its own cached measurement (independent
    of fixes.evaluate's bookkeeping: recomputed from the parquet with plain pandas), and the fixes' arrows start at
    the base SAE's point."""
    tmp, outcomes = run_notebooks
    assert all(o.ok for o in outcomes), [(o.notebook, o.error) for o in outcomes if not o.ok]
    folder = tmp / "figures" / "tiny-stdlib" / "quick" / "08_fixes"
    assert list(json.loads((folder / "figures.json").read_text())) == [
        "score_table", "ratio_vs_l0", "ratio_vs_size", "kl_vs_l0", "fixes_arrows", "fix_effects"]
    table = pd.read_csv(folder / "score_table.csv", keep_default_na=False, na_values=[""])
    from saenb.saes import sets

    keys = {n.name: n.spec.key for n in sets.get("fixes")}
    checked = 0
    for p in (tmp / "results" / "measure").iterdir():
        config = json.loads((p / "config.json").read_text())
        if "sae_ids" not in config or "sae_orthogonal" not in config["interventions"]:
            continue
        frame = pd.read_parquet(p / "result.parquet")
        kl = frame.groupby(frame.intervention.astype(str)).kl.agg(lambda v: v.astype(float).mean())
        (name,) = [n for n, k in keys.items() if k == config["sae_ids"]["blocks.3.hook_resid_pre"]]
        row = table[table.name == name].iloc[0]
        # float32 KLs: a float32 mean against the float64 sums of the table's bootstrap
        assert row.ratio == pytest.approx(kl["sae"] / kl["eps_random"], rel=1e-6)
        assert row.ratio_orthogonal == pytest.approx(kl["sae_orthogonal"] / kl["eps_random_orthogonal"], rel=1e-6)
        assert row.ratio_ci_low <= row.ratio <= row.ratio_ci_high
        checked += 1
    assert checked == len(table) - 2, "every SAE (all but the two NFM fixes) measured and cached"
    arrows = pd.read_csv(folder / "fixes_arrows.csv")
    base = table[table.name == "base"].iloc[0]
    assert np.allclose(arrows.base_ratio, base.ratio) and set(arrows.name) >= {"NFM", "scale fine-tune"}


def test_notebook_09_gap_and_accounting_follow_from_the_measured_frame(run_notebooks):
    """The gap table's ratios are ratios of token means in notebook 09's cached all-token frame (recomputed with plain
    pandas), the accounting's shares follow from them by 1 - log r / log r_eps, and every figure is saved."""
    tmp, outcomes = run_notebooks
    assert all(o.ok for o in outcomes), [(o.notebook, o.error) for o in outcomes if not o.ok]
    folder = tmp / "figures" / "tiny-stdlib" / "quick" / "09_why"
    assert list(json.loads((folder / "figures.json").read_text())) == [
        "gap_by_baseline", "linear_nonlinear", "linear_nonlinear_table", "robustness_curves", "quadratic_vs_measured",
        "quadratic_fit", "curvature_quotients", "energy_in_top_directions", "predicted_vs_measured_ratio",
        "z_vs_quotient", "accounting"]
    gap = pd.read_csv(folder / "gap_by_baseline.csv")
    (path,) = [p for p in (tmp / "results" / "measure").iterdir()
               if any(i.startswith("cov_random(") for i in json.loads((p / "config.json").read_text())["interventions"])
               and json.loads((p / "config.json").read_text())["positions"] == "all"]
    frame = pd.read_parquet(path / "result.parquet")
    frame["name"] = frame.intervention.astype(str).str.split("(").str[0]
    for row in gap.itertuples():
        sub = frame[frame.layer == row.layer]
        kl = sub.groupby("name").kl.agg(lambda v: v.astype(float).mean())
        assert row.ratio == pytest.approx(kl["sae"] / kl[row.baseline], rel=1e-6)
        assert row.ci_low <= row.ratio <= row.ci_high
    account = pd.read_csv(folder / "accounting.csv")
    ratios = gap.set_index(["layer", "baseline"]).ratio
    for row in account[account.explanation.str.contains("cov_random")].itertuples():
        want = 1 - np.log(ratios[(row.layer, "cov_random")]) / np.log(ratios[(row.layer, "eps_random")])
        assert row.share_of_gap == pytest.approx(want)
    quadratic = pd.read_csv(folder / "quadratic_vs_measured.csv")
    assert (quadratic.quadratic > 0).all() and set(quadratic.layer) == {1, 3, 5}


SMOLLM2_RUNS = {"01": {"n_contexts": 3, "layers": [15]}, "04": {"n_contexts": 8}, "05": {"n_contexts": 3, "layers": [15]},
                "06": {"n_contexts": 3},
                "08": {"n_contexts": 4}, "09": {"layers": [24], "n_eval_contexts": 4, "n_curvature_tokens": 2}}
"""Notebook 01, 04, 05, 06, 08 and 09's sizes on smollm2-135m under test: a few contexts at one layer (quick caps the rest;
`test_presets` holds the preset's layers and hook families)."""


@pytest.mark.parametrize("number", sorted(SMOLLM2_RUNS))
def test_notebook_runs_on_smollm2_changing_only_the_preset(number, tmp_path, monkeypatch):
    """Notebooks 01, 04, 05, 06, 08 and 09 on the real pretrained model (quick, a few contexts), by the same code: only the
    parameters differ (one test each, so that pytest-xdist's workers share them). Their hook families come from
    the preset; the report's headline follows 01. 08 scores the quick SAEs of the layer-15 sweep (those not
    trained yet skipped and listed: the preset's default); 09 runs at the last layer only, with the preset's
    Fisher (exact at the patched position, sampled after it: seconds per SmolLM2 token). (02 and 03 run the code
    paths of 01 in single-token and many-sample modes, which the engine's tests hold on a Llama architecture.)"""
    for k, v in {"SAENB_FIGURES": tmp_path / "figures", "SAENB_RESULTS": tmp_path / "results"}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setenv("SAENB_RUNS", str(tmp_path / "runs"))
    outcomes = rep.reproduce("smollm2-135m", [number], SMOLLM2_RUNS[number], quick=True, report=False)
    assert [o.ok for o in outcomes] == [True], outcomes
    figures = tmp_path / "figures" / "smollm2-135m" / "quick"
    if number == "01":
        ratios = pd.read_csv(figures / "01_replication" / "ratio_by_layer.csv")
        assert sorted(ratios.layer.unique()) == [15] and (ratios.ratio > 0).all()
        md, _ = write_report("smollm2-135m", root=tmp_path / "figures", quick=True,
                             runs=tmp_path / "runs" / "smollm2-135m" / "quick")
        assert "## Headline numbers (01_replication)" in md.read_text()
    elif number == "04":
        rho = pd.read_csv(figures / "04_token_analysis" / "predictor_correlations.csv")
        assert len(rho) and rho.rho.between(-1, 1).all()
    elif number == "06":
        nfm = pd.read_csv(figures / "06_nfm_comparison" / "kl_by_variant.csv")
        assert set(nfm.layer) == {15, 6} and (nfm["mean"] > 0).all()
    elif number == "05":
        z = pd.read_csv(figures / "05_attention_saes" / "ratio_by_layer.csv")
        assert set(z.family) == {"resid", "z"} and set(z.layer) == {15} and (z.ratio > 0).all()
    elif number == "08":
        scores = pd.read_csv(figures / "08_fixes" / "score_table.csv", keep_default_na=False, na_values=[""])
        assert "base" in set(scores.name) and (scores.ratio > 0).all() and (scores.l0 > 0).all()
    else:
        gap = pd.read_csv(figures / "09_why" / "gap_by_baseline.csv")
        assert set(gap.layer) == {24} and (gap.ci_low <= gap.ratio).all() and (gap.ratio <= gap.ci_high).all()
