"""Benchmark: the fast engine (`saenb.measure`) against the naive reference (`saenb.measure_naive`).

    python bench/engine.py [--preset tiny-stdlib] [--seqs 8] [--device auto]

Same tokens, same hooks (every layer's residual SAE), the interventions of notebook 1. Prints tokens/s of
each path and their ratio for the three modes (best of --repeats alternating runs), the fast path's peak
memory at two token counts 4x apart (each in a fresh subprocess: resident memory above the loaded model's,
sampled every millisecond), and the fast path's achieved FLOP/s (torch's FlopCounterMode) against a plain
matmul timed in the same run. Every ratio printed is measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from saenb import load_preset, measure, measure_naive
from saenb.patching import NOTEBOOK1, hook_means


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def matmul_flops_per_s(device: torch.device, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def modes(seqs: int, samples: int) -> dict[str, dict]:
    return {
        "all-token": {"positions": "all"},
        "single-token": {"positions": 32},
        f"{samples}-sample": {"positions": 48, "n_samples": samples, "measure_positions": [48],
                              "interventions": ["eps_random"]},
    }


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond from /proc (a thread).

    `ru_maxrss` cannot do this: it keeps the process's all-time peak, which model loading already set.
    """

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def worker(preset: str, device: str, n_seqs: int) -> None:
    """Run the fast all-token path on n_seqs sequences and print its peak memory (one subprocess each)."""
    loaded = load_preset(preset, device=device)
    hooks = loaded.hooks("resid")
    tokens = loaded.tokens(n_seqs)
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    means = hook_means(loaded, hooks, tokens)
    with PeakRSS() as rss:
        df = measure(loaded, hooks, NOTEBOOK1, tokens, progress=False, means=means)
    peak = torch.cuda.max_memory_allocated() if loaded.device.type == "cuda" else rss.extra
    print(json.dumps({"n_seqs": n_seqs, "peak_bytes": peak, "frame_bytes": int(df.memory_usage(deep=True).sum())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-stdlib")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seqs", type=int, default=8, help="sequences for the all-token and single-token modes")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--sample-seqs", type=int, default=2, help="sequences for the many-sample mode")
    parser.add_argument("--repeats", type=int, default=5, help="timings per path; the best is kept")
    parser.add_argument("--memory-seqs", type=int, default=16,
                        help="peak memory is measured at this many sequences and 4x as many")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.preset, args.device, args.worker)

    loaded = load_preset(args.preset, device=args.device)
    hooks = loaded.hooks("resid")
    print(f"{args.preset} on {loaded.device}, {torch.get_num_threads()} threads; hooks: {len(hooks)} residual SAEs")
    rows = []
    for name, kw in modes(args.seqs, args.samples).items():
        interventions = kw.pop("interventions", NOTEBOOK1)
        n = args.sample_seqs if "sample" in name else args.seqs
        tokens = loaded.tokens(n)
        # the mean-ablation reference is an input of both paths, computed once (as measure_cached does)
        common = {"hooks": hooks, "interventions": interventions, "tokens": tokens, "progress": False,
                  "means": hook_means(loaded, hooks, tokens), **kw}
        measure(loaded, **{**common, "tokens": tokens[:1]})  # warm-up
        # fast and naive alternate; the best of `repeats` runs of each (as timeit does) is the least
        # disturbed by the other tenants of a shared machine
        t_fast = t_naive = float("inf")
        for _ in range(1 if "sample" in name else args.repeats):  # the naive many-sample run takes minutes
            fast, t = timed(lambda common=common: measure(loaded, **common))
            t_fast = min(t_fast, t)
            naive, t = timed(lambda common=common: measure_naive(loaded, **common))
            t_naive = min(t_naive, t)
        assert len(fast) == len(naive)
        err = (fast.kl - naive.kl).abs().max()
        splices = len(fast)  # measured (token, hook, intervention, sample) rows
        rows.append((name, splices / t_naive, splices / t_fast, t_naive / t_fast, err))
    # how much of the all-token speed-up the fused kernels give (the rest is the engine's design)
    tokens = loaded.tokens(args.seqs)
    common = {"hooks": hooks, "interventions": NOTEBOOK1, "tokens": tokens, "progress": False,
              "means": hook_means(loaded, hooks, tokens)}
    runs = [timed(lambda: measure(loaded, fused=False, **common)) for _ in range(args.repeats)]
    naive_rate = rows[0][1]
    unfused_rate = len(runs[0][0]) / min(t for _, t in runs)
    rows.append(("all-token, unfused", naive_rate, unfused_rate, unfused_rate / naive_rate, float("nan")))
    print(f"\n{'mode':<20}{'naive rows/s':>14}{'fast rows/s':>14}{'speed-up':>10}{'max |dKL|':>12}")
    for name, naive_rate, fast_rate, ratio, err in rows:
        print(f"{name:<20}{naive_rate:>14.0f}{fast_rate:>14.0f}{ratio:>9.2f}x{err:>12.1e}")

    # The returned frame (one row per token x hook x intervention) necessarily grows with the tokens; the
    # engine's own working memory (batch activations, chunk forwards, logits blocks) is what must stay flat.
    # glibc keeps freed blocks mapped, so RSS would show the high-water mark of fragmentation rather than of
    # live memory: the workers allocate anything above 64 KiB with mmap and trim on free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    print("\nfast all-token peak memory above the loaded model (fresh process each):")
    print(f"  {'sequences':>9} {'tokens':>7} {'peak MiB':>9} {'frame MiB':>10} {'peak - frame':>13}")
    for n in (args.memory_seqs, 4 * args.memory_seqs):
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--device", args.device,
                              "--worker", str(n)], capture_output=True, text=True, check=True, env=env)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        peak, frame = got["peak_bytes"] / 2**20, got["frame_bytes"] / 2**20
        print(f"  {n:>9} {n * 128:>7} {peak:>9.1f} {frame:>10.1f} {peak - frame:>13.1f}")

    # achieved FLOP/s of the fast path vs a plain matmul, same run
    tokens = loaded.tokens(args.seqs)
    with FlopCounterMode(display=False) as counter:
        measure(loaded, hooks, NOTEBOOK1, tokens[:2], progress=False)
    flops_small = counter.get_total_flops()
    t = min(timed(lambda: measure(loaded, hooks, NOTEBOOK1, tokens[:2], progress=False))[1]
            for _ in range(args.repeats))
    achieved = flops_small / t
    peak = matmul_flops_per_s(loaded.device)
    print(f"\nfast path: {flops_small / 1e9:.1f} GFLOP (matmuls) in {t:.2f} s = {achieved / 1e9:.1f} GFLOP/s; "
          f"plain 1024^3 matmul: {peak / 1e9:.1f} GFLOP/s; ratio {achieved / peak:.2f}")


if __name__ == "__main__":
    main()
