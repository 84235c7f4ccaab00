"""``samadapt compare``: one table of several evaluations (the table the study's paper is made of)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare evaluations: means ± std over seeds/folds, paired per-case statistics, case plot",
        description="Read the summary.json of each evaluate folder (or a summary.json file, nnU-Net's too); write "
                    "<out>.md, <out>.csv (means), <out>_paired.csv (paired statistics against the reference) and "
                    "<out>.png (per-case Dice).",
    )
    parser.add_argument("eval_dirs", nargs="+", metavar="EVAL_DIR",
                        help="evaluate output folders or summary.json files (samadapt or nnU-Net v2)")
    parser.add_argument("--out", default="compare", metavar="PREFIX", help="output prefix (default ./compare)")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="run names for the table (default: folder names)")
    parser.add_argument("--group", metavar="REGEX",
                        help="runs whose names are equal once the first match of REGEX is removed are replicates "
                             "of one method (e.g. 'seed=\\d+'): mean ± std over them, and paired replicate by "
                             "replicate (the match) against the reference's")
    parser.add_argument("--reference", metavar="NAME",
                        help="run (or group) the others are paired against (default: the first)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from samadapt.compare import compare_runs, default_names, groups_by_pattern, replicates_by_pattern
    from samadapt.errors import UserError

    if args.names and len(args.names) != len(args.eval_dirs):
        raise UserError(f"--names has {len(args.names)} names for {len(args.eval_dirs)} folders")
    names = args.names or default_names([Path(d) for d in args.eval_dirs])
    groups = groups_by_pattern(names, args.group) if args.group else None
    replicates = replicates_by_pattern(names, args.group) if args.group else None
    print(compare_runs(args.eval_dirs, args.out, names=names, groups=groups, reference=args.reference,
                       replicates=replicates))
    return 0
