"""Command line: `python -m saenb {presets,reproduce,report,score,sweep} ...`."""

from __future__ import annotations

import argparse
import sys

from saenb.checks import UsageError
from saenb.files import BundleError
from saenb.models.hub import HubUnavailableError
from saenb.models.presets import get_preset, list_presets
from saenb.output.report import write_report
from saenb.output.reproduce import check, reproduce
from saenb.saes.library import SpecError
from saenb.studies import fixes, scoring
from saenb.studies.pathology import format_table


USER_ERRORS = (UsageError, ValueError, HubUnavailableError, BundleError, SpecError, FileNotFoundError, ImportError)
"""What a command reports as `<prog> <command>: error: ...` with exit code 2, no traceback: a request it cannot serve
(`UsageError`, and the ValueErrors of presets and the engine's checks), a hub file not cached offline, a bundle or
SAE spec that is missing, a file that is not there, an optional package not installed. Each message names the
value and the fix; every option is checked before the work starts."""


def fail(prog: str, command: str, exc: BaseException) -> int:
    print(f"{prog} {command}: error: {exc}", file=sys.stderr)
    return 2


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
    rp.add_argument("--quick", action="store_true", help="the quick run's report (figures/<preset>/quick/)")
    sc = sub.add_parser("score", help="the pathology score of SAEs: a preset's, a sae_lens release's, or folders",
                        description=scoring.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = sc.add_argument_group("which SAEs (one of)")
    src.add_argument("--preset", default="tiny-stdlib", help="every SAE of a preset (the default)")
    src.add_argument("--release", default=None, help="regex over sae_lens's pretrained releases (with --sae-id)")
    src.add_argument("--sae-id", default=None, help="regex over the matched releases' SAE ids")
    src.add_argument("--sae-path", nargs="+", default=None, help="SAE folders (SAE.load_from_disk), with --model")
    sc.add_argument("--model", default=None, help="for --sae-path: a preset name or a TransformerLens model name")
    sc.add_argument("--hooks", default=None, help="with --preset: comma-separated hook names (default: every SAE)")
    tok = sc.add_argument_group("tokens (default: the preset's held-out contexts)")
    tok.add_argument("--dataset", default=None, help="a Hugging Face dataset (text column), streamed")
    tok.add_argument("--text", default=None, help="a local text file, or a folder of them")
    tok.add_argument("--tokens", default=None, help="a saved LongTensor [n_contexts, n_ctx] (torch.save)")
    sc.add_argument("--n-tokens", type=int, default=65_536)
    sc.add_argument("--context-size", type=int, default=None)
    sc.add_argument("--batch-size", type=int, default=16)
    sc.add_argument("--device", default="auto")
    sc.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--interventions", default="sae,eps_random,zero",
                    help="comma-separated registered interventions (sae, eps_random and zero at least)")
    sc.add_argument("--include-special", action="store_true", help="patch and measure special tokens too")
    sc.add_argument("--output-dir", default=None, help="one SAEBench-shaped JSON per SAE, and pathology.csv")
    sc.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                    help="measure on a Ray cluster: 'auto' joins a running one or starts one here, or its address "
                         "(needs pip install -e '.[ray]')")
    sw = sub.add_parser("sweep", help="commit a preset's trained sweep points into its bundle (records, "
                        "measurements, the listed weights)", description=fixes.commit_sweep.__doc__)
    sw.add_argument("--preset", default="smollm2-135m")
    sw.add_argument("--set", default="fixes", help="a named SAE set at one hook (saenb.saes.sets)")
    sw.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    if args.command == "presets":
        for name in list_presets():
            print(f"{name:14s} {get_preset(name).description}")
        return 0
    if args.command == "score":
        try:
            table = scoring.run(args)
        except USER_ERRORS as exc:
            return fail(parser.prog, "score", exc)
        print(format_table(table))
        if args.output_dir:
            print(f"wrote {len(table)} JSON files and pathology.csv to {args.output_dir}")
        return 0
    if args.command == "report":
        try:
            paths = write_report(args.preset, quick=args.quick)
        except USER_ERRORS as exc:  # unknown preset, nothing saved yet: the message names the fix
            return fail(parser.prog, "report", exc)
        for path in paths:
            print(path)
        return 0
    if args.command == "sweep":
        try:
            get_preset(args.preset)
            names = fixes.commit_sweep(args.preset, args.set, device=args.device)
        except USER_ERRORS as exc:
            return fail(parser.prog, "sweep", exc)
        print(f"recorded {len(names)} points into the {args.preset} bundle: {', '.join(names) or 'none new'}")
        return 0
    if args.command == "reproduce":
        only = args.only.split(",") if args.only is not None else None
        try:  # preset, notebook numbers, output folders: before any notebook runs
            check(args.preset, only, quick=args.quick)
        except USER_ERRORS as exc:
            return fail(parser.prog, "reproduce", exc)
        outcomes = reproduce(args.preset, only, quick=args.quick)
        return 0 if all(o.ok for o in outcomes) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
