"""The ``autopar`` command line: ``autopar SUBCOMMAND ...`` (also ``python -m autopar``).

Subcommands live in their own modules, ``autopar/cli/<name>.py``, listed in :data:`COMMANDS`
(adding one is one line there). A command module defines::

    ORDER = 30                      # position in ``autopar --help`` (optional, default 100)

    def add_parser(subparsers):     # register the subcommand
        p = subparsers.add_parser("name", help="one line", description="...")
        p.add_argument(...)
        p.set_defaults(func=run)

    def run(args) -> int | None:    # do it; print results; return the exit status (None = 0)
        ...

Keep module-level imports light (argparse, autopar.core.errors): heavy imports (torch, the tracer)
belong inside ``run`` so that ``autopar hardware`` starts fast.

Exit status: 0 success; 2 for any :class:`~autopar.core.errors.AutoparError` (message on stderr, no
traceback) and for bad arguments (argparse); 1 when a command reports failure itself; other
exceptions propagate with their traceback, because they are bugs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from autopar.core.errors import AutoparError

COMMANDS = ("estimate", "plan", "report", "run", "replan", "profile", "hardware", "models")
"""The subcommand modules of :mod:`autopar.cli`; their ``ORDER`` sets the order in ``--help``."""
ERROR_EXIT = 2


def command_modules() -> list[str]:
    """Names of the subcommand modules, in no particular order."""
    return [f"autopar.cli.{name}" for name in COMMANDS]


def load_commands() -> list:
    modules = []
    for name in command_modules():
        try:
            modules.append(importlib.import_module(name))
        except Exception as e:  # one broken command must not take the others down
            print(f"autopar: warning: command module {name} failed to import: {e!r}", file=sys.stderr)
    return sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def build_parser() -> argparse.ArgumentParser:
    from autopar import __version__

    parser = argparse.ArgumentParser(
        prog="autopar",
        description="Plan and estimate data/tensor/pipeline parallel training of PyTorch models.",
        epilog="`autopar COMMAND --help` describes a command. Reference: docs/cli.md",
    )
    parser.add_argument("--version", action="version", version=f"autopar {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log progress (-v) or debug detail (-vv) to stderr"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in load_commands():
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``autopar`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return ERROR_EXIT
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        status = args.func(args)
    except AutoparError as e:
        print(f"autopar {args.command}: error: {e}", file=sys.stderr)
        return ERROR_EXIT
    except KeyboardInterrupt:
        print("autopar: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `autopar ... | head`: the reader left; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
