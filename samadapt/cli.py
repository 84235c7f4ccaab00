"""The ``samadapt`` command: one entry point, one subcommand per stage.

Stage commands take ``--config FILE.yaml`` plus dotted ``key=value`` overrides; ``samadapt <cmd> --help``
lists every key with its default. User mistakes (``UserError``) print as one line and exit 2; with
``--debug`` they keep their traceback. Works unchanged under ``accelerate launch`` (``python -m samadapt``).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
from typing import Callable, Sequence

from samadapt.errors import UserError, one_line
from samadapt.stages import COMMANDS, STAGES, StageSpec

# Command groups that register their own sub-parsers: module with add_parser(subparsers).
GROUPS = ("samadapt.data.commands", "samadapt.models.commands", "samadapt.pipelines.commands",
          "samadapt.evaluate.commands")
# Errors of the environment a user can fix (disk full, read-only output, permissions, a path that is a folder
# where a file is expected, a busy device, a name longer than the filesystem allows).
USER_OS_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.ENOENT, errno.EFBIG, errno.EIO,
                  errno.EISDIR, errno.ENOTDIR, errno.EBUSY, errno.ENAMETOOLONG, errno.EPERM, errno.ETXTBSY}
RESUME_HINT = "rerun the same command to resume from the last saved state"


class Terminated(BaseException):
    """SIGTERM (a scheduler's time limit, ``kill``): unwinds like Ctrl-C so progress bars close and the lock goes."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _stage_handler(spec: StageSpec) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        from samadapt.config import parse_config

        # Keys are checked before the stage's heavy imports (torch, monai: seconds), so a typo fails fast.
        config = parse_config(spec.config_class(), args.config, args.overrides)
        result = spec.run_function()(config)
        return 0 if result is None or getattr(result, "ok", True) else 1
    return handler


def _stage_epilog(spec: StageSpec) -> str:
    from samadapt.config import describe

    return "keys (key=default):\n" + describe(spec.config_class())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samadapt", description="Domain-adapt Segment Anything to MRI/CT: pretrain → finetune → evaluate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Stages and the commands that take a config like them (predict), from the one registry.
    for spec in (*STAGES.values(), *COMMANDS.values()):
        sub = subparsers.add_parser(spec.name, help=spec.summary, description=spec.summary,
                                    epilog=_stage_epilog(spec),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--config", metavar="FILE.yaml", help="YAML file with keys (overrides win)")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="config keys, see below")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.set_defaults(func=_stage_handler(spec))
    for module in GROUPS:
        try:
            add_parser = importlib.import_module(module).add_parser
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a missing dependency inside the module is a real bug
                raise
            continue
        add_parser(subparsers)
    return parser


def _version() -> str:
    from samadapt import __version__

    return f"samadapt {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options too (``run p.yaml --runs-dir d lr=1``); argparse's
    # positional list stops at the first option, so the rest are collected here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `samadapt run p.yaml --dry-run | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if args.debug or exc.errno not in USER_OS_ERRORS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror}", file=sys.stderr)
        return 1
    except UnicodeDecodeError as exc:  # a text file (manifest, config, labels.json) in another encoding
        if args.debug:
            raise
        print(f"error: a text input is not UTF-8 ({exc.reason} at byte {exc.start}) — save it as UTF-8",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted — {RESUME_HINT}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"terminated (SIGTERM) — {RESUME_HINT}", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
