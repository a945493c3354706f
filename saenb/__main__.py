"""Command line: `python -m saenb {presets,reproduce,report,score} ...`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saenb")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="list the registered presets")
    rep = sub.add_parser("reproduce", help="run the numbered notebooks with papermill")
    rep.add_argument("--preset", default="tiny-stdlib")
    rep.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 01,03")
    rep.add_argument("--quick", action="store_true", help="a few contexts per notebook (smoke run, CI)")
    rp = sub.add_parser("report", help="write figures/<preset>/report.{md,html} from the saved figures")
    rp.add_argument("--preset", default="tiny-stdlib")
    sc = sub.add_parser("score", help="the pathology score of every SAE of a preset")
    sc.add_argument("--preset", default="tiny-stdlib")
    sc.add_argument("--n-tokens", type=int, default=65_536)
    sc.add_argument("--hooks", default=None, help="comma-separated hook names (default: every SAE)")
    sc.add_argument("--device", default="auto")
    sc.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "presets":
        from saenb.presets import get_preset, list_presets

        for name in list_presets():
            print(f"{name:14s} {get_preset(name).description}")
        return 0
    if args.command == "score":
        from saenb.pathology import format_table, score
        from saenb.presets import load_preset

        loaded = load_preset(args.preset, device=args.device)
        table = score(loaded, args.hooks.split(",") if args.hooks else None, n_tokens=args.n_tokens, seed=args.seed)
        print(format_table(table))
        return 0
    if args.command == "report":
        from saenb.report import write_report

        for path in write_report(args.preset):
            print(path)
        return 0
    if args.command == "reproduce":
        from saenb.presets import get_preset
        from saenb.reproduce import reproduce

        get_preset(args.preset)  # an unknown preset fails here, listing the known ones
        outcomes = reproduce(args.preset, args.only.split(",") if args.only else None, quick=args.quick)
        return 0 if all(o.ok for o in outcomes) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
