"""Scale-out on Ray (https://docs.ray.io): the work that grows, run as tasks on a cluster instead of one process.

    df = measure_cached(loaded, hooks, interventions, tokens, ray="auto")   # or ray="<cluster address>"
    python -m saenb score --preset tiny-stdlib --ray auto
    python -m saenb.saes build --set topk_sweep --ray auto

`ray="auto"` joins the cluster `RAY_ADDRESS` (or a `ray start --head` on this machine) names, else starts one here;
any other string is a cluster's address. Without `ray=` nothing changes.

- **measure** (`measure_cached`, hence `score` and the notebooks): one task per (chunk of contexts x group of
  hooks). Actors (one per GPU when the cluster has GPUs, else one per `cpus_per_worker` CPUs) each fetch the
  loaded model and SAEs once from Ray's object store (and stay for the next measurement of the same objects),
  run the local path's own `store.measure_part` on each part they are given (`seq_offset` and the counter-based
  draws keyed by (hook, intervention, sequence, position, sample) make every chunk's draws independent of where
  it runs), which writes the part into the store; the driver assembles the frame the local path would. Finished parts are skipped on a rerun. An actor that dies is restarted and its task retried.
- **SAE specs** (`saenb.saes.cluster.build_specs`, on this module's connection and workers): one spec per task.

The store and the SAE library must be on storage every node sees (one machine: always; a cluster: a shared file
system, e.g. SAENB_RESULTS=/shared/results), and every node needs this package (pip install, or Ray's
runtime_env).
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable, Sequence
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
        import ray  # optional (the `ray` extra): imported where it is used
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

    def run(self, measure_part: Callable, part, interventions, means, kwargs: dict[str, Any]) -> tuple[str, int]:
        means = {h: (None if m is None else m.to(self.loaded.device)) for h, m in means.items()}
        interventions = [i.to(self.loaded.device) for i in interventions]
        measure_part(self.loaded, part, interventions, means, kwargs)
        return str(part.path), os.getpid()


def measure_parts(loaded, parts: Sequence, interventions, means: dict, kwargs: dict[str, Any],
                  measure_part: Callable, *, address: str = "auto", cpus_per_worker: int = 1,
                  progress: bool = True) -> dict[str, Any]:
    """Run `parts` (`store.Part`s) on the cluster, each by `measure_part(loaded, part, interventions, means, kwargs)`
    (`store.measure_part`, which writes it) in the worker that ran it; returns what ran where. The interventions,
    fitted parts included, go into the object store once."""
    ray = require_ray()
    from ray.util import ActorPool  # Ray is optional (the `ray` extra)

    connect(address)
    last_run.clear()
    last_run.update({"parts": 0, "workers": 0, "pids": [], "seconds": 0.0})
    if not parts:
        return last_run
    t0 = time.time()
    n, resources = cluster_workers(cpus_per_worker)
    actors = _actors_for(loaded, n, resources)[:len(parts)]
    means = {h: (None if m is None else m.cpu()) for h, m in means.items()}
    interventions_ref = ray.put(list(interventions))
    pids = []
    pool = ActorPool(actors)
    results = pool.map_unordered(
        lambda actor, part: actor.run.remote(measure_part, part, interventions_ref, means, kwargs), list(parts))
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
