"""Where the repository keeps its files, atomic writes (a killed writer never leaves half a file where a reader, or a
resumed run, looks), file hashes, and the package's version."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

__version__ = "0.4.0"
"""The package's version, kept equal to pyproject.toml's (a test holds them together); part of every cache key."""

REPO = Path(__file__).resolve().parents[1]
"""The repository's root (data/, figures/, notebooks/ lie under it); installed from a wheel, the site-packages
folder, where no bundle lies: SAENB_BUNDLES then points at a clone's."""
BUNDLES = Path(os.environ.get("SAENB_BUNDLES", REPO / "data" / "bundles"))
"""Where a bundle preset's relative `bundle` folder is looked for: SAENB_BUNDLES, or data/bundles of this clone."""
NOTEBOOKS = REPO / "notebooks"
"""The numbered notebooks."""
NOTEBOOK_RUNS = REPO / "data" / "runs"
"""Where executed copies of the notebooks go (`runs_dir`), unless SAENB_RUNS names another folder."""
RESULTS = Path(os.environ.get("SAENB_RESULTS", REPO / "data" / "results"))
"""Where computed results are cached (measurements, fitted parts, token contexts): SAENB_RESULTS, or data/results."""


def runs_dir(preset: str, *, quick: bool = False) -> Path:
    """Where the executed copies of one kind of run go (quick runs apart from full ones, as their figures): under
    SAENB_RUNS, read at each call (a test or a second run points it at a temporary folder), or data/runs."""
    root = Path(os.environ.get("SAENB_RUNS", NOTEBOOK_RUNS))
    return root / preset / "quick" if quick else root / preset


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


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class BundleError(RuntimeError):
    """A bundle (or a pretrained model's file) is missing, incomplete or corrupted; the message names the fix."""
