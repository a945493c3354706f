"""Benchmark: the fast engine (`saenb.measure`) against the naive reference (`saenb.measure_naive`).

    python bench/engine.py [--shape tiny-stdlib | smollm2-135m | gpt2-small] [--seqs 8] [--samples 500] [--repeats 3]

`--shape gpt2-small` runs GPT-2 small's exact shapes (vocabulary 50,257, d_model 768, 12 layers, residual SAEs of
24,576 latents) with random weights: the gpt2-small preset loaded offline from a synthetic hub cache
(`saenb.models.synthetic_hub`, built once into data/cache/synthetic-hub), its SAEs' encoder biases lowered to a
trained SAE's sparsity (`sparsify`: L0 = 32). `--shape smollm2-135m` runs the real model: SmolLM2-135M-Instruct's
weights (the preset's GGUF file under data/cache/pretrained, `make smollm2`; 30 Llama blocks, d_model 576, a 49,152-word
vocabulary) with its bundle's residual SAEs at layers 6, 15 and 24, and by default the interventions sae, eps_random
and zero (`--interventions`; the other shapes run notebook 1's nine).

Both paths get the same tokens, hooks (residual SAEs) and interventions. Per mode (all-token; single-token;
many-sample: `--sample-seqs` contexts x `--samples` eps-random draws at position 48, measured at 48), the median
time of `--repeats` alternating runs of each path and its spread (min-max), rows/s and their ratio (the naive
many-sample run once, on the first `--naive-samples` draws of each context, its time scaled to all: it forwards
every draw from the embedding, a cost linear in them; its max |dKL| on those rows); the fast path's
peak memory at two token counts 4x apart (each in a fresh subprocess: resident memory above the loaded model's,
sampled every millisecond); each mode's achieved FLOP/s against a plain matmul timed in the same run (1024^3 on a
CPU, 8192^3 on a GPU): the all-token and single-token runs' matmul FLOPs as torch's FlopCounterMode counts them, the
many-sample run's as the work its rows need (`row_flops`: the blocks from the hooked layer on, at one position, and
one unembedding per row); and from the all-token FLOPs, the projected time of the original study's run (2M tokens
x 12 layers x 9 interventions) on an H100, beside the time this device's own all-token rate gives it. Every ratio
printed is measured in this one run. max |dKL| is absolute: a zero ablation's KL of 17 nats differs by about 5e-4
between the paths (fused kernels round differently), 3e-5 of itself.

    python bench/engine.py --shape gpt2-small --profile all-token   # where the fast path's time goes
    python bench/engine.py --shape smollm2-135m --seqs 2 --sample-seqs 2 --samples 8 --repeats 1 --memory-seqs 1
                                                                    # a smoke run (minutes), the real model's shapes

`--profile` on a GPU also counts the run's kernel launches and the calls that make the host wait for the device
(host syncs, by the saenb line that made them); on a CPU, the operators that would launch a kernel on a GPU and the
calls that would make its host wait (`would_sync`: a value or a size read by the host, a copy to it), so that they
can be cut without a GPU; `--graphs` runs the fast path with `measure(graphs=True)`
(`saenb.engine.graphs`: blocks replayed as CUDA graphs; a no-op on a CPU).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
import unittest.mock
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_HUB = REPO / "data" / "cache" / "synthetic-hub"
H100_FP32, H100_TF32 = 67e12, 495e12
"""H100 SXM datasheet rates, dense: FP32 (CUDA cores) and TF32 (tensor cores), FLOP/s."""
STUDY = {"tokens": 2_000_000, "layers": 12, "interventions": 9, "minutes_per_layer": 9.5}
"""The original study's run on GPT-2 small: 2M tokens per layer, 12 layers, its interventions; 9.5 min per layer."""


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def matmul_size(device: torch.device) -> int:
    """The plain matmul's n: 1024 on a CPU, 8192 on a GPU (1024 would time kernel launches)."""
    return 8192 if device.type == "cuda" else 1024


