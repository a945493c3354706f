"""Figures in one house style, built from tidy DataFrames, and saved with the data behind them.

    out = plots.Notebook("01_replication", "tiny-stdlib")       # the house style, and where this notebook saves
    out.figure(plots.ratio_by_layer(ratios), ratios, "ratio_by_layer", caption="SAE / eps-random ratio per layer ...")
    plots.reading(verdicts)                                     # a study's readings as the notebook's paragraph

`save_figure` writes `figures/<preset>/<notebook>/<name>.{png,svg,csv}` and records the caption in that
folder's `figures.json` (the report reads it). Every plotting function takes a DataFrame and column names;
none computes anything beyond arranging what it is given.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import HTML, Markdown
from matplotlib.figure import Figure

from saenb.files import REPO, atomic_path, write_text
from saenb.studies import literature, readings

FIGURES = Path(os.environ.get("SAENB_FIGURES", REPO / "figures"))
"""Where figures go (`SAENB_FIGURES` overrides it, e.g. for a test run in a temporary folder)."""

COLORS = {
    # the SAE cluster: reds
    "sae": "#c0392b",
    "sae_norm_corrected": "#e67e22",
    "sae_norm": "#8e44ad",
    # random baselines at the same distance / cosine: blues and teals
    "eps_random": "#2471a3",
    "theta_random_sae_norm": "#17a589",
    "theta_random_true_norm": "#76d7c4",
    "feature_aligned": "#27ae60",
    "feature_aligned(which=active)": "#1e8449",
    "feature_aligned(which=inactive)": "#82e0aa",
    # notebook 09's baselines and error parts
    "cov_random": "#1abc9c",
    "error_shuffled": "#5b2c6f",
    "theta_random_cos": "#17a589",
    "sae_plus_linear": "#f5b041",
    "sae_plus_nonlinear": "#7b241c",
    "eps_random_like": "#85c1e9",
    "sae_scaled": "#f1948a",
    "decoder (active latents)": "#1e8449",
    "decoder (all latents)": "#82e0aa",
    # latent-space perturbations (seed 004)
    "latent_perturb": "#a04000",
    "sae_plus_random": "#5dade2",
    # SAE + NFM (seed 003; notebook 06 names the variants so)
    "sae_nfm": "#f1948a",
    "sae_nfm_linear": "#f8c471",
    "sae_nfm_interaction": "#d7bde2",
    "linear_control": "#abb2b9",
    "nfm_eps_random": "#85c1e9",
    # the two model sizes of notebook 07
    "base": "#1f4e79",
    "small": "#e59866",
    # SAE families of notebook 08 (architectures, objectives, sweeps, fixes)
    "l1": "#c0392b",
    "topk": "#2471a3",
    "batchtopk": "#5dade2",
    "jumprelu": "#27ae60",
    "gated": "#8e44ad",
    "e2e": "#e67e22",
    "e2e_ds": "#a04000",
    "width": "#2471a3",
    "tokens": "#17a589",
    "fix": "#212121",
    # references
    "zero": "#212121",
    "mean": "#7f8c8d",
    "identity": "#bdc3c7",
    "clean": "#000000",
}
"""One color per intervention, the same in every notebook (labels with parameters, e.g.
`latent_perturb(scale=0.2)`, take their base name's color)."""

NAMES = {
    "sae": "SAE",
    "sae_norm_corrected": "SAE, norm-corrected",
    "sae_norm": "SAE-norm",
    "eps_random": "eps-random",
    "theta_random_sae_norm": "theta-random (SAE norm)",
    "theta_random_true_norm": "theta-random (true norm)",
    "feature_aligned": "feature-aligned",
    "latent_perturb": "latent perturbation",
    "sae_plus_random": "SAE + random",
    "sae_nfm": "SAE + NFM",
    "sae_nfm_linear": "SAE + NFM linear part",
    "sae_nfm_interaction": "SAE + NFM interaction part",
    "linear_control": "SAE + linear control",
    "nfm_eps_random": "eps-random at the SAE + NFM's error",
    "cov_random": "cov-random",
    "error_shuffled": "shuffled SAE error",
    "theta_random_cos": "theta-random at a fixed cosine (true norm)",
    "sae_plus_linear": "SAE + linear part (nonlinear error left)",
    "sae_plus_nonlinear": "SAE + nonlinear part (linear error left)",
    "eps_random_like": "eps-random at that error's size",
    "sae_scaled": "SAE error, scaled",
    "l1": "ReLU + L1",
    "topk": "TopK",
    "batchtopk": "BatchTopK",
    "jumprelu": "JumpReLU",
    "gated": "gated",
    "e2e": "end-to-end",
    "e2e_ds": "end-to-end + downstream",
    "zero": "zero ablation",
    "mean": "mean ablation",
    "identity": "identity",
    "clean": "clean",
}


def base(label: str) -> str:
    return label.split("(")[0]


def color(label: str) -> str:
    return COLORS.get(label, COLORS.get(base(label), "#95a5a6"))


def name(label: str) -> str:
    return NAMES.get(base(label), base(label)) + (label[len(base(label)):] if "(" in label else "")


def set_style() -> None:
    """The house style: seaborn's whitegrid, one font size scale, tight saving at 150 dpi."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    plt.rcParams.update({
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "axes.titlesize": 10,
        "axes.titleweight": "bold",
        "legend.frameon": False,
        "svg.fonttype": "none",  # text stays text in the SVG
    })


# -------------------------------------------------------------------------------------------- saving
def run_dir(preset: str, root: Path = FIGURES, *, quick: bool = False) -> Path:
    """Where one kind of run of a preset keeps its figures and report: figures/<preset>/ for full runs,
    figures/<preset>/quick/ for quick (smoke) runs, so that a quick run never overwrites a full run's figures."""
    return Path(root) / preset / "quick" if quick else Path(root) / preset


def figure_dir(notebook: str, preset: str, root: Path = FIGURES, *, quick: bool = False) -> Path:
    return run_dir(preset, root, quick=quick) / notebook


def save_figure(fig: Figure, df: pd.DataFrame, name: str, *, notebook: str, preset: str, caption: str = "",
                title: str = "", quick: bool = False, root: Path = FIGURES) -> Path:
    """Write `<name>.png`, `.svg` and the DataFrame behind the figure (`.csv`) under figures/<preset>/<notebook>/
    (`quick`: figures/<preset>/quick/<notebook>/), and record its title and caption (in saving order) in that
    folder's figures.json. `title` is the report's heading for it (default: the caption's first phrase)."""
    if df is None or len(df) == 0:
        raise ValueError(f"figure {name!r}: the DataFrame behind it is empty; save the frame the figure was drawn from")
    folder = figure_dir(notebook, preset, root, quick=quick)
    for ext in ("png", "svg"):
        with atomic_path(folder / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext)
    with atomic_path(folder / f"{name}.csv") as tmp:
        df.to_csv(tmp, index=False)
    _record(folder, name, {"title": title or short_title(caption, name), "caption": caption, "png": f"{name}.png",
                           "svg": f"{name}.svg", "csv": f"{name}.csv"})
    return folder / f"{name}.png"


def save_table(df: pd.DataFrame, name: str, *, notebook: str, preset: str, caption: str = "", title: str = "",
               escape: bool = True, quick: bool = False, root: Path = FIGURES) -> Path:
    """Write a table as `<name>.html` (a fragment, for the notebook and the report; `escape=False` keeps HTML
    already in its cells) and `<name>.csv`, recorded in figures.json like a figure."""
    if df is None or len(df) == 0:
        raise ValueError(f"table {name!r} is empty")
    folder = figure_dir(notebook, preset, root, quick=quick)
    write_text(folder / f"{name}.html", df.to_html(index=False, escape=escape, border=0, float_format="{:.4g}".format))
    with atomic_path(folder / f"{name}.csv") as tmp:
        df.to_csv(tmp, index=False)
    _record(folder, name, {"title": title or short_title(caption, name), "caption": caption, "html": f"{name}.html",
                           "csv": f"{name}.csv"})
    return folder / f"{name}.html"


class Notebook:
    """One notebook's output: the house style set once, then `figure` and `table` save under
    figures/<preset>/<notebook>/ (`save_figure`, `save_table`) and show what they saved. `captions` maps a figure
    or table name to its caption (a study's fixed captions), used where none is passed."""

    def __init__(self, name: str, preset: str, quick: bool = False, root: Path = FIGURES,
                 captions: dict[str, str] | None = None):
        self.name, self.preset, self.quick, self.root = name, preset, quick, root
        self.captions = captions or {}
        set_style()

    def figure(self, fig: Figure, df: pd.DataFrame, name: str, *, caption: str = "", title: str = "") -> None:
        """Save the figure with the frame behind it, then show it."""
        save_figure(fig, df, name, notebook=self.name, preset=self.preset, quick=self.quick, root=self.root,
                    caption=caption or self.captions.get(name, ""), title=title)
        plt.show()

    def table(self, df: pd.DataFrame, name: str, *, caption: str = "", title: str = "", escape: bool = True,
              fmt: dict | str | None = None, precision: int | None = None):
        """Save the table; returns it for display: as HTML when `escape` is off, else styled with `fmt` (a format
        string, or one per column) or `precision` (digits of every float) when given."""
        save_table(df, name, notebook=self.name, preset=self.preset, quick=self.quick, root=self.root,
                   caption=caption or self.captions.get(name, ""), title=title, escape=escape)
        if not escape:
            return HTML(df.to_html(index=False, escape=False, float_format="{:.4f}".format))
        if fmt is None and precision is None:
            return df
        return df.style.format(fmt, precision=precision).hide(axis="index")


def reading(verdicts: pd.DataFrame, lead: str = ""):
    """A study's readings (`saenb.studies.readings`) as the notebook's "**Reading.**" paragraph (the report
    collects these from the executed notebooks)."""
    return Markdown(readings.markdown(verdicts, lead))


def short_title(caption: str, name: str = "") -> str:
    """A heading from a caption: its first clause without parentheses ("Mean KL of each intervention per layer
    (token means, ...), log scale." -> "Mean KL of each intervention per layer"); the figure's file name, humanised,
    when there is no caption."""
    text, previous = caption.strip(), None
    while previous != text:  # parentheses, innermost first
        previous, text = text, re.sub(r"\s*\([^()]*\)", "", text)
    head = re.split(r": |; |\. |\.$", text, maxsplit=1)[0].strip().rstrip(",")
    text = head or name.replace("_", " ")
    return text[:1].upper() + text[1:]


def _record(folder: Path, name: str, entry: dict) -> None:
    """Add (or replace) `name` in the folder's figures.json, keeping the saving order."""
    index_path = folder / "figures.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    index[name] = entry
    write_text(index_path, json.dumps(index, indent=2))


# -------------------------------------------------------------------------------------------- figures
def grouped_bars(df: pd.DataFrame, *, x: str, y: str, hue: str, low: str, high: str, logy: bool = False,
                 hline: float | None = None, ylabel: str | None = None, title: str = "",
                 annotate: pd.Series | None = None, ax=None) -> Figure:
    """Bars of `y` per `x`, grouped by `hue`, with the given CI as error bars, and a dashed line at `hline` (e.g.
    ratio 1); `annotate` maps an `x` value to a text written above its group (e.g. a ratio).

    Drawn with matplotlib: seaborn's barplot computes its own CIs from raw rows (over tokens), while
    these CIs are bootstrapped over sequences beforehand.
    """
    hues = list(pd.unique(df[hue]))
    xs = list(pd.unique(df[x]))
    fig, ax = _axes(ax, figsize=(max(6.0, 0.18 * len(xs) * len(hues) + 2), 3.8))
    width = 0.8 / len(hues)
    for i, h in enumerate(hues):
        sub = df[df[hue] == h].set_index(x).reindex(xs)
        pos = np.arange(len(xs)) - 0.4 + width * (i + 0.5)
        err = np.vstack([sub[y] - sub[low], sub[high] - sub[y]])
        ax.bar(pos, sub[y], width, yerr=err, color=color(str(h)), label=name(str(h)), error_kw={"lw": 0.8})
    if annotate is not None:
        top = df.groupby(x)[high].max()
        for i, v in enumerate(xs):
            if v in annotate.index:
                ax.annotate(str(annotate[v]), (i, top[v]), xytext=(0, 4), textcoords="offset points", ha="center",
                            fontsize=8)
    ax.set_xticks(np.arange(len(xs)), [str(v) for v in xs])
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or y)
    _axes_style(ax, logx=False, logy=logy, hline=hline)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def bar_panels(df: pd.DataFrame, *, panel: str, x: str, y: str, hue: str, low: str, high: str,
               annotate: str | None = None, fmt: str = "{:.2f}x", ylabel: str | None = None, logy: bool = False,
               hline: float | None = None, titles: dict | None = None) -> Figure:
    """`grouped_bars` side by side, one panel per `panel` value (titled "<panel> <value>", or by `titles`);
    `annotate` names a column with one value per `x` (e.g. a ratio), written above each group with `fmt`."""
    panels = list(pd.unique(df[panel]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.8), layout="constrained", squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        sub = df[df[panel] == p]
        notes = sub.drop_duplicates(x).set_index(x)[annotate].map(fmt.format) if annotate else None
        grouped_bars(sub, x=x, y=y, hue=hue, low=low, high=high, logy=logy, hline=hline, ylabel=ylabel,
                     title=(titles or {}).get(p, f"{panel} {p}"), annotate=notes, ax=ax)
    for ax in axes[0, :-1]:
        ax.get_legend().remove()
    return fig


def histograms(df: pd.DataFrame, *, hue: str, col: str, notes: dict | None = None, xlabel: str = "",
               col_wrap: int = 3, sharex: bool = True) -> Figure:
    """Log-count histograms from `metrics.histogram_table`'s counts (columns bin_left, bin_right, count), one
    panel per `col`, overlaid by `hue`; `notes` maps a panel's `col` value to a text printed in its corner."""
    panels = list(pd.unique(df[col]))
    fig, axes = _panels(len(panels), col_wrap, (3.4, 2.6) if len(panels) > 1 else (6.5, 3.6), sharex=sharex)
    for ax, panel in zip(axes.flat, panels, strict=False):
        sub = df[df[col] == panel]
        for h in pd.unique(sub[hue]):
            bins = sub[sub[hue] == h].sort_values("bin_left")
            edges = np.append(bins["bin_left"].to_numpy(), bins["bin_right"].iloc[-1])
            ax.stairs(bins["count"].to_numpy(), edges, lw=1.3, color=color(str(h)), label=name(str(h)))
        ax.set_yscale("log")
        ax.set_title(f"{col} {panel}")
        if notes and panel in notes:
            ax.text(0.97, 0.95, notes[panel], transform=ax.transAxes, ha="right", va="top", fontsize=7.5,
                    bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
    _label(axes, len(panels), xlabel, "tokens")
    axes.flat[0].legend(fontsize=8, loc="center right")
    return fig


def lines(df: pd.DataFrame, *, x: str, y: str, hue: str, col: str | None = None, low: str | None = None,
          high: str | None = None, logy: bool = False, ylabel: str | None = None, xlabel: str | None = None,
          col_wrap: int = 3) -> Figure:
    """One line of `y` against `x` per `hue` (a CI band when `low`/`high` are given), one panel per `col`."""
    panels = list(pd.unique(df[col])) if col else [None]
    fig, axes = _panels(len(panels), col_wrap, (3.6, 2.6) if col else (7.0, 3.4))
    for ax, panel in zip(axes.flat, panels, strict=False):
        sub_panel = df if panel is None else df[df[col] == panel]
        for h in pd.unique(sub_panel[hue]):
            sub = sub_panel[sub_panel[hue] == h].sort_values(x)
            ax.plot(sub[x], sub[y], color=color(str(h)), label=name(str(h)), lw=1.2)
            if low and high:
                # a band reaching below zero cannot be drawn on a log axis: its bottom is cut at y / 10 there
                bottom = sub[low].where(sub[low] > 0, sub[y] / 10) if logy else sub[low]
                ax.fill_between(sub[x], bottom, sub[high], color=color(str(h)), alpha=0.2, lw=0)
        if logy:
            ax.set_yscale("log")
        if panel is not None:
            ax.set_title(f"{col} {panel}")
    _label(axes, len(panels), xlabel or x, ylabel or y)
    axes.flat[0].legend(fontsize=8)
    return fig


def grid(df: pd.DataFrame, *, x: str, y: str, hue: str, row: str, col: str, logx: bool = False,
         xlabel: str | None = None) -> Figure:
    """A `row` x `col` grid of `y` against `x` (points joined by lines), one series per `hue`. Each row keeps its
    own y scale (rows are different quantities: R^2, CE_rec, ...); columns share x."""
    rows, cols = list(pd.unique(df[row])), list(pd.unique(df[col]))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.3 * len(cols), 2.3 * len(rows)), sharex=True,
                             sharey="row", layout="constrained", squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax, sub = axes[i, j], df[(df[row] == r) & (df[col] == c)]
            for h in pd.unique(sub[hue]):
                line = sub[sub[hue] == h].sort_values(x)
                ax.plot(line[x], line[y], color=color(str(h)), label=name(str(h)), lw=1.2, marker="o", ms=3)
            if logx:
                ax.set_xscale("log", base=2)
            if i == 0:
                ax.set_title(str(c))
        axes[i, 0].set_ylabel(str(r))
    for ax in axes[-1]:
        ax.set_xlabel(xlabel or x)
    axes.flat[0].legend(fontsize=8)
    return fig


def ratio_by_layer(df: pd.DataFrame, *, x: str = "layer", y: str = "ratio", hue: str = "metric",
                   low: str = "ci_low", high: str = "ci_high",
                   reference: tuple[float, float] | None = literature.GURNEE_RESID.value,
                   reference_label: str = "GPT-2 small residual, original study", title: str = "",
                   ylabel: str = "SAE / eps-random", ax=None) -> Figure:
    """Ratios with CIs per layer, one marker series per `hue`, a line at 1 (no pathology) and the original
    study's range as a band."""
    fig, ax = _axes(ax, figsize=(6.0, 3.6))
    series = list(pd.unique(df[hue]))
    markers = "osD^v"
    for i, s in enumerate(series):
        sub = df[df[hue] == s].sort_values(x)
        shift = (i - (len(series) - 1) / 2) * 0.12
        ax.errorbar(sub[x] + shift, sub[y], yerr=np.vstack([sub[y] - sub[low], sub[high] - sub[y]]),
                    marker=markers[i % len(markers)], ls="-", lw=1.2, capsize=3, label=str(s))
    ax.axhline(1.0, color="#555555", lw=0.8, ls="--")
    if reference:
        ax.axhspan(*reference, color="#f5b7b1", alpha=0.35, lw=0, label=reference_label)
    ax.set_xticks(sorted(pd.unique(df[x])))
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def ratio_panels(df: pd.DataFrame, *, panel: str, titles: dict, references: dict | None = None,
                 ylabel: str = "SAE / eps-random") -> Figure:
    """`ratio_by_layer` side by side, one panel per key of `titles` (a `panel` value -> its title), sharing y;
    `references` maps a panel value to its published (low, high) band (none drawn without it)."""
    fig, axes = plt.subplots(1, len(titles), figsize=(6.0 * len(titles), 3.8), layout="constrained", sharey=True,
                             squeeze=False)
    for ax, (p, title) in zip(axes[0], titles.items(), strict=True):
        band = (references or {}).get(p)
        ratio_by_layer(df[df[panel] == p], hue="metric", reference=band, title=title, ax=ax, ylabel=ylabel,
                       reference_label=f"GPT-2 small, original study ({band[0]}-{band[1]}x)" if band else "")
    return fig


def sample_grid(samples: pd.DataFrame, tails: pd.DataFrame, *, value: str = "kl", hue: str = "intervention",
                panel: str = "seq", bins: int = 40, col_wrap: int = 4, reference_label: str = "SAE") -> Figure:
    """One panel per token (`panel` value): histograms of its sampled `value` per `hue`, the reference (the
    SAE splice) as a vertical line, and its z-score (from `tails`) in the corner.
    `tails` is `metrics.tail_position`'s frame (columns panel, reference, z)."""
    tokens = list(pd.unique(samples[panel]))
    fig, axes = _panels(len(tokens), col_wrap, (3.0, 2.3), sharex=False, sharey=False)
    tails = tails.set_index(panel)
    for ax, token in zip(axes.flat, tokens, strict=False):
        sub = samples[samples[panel] == token]
        edges = np.linspace(0, max(sub[value].max(), tails.loc[token, "reference"]) * 1.05, bins + 1)
        for h in pd.unique(sub[hue]):
            ax.hist(sub.loc[sub[hue] == h, value], bins=edges, histtype="stepfilled", alpha=0.45, color=color(str(h)),
                    label=name(str(h)))
        ax.axvline(tails.loc[token, "reference"], color=color("sae"), lw=1.8, label=reference_label)
        ax.text(0.97, 0.95, f"z = {tails.loc[token, 'z']:.1f}", transform=ax.transAxes, ha="right", va="top",
                fontsize=8, color=color("sae"))
        ax.set_title(f"{panel} {token}")
    axes.flat[0].legend(fontsize=6.5, loc="center right")
    _label(axes, len(tokens), value, "samples")
    return fig


def next_token_logprobs(df: pd.DataFrame, *, title: str = "", ax=None) -> Figure:
    """The "intuition" figure: top-k next-token log-probs of the clean model (x axis: its tokens, by rank)
    and of each splice; the legend gives each splice's KL. Takes `next_token_distributions`'s frame."""
    fig, ax = _axes(ax, figsize=(8.5, 3.6))
    order = df[df.intervention == "clean"].sort_values("rank")
    for label, sub in df.groupby("intervention", observed=True, sort=False):
        sub = sub.set_index("token_id").reindex(order.token_id)
        kl = sub["kl"].iloc[0]
        legend = name(str(label)) + ("" if label == "clean" else f" (KL {kl:.3f})")
        ax.plot(np.arange(len(order)), sub["logp"], marker="o", ms=3.5, lw=1.0, color=color(str(label)), label=legend)
    ax.set_xticks(np.arange(len(order)), order.token_str, rotation=70, fontsize=7.5)
    ax.set_ylabel("log p(next token)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def next_token_panels(df: pd.DataFrame, titles: dict) -> Figure:
    """`next_token_logprobs` for each (seq, pos) of the frame, one panel above the other; `titles` maps a
    (seq, pos) to its panel's title."""
    picks = list(titles)
    fig, axes = plt.subplots(len(picks), 1, figsize=(9, 3.3 * len(picks)), layout="constrained", squeeze=False)
    for ax, (seq, pos) in zip(axes[:, 0], picks, strict=True):
        next_token_logprobs(df[(df.seq == seq) & (df.pos == pos)], ax=ax, title=titles[(seq, pos)])
    return fig


def heatmap(df: pd.DataFrame, *, x: str, y: str, value: str, fmt: str = "{:.2f}", title: str = "",
            cmap: str = "RdBu_r", limits: tuple[float, float] = (-1.0, 1.0), ax=None) -> Figure:
    """A grid of `value` (long form: one row per (y, x) cell), each cell printed, a diverging colour scale."""
    grid = df.pivot(index=y, columns=x, values=value)
    fig, ax = _axes(ax, figsize=(1.0 + 0.75 * grid.shape[1], 0.8 + 0.45 * grid.shape[0]))
    image = ax.imshow(grid.to_numpy(float), cmap=cmap, vmin=limits[0], vmax=limits[1], aspect="auto")
    for (i, j), v in np.ndenumerate(grid.to_numpy(float)):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7.5,
                color="white" if abs(v) > 0.6 * max(map(abs, limits)) else "black")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(r) for r in grid.index])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(False)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8, label=value)
    return fig


