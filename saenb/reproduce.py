"""Run the numbered notebooks headlessly with papermill: `python -m saenb reproduce [--quick]`.

Executed copies go to data/runs/<preset>/ (git-ignored); a failing notebook is named with its failing
cell and the others still run. The notebooks save their figures under figures/<preset>/; the report
(`saenb.report`) is written from them at the end. `measure` results are cached (data/results/), so a
second run only redraws.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
RUNS = REPO / "data" / "runs"
KERNEL = "saenb"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks, in order; `only` keeps those whose number or name is listed ("01", "3",
    "01_replication")."""
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {o.removesuffix(".ipynb").split("_")[0].zfill(2) for o in only}
        unknown = wanted - {p.name[:2] for p in found}
        if unknown:
            raise ValueError(f"no notebook numbered {sorted(unknown)}; notebooks: {[p.name for p in found]}")
        found = [p for p in found if p.name[:2] in wanted]
    return found


def kernel_name() -> str:
    """The `saenb` kernel when it is registered for this very interpreter (make venv registers it), else
    ipykernel's built-in `python3`, which runs the current interpreter: a `saenb` kernel registered by
    another checkout must not run these notebooks with that checkout's package."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv = KernelSpecManager().get_kernel_spec(KERNEL).argv
    except NoSuchKernel:
        return "python3"
    ours = os.path.exists(argv[0]) and os.path.samefile(argv[0], sys.executable)
    return KERNEL if ours else "python3"


@dataclass
class Outcome:
    notebook: str
    ok: bool
    output: Path
    error: str = ""
    seconds: float = 0.0


def reproduce(preset: str = "tiny-stdlib", only: list[str] | None = None, parameters: dict | None = None, *,
              quick: bool = False, report: bool = True) -> list[Outcome]:
    """Run the notebooks (`quick`: each with its `quick` parameter on: a few contexts, for smoke runs and CI)."""
    import papermill as pm

    todo = notebooks(only)
    if not todo:
        print(f"No numbered notebooks in {NOTEBOOKS} yet: nothing to run.")
        return []
    out_dir = RUNS / preset
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    kernel = kernel_name()
    params = {"preset": preset, **({"quick": True} if quick else {}), **(parameters or {})}
    for path in tqdm(todo, desc=f"notebooks ({preset})", unit="nb"):
        output = out_dir / path.name
        t0 = time.time()
        try:
            pm.execute_notebook(str(path), str(output), parameters=params, kernel_name=kernel, cwd=str(NOTEBOOKS),
                                progress_bar=False)
            outcomes.append(Outcome(path.name, True, output, seconds=time.time() - t0))
        except pm.PapermillExecutionError as exc:
            outcomes.append(Outcome(path.name, False, output, f"cell {exc.exec_count}: {exc.ename}: {exc.evalue}",
                                    time.time() - t0))
    for o in outcomes:
        detail = f"\n       {o.error}" if o.error else ""
        print(f"{'ok    ' if o.ok else 'FAILED'} {o.notebook} ({o.seconds / 60:.1f} min) -> {o.output}{detail}")
    if report and any(o.ok for o in outcomes):
        from saenb.report import write_report

        md, html = write_report(preset)
        print(f"report: {md}\n        {html}")
    return outcomes