def matmul_flops_per_s(device: torch.device, n: int, reps: int = 10, rounds: int = 5) -> float:
    """A plain n^3 float32 matmul's rate: the best of `rounds` timings of `reps` products (one timing of 10 on
    2 cores read anywhere from 281 to 332 GFLOP/s within a minute; the best is the rate the machine can reach, so
    fractions of it are not flattered by a slow moment)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = 0.0
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def modes(samples: int) -> dict[str, dict]:
    return {
        "all-token": {"positions": "all"},
        "single-token": {"positions": 32},
        f"{samples}-sample": {"positions": 48, "n_samples": samples, "measure_positions": [48],
                              "interventions": ["eps_random"]},
    }


def spread(times: list[float]) -> str:
    return f"{statistics.median(times):7.2f} s [{min(times):.2f}-{max(times):.2f}]"


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


SYNTHETIC_L0 = 32
"""Active latents per token of the synthetic (random-weight) SAEs after `sparsify`; gpt2-small-res-jb's fire
about 13 to 100."""


def load(shape: str, device: str, layers: list[int]):
    from saenb import load_preset

    if shape == "gpt2-small":
        return sparsify(load_preset("gpt2-small", device=device, layers=layers, families=("resid",)), SYNTHETIC_L0)
    return load_preset(shape, device=device, families=("resid",))


def sparsify(loaded, l0: int):
    """Lower each SAE's encoder bias so that a median token fires `l0` latents (on 4 contexts). A random encoder
    fires half its latents (12,290 of 24,576 per token), which no trained SAE does, and the work of a choice among
    the active latents (feature_aligned) and of the geometry grows with it."""
    from saenb.hooks import clean_activations

    tokens = loaded.tokens(4)
    with torch.no_grad():
        for hook, sae in loaded.saes.items():
            x = clean_activations(loaded.model, hook, tokens)[:, 1:].to(loaded.device)
            sae.b_enc -= sae.encode(x).topk(l0 + 1, dim=-1).values[..., -1].median()
    return loaded


def worker(args, n_seqs: int) -> None:
    """Run the fast all-token path on n_seqs sequences and print its peak memory (one subprocess each)."""
    from saenb import measure
    from saenb.engine.patching import hook_means

    loaded = load(args.shape, args.device, args.layers)
    hooks = loaded.hooks("resid")
    tokens = loaded.tokens(n_seqs)
    means = hook_means(loaded, hooks, tokens)
    cuda = loaded.device.type == "cuda"
    if cuda:  # device memory above what is allocated on entry (the model, SAEs, tokens, means)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        df = measure(loaded, hooks, interventions(args), tokens, progress=False, means=means, graphs=args.graphs)
    peak = torch.cuda.max_memory_allocated() - base if cuda else rss.extra
    print(json.dumps({"n_seqs": n_seqs, "peak_bytes": peak, "frame_bytes": int(df.memory_usage(deep=True).sum())}))


def arguments(loaded, hooks, args, name: str) -> dict:
    """The keyword arguments of `measure` / `measure_naive` for one mode of `modes`: many-sample runs on
    --sample-seqs contexts at the middle hook, the others on --seqs contexts at every hook; the mean-ablation
    reference is an input of both paths, computed once (as measure_cached does); --memory-mb when given (the
    naive path ignores it)."""
    from saenb.engine.patching import hook_means

    kw = dict(modes(args.samples)[name])
    sample_mode = "sample" in name
    tokens = loaded.tokens(args.sample_seqs if sample_mode else args.seqs)
    use = hooks[len(hooks) // 2:len(hooks) // 2 + 1] if sample_mode else hooks
    budget = {} if args.memory_mb is None else {"memory_mb": args.memory_mb}
    return {"hooks": use, "interventions": kw.pop("interventions", interventions(args)), "tokens": tokens,
            "progress": False, "means": hook_means(loaded, use, tokens), "graphs": args.graphs, **budget, **kw}


def interventions(args) -> tuple[str, ...]:
    """--interventions, or the shape's default: sae, eps_random and zero on smollm2-135m, notebook 1's elsewhere."""
    from saenb.engine.patching import NOTEBOOK1

    if args.interventions:
        return tuple(args.interventions)
    return ("sae", "eps_random", "zero") if args.shape == "smollm2-135m" else NOTEBOOK1


def row_flops(cfg, start_layer: int, n_keys: int) -> int:
    """Matmul FLOPs one patched row needs at one position: blocks start_layer.. (q, k, v and o projections, with
    grouped key/value heads; scores and weighted sum over n_keys keys; the MLP's two matrices, three when gated)
    and the unembedding."""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    projections = 2 * cfg.d_model * cfg.d_head * 2 * (cfg.n_heads + n_kv)
    attention = 4 * cfg.n_heads * cfg.d_head * n_keys
    mlp = 2 * cfg.d_model * cfg.d_mlp * (3 if cfg.gated_mlp else 2)
    return (cfg.n_layers - start_layer) * (projections + attention + mlp) + 2 * cfg.d_model * cfg.d_vocab


def profile(loaded, hooks, args) -> None:
    """The fast path of one mode under torch.profiler: its operators by self time (device time on a GPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from saenb import measure

    name = next(n for n in modes(args.samples) if args.profile in n)
    common = arguments(loaded, hooks, args, name)
    measure(loaded, **common)  # warm-up
    cuda = loaded.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        measure(loaded, **common)
    print(f"{name}: {time.perf_counter() - t0:.2f} s under the profiler")
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25,
                       max_name_column_width=60))
    if cuda:
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
        launches = sum(e.count for e in events if e.key in LAUNCHES)
        syncs = host_syncs(lambda: measure(loaded, **common))
        print(f"kernel launches: {launches} (CUDA graph replays among them: "
              f"{sum(e.count for e in events if e.key == 'cudaGraphLaunch')}); host syncs: {sum(syncs.values())}, "
              "by the saenb line that made them:")
        for where, count in syncs.most_common(15):
            print(f"  {count:6d}  {where}")
    else:  # the host is the device: count what would make it wait on a GPU, and the kernels a GPU would launch
        syncs, kernels = would_sync(lambda: measure(loaded, **common))
        print(f"operators that would launch a kernel on a GPU (not views): {kernels}; calls that would make the host "
              f"wait for a GPU: {sum(syncs.values())}, by the saenb line that made them:")
        for where, count in syncs.most_common(15):
            print(f"  {count:6d}  {where}")


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
"""The profiler's names of the runtime calls that start work on a GPU."""