def binned_panels(df: pd.DataFrame, *, titles: dict | None = None, ylabel: str = "", col_wrap: int = 3,
                  logx: tuple[str, ...] = (), title: str = "") -> Figure:
    """`tokens.binned_table`'s frame: one panel per predictor, its binned means with CIs against the bins'
    median predictor values; `titles` maps a predictor to its panel title (e.g. its Spearman rho), `title` heads
    the figure."""
    predictors = list(pd.unique(df["predictor"]))
    fig, axes = _panels(len(predictors), col_wrap, (3.5, 2.6), sharex=False, sharey=True)
    for ax, predictor in zip(axes.flat, predictors, strict=False):
        sub = df[df["predictor"] == predictor].sort_values("x")
        ax.errorbar(sub["x"], sub["mean"], yerr=np.vstack([sub["mean"] - sub["ci_low"], sub["ci_high"] - sub["mean"]]),
                    marker="o", ms=3.5, lw=1.2, capsize=2, color=color("sae"))
        ax.axhline(0.0, color="#555555", lw=0.8, ls="--")
        if predictor in logx:
            ax.set_xscale("log")
        ax.set_xlabel(predictor)
        ax.set_title((titles or {}).get(predictor, predictor), fontsize=9)
    for ax in axes.flat[len(predictors):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    return fig


def scatter(df: pd.DataFrame, *, x: str, y: str, logx: bool = False, title: str = "", xlabel: str | None = None,
            ylabel: str | None = None) -> Figure:
    """Points of `y` against `x`, with a dashed line at y = 0."""
    fig, ax = _axes(None, figsize=(5.5, 3.6))
    ax.scatter(df[x], df[y], s=8, alpha=0.5, color=color("sae"), lw=0)
    ax.axhline(0.0, color="#555555", lw=0.8, ls="--")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title, fontsize=10)
    return fig


