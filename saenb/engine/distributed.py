"""Scale-out on Ray (https://docs.ray.io): the work that grows, run as tasks on a cluster instead of one process.

    df = measure_cached(loaded, hooks, interventions, tokens, ray="auto")   # or ray="<cluster address>"
    python -m saenb score --preset tiny-stdlib --ray auto
    python -m saenb.saes build --set topk_sweep --ray auto

`ray="auto"` joins the cluster `RAY_ADDRESS` (or a `ray start --head` on this machine) names, else starts one here;
any other string is a cluster's address. Without `ray=` nothing changes.

- **measure** (`measure_cached`, hence `score` and the notebooks): one task per (chunk of contexts x group of
  hooks). Actors (one per GPU when the cluster has GPUs, else one per `cpus_per_worker` CPUs) each fetch the
  loaded model and SAEs once from Ray's object store (and stay for the next measurement of the same objects),
  run the local path's own `store.measure_part` on each part they are given (`seq_offset` and per-(hook,
  intervention) generators make every chunk's draws independent of where it runs), which writes the part into
  the store; the driver assembles the frame the local path
  would. Finished parts are skipped on a rerun. An actor that dies is restarted and its task retried.
- **SAE specs** (`build_specs`): one spec per task (`saes.library.build`, into the library's folder). Activation
  caches are filled first, in one task (two workers filling one cache would collide), then the bases that
  fine-tunes start from, then everything else in parallel.

The store and the SAE library must be on storage every node sees (one machine: always; a cluster: a shared file
system, e.g. SAENB_RESULTS=/shared/results), and every node needs this package (pip install, or Ray's
runtime_env).
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

ACTOR_PREFIX = "saenb-measure"
"""Measure actors are named `<prefix>-<run id>-<i>` (tests find and kill one by name)."""
MAX_RETRIES = 3
"""How often a killed actor is restarted and its task retried, and a failed training task re-run."""
last_run: dict[str, Any] = {}
"""What the latest distributed call ran: parts or tasks, workers, the worker processes' pids, seconds."""


def require_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray backend needs Ray: pip install -e '.[ray]' (or pip install 'ray[default]')") \
            from None
    return ray


def connect(address: str = "auto", *, num_cpus: int | None = None) -> None:
    """Join (or start) the cluster: "auto" joins a running one if there is one, else starts one on this machine
    (`num_cpus` of it); any other string is an address (`ray://host:10001`, `host:6379`)."""
    ray = require_ray()
    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if address != "auto":
        ray.init(address=address, **kwargs)
        return
    try:
        ray.init(address="auto", **kwargs)
    except ConnectionError:  # no running cluster: a local one
        ray.init(num_cpus=num_cpus, **kwargs)


def shutdown() -> None:
    """Stop the workers this process started, and disconnect."""
    ray = require_ray()
    release_workers()
    if ray.is_initialized():
        ray.shutdown()