def saenb_line() -> str:
    """The innermost saenb line on the stack ("file:line code"), where a counted call was made."""
    frames = [f for f in traceback.extract_stack() if f"{os.sep}saenb{os.sep}" in f.filename]
    if not frames:
        return "outside saenb"
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} {frames[-1].line}"


SYNCING = ("aten.item", "aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten._unique2",
           "aten.unique_dim", "aten.unique_consecutive", "aten.masked_select", "aten.repeat_interleave.Tensor")
"""Operators whose result the host must read before it can go on (a value: item, int, float, bool, equal; or a
size: nonzero, unique, masked_select, repeat_interleave by counts): on a GPU, each waits for the device, as does a
copy to the host (`HOST_COPIES`, no operator on a CPU: counted by wrapping the methods)."""
HOST_COPIES = ("tolist", "cpu")


def would_sync(fn) -> tuple[collections.Counter, int]:
    """Run fn on a CPU under a dispatch mode that counts, by the innermost saenb line, the calls that on a GPU would
    make the host wait (`SYNCING`, indexing by a boolean mask, which runs nonzero, and `HOST_COPIES`), and the
    operators that would launch a kernel there (those that write memory: in place, `out=`, or a result that is not
    a view of an input)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    counts: collections.Counter = collections.Counter()
    kernels = 0

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal kernels
            out = func(*args, **(kwargs or {}))
            name = str(func)
            masks = args[1] if name.startswith("aten.index.Tensor") else ()
            if any(name == op or name.startswith(op + ".") for op in SYNCING) or \
                    any(getattr(m, "dtype", None) == torch.bool for m in masks):
                counts[saenb_line()] += 1
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
            outputs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
            writes = func._schema.is_mutable or any(t.untyped_storage().data_ptr() not in inputs for t in outputs)
            kernels += bool(outputs) and writes
            return out

    def counted(method):
        def wrapper(self, *args, **kwargs):
            counts[saenb_line()] += 1
            return method(self, *args, **kwargs)
        return wrapper

    with contextlib.ExitStack() as stack:
        for name in HOST_COPIES:
            stack.enter_context(unittest.mock.patch.object(Tensor, name, counted(getattr(Tensor, name))))
        stack.enter_context(Count())
        fn()
    return counts, kernels


def host_syncs(fn) -> collections.Counter:
    """Run fn with torch's CUDA sync debug mode on and count each synchronising call by the innermost saenb line
    on the stack when it happened."""
    counts: collections.Counter = collections.Counter()

    def record(*_args, **_kwargs):
        counts[saenb_line()] += 1

    show, warnings.showwarning = warnings.showwarning, record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = show
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny-stdlib", choices=("tiny-stdlib", "smollm2-135m", "gpt2-small"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 6, 11], help="gpt2-small: layers with SAEs")
    parser.add_argument("--seqs", type=int, default=8, help="sequences for the all-token and single-token modes")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--sample-seqs", type=int, default=8, help="sequences for the many-sample mode")
    parser.add_argument("--naive-samples", type=int, default=50,
                        help="many-sample mode: the draws the naive path is timed on (its time scaled to --samples)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per path (the median and spread shown)")
    parser.add_argument("--memory-seqs", type=int, default=16,
                        help="peak memory is measured at this many sequences and 4x as many (0: not measured)")
    parser.add_argument("--memory-mb", type=int, default=None,
                        help="the fast path's memory budget per chunk of patched forwards (default: measure's)")
    parser.add_argument("--profile", choices=("all-token", "single-token", "sample"), default=None,
                        help="instead: profile the fast path of one mode (torch.profiler) and print its top operators")
    parser.add_argument("--modes", nargs="+", choices=("all-token", "single-token", "sample"),
                        default=["all-token", "single-token", "sample"],
                        help="the modes timed (all-token always: the unfused run, memory and FLOP rate use it)")
    parser.add_argument("--interventions", nargs="+", default=None,
                        help="all-token and single-token interventions (default: sae eps_random zero on "
                             "smollm2-135m, notebook 1's nine on the other shapes)")
    parser.add_argument("--graphs", action="store_true",
                        help="measure(graphs=True): blocks replayed as CUDA graphs (a no-op on a CPU)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shape == "gpt2-small" and os.environ.get("HF_HOME") != str(SYNTHETIC_HUB):
        # the hub libraries read HF_HOME when imported: build the synthetic cache once, then run again with it
        if not (SYNTHETIC_HUB / "manifest.json").exists() or \
                set(args.layers) - set(json.loads((SYNTHETIC_HUB / "manifest.json").read_text())["layers"]):
            subprocess.run([sys.executable, "-m", "saenb.models.synthetic_hub", "--out", str(SYNTHETIC_HUB),
                            "--families", "resid", "--layers", *map(str, args.layers)], check=True, cwd=REPO)
        env = {**os.environ, "HF_HOME": str(SYNTHETIC_HUB), "HF_HUB_OFFLINE": "1"}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    if args.worker is not None:
        return worker(args, args.worker)

    from saenb import measure, measure_naive
    from saenb.hooks import splice_point

    loaded = load(args.shape, args.device, args.layers)
    hooks = loaded.hooks("resid")
    cfg = loaded.model.cfg
    if args.profile:
        return profile(loaded, hooks, args)
    print(f"{args.shape} on {loaded.device}, {torch.get_num_threads()} threads; d_model {cfg.d_model}, "
          f"{cfg.n_layers} layers, vocabulary {cfg.d_vocab}; {len(hooks)} residual SAEs of "
          f"{next(iter(loaded.saes.values())).cfg.d_sae} latents"
          f"{f' (L0 set to {SYNTHETIC_L0})' if args.shape == 'gpt2-small' else ''}; interventions "
          f"{', '.join(interventions(args))}{'; graphs' if args.graphs else ''}; median of {args.repeats} [min-max]")
    rows, flops = [], {}
    for name in modes(args.samples):
        if name != "all-token" and not any(m in name for m in args.modes):
            continue
        sample_mode = "sample" in name
        common = arguments(loaded, hooks, args, name)
        measure(loaded, **{**common, "tokens": common["tokens"][:1]})  # warm-up
        # fast and naive alternate, so that a disturbance of the shared machine hits both
        t_fast, t_naive = [], []
        # the naive many-sample run takes minutes: once, on the first --naive-samples draws of each context (the
        # draws are keyed by sample index, so they are the fast run's first rows), its time scaled to all of
        # them: the naive path forwards every sample from the embedding, a cost exactly linear in the samples
        n_naive = min(args.naive_samples, args.samples) if sample_mode else None
        scale = args.samples / n_naive if sample_mode else 1.0
        for rep in range(args.repeats):
            fast, t = timed(lambda common=common: measure(loaded, **common))
            t_fast.append(t)
            if not (sample_mode and rep):
                naive_kw = {**common, "n_samples": n_naive} if sample_mode else common
                naive, t = timed(lambda kw=naive_kw: measure_naive(loaded, **kw))
                t_naive.append(t * scale)
        shared = fast[fast["sample"] < n_naive].reset_index(drop=True) if sample_mode else fast
        assert len(shared) == len(naive) and (shared["seq"].to_numpy() == naive["seq"].to_numpy()).all()
        err = (shared.kl - naive.kl).abs().max()
        if sample_mode and scale != 1:
            print(f"{name}: the naive path timed on {n_naive} of the {args.samples} samples, scaled by {scale:g}")
        rows.append((name, len(fast), t_naive, t_fast, err))
        if sample_mode:  # the work its rows need: the blocks from the hooked layer on at one position, the unembedding
            hook = common["hooks"][0]
            flops[name] = len(fast) * row_flops(cfg, splice_point(hook)[1], common["positions"] + 1)
        else:  # the matmuls the fast path runs
            with FlopCounterMode(display=False) as counter:
                measure(loaded, **common)
            flops[name] = counter.get_total_flops()
    # how much of the all-token speed-up the fused kernels give (the rest is the engine's design)
    common = arguments(loaded, hooks, args, "all-token")
    tokens = common["tokens"]
    unfused = [timed(lambda: measure(loaded, **{**common, "fused": False}))[1] for _ in range(args.repeats)]
    rows.append(("all-token, unfused", rows[0][1], rows[0][2], unfused, float("nan")))
    print(f"\n{'mode':<20}{'rows':>9}{'naive':>30}{'fast':>22}{'speed-up':>10}{'max |dKL|':>11}")
    for name, n_rows, t_naive, t_fast, err in rows:
        ratio = statistics.median(t_naive) / statistics.median(t_fast)
        print(f"{name:<20}{n_rows:>9}{spread(t_naive):>30}{spread(t_fast):>22}{ratio:>9.1f}x{err:>11.1e}")

    # The returned frame (one row per token x hook x intervention) necessarily grows with the tokens; the
    # engine's own working memory (batch activations, chunk forwards, logits blocks) is what must stay flat.
    # glibc keeps freed blocks mapped, so RSS would show the high-water mark of fragmentation rather than of
    # live memory: the workers allocate anything above 64 KiB with mmap and trim on free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    if args.memory_seqs > 0:  # --memory-seqs 0 skips the memory measurement
        print(f"\nfast all-token peak {'device' if loaded.device.type == 'cuda' else 'resident'} memory above the "
              "loaded model (fresh process each):")
        print(f"  {'sequences':>9} {'tokens':>7} {'peak MiB':>9} {'frame MiB':>10} {'peak - frame':>13}")
        for n in (args.memory_seqs, 4 * args.memory_seqs):
            out = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--device", args.device, "--layers",
                                  *map(str, args.layers), "--interventions", *interventions(args), "--worker", str(n),
                                  *(["--graphs"] if args.graphs else [])], capture_output=True, text=True, check=True,
                                 env=env)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            peak, frame = got["peak_bytes"] / 2**20, got["frame_bytes"] / 2**20
            print(f"  {n:>9} {n * tokens.shape[1]:>7} {peak:>9.1f} {frame:>10.1f} {peak - frame:>13.1f}")

    # achieved FLOP/s of each mode's fast path (its median time above) vs a plain matmul, same run
    n = matmul_size(loaded.device)
    peak = matmul_flops_per_s(loaded.device, n)
    print(f"\nfast path's matmul rate against a plain {n}^3 float32 matmul in this run (best of 5: {peak / 1e9:.1f} "
          "GFLOP/s):")
    print(f"  {'mode':<18}{'GFLOP':>9}{'fast s':>9}{'GFLOP/s':>9}{'fraction':>10}")
    for name, _, _, t_fast, _ in rows[:len(flops)]:
        t = statistics.median(t_fast)
        print(f"  {name:<18}{flops[name] / 1e9:>9.1f}{t:>9.2f}{flops[name] / t / 1e9:>9.1f}"
              f"{flops[name] / t / peak:>10.2f}{'  (rows x row_flops)' if 'sample' in name else ''}")
    t = statistics.median(rows[0][3])
    achieved = flops["all-token"] / t
    # the study's run: every token of 2M patched by each of 9 interventions at each of 12 layers (all-token mode)
    per_splice = flops["all-token"] / rows[0][1]  # per measured (token, hook, intervention) row
    splices = STUDY["tokens"] * STUDY["interventions"]  # per layer
    per_layer = per_splice * splices
    minutes = {name: per_layer / rate / 60 for name, rate in
               (("fp32", H100_FP32), ("tf32", H100_TF32), ("here", H100_FP32 * achieved / peak))}
    measured = t / rows[0][1] * splices / 60  # this device's own time per row, scaled to the study's rows
    print(f"the study's run (2M tokens x 12 layers x 9 interventions) at {per_splice / 1e9:.3f} GFLOP per splice "
          f"({cfg.d_vocab}-token vocabulary): {per_layer * STUDY['layers'] / 1e15:.1f} PFLOP; projected on an H100: "
          f"{minutes['fp32']:.2f} min per layer at its FP32 datasheet rate ({minutes['tf32']:.2f} in TF32), "
          f"{minutes['here']:.2f} min at the fraction of peak reached here; measured on this {loaded.device.type}: "
          f"{measured:.2f} min per layer; the study's: {STUDY['minutes_per_layer']} min per layer")


if __name__ == "__main__":
    main()
