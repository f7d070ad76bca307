"""A minimal monte_trio echo client: sends each word as a request and prints the reply.

Run it against ``echo_server.py``::

    python examples/echo_client.py 127.0.0.1:5000 hello world
    python examples/echo_client.py 127.0.0.1:5000 --server-key=KEY hello world

``--server-key`` pins the server's public key (the ``public key:`` line the server prints).
Write it with ``=``: a key may start with ``-``, which would otherwise read as an option.
the connection is refused unless the server proves it holds that key. Without it the client
accepts any server key (and warns), which still encrypts but does not authenticate the server.
``--monte-v1`` speaks Go monte's protocol instead (to talk to a Go monte server).

Exits 0 if every reply equals what was sent, 1 on an error, 130 if stopped with Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import unicodedata

import trio

import monte_trio


def printable(text: str) -> str:
    """``text`` with control characters escaped, so that a server cannot drive our terminal."""
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")
        else char
        for char in text
    )


async def main(
    host: str, port: int, server_key: str | None, monte_v1: bool, words: list[str]
) -> int:
    if monte_v1:
        client = monte_trio.open_client(host, port, handshake=monte_trio.MonteV1Handshake())
    else:
        trust: monte_trio.TrustPolicy
        if server_key is not None:
            # Only a server holding this key gets through the handshake.
            trust = monte_trio.PinnedKeys([server_key])
        else:
            print("warning: no --server-key: accepting any server", file=sys.stderr, flush=True)
            trust = monte_trio.AcceptAnyKey()
        # identity= is this client's own key; by default a fresh one per run. Load one
        # with monte_trio.Identity.load("client.key") if the server pins client keys.
        client = monte_trio.open_client(host, port, trust=trust)

    # The first connection is dialed (and the handshake done) on entering the block.
    async with client as c:
        for word in words:
            body = word.encode()
            reply = await c.request(body)
            print(f"reply: {printable(reply.decode(errors='replace'))}", flush=True)
            if reply != body:
                print("the reply differs from the request!", file=sys.stderr)
                return 1
    return 0


async def until_ctrl_c(
    host: str, port: int, server_key: str | None, monte_v1: bool, words: list[str]
) -> int:
    """Run :func:`main`: its status, 1 on an error, 130 if Ctrl-C (SIGINT) cancelled it.

    Without this, Trio raises KeyboardInterrupt wherever the program happens to be (inside
    an ExceptionGroup if that is in a nursery); with it, Ctrl-C is a plain cancellation.
    """
    with trio.open_signal_receiver(signal.SIGINT) as signals, trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def on_ctrl_c() -> None:
                async for _ in signals:
                    scope.cancel()

            nursery.start_soon(on_ctrl_c)
            try:
                return await main(host, port, server_key, monte_v1, words)
            except monte_trio.MonteError as exc:  # e.g. the server's key is not the pinned one
                print(f"error: {printable(str(exc))}", file=sys.stderr)
                return 1
            finally:
                nursery.cancel_scope.cancel()
    return 130


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A minimal monte_trio echo client.")
    parser.add_argument("address", metavar="HOST:PORT")
    parser.add_argument("words", nargs="+", metavar="WORD", help="messages to send")
    parser.add_argument(
        "--server-key", metavar="KEY", help="pin the server's public key (write --server-key=KEY)"
    )
    parser.add_argument("--monte-v1", action="store_true", help="speak Go monte's protocol")
    args = parser.parse_args()
    host, _, port = args.address.rpartition(":")
    try:
        status = trio.run(
            until_ctrl_c, host, int(port), args.server_key, args.monte_v1, args.words
        )
    except KeyboardInterrupt:  # Ctrl-C before until_ctrl_c was listening for it
        status = 130
    sys.exit(status)
