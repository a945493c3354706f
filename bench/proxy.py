"""Benchmark: notebook 07's sweep evaluation (`saenb.studies.proxy.evaluate`) against the plain way.

    python bench/proxy.py [--preset tiny-stdlib] [--seqs 32] [--device auto]

The plain way evaluates each TopK SAE on its own, as a per-SAE eval script would: a clean forward for
L_orig, a `run_with_cache` for the activations it reconstructs, and a full `run_with_hooks` forward with the
splice for L_recon. `evaluate` shares one clean forward per model and batch among all that model's SAEs and
runs each splice on from its layer (`start_at_layer`) and computes every metric of the table besides; the
plain way only CE. Both give the same CE_recon (checked here); the ratio of their times is measured in this
one run (evaluate's bootstrap CIs at 100 resamples: they are not what is being compared).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformer_lens.utilities import get_act_name

from saenb import load_preset
from saenb.models.loaded import resolve_device
from saenb.studies import proxy


@torch.inference_mode()
def plain(sweep: proxy.Sweep, tokens: torch.Tensor, batch_size: int) -> dict:
    ce = {}
    for (model_key, layer, k, factor), sae in sweep.saes.items():
        model = sweep.models[model_key]
        hook = get_act_name("resid_post", layer)

        def splice(act, hook, sae=sae):  # BOS keeps its clean activation, as in the sweep
            return torch.cat([act[:, :1], sae.decode(sae.encode(act[:, 1:]))], dim=1)

        total = 0.0
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size]
            model(batch, return_type="loss")
            _, cache = model.run_with_cache(batch, names_filter=[hook])
            sae.encode(cache[hook])
            total += float(model.run_with_hooks(batch, return_type="loss", fwd_hooks=[(hook, splice)])) * len(batch)
        ce[(model_key, layer, k, factor)] = total / len(tokens)
    return ce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-stdlib")
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    sweep = proxy.load_sweep(args.preset, device=device)
    tokens = load_preset(args.preset, device=device, layers=[0], families=("resid",)).tokens(args.seqs).to(device)
    n_tokens = tokens.numel() * len(sweep.saes)

    t0 = time.perf_counter()
    fast = proxy.evaluate(sweep, tokens, batch_size=args.batch_size, n_resamples=100, progress=False)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = plain(sweep, tokens, args.batch_size)
    t_plain = time.perf_counter() - t0

    worst = max(abs(row.ce_recon - slow[(row.model, row.layer, row.k, row.budget)]) / row.ce_recon
                for row in fast.itertuples())
    print(f"{len(sweep.saes)} SAEs x {len(tokens)} contexts on {device}; CE_recon agrees to {worst:.1e} (relative)")
    print(f"evaluate (all metrics): {t_fast:6.1f} s  {n_tokens / t_fast:9.0f} SAE-tokens/s")
    print(f"plain (CE only):        {t_plain:6.1f} s  {n_tokens / t_plain:9.0f} SAE-tokens/s")
    print(f"speed-up: {t_plain / t_fast:.2f}x")


if __name__ == "__main__":
    main()
