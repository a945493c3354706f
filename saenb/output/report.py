"""The report, written as a blog post from what the notebooks saved: title, summary with the numbers, one section
per notebook (its question, its computed readings, its figures and tables), methods.

    python -m saenb report --preset tiny-stdlib [--quick]   # also run at the end of `python -m saenb reproduce`

Writes `figures/<preset>/report.md` (images as files beside it: it pastes into LessWrong / the Alignment Forum) and
`figures/<preset>/report.html` (one self-contained page, figures embedded as base64 PNG); a quick run's report goes
to figures/<preset>/quick/ and says so. Everything in it is read back, never recomputed from a model: captions and
titles from each notebook folder's figures.json, numbers from the CSVs beside the figures, readings from the
executed notebooks in data/runs/<preset>/ (their "**Reading.**" markdown outputs), questions from the notebooks.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.metadata as md
import io
import json
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import nbformat
import pandas as pd
from markdown_it import MarkdownIt
from PIL import Image  # Pillow: matplotlib's own dependency

from saenb.checks import writable_folder
from saenb.files import NOTEBOOKS, REPO, runs_dir, write_text
from saenb.models.presets import get_preset
from saenb.output.plots import FIGURES, run_dir, short_title
from saenb.studies import literature
from saenb.studies import readings as rd

HEADLINES = {"01_replication": ("ratio_by_layer", {}), "05_attention_saes": ("ratio_by_layer", {"family": "z"})}
"""Per notebook, the saved figure whose frame (columns layer, metric, ratio, ci_low, ci_high), restricted to the
rows whose columns equal the given values, makes a headline table of the report."""

VERSIONS = ("saenb", "torch", "sae-lens", "transformer-lens", "transformers", "numpy", "pandas")

CSS = """
body { font-family: Georgia, "Times New Roman", serif; max-width: 46em; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.6; font-size: 17px; }
h1, h2, h3 { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; line-height: 1.25; }
h1 { font-size: 1.9em; } h2 { margin-top: 2.2em; border-bottom: 1px solid #ddd; } h3 { font-size: 1.05em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.8em; display: block; max-width: 100%;
        overflow-x: auto; font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; }
