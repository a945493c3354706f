"""Run the numbered notebooks headlessly with papermill: `python -m saenb reproduce`.

Executed copies go to data/runs/<preset>/ (git-ignored); a failing notebook is named with its failing
cell and the others still run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
RUNS = REPO / "data" / "runs"
KERNEL = "saenb"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks, in order; `only` keeps those whose number prefix is listed ("01", "3")."""
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {o.zfill(2) for o in only}
        unknown = wanted - {p.name[:2] for p in found}
        if unknown:
            raise ValueError(f"no notebook numbered {sorted(unknown)}; notebooks: {[p.name for p in found]}")
        found = [p for p in found if p.name[:2] in wanted]
    return found


def kernel_name() -> str:
    """The `saenb` kernel when registered (make venv does it), else the running Python's own kernel."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL if KERNEL in KernelSpecManager().find_kernel_specs() else "python3"


@dataclass
class Outcome:
    notebook: str
    ok: bool
    output: Path
    error: str = ""


def reproduce(preset: str = "tiny-stdlib", only: list[str] | None = None, parameters: dict | None = None) -> list[Outcome]:
    import papermill as pm

    todo = notebooks(only)
    if not todo:
        print(f"No numbered notebooks in {NOTEBOOKS} yet: nothing to run.")
        return []
    out_dir = RUNS / preset
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    kernel = kernel_name()
    for path in tqdm(todo, desc=f"notebooks ({preset})", unit="nb"):
        output = out_dir / path.name
        try:
            pm.execute_notebook(str(path), str(output), parameters={"preset": preset, **(parameters or {})},
                                kernel_name=kernel, cwd=str(NOTEBOOKS), progress_bar=False)
            outcomes.append(Outcome(path.name, True, output))
        except pm.PapermillExecutionError as exc:
            outcomes.append(Outcome(path.name, False, output, f"cell {exc.exec_count}: {exc.ename}: {exc.evalue}"))
    for o in outcomes:
        print(f"{'ok    ' if o.ok else 'FAILED'} {o.notebook} -> {o.output}" + (f"\n       {o.error}" if o.error else ""))
    return outcomes
