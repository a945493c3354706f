"""`reproduce` runs the notebooks with this checkout's interpreter, whatever kernelspecs the user's Jupyter folders
hold (a second clone's `make` once redirected the first clone's notebooks into its own tree)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_core.paths import jupyter_path

import saenb
from saenb.files import REPO
from saenb.output import reproduce as rep

PROBE = '''import json, sys, pathlib
import saenb
pathlib.Path("probe.json").write_text(json.dumps({"python": sys.executable, "saenb": saenb.__file__, "preset": preset}))
'''


def test_a_decoy_user_kernelspec_does_not_run_the_notebooks(tmp_path, monkeypatch):
    """A user-wide `saenb` (and `python3`) kernelspec pointing at another interpreter (here a script that only
    leaves a mark) is ignored: the notebook runs in this interpreter, imports this tree's saenb and writes where it
    was told."""
    home, data = tmp_path / "home", tmp_path / "home" / ".local" / "share" / "jupyter"
    decoy = tmp_path / "other-python"
    decoy.write_text(f"#!/bin/sh\ntouch {tmp_path / 'decoy-ran'}\nexit 1\n")
    decoy.chmod(decoy.stat().st_mode | stat.S_IXUSR)
    for name in (rep.KERNEL, "python3"):
        spec = data / "kernels" / name
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({"argv": [str(decoy), "-f", "{connection_file}"],
                                                      "display_name": "another checkout", "language": "python"}))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(data))
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "0")  # the user folder first, as outside a venv
    assert KernelSpecManager().get_kernel_spec(rep.KERNEL).argv[0] == str(decoy)  # what a name lookup would run

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('preset = "tiny-stdlib"',
                                                                   metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell(PROBE)])
    nb.metadata["kernelspec"] = {"name": rep.KERNEL, "display_name": "saenb (.venv)", "language": "python"}
    nbformat.write(nb, notebooks / "01_probe.ipynb")
    monkeypatch.setattr(rep, "NOTEBOOKS", notebooks)
    monkeypatch.setattr(rep, "runs_dir", lambda preset, quick=False: tmp_path / "runs")

    (outcome,) = rep.reproduce("tiny-stdlib", ["01"], quick=True, report=False)
    assert outcome.ok, outcome.error
    assert not (tmp_path / "decoy-ran").exists()
    probe = json.loads((notebooks / "probe.json").read_text())
    assert probe["python"] == sys.executable and probe["saenb"] == saenb.__file__
    assert probe["saenb"].startswith(str(REPO)) and probe["preset"] == "tiny-stdlib"
    assert (tmp_path / "runs" / "01_probe.ipynb").exists()


def test_the_venv_holds_the_kernel():
    """`make venv` registers `saenb` inside the virtual environment (`ipykernel install --sys-prefix`), for this
    interpreter, in a folder JupyterLab started from the venv looks in."""
    spec = Path(sys.prefix) / "share" / "jupyter" / "kernels" / rep.KERNEL / "kernel.json"
    if not spec.exists():
        pytest.skip(f"no {spec}: `make venv` registers it")
    assert os.path.samefile(json.loads(spec.read_text())["argv"][0], sys.executable)
    assert str(Path(sys.prefix) / "share" / "jupyter") in jupyter_path()