code { font-size: 0.88em; background: #f6f6f6; padding: 0 0.2em; overflow-wrap: anywhere; }
blockquote { border-left: 3px solid #c33; margin: 1em 0; padding: 0.2em 1em; background: #fff6f6; }
em { color: #555; }
@media (max-width: 600px) { body { font-size: 15px; padding: 0 0.6em; margin: 1em auto; } }
"""


# ------------------------------------------------------------------------------------------- sources
def notebook_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*") if (p / "figures.json").exists())


def _csv(folder: Path, notebook: str, name: str) -> pd.DataFrame | None:
    path = folder / notebook / f"{name}.csv"
    return pd.read_csv(path) if path.exists() else None


def _notebook(name: str, runs: Path | None) -> tuple[nbformat.NotebookNode | None, nbformat.NotebookNode | None]:
    """(the notebook as committed, its executed copy in `runs` or None)."""
    source = NOTEBOOKS / f"{name}.ipynb"
    executed = Path(runs) / f"{name}.ipynb" if runs else None
    read = lambda p: nbformat.read(p, as_version=4) if p is not None and p.exists() else None  # noqa: E731
    return read(source), read(executed)


def heading_and_question(nb: nbformat.NotebookNode | None, name: str) -> tuple[str, str]:
    """The notebook's title (its first heading without the number) and its **Question.** paragraph."""
    if nb is None or not nb.cells or nb.cells[0].cell_type != "markdown":
        return name.replace("_", " "), ""
    text = nb.cells[0].source
    title = re.search(r"^#\s+(?:\d+\s*·\s*)?(.+)$", text, re.M)
    question = re.search(r"\*\*Question\.\*\*(.+?)(?:\n\s*\n|$)", text, re.S)
    return (title[1].strip() if title else name.replace("_", " "),
            " ".join(question[1].split()) if question else "")


def readings(nb: nbformat.NotebookNode | None) -> list[str]:
    """The executed notebook's computed readings: its markdown outputs that start with **Reading."""
    found = []
    for cell in (nb.cells if nb is not None else []):
        for out in cell.get("outputs", []):
            text = out.get("data", {}).get("text/markdown", "")
            text = "".join(text) if isinstance(text, list) else text
            if text.lstrip().startswith("**Reading"):
                found.append(text.strip())
    return found


def run_facts(nb: nbformat.NotebookNode | None) -> dict:
    """What an executed notebook ran with: papermill's injected parameters, its run time, and the first line it
    printed (the setup cell's "<preset>: 6 residual SAEs, 512 contexts x 128 tokens")."""
    if nb is None:
        return {}
    pm = nb.metadata.get("papermill", {})
    printed = next((line for cell in nb.cells for out in cell.get("outputs", [])
                    if out.get("output_type") == "stream" and out.get("name") == "stdout"
                    for line in "".join(out.get("text", "")).splitlines()
                    if line.strip() and not line.startswith("Moving model")), "")
    return {"parameters": pm.get("parameters", {}), "seconds": pm.get("duration"), "printed": printed}


# ------------------------------------------------------------------------------------------- summary
def _span(values: pd.Series, fmt: str = "{:.2f}") -> str:
    lo, hi = values.min(), values.max()
    return fmt.format(lo) if abs(hi - lo) < 5e-3 else f"{fmt.format(lo)}-{fmt.format(hi)}"


def _replication(folder: Path) -> str | None:
    r = _csv(folder, "01_replication", "ratio_by_layer")
    if r is None:
        return None
    r = r[r.metric == "kl"]
    low, high = literature.GURNEE_RESID.value
    return (f"Splicing an SAE's reconstruction into the residual stream moves the next-token distribution "
            f"**{_span(r.ratio)}x** as far (KL divergence) as a random error of the same size, across "
            f"{len(r)} layers; the 95% CI excludes 1 at {(r.ci_low > 1).sum()} of them (the original study: "
            f"{low}-{high}x on GPT-2 small).")


def _single_token(folder: Path) -> str | None:
    r = _csv(folder, "02_single_token", "kl_at_offsets_0_1")
    if r is None or not {"offset", "intervention", "ratio"} <= set(r.columns):
        return None
    at = r[(r.offset == 0) & (r.intervention == "sae")]
    return f"Patched at one position only, the ratio at that token is {_span(at.ratio)}x." if len(at) else None


def _hypersphere(folder: Path) -> str | None:
    z = _csv(folder, "03_hypersphere", "z_scores")
    if z is None or "z" not in z:
        return None
    return (f"Placed among random errors of its size drawn for the same token, the SAE's KL has a median z-score of "
            f"{z.z.median():.1f} over {len(z)} tokens, and lies beyond the draws' 99th percentile for "
            f"{(z.percentile >= 0.99).mean():.0%} of them.")


def _attention(folder: Path) -> str | None:
    r = _csv(folder, "05_attention_saes", "ratio_by_layer")
    if r is None:
        return None
    r = r[(r.family == "z") & (r.metric == "kl")]
    return f"Attention-output (hook_z) SAEs show it too: {_span(r.ratio)}x." if len(r) else None


def _fixes(folder: Path) -> str | None:
    """The range of the ratio over the SAEs scored, the dose-response (each architecture's ratio at its lowest and
    highest L0) and the fix that cuts the ratio most, named as the largest only where its CI clears the others'."""
    table, effects = _csv(folder, "08_fixes", "score_table"), _csv(folder, "08_fixes", "fix_effects")
    if table is None or effects is None or not len(effects):
        return None
    dose = []
    for group, label in (("l1", "ReLU + L1"), ("topk", "TopK"), ("batchtopk", "BatchTopK")):
        sub = table[table.group == group].sort_values("l0")
        if len(sub) >= 2:
            dose.append(f"{label} {sub.ratio.iloc[0]:.2f}x at L0 {sub.l0.iloc[0]:.0f} to {sub.ratio.iloc[-1]:.2f}x at "
                        f"L0 {sub.l0.iloc[-1]:.0f}")
    fixed = table[table.base.fillna("") != ""].set_index("name")
    best, overlapping = rd.largest(-fixed.ratio, -fixed.ratio_ci_high, -fixed.ratio_ci_low)
    change = effects.set_index("fix").ratio_change
    r = fixed.loc[best]
    which = (f"{best} cuts the ratio most" if not overlapping else
             f"{best} cuts the ratio most but is not separated from {', '.join(overlapping)}")
    return (f"Scored on one footing, {len(table)} SAEs and fixes at one hook range from {table.ratio.min():.2f}x to "
            f"{table.ratio.max():.2f}x" + (f"; by L0: {'; '.join(dose)}" if dose else "")
            + f". Of the fixes of the base SAE, {which} ({r.ratio:.2f}x [{r.ratio_ci_low:.2f}, {r.ratio_ci_high:.2f}], "
            f"{change[best]:+.0%} against the base).")


def _why(folder: Path) -> str | None:
    """Per layer, the explanation with the largest share of the gap, named only where its CI clears the others'
    ("not separated" otherwise); shares with their CIs and, outside [0, 100%], what that means. Never averaged
    over layers (each layer's shares are read against that layer's ratio)."""
    account = _csv(folder, "09_why", "accounting")
    need = {"layer", "explanation", "share_of_gap", "share_ci_low", "share_ci_high", "note"}
    if account is None or not need <= set(account.columns):
        return None
    account = account.assign(note=account.note.fillna(""))
    parts = []
    for layer, shares in account.groupby("layer", sort=True):
        est = shares.set_index("explanation")
        top, others = rd.largest(est.share_of_gap, est.share_ci_low, est.share_ci_high)

        def text(name: str) -> str:
            r = est.loc[name]
            note = f": {r.note}" if r.note else ""
            return f"{name} {r.share_of_gap:.0%} [{r.share_ci_low:.0%}, {r.share_ci_high:.0%}]{note}"

        if others:
            listed = "; ".join(map(text, [top, *others]))
            parts.append(f"at layer {layer} the largest is not separated from the next ({listed})")
        else:
            parts.append(f"at layer {layer} {text(top)} accounts for the largest share, its CI clear of the others'")
    return ("Of the explanations tested for why (each a share of the log gap to eps-random on the same tokens, "
            f"95% CIs, per layer): {'; '.join(parts)}.")


FINDINGS: tuple[Callable[[Path], str | None], ...] = (_replication, _single_token, _hypersphere, _attention, _fixes,
                                                     _why)
"""One sentence of the summary each, read from a notebook's saved frames (None when that notebook did not run)."""


def summary(folder: Path) -> str:
    return " ".join(s for s in (f(folder) for f in FINDINGS) if s)


def headline_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Ratios with CIs as text, one row per layer, one column per metric ("2.31 [2.10, 2.55]")."""
    text = frame.assign(value=[f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in
                               zip(frame["ratio"], frame["ci_low"], frame["ci_high"], strict=True)])
    table = text.pivot(index="layer", columns="metric", values="value")
    table = table[sorted(table.columns, key=lambda c: c != "kl")]  # KL, the headline, first
    table.columns = [f"SAE / eps-random {'KL' if c == 'kl' else 'CE delta'} (95% CI)" for c in table.columns]
    return table.reset_index()


def embedded_png(path: Path) -> bytes:
    """A figure's PNG for the one-page HTML, with its colours reduced to a 256-colour palette (a line plot has far
    fewer): a quarter of the bytes, so that the page of every figure stays well under 5 MB."""
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def markdown_table(frame: pd.DataFrame) -> str:
    """A saved table as a markdown table (no raw HTML in the post): a cell's HTML (notebook 04's contexts) becomes
    text, line breaks as " ↵ ", highlighted tokens in bold."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        text = re.sub(r"<br\s*/?>", " ↵ ", str(v).replace("\n", " "))
        text = re.sub(r"<mark><b>(.*?)</b></mark>|<b>(.*?)</b>", lambda m: f"**{m[1] or m[2]}**", text)
        text = html.unescape(re.sub(r"<[^>]+>", "", text))
        return text.replace("|", "\\|")

    return frame.map(cell).to_markdown(index=False)


# ------------------------------------------------------------------------------------------- methods
def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            found["saenb commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def methods(preset: str, facts: dict[str, dict]) -> list[str]:
    p = get_preset(preset)
    lines = ["## Methods", ""]
    where = f"bundle `data/bundles/{p.bundle}`" if p.is_bundle else f"`{p.model_name}` from the Hugging Face hub"
    manifest = p.bundle_path / "manifest.json" if p.is_bundle else None
    digest = (f" (manifest sha256 `{hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]}`)"
              if manifest is not None and manifest.exists() else "")
    families = "; ".join(f"`{s.hook_template}`" + (f" from `{s.release}`" if s.release else "") for s in p.sae_sources)
    lines += [f"- **Preset** `{preset}`: {p.description}; {where}{digest}.",
              f"- **SAEs** at {families}; layers {', '.join(map(str, p.layers))}.",
              f"- **Tokens**: held-out contexts of {p.n_ctx} tokens, the first (BOS) never patched; every intervention "
              "of a run sees the same contexts. Random interventions are seeded (`seed` below) per sequence, so a "
              "rerun draws the same errors.",
              "- **Metric**: KL(clean || patched) of the next-token distribution per token, its SAE / eps-random ratio "
              "of means with 95% paired bootstrap CIs over contexts.", ""]
    if facts:
        lines += ["| notebook | ran on | parameters set | minutes |", "| --- | --- | --- | ---: |"]
        for name, f in facts.items():
            params = ", ".join(f"{k}={v!r}" for k, v in f.get("parameters", {}).items() if k != "preset") or "defaults"
            seconds = f.get("seconds")
            lines.append(f"| {name} | {f.get('printed', '').replace('|', '/')} | {params} | "
                         f"{'' if seconds is None else f'{seconds / 60:.1f}'} |")
        lines.append("")
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".", ""]
    return lines


# ------------------------------------------------------------------------------------------- the post
def build_markdown(preset: str, root: Path = FIGURES, *, quick: bool = False, runs: Path | None = None,
                   embed: bool = False) -> str:
    """The report as markdown; `embed` puts each PNG inline as a data URI (for the self-contained HTML)."""
    folder = run_dir(preset, root, quick=quick)
    runs = runs_dir(preset, quick=quick) if runs is None else Path(runs)
    folders = notebook_dirs(folder)
    if not folders:
        raise FileNotFoundError(f"no saved figures under {folder}; run the notebooks first: "
                                f"python -m saenb reproduce --preset {preset}{' --quick' if quick else ''}")
    lines = [f"# How pathological are SAE reconstruction errors? ({preset})", ""]
    if quick:
        full = run_dir(preset, root) / "report.md"
        full = full.relative_to(REPO) if full.is_relative_to(REPO) else full
        lines += [f"> **A quick run** (`reproduce --quick`: a few contexts per notebook, a smoke test). Its numbers "
                  f"are not results; the full run's report is `{full}`.", ""]
    found = summary(folder)
    lines += [f"**Summary.** {found}" if found else "**Summary.** (no headline notebook has run yet)", "",
              f"Every number and figure below was computed by the workbook's notebooks (`python -m saenb reproduce "
              f"--preset {preset}{' --quick' if quick else ''}`) and is read back here from the frames they saved; "
              "each figure's data is the CSV linked under it.", ""]
    for nb_folder in folders:
        name, where = HEADLINES.get(nb_folder.name, (None, {}))
        if name and (nb_folder / f"{name}.csv").exists():
            frame = pd.read_csv(nb_folder / f"{name}.csv")
            for column, value in where.items():
                frame = frame[frame[column] == value]
            scope = "".join(f", {column} {value}" for column, value in where.items())
            lines += [f"## Headline numbers ({nb_folder.name}{scope})", "",
                      headline_table(frame).to_markdown(index=False), ""]
    facts = {}
    for nb_folder in folders:
        source, executed = _notebook(nb_folder.name, runs)
        facts[nb_folder.name] = run_facts(executed)
        title, question = heading_and_question(source, nb_folder.name)
        lines += [f"## {nb_folder.name[:2]}. {title}", ""]
        if question:
            lines += [f"**Question.** {question}", ""]
        lines += [text + "\n" for text in readings(executed)]
        for fig_name, entry in json.loads((nb_folder / "figures.json").read_text()).items():
            lines += [f"### {entry.get('title') or short_title(entry.get('caption', ''), fig_name)}", ""]
            if "html" in entry:  # a table: its HTML fragment in the page, a markdown table in the post
                lines += [(nb_folder / entry["html"]).read_text().strip() if embed else
                          markdown_table(pd.read_csv(nb_folder / entry["csv"])), ""]
            else:
                png = nb_folder / entry["png"]
                src = ("data:image/png;base64," + base64.b64encode(embedded_png(png)).decode()) if embed \
                    else f"{nb_folder.name}/{entry['png']}"
                lines += [f"![{entry.get('title') or fig_name}]({src})", ""]
            if entry.get("caption"):
                lines += [f"*{entry['caption']}*", ""]
            lines += [f"Data: [`{nb_folder.name}/{entry['csv']}`]({nb_folder.name}/{entry['csv']})", ""]
    lines += methods(preset, {k: v for k, v in facts.items() if v})
    return "\n".join(lines)


def write_report(preset: str = "tiny-stdlib", root: Path = FIGURES, *, quick: bool = False,
                 runs: Path | None = None) -> tuple[Path, Path]:
    """Write report.md and the self-contained report.html beside the run's figures; returns both paths."""
    get_preset(preset)  # an unknown preset fails here, listing the known ones
    out = writable_folder(run_dir(preset, root, quick=quick), "the report's folder")
    md_path, html_path = out / "report.md", out / "report.html"
    write_text(md_path, build_markdown(preset, root, quick=quick, runs=runs))
    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(
        build_markdown(preset, root, quick=quick, runs=runs, embed=True))
    title = f"How pathological are SAE reconstruction errors? ({preset}{', quick run' if quick else ''})"
    page = (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{title}</title>"
            f"<style>{CSS}</style></head><body>\n{body}</body></html>\n")
    write_text(html_path, page)
    return md_path, html_path
