"""The key-value service's client: typed calls through a Protocol, and a callback it serves.

Run it against ``kv_server.py`` with operations, done in order::

    python examples/kv_client.py 127.0.0.1:5000 --server-key=KEY put colour blue get colour
    python examples/kv_client.py 127.0.0.1:5000 --watch "" put a 1 delete a get a keys

Operations: ``get KEY``, ``put KEY VALUE``, ``delete KEY``, ``keys``. Each prints one line
(``colour = blue``, ``put colour``, ``deleted colour``, ``keys: a, b``), or ``not found:
KEY`` when the server raised :class:`kv_server.NotFound`, which arrives here as itself.
``--watch PREFIX`` first asks the server to call this client back on each change of a key
starting with PREFIX (``""``: every key): the client serves :class:`kv_server.Watcher`,
and prints ``changed: KEY = VALUE`` (or ``changed: KEY deleted``) when called.

``--server-key=KEY`` pins the server's key (without it any server is accepted, with a
warning); ``--identity FILE`` is this client's key, for a server that pins client keys.
Exits 0 if every operation succeeded, 1 if a key was not found or on an error, 130 if
stopped with Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import unicodedata
from collections.abc import Awaitable, Callable

import trio
from kv_server import NAMESPACE, KeyValue, NotFound, Watcher

import monte_trio

ARITY = {"get": 1, "put": 2, "delete": 1, "keys": 0}


def printable(text: str) -> str:
    """``text`` with control characters escaped, so that a server cannot drive our terminal."""
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")
        else char
        for char in text
    )


def parse_operations(words: list[str]) -> list[list[str]]:
    """``["put", "a", "1", "keys"]`` -> ``[["put", "a", "1"], ["keys"]]``."""
    operations: list[list[str]] = []
    index = 0
    while index < len(words):
        name = words[index]
        if name not in ARITY:
            raise ValueError(f"unknown operation {name!r}: expected one of {', '.join(ARITY)}")
        operands = words[index + 1 : index + 1 + ARITY[name]]
        if len(operands) != ARITY[name]:
            raise ValueError(f"{name} takes {ARITY[name]} operand(s)")
        operations.append([name, *operands])
        index += 1 + ARITY[name]
    return operations


class PrintChanges:
    """Implements :class:`kv_server.Watcher`: the server calls it on each change."""

    async def changed(self, key: str, value: str | None) -> None:
        if value is None:
            print(f"changed: {printable(key)} deleted", flush=True)
        else:
            print(f"changed: {printable(key)} = {printable(value)}", flush=True)


async def run(kv: KeyValue, operations: list[list[str]]) -> int:
    """Do each operation through the typed proxy; 1 if a key was not found."""
    status = 0
    for name, *operands in operations:
        try:
            if name == "get":
                value = await kv.get(operands[0])  # mypy knows: str
                print(f"{printable(operands[0])} = {printable(value)}", flush=True)
            elif name == "put":
                await kv.put(operands[0], operands[1])
                print(f"put {printable(operands[0])}", flush=True)
            elif name == "delete":
                await kv.delete(operands[0])
                print(f"deleted {printable(operands[0])}", flush=True)
            else:
                keys = await kv.keys()
                print(f"keys: {', '.join(printable(key) for key in keys)}", flush=True)
        except NotFound as exc:  # the server's exception, raised here as itself
            shown = exc.details["key"] if exc.details else str(exc)
            print(f"not found: {printable(shown)}", flush=True)
            status = 1
    return status


async def main(
    host: str,
    port: int,
    server_key: str | None,
    identity_file: str | None,
    watch: str | None,
    operations: list[list[str]],
) -> int:
    trust: monte_trio.TrustPolicy
    if server_key is not None:
        trust = monte_trio.PinnedKeys([server_key])
    else:
        print("warning: no --server-key: accepting any server", file=sys.stderr, flush=True)
        trust = monte_trio.AcceptAnyKey()
    identity = monte_trio.Identity.load(identity_file) if identity_file is not None else None
    # The router serves what the server calls back: Watcher's methods.
    callbacks = monte_trio.Router()
    watcher: Watcher = PrintChanges()  # mypy: PrintChanges implements Watcher
    callbacks.add_service(watcher, Watcher)
    # One connection: the server calls back the connection that asked to watch.
    async with monte_trio.open_client(
        host, port, identity=identity, trust=trust, handler=callbacks, max_conns=1
    ) as client:
        kv = client.proxy(KeyValue, namespace=NAMESPACE)  # mypy sees a KeyValue
        if watch is not None:
            watching = await kv.watch(watch)
            print(f"watching {printable(watch)!r} ({watching} watching)", flush=True)
        return await run(kv, operations)


async def until_ctrl_c(program: Callable[[], Awaitable[int]]) -> int:
    """Run ``program``: its status, 1 on an error, 130 if Ctrl-C (SIGINT) cancelled it."""
    with trio.open_signal_receiver(signal.SIGINT) as signals, trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def on_ctrl_c() -> None:
                async for _ in signals:
                    scope.cancel()

            nursery.start_soon(on_ctrl_c)
            try:
                return await program()
            except monte_trio.MonteError as exc:  # e.g. the server's key is not the pinned one
                print(f"error: {printable(str(exc))}", file=sys.stderr)
                return 1
            finally:
                nursery.cancel_scope.cancel()
    return 130


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A client of kv_server.py.")
    parser.add_argument("address", metavar="HOST:PORT")
    parser.add_argument("operations", nargs="*", metavar="OPERATION", help="see above")
    parser.add_argument(
        "--server-key", metavar="KEY", help="pin the server's public key (write --server-key=KEY)"
    )
    parser.add_argument("--identity", metavar="FILE", help="this client's private key file")
    parser.add_argument("--watch", metavar="PREFIX", help="print changes of keys with PREFIX")
    args = parser.parse_intermixed_args()  # options may come after the address
    host, _, port = args.address.rpartition(":")
    try:
        operations = parse_operations(args.operations)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        program = functools.partial(
            main, host, int(port), args.server_key, args.identity, args.watch, operations
        )
        status = trio.run(until_ctrl_c, program)
    except KeyboardInterrupt:  # Ctrl-C before until_ctrl_c was listening for it
        status = 130
    sys.exit(status)
