"""`python -m saenb.saes {list,cache,build,commit}`: the declared SAE sets, trained and committed.

    python -m saenb.saes list --set fixes               # each spec, its key and where it is stored
    python -m saenb.saes cache --set fixes --preset smollm2-135m   # the set's activation caches, whole (resumable;
                                                        # a real model's long pass, run ahead in the background)
    python -m saenb.saes build --set fixes              # train what is stored nowhere (resumable)
    python -m saenb.saes build --set fixes --evaluate   # and record sae_lens run_evals quality figures
    python -m saenb.saes commit --set fixes             # copy the set's locally trained SAEs into the bundle
    python -m saenb.saes build --set base --preset mine --bundle path/to/bundle --commit
                                                        # a new bundle's own SAEs (its manifest's recipe)
    python -m saenb.saes build --set topk_sweep --ray auto   # one spec per task on a Ray cluster
    python -m saenb.saes build --set fixes --preset smollm2-135m --device cuda   # cache and train on a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

from saenb.checks import UsageError, positive_int
from saenb.models.presets import TINY_STDLIB, Preset, PresetError, register_preset
from saenb.saes import activations, cluster, library, sets, sources
from saenb.saes.quality import evaluate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saenb.saes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("list", "cache", "build", "commit"))
    parser.add_argument("--set", dest="name", default="fixes", help=f"one of {sorted(sets.SETS)}")
    parser.add_argument("--preset", default="tiny-stdlib", help="a registered bundle preset, or a name for --bundle")
    parser.add_argument("--bundle", default=None,
                        help="a bundle folder (not registered): registered as --preset for this command")
    parser.add_argument("--groups", default=None, help="comma-separated groups of the set (default: all)")
    parser.add_argument("--evaluate", action="store_true", help="record run_evals quality in each record.json")
    parser.add_argument("--commit", action="store_true", help="with build: copy what it trained into the bundle")
    parser.add_argument("--shards", type=int, default=None,
                        help="with cache: only the first N shards of each cache (1,024 contexts each)")
    parser.add_argument("--device", default=None,
                        help="with cache and build: the device of the activation passes, trainings and evaluations "
                             f"(cpu, cuda, cuda:1; default: ${sources.DEVICE_VARIABLE}, else cpu); each record says "
                             "where it ran")
    parser.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                        help="with build: train the specs on a Ray cluster, one spec per task ('auto': join a "
                             "running cluster or start one here)")
    args = parser.parse_args(argv)

    try:  # every option before anything is trained: argparse's `error: ...`, exit code 2
        if args.bundle:
            if not (Path(args.bundle) / "manifest.json").is_file():
                raise UsageError(f"--bundle {args.bundle}: no manifest.json there; pass a bundle folder "
                                 "(`python -m saenb.models.bundle build --out FOLDER` makes one)")
            register_preset(Preset(name=args.preset, bundle=args.bundle, sae_sources=TINY_STDLIB.sae_sources,
                                   layers=(0,), description=f"the bundle at {args.bundle}"))
        chosen = sets.get(args.name, args.preset)
        if args.groups is not None:
            groups, known = set(args.groups.split(",")), sorted({n.group for n in chosen})
            if groups - set(known):
                raise UsageError(f"--groups {sorted(groups - set(known))}: set {args.name!r} has groups {known}")
            chosen = [n for n in chosen if n.group in groups]
        if args.shards is not None:
            positive_int("--shards", args.shards)
        if args.device is not None:
            try:
                device = torch.device(args.device)
            except RuntimeError as exc:
                raise UsageError(f"--device {args.device}: not a device ({exc}); use cpu, cuda or cuda:N") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise UsageError(f"--device {args.device}: no CUDA device here (torch {torch.__version__}); "
                                 "use --device cpu")
            os.environ[sources.DEVICE_VARIABLE] = args.device  # read by sources.train_device (Ray's workers too)
        if args.ray and importlib.util.find_spec("ray") is None:
            raise UsageError("--ray needs Ray: pip install -e '.[ray]' (or drop --ray to train here)")
    except (ValueError, PresetError) as exc:
        parser.error(str(exc))
    if args.command == "cache":  # one pass per (model, hook, data_seed): SAEs that differ otherwise share it
        for spec in {(n.spec.model, n.spec.hook, n.spec.data_seed): n.spec for n in reversed(chosen)}.values():
            t0 = time.time()
            where = activations.complete(spec, args.shards)
            print(f"{spec.model} {spec.hook} seed {spec.data_seed}: {where} ({time.time() - t0:.0f} s)", flush=True)
        return 0
    if args.command == "build" and args.ray:
        cluster.build_specs([n.spec for n in chosen], address=args.ray)  # then the loop below finds them
    for named in chosen:
        where = library.find(named.spec)
        if args.command == "list":
            print(f"{named.name:24s} {named.group:10s} {named.spec.key} {where or '-'}")
        elif args.command == "build":
            t0 = time.time()
            if where is None:
                where = library.build(named.spec)
            if args.evaluate and "quality" not in library.record(named.spec) and (where / "record.json").exists():
                library.add_quality(named.spec, evaluate(named.spec))
            if args.commit and library.committed_dir(named.spec) is None:
                where = library.commit(named.spec)
            print(f"{named.name}: {where} ({time.time() - t0:.0f} s)", flush=True)
        elif args.command == "commit" and where is not None and library.committed_dir(named.spec) is None:
            print(library.commit(named.spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
