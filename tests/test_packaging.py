"""The package as a user installs it: the wheel holds the score CLI's JSON schema and the `saenb` console script,
the version is pyproject.toml's, and a bundle preset outside a clone names the environment variable to set."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import saenb
from saenb import files
from saenb.files import REPO, BundleError


def test_the_version_is_pyprojects():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert saenb.__version__ == files.__version__ == project["version"]
    assert project["scripts"]["saenb"] == "saenb.__main__:main"


def test_the_wheel_holds_the_schema_and_the_console_script(tmp_path):
    src = tmp_path / "src"  # a copy: a build in the clone would leave build/ and *.egg-info behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "saenb", src / "saenb", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(src),
                          "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("saenb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "saenb/studies/schemas/pathology.schema.json" in names, sorted(names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "saenb = saenb.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_a_bundle_preset_outside_a_clone_says_how_to_point_at_the_bundles(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "BUNDLES", tmp_path / "site-packages" / "data" / "bundles")
    with pytest.raises(BundleError, match=r"SAENB_BUNDLES=/path/to/saenb/data/bundles"):
        saenb.load_preset("tiny-stdlib")
