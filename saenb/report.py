"""The blog report: every saved figure with its caption, and the headline numbers, from the saved frames.

    python -m saenb report --preset tiny-stdlib     # also run at the end of `python -m saenb reproduce`

Writes `figures/<preset>/report.md` (figures linked) and `figures/<preset>/report.html` (one self-contained
page: figures embedded as base64 PNG). Everything in it is read back from what the notebooks saved with
`plots.save_figure` (figures.json captions, PNGs, CSVs), never recomputed from a model.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pandas as pd
from markdown_it import MarkdownIt

from saenb.files import write_text
from saenb.plots import FIGURES

HEADLINES = {"01_replication": ("ratio_by_layer", {}), "05_attention_saes": ("ratio_by_layer", {"family": "z"})}
"""Per notebook, the saved figure whose frame (columns layer, metric, ratio, ci_low, ci_high), restricted to the
rows whose columns equal the given values, makes a headline table of the report."""

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 980px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.5; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th { background: #f4f4f4; }
figure { margin: 1.5em 0; }
figcaption, .caption { color: #555; font-size: 0.92em; }
"""


def headline_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Ratios with CIs as text, one row per layer, one column per metric ("2.31 [2.10, 2.55]")."""
    text = frame.assign(value=[f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in
                               zip(frame["ratio"], frame["ci_low"], frame["ci_high"], strict=True)])
    table = text.pivot(index="layer", columns="metric", values="value")
    table = table[sorted(table.columns, key=lambda c: c != "kl")]  # KL, the headline, first
    table.columns = [f"SAE / eps-random {'KL' if c == 'kl' else 'CE delta'} (95% CI)" for c in table.columns]
    return table.reset_index()


def notebook_dirs(preset: str, root: Path = FIGURES) -> list[Path]:
    return sorted(p for p in (Path(root) / preset).glob("[0-9][0-9]_*") if (p / "figures.json").exists())


def build_markdown(preset: str, root: Path = FIGURES, *, embed: bool = False) -> str:
    """The report as markdown; `embed` puts each PNG inline as a data URI (for the self-contained HTML)."""
    folders = notebook_dirs(preset, root)
    if not folders:
        raise FileNotFoundError(f"no saved figures under {Path(root) / preset}; run the notebooks first: "
                                f"python -m saenb reproduce --preset {preset}")
    lines = [f"# SAE reconstruction errors are pathological: {preset}", ""]
    lines += ["Every figure below was produced by the workbook's notebooks "
              f"(`python -m saenb reproduce --preset {preset}`); its data is the CSV beside it.", ""]
    for folder in folders:
        name, where = HEADLINES.get(folder.name, (None, {}))
        if name and (folder / f"{name}.csv").exists():
            frame = pd.read_csv(folder / f"{name}.csv")
            for column, value in where.items():
                frame = frame[frame[column] == value]
            table = headline_table(frame)
            scope = "".join(f", {column} {value}" for column, value in where.items())
            lines += [f"## Headline numbers ({folder.name}{scope})", "", table.to_markdown(index=False), ""]
    for folder in folders:
        lines += [f"## {folder.name.replace('_', ' ', 1)}", ""]
        for fig_name, entry in json.loads((folder / "figures.json").read_text()).items():
            lines += [f"### {fig_name.replace('_', ' ')}", ""]
            if "html" in entry:  # a table: its HTML fragment goes in as it is
                lines += [(folder / entry["html"]).read_text().strip(), ""]
            else:
                png = folder / entry["png"]
                src = ("data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()) if embed \
                    else f"{folder.name}/{entry['png']}"
                lines += [f"![{fig_name}]({src})", ""]
            if entry.get("caption"):
                lines += [f"*{entry['caption']}*", ""]
            lines += [f"Data: [`{folder.name}/{entry['csv']}`]({folder.name}/{entry['csv']})", ""]
    return "\n".join(lines)


def write_report(preset: str = "tiny-stdlib", root: Path = FIGURES) -> tuple[Path, Path]:
    """Write report.md and the self-contained report.html under figures/<preset>/; returns both paths."""
    out = Path(root) / preset
    md_path, html_path = out / "report.md", out / "report.html"
    write_text(md_path, build_markdown(preset, root))
    body = MarkdownIt("commonmark").enable("table").render(build_markdown(preset, root, embed=True))
    html = (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>saenb report: {preset}</title>"
            f"<style>{CSS}</style></head><body>\n{body}</body></html>\n")
    write_text(html_path, html)
    return md_path, html_path

