"""The Ray backend's overhead against the single-process path, on the same machine and work, in one run.

    python bench/ray_overhead.py [--contexts 64] [--chunk-seqs 8] [--repeats 3]

tiny-stdlib, its 6 residual SAEs, sae + eps_random + zero on `--contexts` held-out contexts (the score's work).
Single process: `measure_cached` with torch on every core. Ray: a local cluster on the same cores, one worker per
core (one torch thread each), the same chunks as tasks. Both from cold caches; the frames are checked equal. The
cluster's start-up and the first measurement (which starts the workers and sends them the model; they stay for
the next measurement) are timed apart: a session pays them once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saenb import load_preset
from saenb.engine import distributed, store  # noqa: E402

INTERVENTIONS = ["sae", "eps_random", "zero"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--chunk-seqs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    loaded = load_preset("tiny-stdlib", families=("resid",))
    hooks = loaded.hooks("resid")
    tokens = loaded.tokens(args.contexts)
    t0 = time.perf_counter()
    import ray

    ray.init(num_cpus=cores, include_dashboard=False, configure_logging=False, _node_ip_address="127.0.0.1")
    startup = time.perf_counter() - t0

    def run(**kw) -> tuple[float, pd.DataFrame]:
        with tempfile.TemporaryDirectory() as root:
            t = time.perf_counter()
            df = store.measure_cached(loaded, hooks, INTERVENTIONS, tokens, chunk_seqs=args.chunk_seqs,
                                      root=Path(root), progress=False, **kw)
            return time.perf_counter() - t, df

    torch.set_num_threads(cores)
    run()  # warm-up (first-call allocations, kernels)
    first, _ = run(ray="auto")  # starts the workers, which stay for the next measurement of this model
    local_times, ray_times = [], []
    for _ in range(args.repeats):
        seconds, local = run()
        local_times.append(seconds)
        seconds, remote = run(ray="auto")
        ray_times.append(seconds)
        pd.testing.assert_frame_equal(remote, local, check_exact=True)
    ray.shutdown()
    fmt = lambda v: f"{statistics.median(v):.2f} s [{min(v):.2f}-{max(v):.2f}]"  # noqa: E731
    n_parts = -(-args.contexts // args.chunk_seqs)
    print(f"tiny-stdlib, {len(hooks)} SAEs x {INTERVENTIONS} x {args.contexts} contexts, {n_parts} parts, "
          f"{cores} cores, median [min-max] of {args.repeats}")
    print(f"  single process ({cores} torch threads):      {fmt(local_times)}")
    print(f"  Ray, local cluster ({distributed.last_run['workers']} workers x 1 thread): {fmt(ray_times)}")
    print(f"  Ray / single process: {statistics.median(ray_times) / statistics.median(local_times):.2f}x; "
          f"once per session: cluster start-up {startup:.1f} s, first measurement (starts the workers, sends "
          f"the model) {first:.2f} s; frames equal: yes")


if __name__ == "__main__":
    main()