def reduction_scatter(df: pd.DataFrame, *, x: str, y: str, hue: str, low: str | None = None, high: str | None = None,
                      label: str | None = None, reference: tuple[float, float] | None = None,
                      reference_label: str = "", xlabel: str = "", ylabel: str = "", title: str = "") -> Figure:
    """One point per row, coloured by `hue`, with optional CIs on `y`, the line y = x (the behavioural gain
    equals the reconstruction gain) and a reference point (e.g. a published result); `label` names each point."""
    fig, ax = _axes(None, figsize=(6.4, 4.2))
    for h, sub in df.groupby(hue, sort=False, observed=True):
        yerr = np.vstack([sub[y] - sub[low], sub[high] - sub[y]]) if low and high else None
        ax.errorbar(sub[x], sub[y], yerr=yerr, fmt="o", ms=6, capsize=3, color=color(str(h)), label=name(str(h)))
        if label:
            for _, row in sub.iterrows():
                ax.annotate(str(row[label]), (row[x], row[y]), xytext=(5, 3), textcoords="offset points", fontsize=7)
    lims = [min(0.0, df[x].min(), df[low or y].min()) - 0.02,
            max(df[x].max(), df[high or y].max(), *(reference or ())) + 0.05]
    ax.plot(lims, lims, color="#555555", lw=0.8, ls="--", label="y = x")
    if reference:
        ax.scatter(*reference, marker="*", s=160, color="black", zorder=3, label=reference_label)
    ax.axhline(0.0, color="#999999", lw=0.6)
    ax.axvline(0.0, color="#999999", lw=0.6)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def token_strips(rows: pd.DataFrame, summary: pd.DataFrame, *, y: str = "gap", title: str = "") -> Figure:
    """`tokens.top_tokens`'s output: one box per token (its individual values over it as points), largest
    mean first, the token string and its count as the label, the mean as a diamond."""
    order = list(summary["token_str"])
    fig, ax = _axes(None, figsize=(max(7.0, 0.45 * len(order) + 1.5), 4.0))
    data = [rows.loc[rows["token_str"] == t, y].to_numpy() for t in order]
    ax.boxplot(data, positions=np.arange(len(order)), widths=0.6, showfliers=False,
               medianprops={"color": "#333333"}, boxprops={"color": "#777777"}, whiskerprops={"color": "#777777"})
    rng = np.random.default_rng(0)  # horizontal jitter of the points only
    for i, values in enumerate(data):
        ax.scatter(i + rng.uniform(-0.2, 0.2, len(values)), values, s=6, alpha=0.45, color=color("sae"), lw=0)
    ax.scatter(np.arange(len(order)), summary["mean"], marker="D", s=22, color="black", zorder=3, label="mean")
    ax.axhline(0.0, color="#555555", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(order)), [f"{t!r} (n={c})" for t, c in zip(order, summary["count"], strict=True)],
                  rotation=70, fontsize=7.5)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def _panels(n: int, col_wrap: int, size: tuple[float, float], sharex: bool = True, sharey: bool = True):
    """A grid of n panels, col_wrap wide, each `size` inches (axes shared unless told otherwise)."""
    ncols = min(col_wrap, n)
    nrows = -(-n // ncols)
    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), sharex=sharex, sharey=sharey,
                        layout="constrained", squeeze=False)


