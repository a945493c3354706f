"""The Ray backend on a local cluster (127.0.0.1, 2 CPUs): the distributed measurement equals the single-process
one exactly (for every registered intervention, fitted ones included: they carry their fits to the workers), a
worker killed mid-run is restarted and its task retried without changing the frame, and a sweep of SAE specs trains
on the cluster and loads.

Ray is the optional extra `.[ray]`, which `make test` installs; without it these tests skip, unless SAENB_CI=1
(set by CI) turns the skip into a failure.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import pandas as pd
import pytest

from saenb import saes
from saenb.engine import distributed, store
from saenb.engine import interventions as iv
from saenb.models.presets import TINY_STDLIB, Preset, register_preset
from saenb.saes import library, sources
from saenb.saes.cluster import build_specs
from saenb.saes.spec import SAESpec
from saenb.studies import baselines, nfm

try:
    import ray
except ImportError:
    if os.environ.get("SAENB_CI") == "1":
        raise
    pytest.skip("needs Ray: pip install -e '.[ray]' (make test installs it)", allow_module_level=True)

HOOKS = ["blocks.1.hook_resid_pre", "blocks.4.hook_resid_pre"]
INTERVENTIONS = ["sae", "eps_random", "zero", "mean"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, _node_ip_address="127.0.0.1")
    yield
    distributed.shutdown()


@pytest.fixture(scope="module")
def local_frame(tiny, tmp_path_factory):
    tokens = tiny.tokens(8)
    df = store.measure_cached(tiny, HOOKS, INTERVENTIONS, tokens, chunk_seqs=2, seed=3,
                              root=tmp_path_factory.mktemp("local"), progress=False)
    return tokens, df


@pytest.mark.parametrize("hooks_per_task", [None, 1])
def test_distributed_measure_equals_the_single_process_one(tiny, cluster, local_frame, tmp_path, hooks_per_task):
    tokens, local = local_frame
    df = store.measure_cached(tiny, HOOKS, INTERVENTIONS, tokens, chunk_seqs=2, seed=3, root=tmp_path,
                              progress=False, ray="auto", hooks_per_task=hooks_per_task)
    pd.testing.assert_frame_equal(df, local, check_exact=True)
    run = distributed.last_run
    assert run["parts"] == 4 * (2 if hooks_per_task else 1) and run["workers"] == 2
    assert os.getpid() not in run["pids"], "the parts ran in the workers, not in the driver"
    # a rerun reads the finished result: nothing is submitted
    again = store.measure_cached(tiny, HOOKS, INTERVENTIONS, tokens, chunk_seqs=2, seed=3, root=tmp_path,
                                 progress=False, ray="auto", hooks_per_task=hooks_per_task)
    pd.testing.assert_frame_equal(again, local, check_exact=True)


def every_intervention(loaded, hooks, tokens, root) -> list[iv.Intervention]:
    """Each registered intervention once (the fitted ones with fits made here on other contexts), and eps-random
    at a fitted splice's error size."""
    fit_tokens = loaded.tokens_excluding(16, tokens)
    fitted = baselines.fit(loaded, hooks, fit_tokens, root=root / "baselines")
    trained = nfm.fit(loaded, hooks, fit_tokens, nfm.NFMConfig(max_epochs=2, patience=1, batch_size=256),
                      root=root / "nfm", progress=False)
    params = {"theta_random_cos": {"cos": 0.8}, "eps_random_like": {"of": "sae_scaled", "scale": 0.5},
              "latent_perturb": {"scale": 0.2}}
    made = {**{name: fitted.intervention(name) for name in baselines.INTERVENTIONS},
            "sae_nfm": trained.intervention, "nfm_eps_random": trained.eps_intervention}
    every = [made.get(name) or iv.intervention(name, **params.get(name, {})) for name in iv.names()]
    return [*every, fitted.eps_intervention("sae_plus_linear")]


def test_every_intervention_fitted_ones_included_gives_the_same_frame_on_ray(tiny, cluster, tmp_path):
    tokens = tiny.tokens(4)
    every = every_intervention(tiny, HOOKS, tokens, tmp_path / "fits")
    assert {i.name for i in every} == set(iv.names())
    local = store.measure_cached(tiny, HOOKS, every, tokens, chunk_seqs=2, seed=3, root=tmp_path / "local",
                                 progress=False)
    df = store.measure_cached(tiny, HOOKS, every, tokens, chunk_seqs=2, seed=3, root=tmp_path / "ray",
                              progress=False, ray="auto")
    assert os.getpid() not in distributed.last_run["pids"], "the parts ran in the workers, not in the driver"
    assert set(df["intervention"].cat.categories) == {i.label for i in every}
    pd.testing.assert_frame_equal(df, local, check_exact=True)


def test_a_worker_killed_mid_run_is_retried_and_the_frame_is_unchanged(tiny, cluster, local_frame, tmp_path):
    tokens, local = local_frame
    out = {}

    def run():
        out["df"] = store.measure_cached(tiny, HOOKS, INTERVENTIONS, tokens, chunk_seqs=1, seed=3, root=tmp_path,
                                         progress=False, ray="auto", hooks_per_task=1)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*/part-*.parquet")):  # the first part written: the workers are busy
        assert time.monotonic() < deadline and thread.is_alive(), "no part was written"
        time.sleep(0.02)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(distributed.ACTOR_PREFIX)]
    assert len(names) == 2
    victim = ray.get_actor(names[0])
    victim_pid = ray.get(victim.pid.remote())
    ray.kill(victim, no_restart=False)  # as if its process crashed: Ray restarts it and retries its task
    thread.join(300)
    assert not thread.is_alive()
    pd.testing.assert_frame_equal(out["df"], local, check_exact=True)
    pids = set(distributed.last_run["pids"])
    assert len(pids) >= 3 and victim_pid in pids, "the killed worker was restarted (a new process) and ran parts"


def test_a_sweep_of_sae_specs_trains_on_the_cluster_and_loads(small_bundle, cluster, tmp_path, monkeypatch):
    name = f"ray-specs-{tmp_path.name}"
    register_preset(Preset(name=name, bundle=str(small_bundle), sae_sources=TINY_STDLIB.sae_sources, layers=(0, 1)))
    monkeypatch.setattr(sources, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(library, "LOCAL", tmp_path / "local")
    topk = SAESpec(preset=name, hook="blocks.1.hook_resid_pre", architecture="topk", sparsity=4,
                   training_tokens=8192, batch_tokens=512, data_seed=7)
    sweep = [topk, dataclasses.replace(topk, sparsity=8), dataclasses.replace(topk, architecture="standard",
                                                                              sparsity=1.0)]
    folders = build_specs(sweep, address="auto", progress=False)
    assert [f.parent for f in folders] == [tmp_path / "local" / name] * 3
    for spec in sweep:
        sae = saes.load(spec, train=False)  # the driver loads what the workers stored (the sha256 is checked)
        assert sae.cfg.d_in == 64 and sae.cfg.d_sae == 256
        assert library.record(spec)["training"]["steps"] == 16
    run = distributed.last_run
    assert run["tasks"] == {"caches": 1, "train": 3} and os.getpid() not in run["pids"]
