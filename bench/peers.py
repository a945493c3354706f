"""Benchmark: saenb's pathology score against sae_lens's own evals on the same SAEs and tokens.

    python bench/peers.py [--preset tiny-stdlib] [--seqs 64] [--repeats 3] [--family resid]

sae_lens's `run_evals` (KL and CE only: `compute_kl`, `compute_ce_loss`; special tokens excluded, as saenb does)
runs each SAE on its own: per batch a clean forward, the SAE splice and zero ablation, each a full forward.
saenb's `measure` scores every SAE of the preset in one pass (one clean forward per batch, splices run on from
their layer) and also computes the eps-random baseline. Printed in one run: the wall time of each (median of
`--repeats`, caches cold: the measurement store is not used), their ratio, and how far apart their
kl_div_with_sae and ce_loss_score are.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from datasets import Dataset
from sae_lens import ActivationsStore, run_evals
from sae_lens.evals import EvalConfig
from sae_lens.training.activation_scaler import ActivationScaler

from saenb import load_preset, measure
from saenb.engine import metrics


def sae_lens_evals(loaded, tokens: torch.Tensor, batch: int) -> dict[str, dict[str, float]]:
    out = {}
    for hook, sae in loaded.saes.items():
        store = ActivationsStore.from_sae(loaded.model, sae, dataset=Dataset.from_dict({"tokens": tokens.numpy()}),
                                          context_size=tokens.shape[1], streaming=False, store_batch_size_prompts=batch,
                                          train_batch_size_tokens=batch * tokens.shape[1], n_batches_in_buffer=2)
        cfg = EvalConfig(batch_size_prompts=batch, n_eval_reconstruction_batches=len(tokens) // batch,
                         compute_kl=True, compute_ce_loss=True)
        with torch.no_grad():
            m, _ = run_evals(sae, store, loaded.model, ActivationScaler(), cfg, exclude_special_tokens=True)
        out[hook] = {"kl": m["model_behavior_preservation"]["kl_div_with_sae"],
                     "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"]}
    return out


def saenb_score(loaded, tokens: torch.Tensor, batch: int) -> dict[str, dict[str, float]]:
    # every position with a next token (sae_lens's CE mask), as run_evals measures them
    df = measure(loaded, None, ["sae", "eps_random", "zero"], tokens, measure_positions=range(1, tokens.shape[1]),
                 batch_size=16, progress=False)  # the engine's default batch: its fastest here
    out = {}
    for hook, sub in df.groupby("hook", observed=True):
        by = sub.groupby("intervention", observed=True)
        kl, ce = by.kl.mean(), by.ce_patched.mean()
        out[hook] = {"kl": kl["sae"], "kl_eps_random": kl["eps_random"],
                     "ce_loss_score": metrics.ce_loss_score(by.ce_clean.mean()["sae"], ce["sae"], ce["zero"])}
    return out


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-stdlib")
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--family", default=None, choices=("resid", "z"), help="only this hook family's SAEs")
    args = parser.parse_args()
    loaded = load_preset(args.preset, device="cpu", families=(args.family,) if args.family else ("resid", "z"))
    tokens = loaded.tokens(args.seqs)
    t_lens, all_lens, theirs = timed(lambda: sae_lens_evals(loaded, tokens, args.batch), args.repeats)
    t_ours, all_ours, ours = timed(lambda: saenb_score(loaded, tokens, args.batch), args.repeats)
    print(f"{len(loaded.saes)} SAEs x {args.seqs} contexts of {tokens.shape[1]} tokens, {torch.get_num_threads()} "
          f"threads, median of {args.repeats}")
    print(f"sae_lens run_evals (KL, CE; per SAE):        {t_lens:7.2f} s  {[round(t, 2) for t in all_lens]}")
    print(f"saenb measure (sae + eps_random + zero):   {t_ours:7.2f} s  {[round(t, 2) for t in all_ours]}")
    print(f"speed-up: {t_lens / t_ours:.2f}x, while also computing the eps-random baseline")
    kl_rel = np.array([abs(ours[h]["kl"] / theirs[h]["kl"] - 1) for h in theirs])
    ce_abs = np.array([abs(ours[h]["ce_loss_score"] - theirs[h]["ce_loss_score"]) for h in theirs])
    print(f"kl_div_with_sae: max relative difference {kl_rel.max():.2e}; ce_loss_score: max absolute difference "
          f"{ce_abs.max():.2e}")
    for hook in theirs:
        print(f"  {hook:26s} KL {ours[hook]['kl']:.5f} vs {theirs[hook]['kl']:.5f}   ce_loss_score "
              f"{ours[hook]['ce_loss_score']:.4f} vs {theirs[hook]['ce_loss_score']:.4f}   ratio to eps-random "
              f"{ours[hook]['kl'] / ours[hook]['kl_eps_random']:.2f}")


if __name__ == "__main__":
    main()
