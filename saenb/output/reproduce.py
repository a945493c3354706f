"""Run the numbered notebooks headlessly with papermill: `python -m saenb reproduce [--quick]`.

Executed copies go to data/runs/<preset>/ (git-ignored; quick runs to data/runs/<preset>/quick/); a failing
notebook is named with its failing cell and the others still run. The notebooks save their figures under
figures/<preset>/ (quick runs: figures/<preset>/quick/); the report (`saenb.output.report`) is written from them and
from the executed copies' readings at the end. `measure` results are cached (data/results/), so a second run
only redraws.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import papermill as pm
from ipykernel.ipkernel import IPythonKernel
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpec
from nbclient.exceptions import CellTimeoutError
from tqdm.auto import tqdm
from traitlets.config import Config

from saenb.checks import UsageError, writable_folder
from saenb.files import NOTEBOOKS, runs_dir
from saenb.models.presets import get_preset
from saenb.output.plots import run_dir
from saenb.output.report import write_report

KERNEL = "saenb"


def cell_timeout() -> int | None:
    """Seconds a cell may run before its notebook is stopped and run once more (SAENB_CELL_TIMEOUT; none by
    default: a real model's cell may run for hours). The notebook tests set one: a kernel's reply lost between
    kernel and client (seen once here, both sides idle in epoll_wait; nteract/papermill#711 and
    jupyter/jupyter_client#922 report the same) would otherwise hold the run forever. Results are cached, so the
    second run only redraws what the first finished."""
    value = os.environ.get("SAENB_CELL_TIMEOUT")
    return int(value) if value else None

def kernel_language_info() -> dict:
    """The `language_info` the kernel reports and JupyterLab writes into a notebook when it opens one."""
    return dict(IPythonKernel.language_info)


def stored_form(nb) -> str:
    """A notebook as it is committed: without outputs or execution counts, with the kernel's `language_info`
    (which JupyterLab fills in on opening: a notebook stored with less is marked modified as soon as it is
    opened), serialised as Jupyter's contents manager writes it (nbformat, one-space indent, sorted keys)."""
    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata["language_info"] = kernel_language_info()
    text = nbformat.writes(nb, version=nbformat.NO_CONVERT)
    return text if text.endswith("\n") else text + "\n"


def store_notebooks() -> list[Path]:
    """Rewrite the numbered notebooks in their stored form; returns those that changed."""
    changed = []
    for path in notebooks():
        text = stored_form(nbformat.read(path, as_version=nbformat.NO_CONVERT))
        if path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks, in order; `only` keeps those whose number or name is listed ("01", "3",
    "01_replication")."""
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {o.removesuffix(".ipynb").split("_")[0].zfill(2) for o in only}
        unknown = wanted - {p.name[:2] for p in found}
        if unknown:
            raise UsageError(f"no notebook numbered {sorted(unknown)}; pass numbers of {[p.name for p in found]} "
                             "(e.g. --only 01,03)")
        found = [p for p in found if p.name[:2] in wanted]
    return found


def this_kernel() -> KernelSpec:
    """The `saenb` kernel as this very interpreter runs it (what `make venv` registers inside the virtual
    environment, `ipykernel install --sys-prefix`)."""
    return KernelSpec(name=KERNEL, argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                      display_name="saenb (.venv)", language="python")


class ThisInterpreterKernelManager(AsyncKernelManager):
    """Starts `this_kernel()` whatever kernel name it is given, without looking in any Jupyter folder: a `saenb` (or
    `python3`) kernelspec that another checkout, or another Python, registered for the user must not run these
    notebooks with that checkout's package and write into its folders."""

    @property
    def kernel_spec(self) -> KernelSpec:
        if self._kernel_spec is None:
            self._kernel_spec = this_kernel()
        return self._kernel_spec


@dataclass
class Outcome:
    notebook: str
    ok: bool
    output: Path
    error: str = ""
    seconds: float = 0.0


def check(preset: str, only: list[str] | None = None, *, quick: bool = False) -> list[Path]:
    """What `reproduce` would run, checked before anything runs: the preset is registered, the notebook numbers
    exist and apply to the preset (those that do not are left out, and said why; one asked for by number is an
    error), and the folders the runs and figures go to can be written; a `UsageError` names the fix."""
    spec = get_preset(preset)
    todo = notebooks(only)
    left_out = [p for p in todo if p.name[:2] in spec.not_applicable]
    if only and left_out:
        raise UsageError("; ".join(f"notebook {p.name} does not apply to preset {preset!r}: "
                                   f"{spec.not_applicable[p.name[:2]]}" for p in left_out)
                         + "; leave it out of --only, or run it on tiny-stdlib")
    for p in left_out:
        print(f"left out {p.name}: it does not apply to preset {preset!r} ({spec.not_applicable[p.name[:2]]})")
    todo = [p for p in todo if p not in left_out]
    writable_folder(runs_dir(preset, quick=quick), "the executed notebooks' folder")
    writable_folder(run_dir(preset, quick=quick), "the figures' folder (SAENB_FIGURES)")
    return todo


def reproduce(preset: str = "tiny-stdlib", only: list[str] | None = None, parameters: dict | None = None, *,
              quick: bool = False, report: bool = True) -> list[Outcome]:
    """Run the notebooks (`quick`: each with its `quick` parameter on: a few contexts, for smoke runs and CI)."""
    todo = check(preset, only, quick=quick)
    if not todo:
        print(f"No numbered notebooks in {NOTEBOOKS} yet: nothing to run.")
        return []
    out_dir = runs_dir(preset, quick=quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    params = {"preset": preset, **({"quick": True} if quick else {}), **(parameters or {})}
    # the kernel on Unix-domain sockets (IPC): nothing listens on a TCP port, and ipykernel has nothing to warn
    # about (over TCP it logs "Kernel is running over TCP without encryption" into every run's log). Their paths are
    # absolute, in a folder of this run's own: jupyter_client's default, "kernel-ipc-N" relative to the working
    # folder, is shared by every run started there, and a stale socket file of a killed kernel is reused
    sockets = Path(tempfile.mkdtemp(prefix="saenb-kernel-")) if os.name == "posix" else None
    for path in tqdm(todo, desc=f"notebooks ({preset}{', quick' if quick else ''})", unit="nb"):
        ipc = {"KernelManager": {"transport": "ipc", "ip": str(sockets / path.stem)}} if sockets else {}
        config = Config(ipc)
        output = out_dir / path.name
        t0 = time.time()
        for attempt in (1, 2):
            try:
                pm.execute_notebook(str(path), str(output), parameters=params, kernel_name=KERNEL,
                                    cwd=str(NOTEBOOKS), progress_bar=False, config=config,
                                    kernel_manager_class=ThisInterpreterKernelManager,
                                    execution_timeout=cell_timeout())
                outcomes.append(Outcome(path.name, True, output, seconds=time.time() - t0))
            except pm.PapermillExecutionError as exc:
                outcomes.append(Outcome(path.name, False, output, f"cell {exc.exec_count}: {exc.ename}: "
                                        f"{exc.evalue}", time.time() - t0))
            except CellTimeoutError as exc:
                if attempt == 1:
                    print(f"{path.name}: a cell ran past SAENB_CELL_TIMEOUT={cell_timeout()} s; running it again")
                    continue
                outcomes.append(Outcome(path.name, False, output, f"timed out twice: {exc}", time.time() - t0))
            break
    if sockets:
        shutil.rmtree(sockets, ignore_errors=True)
    for o in outcomes:
        detail = f"\n       {o.error}" if o.error else ""
        print(f"{'ok    ' if o.ok else 'FAILED'} {o.notebook} ({o.seconds / 60:.1f} min) -> {o.output}{detail}")
    if report and any(o.ok for o in outcomes):
        md, html = write_report(preset, quick=quick, runs=out_dir)
        print(f"report: {md}\n        {html}")
    return outcomes
