"""Option parsing shared by the commands: argument types, the help format, the security flags.

Every value is checked by argparse itself (a bad one is a usage error, exit status 2) so
that nothing starts before the command line is known to be good.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Awaitable, Callable

from ._output import PROG

__all__ = [
    "MONTE_V1",
    "NATIVE",
    "PROFILES",
    "TRUST_CHOICES",
    "Command",
    "HelpFormatter",
    "Job",
    "add_command",
    "add_security_options",
    "address",
    "byte_size",
    "format_size",
    "non_negative_int",
    "port",
    "positive_int",
]

NATIVE = "native"
MONTE_V1 = "monte-v1"
PROFILES = (NATIVE, MONTE_V1)

Job = Callable[[], Awaitable[int]]
"""A command's work, checked and ready to run in an event loop: returns the exit status."""

Command = Callable[[argparse.ArgumentParser, argparse.Namespace], Job]
"""What ``main`` calls for a command: ``run(command_parser, args)`` checks the options
(reading the files they name) before any event loop starts and returns the :data:`Job`."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option that has a default and does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default is argparse.SUPPRESS
        ):
            return text
        return super()._get_help_string(action)


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    summary: str,
    description: str,
    run: Command,
) -> argparse.ArgumentParser:
    """Add the subparser of command ``name``, which ``main`` runs with ``run``.

    Args:
        commands: the program's subparsers.
        name: the command's name.
        summary: one line for the program's ``--help``.
        description: the paragraph of the command's ``--help``.
        run: called with the command's parser (for its usage errors) and the arguments;
            returns the command's work.

    Returns:
        The command's parser, to add its options to.
    """
    parser = commands.add_parser(
        name, help=summary, description=description, formatter_class=HelpFormatter
    )
    parser.set_defaults(command_parser=parser, run=run)
    return parser


def port(text: str) -> int:
    """An argparse ``type``: a port number, 0 to 65535."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range (0-65535)")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


_SIZE = re.compile(r"\s*(\d+)\s*([a-z]*)\s*", re.IGNORECASE)
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    **{f"{p}{suffix}": 1024**power for power, p in enumerate("kmg", 1) for suffix in ("", "ib")},
    **{f"{p}b": 1000**power for power, p in enumerate("kmg", 1)},
}


def byte_size(text: str) -> int:
    """An argparse ``type``: a number of bytes, ``0`` or more, with an optional unit:
    ``KiB``, ``MiB``, ``GiB`` (also ``K``, ``M``, ``G``: powers of 1024) or ``kB``, ``MB``,
    ``GB`` (powers of 1000), in any case."""
    match = _SIZE.fullmatch(text)
    factor = _UNITS.get(match.group(2).lower()) if match is not None else None
    if match is None or factor is None:
        raise argparse.ArgumentTypeError(
            f"not a size in bytes: {text!r} (write a number, optionally with a unit such as "
            "KiB, MiB or GiB: 1400, 64KiB, 256MiB)"
        )
    return int(match.group(1), 10) * factor


def format_size(nbytes: int) -> str:
    """``nbytes`` for people: ``8 MiB`` when it is a whole number of KiB, MiB or GiB,
    else ``1,400 bytes``."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor:,} {unit}"
    return f"{nbytes:,} bytes"


def address(text: str) -> tuple[str, int]:
    """An argparse ``type``: ``HOST:PORT`` or ``[V6ADDR]:PORT``, a port that can be dialed."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = port(port_text)
    if number == 0:
        raise argparse.ArgumentTypeError(f"port 0 cannot be dialed: {text!r}")
    return host, number


TRUST_CHOICES = (
    "'pin:KEY[,KEY...]' accepts exactly these {who} keys; "
    "'tofu:FILE' trusts on first use: new {who} keys are learned into FILE (a read-only "
    "FILE admits only the keys already in it); "
    "'any' accepts every {who} key: the traffic is encrypted but {who}s are not authenticated"
)


def add_security_options(parser: argparse.ArgumentParser, *, who: str) -> None:
    """Add ``--profile``, ``--identity``, ``--passphrase-file``, ``--trust`` and ``--psk``.

    Args:
        parser: the command's parser.
        who: the peer being authenticated: ``"client"`` (``serve``, where ``--trust`` is
            required) or ``"server"`` (``bench``, where it defaults to any, with a warning).
    """
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default=NATIVE,
        help="wire profile: native (Noise, authenticated) or monte-v1 (Go monte's protocol, "
        "unauthenticated: for talking to Go monte only)",
    )
    parser.add_argument(
        "--identity",
        metavar="FILE",
        help=f"native: this side's private key file (create one with '{PROG} keygen FILE') "
        "(default: a fresh key for this run)",
    )
    parser.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="the passphrase of the --identity file, if it is encrypted; FILE must be "
        "readable by its owner only (default: the key is not encrypted)",
    )
    if who == "client":  # serve: no default, the operator must choose
        trust_help = "native, required: which client keys to accept: " + TRUST_CHOICES.format(
            who=who
        )
    else:
        trust_help = (
            f"native: which {who} keys to accept: "
            + TRUST_CHOICES.format(who=who)
            + " (default: any, with a warning)"
        )
    parser.add_argument("--trust", metavar="SPEC", help=trust_help)
    parser.add_argument(
        "--psk",
        metavar="FILE",
        help="native: a pre-shared key both sides must hold; FILE holds 32 raw bytes or "
        "64 hexadecimal characters and is readable by its owner only (default: none)",
    )
