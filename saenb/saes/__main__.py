"""`python -m saenb.saes {list,build,commit}`: the declared SAE sets, trained and committed.

    python -m saenb.saes list --set fixes               # each spec, its key and where it is stored
    python -m saenb.saes build --set fixes              # train what is stored nowhere (resumable)
    python -m saenb.saes build --set fixes --evaluate   # and record sae_lens run_evals quality figures
    python -m saenb.saes commit --set fixes             # copy the set's locally trained SAEs into the bundle
"""

from __future__ import annotations

import argparse
import sys
import time

from saenb.saes import library, sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saenb.saes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("list", "build", "commit"))
    parser.add_argument("--set", dest="name", default="fixes", help=f"one of {sorted(sets.SETS)}")
    parser.add_argument("--groups", default=None, help="comma-separated groups of the set (default: all)")
    parser.add_argument("--evaluate", action="store_true", help="record run_evals quality in each record.json")
    args = parser.parse_args(argv)
    try:
        chosen = sets.get(args.name)
    except ValueError as exc:
        parser.error(str(exc))
    if args.groups:
        groups = set(args.groups.split(","))
        chosen = [n for n in chosen if n.group in groups]
    for named in chosen:
        where = library.find(named.spec)
        if args.command == "list":
            print(f"{named.name:24s} {named.group:10s} {named.spec.key} {where or '-'}")
        elif args.command == "build":
            t0 = time.time()
            if where is None:
                where = library.build(named.spec)
            if args.evaluate and "quality" not in library.record(named.spec) and (where / "record.json").exists():
                from saenb.saes.quality import evaluate

                library.add_quality(named.spec, evaluate(named.spec))
            print(f"{named.name}: {where} ({time.time() - t0:.0f} s)", flush=True)
        elif args.command == "commit" and where is not None and library.committed_dir(named.spec) is None:
            print(library.commit(named.spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