def _label(axes, n: int, xlabel: str, ylabel: str) -> None:
    """Hide the grid's unused panels; label the bottom row's x axes and the left column's y axes."""
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)


def _axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def _axes_style(ax, *, logx: bool, logy: bool, hline: float | None) -> None:
    """Log scales and a dashed horizontal reference line (e.g. ratio 1), as asked."""
    if hline is not None:
        ax.axhline(hline, color="#7f8c8d", lw=0.8, ls="--")
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")


def _finish_panel(ax, panel, notes: dict | None, *, logx: bool, logy: bool, hline: float | None,
                  note_at: str) -> None:
    """Scales and reference line (`_axes_style`), the panel's title, and its note in the top `note_at` corner."""
    _axes_style(ax, logx=logx, logy=logy, hline=hline)
    if panel is not None:
        ax.set_title(str(panel))
    if notes and panel in notes:
        ax.text(0.98 if note_at == "right" else 0.02, 0.98, notes[panel], transform=ax.transAxes, fontsize=7,
                va="top", ha=note_at, color="#555555")


def _figure_legend(fig, axes, **kw) -> None:
    """One legend for the figure, outside on the right, from the first panel's entries."""
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, **kw)


def points_ci(df: pd.DataFrame, *, x: str, y: str, hue: str, low: str | None = "ci_low", high: str | None = "ci_high",
              col: str | None = None, logx: bool = False, logy: bool = False, hline: float | None = None,
              xlabel: str | None = None, ylabel: str | None = None, notes: dict | None = None,
              col_wrap: int = 3) -> Figure:
    """Points of `y` against `x` with CI bars (none when `low` is None), joined per `hue` in order of `x`; a panel
    per `col`; an optional horizontal reference line and a note (text) per panel. Rows whose `source` column (if
    any) starts with "record" are drawn hollow (read from a committed record, not measured in this run)."""
    panels = list(pd.unique(df[col])) if col else [None]
    fig, axes = _panels(len(panels), col_wrap, (4.2, 3.2), sharex=False, sharey=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        sub_panel = df if panel is None else df[df[col] == panel]
        for h in pd.unique(sub_panel[hue]):
            sub = sub_panel[sub_panel[hue] == h].sort_values(x)
            err = np.vstack([(sub[y] - sub[low]).clip(lower=0), (sub[high] - sub[y]).clip(lower=0)]) if low else None
            ax.errorbar(sub[x], sub[y], yerr=err, color=color(str(h)), label=name(str(h)), marker="o", ms=3.5,
                        lw=1.1, capsize=2)
            if "source" in sub:  # points read from a committed record rather than measured here: hollow
                read = sub[sub.source.astype(str).str.startswith("record")]
                ax.plot(read[x], read[y], "o", ms=3.5, mfc="white", mec=color(str(h)), zorder=3)
        _finish_panel(ax, panel, notes, logx=logx, logy=logy, hline=hline, note_at="right")
    _label(axes, len(panels), xlabel or x, ylabel or y)
    _figure_legend(fig, axes)
    return fig


def xy(df: pd.DataFrame, *, x: str, y: str, hue: str, col: str | None = None, logx: bool = False,
       logy: bool = False, diagonal: bool = False, hline: float | None = None, xlabel: str | None = None,
       ylabel: str | None = None, notes: dict | None = None, col_wrap: int = 3) -> Figure:
    """Points of `y` against `x` per `hue` (house colors; seaborn's palette for other values), a panel per `col`,
    with an optional y = x line (`diagonal`), a horizontal line and a note per panel."""
    panels = list(pd.unique(df[col])) if col else [None]
    hues = list(pd.unique(df[hue]))
    palette = dict(zip(hues, sns.color_palette("colorblind", len(hues)), strict=True))
    fig, axes = _panels(len(panels), col_wrap, (3.8, 3.2), sharex=False, sharey=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        sub_panel = df if panel is None else df[df[col] == panel]
        for h in hues:
            sub = sub_panel[sub_panel[hue] == h]
            c = color(str(h)) if str(h) in COLORS or base(str(h)) in COLORS else palette[h]
            ax.scatter(sub[x], sub[y], s=6, alpha=0.45, lw=0, color=c, label=name(str(h)))
        if diagonal:
            both = pd.concat([sub_panel[x], sub_panel[y]])
            both = both[both > 0] if (logx or logy) else both
            lo, hi = both.min(), both.max()
            ax.plot([lo, hi], [lo, hi], color="#555555", lw=0.8, ls="--")
        _finish_panel(ax, panel, notes, logx=logx, logy=logy, hline=hline, note_at="left")
    _label(axes, len(panels), xlabel or x, ylabel or y)
    _figure_legend(fig, axes, markerscale=2)
    return fig


def arrows(df: pd.DataFrame, *, x: str, y: str, label: str, base_x: str, base_y: str, ax=None,
           xlabel: str | None = None, ylabel: str | None = None, logx: bool = False, logy: bool = False,
           hline: float | None = None, note: str = "") -> Figure:
    """One arrow per row from (`base_x`, `base_y`) to (`x`, `y`), its end labelled by `label`."""
    fig, ax = _axes(ax, (5.6, 4.0))
    for _, row in df.iterrows():
        ax.annotate("", xy=(row[x], row[y]), xytext=(row[base_x], row[base_y]),
                    arrowprops=dict(arrowstyle="->", color="#555555", lw=1.0))
        ax.plot(row[x], row[y], "o", color="#c0392b", ms=4)
        ax.annotate(str(row[label]), (row[x], row[y]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.plot(df[base_x], df[base_y], "s", color="#212121", ms=6, label="base SAE")
    _axes_style(ax, logx=logx, logy=logy, hline=hline)
    if note:
        ax.text(0.02, 0.98, note, transform=ax.transAxes, fontsize=7, va="top", color="#555555")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.legend(fontsize=7, loc="lower right")
    return fig
