"""Where the repository keeps its files, and atomic writes: a killed writer never leaves half a file where a reader
(or a resumed run) looks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository's root (data/, figures/, notebooks/ lie under it)."""
RESULTS = Path(os.environ.get("SAENB_RESULTS", REPO / "data" / "results"))
"""Where computed results are cached (measurements, fitted parts, token contexts): SAENB_RESULTS, or data/results."""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on leaving the block without an error it replaces
    `path` (`os.replace` is atomic on one filesystem), otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
