"""A download-style streaming call: the client asks once, the server answers many times.

Run the demo (a server and a client in one process, on 127.0.0.1)::

    python examples/log_search.py

The server keeps a log (made up for the demo: 100,000 lines). The client opens a
download call with a search term as its one request; the server's call handler, an async
generator, yields every matching line as a message of its own, as it finds them. The
client reads them with ``async for`` as they arrive: it can start on the first line long
before the search ends, flow control paces the server to the client (a slow client holds
the generator back, it never piles lines up in memory), and leaving the ``async with``
block early would cancel the search at the server.

A term with no match ends the call with no message; an empty term is refused by the
handler, and the client gets the error as a :exc:`monte_trio.RemoteError`, as for a
unary request. Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import trio

import monte_trio

LEVELS = ("DEBUG", "INFO", "INFO", "INFO", "WARNING", "ERROR")


def make_log(lines: int) -> list[bytes]:
    """A deterministic log: ``<n> <LEVEL> request <n> took <ms> ms``."""
    return [
        b"%06d %s request %d took %d ms" % (n, LEVELS[n % 6].encode(), n, (n * 37) % 500)
        for n in range(lines)
    ]


class LogSearch:
    """The call handler: a download whose request is the term, whose replies are lines."""

    def __init__(self, log: list[bytes]) -> None:
        self.log = log

    async def __call__(self, call: monte_trio.IncomingCall) -> AsyncIterator[bytes]:
        term = await call.receive()  # a download's one request
        if not term:
            raise ValueError("an empty search term matches everything: ask for less")
        for number, line in enumerate(self.log):
            if term in line:
                yield line  # one message each, sent as the client's credit allows
            if number % 10_000 == 0:
                await trio.lowlevel.checkpoint()  # a long search stays cancellable


async def search(client: monte_trio.Client, term: bytes) -> list[bytes]:
    """Every line of the server's log that holds ``term``, in order."""
    async with client.download(term) as lines:
        return [line async for line in lines]


async def main() -> int:
    log = make_log(100_000)
    trust = monte_trio.AcceptAnyKey()  # for the demo; pin keys in real use
    server = monte_trio.Server(None, call_handler=LogSearch(log), trust=trust)
    ok = True
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, 0, "127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with monte_trio.open_client("127.0.0.1", port, trust=trust) as client:
            errors = await search(client, b"ERROR")
            expected = [line for line in log if b"ERROR" in line]
            ok &= errors == expected
            print(f"client: {len(errors):,} lines hold ERROR, the first: {errors[0].decode()}")
            slow = await search(client, b"took 499 ms")
            ok &= slow == [line for line in log if b"took 499 ms" in line]
            print(f"client: {len(slow):,} requests took 499 ms")
            ok &= await search(client, b"no such thing") == []
            print("client: no line holds 'no such thing'")
            try:
                await search(client, b"")
                ok = False
            except monte_trio.RemoteError as exc:
                print(f"client: an empty term was refused: {exc}")
        await server.shutdown()
        nursery.cancel_scope.cancel()
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(trio.run(main))
    except KeyboardInterrupt:
        sys.exit(130)
