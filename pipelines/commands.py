"""``samadapt run``: the pipeline command (see :mod:`samadapt.pipelines.runner`)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="run a pipeline of stages (skips finished ones, resumes crashed ones)",
        description="Run a pipeline YAML (or a packaged one: demo, strategy_grid). Stages whose "
                    "stage_output.json matches the current config and inputs are skipped.",
    )
    parser.add_argument("pipeline", help="pipeline YAML file or packaged pipeline name")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="key=value for every stage that has the key, or <stage>.key=value for one stage")
    parser.add_argument(
        "--from", dest="start", metavar="STAGE", help="start at this stage (earlier ones must be complete)"
    )
    parser.add_argument("--until", metavar="STAGE", help="stop after this stage")
    parser.add_argument("--force", action="store_true", help="rerun selected stages even if up to date")
    parser.add_argument("--dry-run", action="store_true", help="list the stages and their status, run nothing")
    parser.add_argument("--cost", action="store_true",
                        help="with --dry-run: each fine-tune's training FLOPs and GPU time on paper (s per stage)")
    parser.add_argument("--runs-dir", metavar="DIR", help="folder for the stage folders (default runs/<pipeline name>)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from samadapt.pipelines.runner import run_pipeline

    run_pipeline(
        args.pipeline,
        args.overrides,
        start=args.start,
        until=args.until,
        force=args.force,
        dry_run=args.dry_run,
        cost=args.cost,
        runs_dir=args.runs_dir,
    )
    return 0