def cluster_workers(cpus_per_worker: int = 1) -> tuple[int, dict[str, float]]:
    """How many workers the cluster fits, and each one's resources: one per GPU when it has GPUs, else one per
    `cpus_per_worker` CPUs."""
    ray = require_ray()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1, "num_cpus": cpus_per_worker}
    return max(1, int(resources.get("CPU", 1)) // cpus_per_worker), {"num_cpus": cpus_per_worker}


# ------------------------------------------------------------------------------------------------ measure
class _Measurer:
    """A worker holding the loaded model and SAEs (on its GPU when it has one)."""

    def __init__(self, loaded, threads: int):
        torch.set_num_threads(max(1, threads))
        if torch.cuda.is_available() and loaded.device.type != "cuda":
            device = torch.device("cuda")
            loaded = dataclasses.replace(loaded, model=loaded.model.to(device),
                                         saes={h: s.to(device) for h, s in loaded.saes.items()}, device=device)
        self.loaded = loaded

    def pid(self) -> int:
        return os.getpid()

    def run(self, part, specs, means, kwargs: dict[str, Any]) -> tuple[str, int]:
        from saenb.engine import store

        means = {h: (None if m is None else m.to(self.loaded.device)) for h, m in means.items()}
        store.measure_part(self.loaded, part, specs, means, kwargs)
        return str(part.path), os.getpid()


def measure_parts(loaded, parts: Sequence, specs, means: dict, kwargs: dict[str, Any], *,
                  address: str = "auto", cpus_per_worker: int = 1, progress: bool = True) -> dict[str, Any]:
    """Run `parts` (`store.Part`s) on the cluster, each written by the worker that ran it; returns what ran where."""
    require_ray()
    from ray.util import ActorPool

    connect(address)
    last_run.clear()
    last_run.update({"parts": 0, "workers": 0, "pids": [], "seconds": 0.0})
    if not parts:
        return last_run
    t0 = time.time()
    n, resources = cluster_workers(cpus_per_worker)
    actors = _actors_for(loaded, n, resources)[:len(parts)]
    means = {h: (None if m is None else m.cpu()) for h, m in means.items()}
    pids = []
    pool = ActorPool(actors)
    results = pool.map_unordered(lambda actor, part: actor.run.remote(part, specs, means, kwargs), list(parts))
    for _, pid in tqdm(results, total=len(parts), desc=f"measure on Ray ({len(actors)} workers)", unit="part",
                       disable=not progress):
        pids.append(pid)
    last_run.update({"parts": len(parts), "workers": len(actors), "pids": pids, "seconds": time.time() - t0})
    return last_run


_POOL: dict[str, Any] = {}
"""The measure workers of the latest loaded model (its fingerprint, its object-store reference, the actors): kept
for the next measurement of the same model and SAEs. One pool at a time: actors hold their CPUs / GPUs while they
live, so the next model's workers (or training tasks) could not be scheduled beside them."""


def _fingerprint(loaded) -> tuple:
    """What identifies the weights a worker holds: the objects (a `Loaded` is rebuilt, never edited, when its SAEs
    change: `with_saes`) and the cluster connection."""
    ray = require_ray()
    return (id(loaded), id(loaded.model), tuple((h, id(s)) for h, s in loaded.saes.items()),
            ray.get_runtime_context().get_job_id())


def release_workers() -> None:
    """Stop the measure workers (their resources go back to the cluster); the next measurement starts new ones."""
    ray = require_ray()
    if _POOL and ray.is_initialized() and _POOL["fingerprint"][-1] == ray.get_runtime_context().get_job_id():
        for actor in _POOL["actors"]:
            ray.kill(actor)
    _POOL.clear()


def _actors_for(loaded, n: int, resources: dict[str, float]) -> list:
    ray = require_ray()
    fingerprint = _fingerprint(loaded)
    if _POOL.get("fingerprint") == fingerprint and len(_POOL["actors"]) >= n:
        return _POOL["actors"][:n]
    release_workers()
    loaded_ref = ray.put(loaded)  # once into the object store (kept referenced: a restarted actor re-reads it)
    remote = ray.remote(max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)(_Measurer)
    run_id = uuid.uuid4().hex[:8]
    actors = [remote.options(name=f"{ACTOR_PREFIX}-{run_id}-{i}", **resources)
              .remote(loaded_ref, int(resources["num_cpus"])) for i in range(n)]
    _POOL.update({"fingerprint": fingerprint, "ref": loaded_ref, "actors": actors})
    return actors


# ------------------------------------------------------------------------------------------------ SAE specs
def _build_task(kind: str, specs: list, preset, local: Path, runs: Path) -> int:
    """On a worker: the driver's SAE library and run folders, its preset registered, then fill the activation
    caches of `specs` ("caches") or train each spec that is stored nowhere ("train")."""
    from saenb.models.presets import _REGISTRY, register_preset
    from saenb.saes import activations, library, models

    library.LOCAL, models.RUNS = Path(local), Path(runs)
    if preset is not None and preset.name not in _REGISTRY:
        register_preset(preset)
    for spec in specs:
        if kind == "caches":
            activations.activation_cache(spec, progress=False)
        elif library.find(spec) is None:
            library.build(spec, progress=False)
    return os.getpid()


def build_specs(specs: Sequence, *, address: str = "auto", cpus_per_task: int = 1, progress: bool = True) -> list[Path]:
    """Train every spec that is stored nowhere on the cluster, one spec per task; returns each spec's folder."""
    ray = require_ray()
    from saenb.models.presets import get_preset
    from saenb.saes import activations, library, models

    connect(address)
    release_workers()  # idle measure workers would hold the CPUs / GPUs the training tasks need
    specs = list(dict.fromkeys(specs))
    todo = [s for s in specs if library.find(s) is None]
    bases = list(dict.fromkeys(s.base for s in todo if s.finetune is not None and library.find(s.base) is None))
    runner = [s for s in [*bases, *todo] if s.finetune is None and s.objective == "mse"]
    caches = list({activations.cache_dir(s): s for s in runner
                   if not (activations.cache_dir(s) / "state.json").exists()}.values())
    resources = cluster_workers(cpus_per_task)[1]
    task = ray.remote(max_retries=MAX_RETRIES)(_build_task).options(**resources)
    local, runs = library.LOCAL, models.RUNS
    presets = {s.preset: _registered(get_preset(s.preset)) for s in specs}
    waves = [("caches", [caches] if caches else []), ("train", [[s] for s in bases]),
             ("train", [[s] for s in todo if s not in bases])]
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
    from saenb.models import presets as p

    return None if preset.name in {p.TINY_STDLIB.name, p.SMOLLM2_135M.name, p.GPT2_SMALL.name} else preset
