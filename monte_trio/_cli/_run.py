"""The ``monte-trio`` program: its parser, made of one subparser per command, and ``main``.

Each command module (``_keygen``, ``_serve``, ``_bench``, ``_demo``) adds its own subparser
and sets ``run``, the function ``main`` calls with the command's parser (for usage errors)
and the parsed arguments. ``main`` turns what a command raises into an exit status
(:func:`._errors.exit_status`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .._version import __version__
from . import _bench, _demo, _keygen, _serve
from ._errors import exit_status
from ._options import Command, HelpFormatter
from ._output import PROG

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``monte-trio``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fast, fully-encrypted, bidirectional RPC over TCP for Trio: tools.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (_keygen, _serve, _bench, _demo):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``monte-trio`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Raises:
        SystemExit: bad usage (status 2), ``--help`` or ``--version`` (status 0).
    """
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        run: Command = args.run
        return run(args.command_parser, args)
    except SystemExit:
        raise
    except BaseException as exc:
        status = exit_status(exc)
        if status is None:
            raise
        return status
