"""``monte-trio call HOST:PORT METHOD [JSON-ARGS...]``: call a method, print its result.

Each argument is a JSON value; the result is printed as JSON (a ``bytes`` result as a
string, its bytes decoded as UTF-8 with invalid ones escaped). A failed call exits with
status 1 and the error (code, registered name, message) on stderr, escaped like all text
a peer chose.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

import trio

from .._client import open_client
from .._config import ConnectionConfig
from .._util import printable
from ._interrupt import interruptible
from ._options import Job, add_command, add_security_options, address
from ._output import say
from ._security import Security, resolve_security

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``call`` command and its options to ``commands``."""
    call = add_command(
        commands,
        "call",
        summary="call a method and print its JSON result",
        description="Calls METHOD on the server at HOST:PORT with the JSON-ARGS (each one "
        "JSON value) as positional arguments, and prints the result as JSON. A failed "
        "call exits with status 1 and prints the error. Ctrl-C stops it (status 130).",
        run=run,
    )
    call.add_argument("address", type=address, metavar="HOST:PORT", help="the server")
    call.add_argument("method", metavar="METHOD", help="the method's full name")
    call.add_argument(
        "args", nargs="*", metavar="JSON-ARGS", help="arguments, one JSON value each"
    )
    add_security_options(call, who="server")
    call.add_argument(
        "--codec",
        choices=("json", "msgpack"),
        default="json",
        help="the service codec, as the server's (msgpack needs msgspec)",
    )


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Job:
    """Parse the JSON arguments; return the work: one call."""
    values: list[Any] = []
    for index, text in enumerate(args.args, start=1):
        try:
            values.append(json.loads(text))
        except (ValueError, RecursionError) as exc:
            parser.error(f"argument {index} is not a JSON value: {exc}")
    try:
        config = ConnectionConfig(codec=args.codec)
    except ValueError as exc:
        parser.error(f"--codec: {exc}")
    security = resolve_security(parser, args, who="server")
    return functools.partial(
        interruptible, functools.partial(_call, args, security, config, values)
    )


def _bytes_as_text(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    raise TypeError(f"{type(value).__name__} is not JSON")


async def _call(
    args: argparse.Namespace,
    security: Security,
    config: ConnectionConfig,
    values: list[Any],
    interrupt: trio.CancelScope,
) -> int:
    host, port = args.address
    async with open_client(
        host,
        port,
        handshake=security.handshake,
        identity=security.identity,
        trust=security.trust,
        psk=security.psk,
        config=config,
        max_conns=1,
    ) as client:
        with interrupt:
            result = await client.call(args.method, *values)
    if interrupt.cancel_called:
        return 130
    say(printable(json.dumps(result, ensure_ascii=False, default=_bytes_as_text)))
    return 0
