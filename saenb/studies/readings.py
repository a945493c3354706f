"""Readings: a study's verdicts as data, one row per claim, and the paragraph a notebook displays.

    rows = [readings.claim("the SAE splice is worse than eps-random at every layer", "CI above 1 at 6 of 6 layers",
                           holds=True, published="2.2-4.5x on GPT-2 small (Gurnee 2024)")]
    frame = readings.frame(rows)          # columns: claim, published, here, holds
    readings.markdown(frame)              # "**Reading.** ..." (the report collects these from executed notebooks)

A claim is no stronger than its CIs: "largest" only where the largest one's CI clears every other's, "above 1"
only where the CI's lower bound is; a share outside [0, 1] is said to be one. `holds` is None for a statement that
only reports numbers.
"""

from __future__ import annotations

import pandas as pd

COLUMNS = ["claim", "published", "here", "holds"]


def claim(claim: str, here: str, *, holds: bool | None = None, published: str = "") -> dict:
    """One reading: what is claimed, this run's numbers behind it, the published figure it is set against."""
    return {"claim": claim, "here": here, "published": published, "holds": None if holds is None else bool(holds)}


def frame(rows: list[dict]) -> pd.DataFrame:
    """The readings frame of `claim` rows (column `holds`: True, False or None)."""
    return pd.DataFrame(rows, columns=COLUMNS).astype({"holds": object})


def markdown(readings: pd.DataFrame, lead: str = "") -> str:
    """"**Reading.**" and `lead`, then a list: each claim with its verdict, its numbers and the published figure."""
    items = []
    for r in readings.itertuples(index=False):
        verdict = "" if r.holds is None else f"**{'holds' if r.holds else 'does not hold'}**, "
        published = f" Published: {r.published}." if r.published else ""
        items.append(f"- {r.claim[0].upper()}{r.claim[1:]}: {verdict}{r.here}.{published}")
    return "\n".join([" ".join(["**Reading.**", *([lead] if lead else [])]), "", *items])


def share(value: float) -> str:
    """A share of a gap as a percentage, said to be outside [0, 100%] when it is (a baseline more harmful than the
    SAE itself accounts for "more than all" of its gap; one less harmful than eps-random for "less than none")."""
    if value != value:
        return "undefined (no gap)"
    if value > 1:
        return f"{value:.0%} (more than all of it)"
    if value < 0:
        return f"{value:.0%} (less than none of it)"
    return f"{value:.0%}"


def span(values, fmt: str = "{:.2f}", unit: str = "") -> str:
    """"low-high" of a series ("1.21-1.45x"), or its one value."""
    low, high = min(values), max(values)
    return fmt.format(low) + unit if low == high else f"{fmt.format(low)}-{fmt.format(high)}{unit}"


def largest(estimates: pd.Series, low: pd.Series, high: pd.Series) -> tuple[object, list]:
    """The index of the largest estimate, and the others whose CI reaches its CI's lower bound (none: it is the
    largest as far as the CIs tell)."""
    top = estimates.idxmax()
    others = high.drop(top)
    return top, list(others[others >= low[top]].index)


def overlap(top, others: list) -> str:
    """`top`, and whether its CI clears the others' (`largest`'s result as words)."""
    if not others:
        return f"{top} (its CI clears every other's)"
    return f"{top} by its estimate, but its CI overlaps those of {', '.join(map(str, others))}"
