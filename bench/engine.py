"""Benchmark: the fast engine (`saenb.measure`) against the naive reference (`saenb.measure_naive`).

    python bench/engine.py [--preset tiny-stdlib] [--seqs 8] [--device auto]

Same tokens, same hooks (every layer's residual SAE), the interventions of notebook 1. Prints tokens/s of
each path and their ratio for the three modes, the fast path's peak memory at two token counts 4x apart
(each measured in a fresh subprocess), and the fast path's achieved FLOP/s (torch's FlopCounterMode)
against a plain matmul timed in the same run. Every ratio printed is measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from saenb import load_preset, measure, measure_naive
from saenb.patching import NOTEBOOK1


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
        "all-token": dict(positions="all"),
        "single-token": dict(positions=32),
        f"{samples}-sample": dict(positions=48, n_samples=samples, measure_positions=[48],
                                  interventions=["eps_random"]),
    }


def worker(preset: str, device: str, n_seqs: int) -> None:
    """Run the fast all-token path on n_seqs sequences and print its peak memory (one subprocess each)."""
    loaded = load_preset(preset, device=device)
    hooks = loaded.hooks("resid")
    tokens = loaded.tokens(n_seqs)
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    measure(loaded, hooks, NOTEBOOK1, tokens, progress=False, batch_size=8)
    peak = (torch.cuda.max_memory_allocated() if loaded.device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    print(json.dumps({"n_seqs": n_seqs, "peak_bytes": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-stdlib")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seqs", type=int, default=8, help="sequences for the all-token and single-token modes")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--sample-seqs", type=int, default=2, help="sequences for the many-sample mode")
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
        common = dict(hooks=hooks, interventions=interventions, tokens=tokens, progress=False, **kw)
        measure(loaded, **{**common, "tokens": tokens[:1]})  # warm-up
        fast, t_fast = timed(lambda common=common: measure(loaded, **common))
        naive, t_naive = timed(lambda common=common: measure_naive(loaded, **common))
        assert len(fast) == len(naive)
        err = (fast.kl - naive.kl).abs().max()
        splices = len(fast)  # measured (token, hook, intervention, sample) rows
        rows.append((name, splices / t_naive, splices / t_fast, t_naive / t_fast, err))
    print(f"\n{'mode':<16}{'naive rows/s':>14}{'fast rows/s':>14}{'speed-up':>10}{'max |dKL|':>12}")
    for name, naive_rate, fast_rate, ratio, err in rows:
        print(f"{name:<16}{naive_rate:>14.0f}{fast_rate:>14.0f}{ratio:>9.1f}x{err:>12.1e}")

    # peak memory of the fast path at two token counts 4x apart (fresh processes)
    print("\nfast all-token peak memory (fresh process each):")
    for n in (args.seqs, 4 * args.seqs):
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--device", args.device,
                              "--worker", str(n)], capture_output=True, text=True, check=True)
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
        print(f"  {n:>4} sequences ({n * 128:>6} tokens): {peak / 2**20:8.1f} MiB")

    # achieved FLOP/s of the fast path vs a plain matmul, same run
    tokens = loaded.tokens(args.seqs)
    with FlopCounterMode(display=False) as counter:
        measure(loaded, hooks, NOTEBOOK1, tokens[:2], progress=False)
    flops_small = counter.get_total_flops()
    _, t = timed(lambda: measure(loaded, hooks, NOTEBOOK1, tokens[:2], progress=False))
    achieved = flops_small / t
    peak = matmul_flops_per_s(loaded.device)
    print(f"\nfast path: {flops_small / 1e9:.1f} GFLOP (matmuls) in {t:.2f} s = {achieved / 1e9:.1f} GFLOP/s; "
          f"plain 1024^3 matmul: {peak / 1e9:.1f} GFLOP/s; ratio {achieved / peak:.2f}")


if __name__ == "__main__":
    main()
