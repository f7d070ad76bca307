"""The ``monte-trio`` program: its parser, made of one subparser per command, and ``main``.

Each command module (``_keygen``, ``_pubkey``, ``_serve``, ``_call``, ``_bench``,
``_demo``) adds its own subparser and sets ``run``, which checks the command's options
(usage errors go through the command's parser) and returns the command's work, an async
function. :func:`main` runs that work with :func:`trio.run`; :func:`async_main` awaits it
in an event loop already running (a test's, or an application's). Both turn what a command
raises into an exit status (:func:`._errors.exit_status`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import trio

from .._version import __version__
from . import _bench, _call, _demo, _keygen, _pubkey, _serve
from ._errors import exit_status
from ._options import Command, HelpFormatter, Job
from ._output import PROG

__all__ = ["async_main", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``monte-trio``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fast, fully-encrypted, bidirectional RPC over TCP for Trio: tools.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (_keygen, _pubkey, _serve, _call, _bench, _demo):
        command.add_parser(commands)
    return parser


def _prepare(argv: Sequence[str] | None) -> Job:
    """Parse ``argv`` and check the command's options; return the command's work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Command = args.run
    return run(args.command_parser, args)


def _status(exc: BaseException) -> int:
    """The exit status for ``exc`` raised by a command (re-raised if it is not expected)."""
    status = exit_status(exc)
    if status is None:
        raise exc
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``monte-trio`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    The options are checked before the event loop starts (:func:`trio.run`).

    Raises:
        SystemExit: bad usage (status 2), ``--help`` or ``--version`` (status 0).
    """
    try:
        return trio.run(_prepare(argv))
    except SystemExit:
        raise
    except BaseException as exc:
        return _status(exc)


async def async_main(argv: Sequence[str] | None = None) -> int:
    """:func:`main` in the event loop already running; return the exit status.

    Raises:
        SystemExit: bad usage (status 2), ``--help`` or ``--version`` (status 0).
    """
    try:
        job = _prepare(argv)
        return await job()
    except SystemExit:
        raise
    except BaseException as exc:
        return _status(exc)
