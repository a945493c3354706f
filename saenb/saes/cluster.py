"""SAE specs trained on a Ray cluster (https://docs.ray.io), one spec per task, on `saenb.engine.distributed`'s
connection (`address`: "auto" or a cluster's address, as there); what ran goes into `distributed.last_run`.

    python -m saenb.saes build --set topk_sweep --ray auto

Each task runs `library.build` into the library's folder. Activation caches are filled first, in one task (two
workers filling one cache would collide), then the bases that fine-tunes start from, then everything else in
parallel. The SAE library and the run folders must be on storage every node sees.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from saenb.engine import distributed
from saenb.models.presets import GPT2_SMALL, SMOLLM2_135M, TINY_STDLIB, get_preset, list_presets, register_preset
from saenb.saes import activations, library, sources


def _build_task(kind: str, specs: list, preset, local: Path, runs: Path) -> int:
    """On a worker: the driver's SAE library and run folders, its preset registered, then fill the activation
    caches of `specs` ("caches") or train each spec that is stored nowhere ("train")."""
    library.LOCAL, sources.RUNS = Path(local), Path(runs)
    if preset is not None and preset.name not in list_presets():
        register_preset(preset)
    for spec in specs:
        if kind == "caches":
            activations.activation_cache(spec, progress=False)
        elif library.find(spec) is None:
            library.build(spec, progress=False)
    return os.getpid()


def build_specs(specs: Sequence, *, address: str = "auto", cpus_per_task: int = 1, progress: bool = True) -> list[Path]:
    """Train every spec that is stored nowhere on the cluster, one spec per task; returns each spec's folder."""
    ray = distributed.require_ray()
    distributed.connect(address)
    distributed.release_workers()  # idle measure workers would hold the CPUs / GPUs the training tasks need
    specs = list(dict.fromkeys(specs))
    todo = [s for s in specs if library.find(s) is None]
    bases = list(dict.fromkeys(s.base for s in todo if s.finetune is not None and library.find(s.base) is None))
    runner = [s for s in [*bases, *todo] if s.finetune is None and s.objective == "mse"]
    caches = list({activations.cache_dir(s): s for s in runner
                   if not (activations.cache_dir(s) / "state.json").exists()}.values())
    resources = distributed.cluster_workers(cpus_per_task)[1]
    task = ray.remote(max_retries=distributed.MAX_RETRIES)(_build_task).options(**resources)
    local, runs = library.LOCAL, sources.RUNS
    presets = {s.preset: _registered(get_preset(s.preset)) for s in specs}
    waves = [("caches", [caches] if caches else []), ("train", [[s] for s in bases]),
             ("train", [[s] for s in todo if s not in bases])]
    last_run = distributed.last_run
    last_run.clear()
    last_run.update({"tasks": {}, "pids": []})
    t0 = time.time()
    for kind, groups in waves:
        refs = [task.remote(kind, group, presets[group[0].preset], local, runs) for group in groups]
        last_run["tasks"][kind] = last_run["tasks"].get(kind, 0) + len(refs)
        for _ in tqdm(range(len(refs)), desc=f"SAE specs on Ray: {kind}", disable=not progress or not refs):
            ready, refs = ray.wait(refs, num_returns=1)
            last_run["pids"] += ray.get(ready)
    last_run["seconds"] = time.time() - t0
    return [library.find(s) for s in specs]


def _registered(preset):
    """The preset to register on workers: None for the package's own (registered at import everywhere)."""
    return None if preset.name in {TINY_STDLIB.name, SMOLLM2_135M.name, GPT2_SMALL.name} else preset
