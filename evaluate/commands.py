"""``samadapt compare``: one table of several evaluations (the table the study's paper is made of)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare evaluate folders: Markdown/CSV table of mean metrics + Dice bar chart",
        description="Read summary.json of each evaluate folder; write <out>.md, <out>.csv and <out>.png.",
    )
    parser.add_argument("eval_dirs", nargs="+", metavar="EVAL_DIR", help="evaluate output folders")
    parser.add_argument("--out", default="compare", metavar="PREFIX", help="output prefix (default ./compare)")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="run names for the table (default: folder names)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from samadapt.errors import UserError
    from samadapt.report import compare_runs

    if args.names and len(args.names) != len(args.eval_dirs):
        raise UserError(f"--names has {len(args.names)} names for {len(args.eval_dirs)} folders")
    print(compare_runs(args.eval_dirs, args.out, names=args.names))
    return 0
