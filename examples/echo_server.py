"""A minimal monte_trio echo server: every request is answered with its own body.

Run it (Ctrl-C stops it gracefully)::

    python examples/echo_server.py --port 5000
    python examples/echo_server.py --port 5000 --identity server.key

It prints ``listening on HOST:PORT`` and, for the native profile, ``public key: KEY``: give
that key to clients so they can pin it (``echo_client.py --server-key=KEY``). With
``--identity`` the key is stable across restarts (create the file with
``python -m monte_trio keygen server.key``); without it a fresh key is made each run.

``--monte-v1`` speaks Go monte's protocol instead, to serve Go monte clients; it encrypts
but authenticates nobody.
"""

from __future__ import annotations

import argparse
import signal

import trio

import monte_trio


async def echo(request: monte_trio.Request) -> bytes | None:
    """The handler: called for each request and one-way message."""
    if request.oneway:
        print(f"one-way message: {request.body!r}", flush=True)
        return None  # the return value of a one-way message is ignored
    return request.body  # the reply


async def main(port: int, identity_file: str | None, monte_v1: bool) -> None:
    if monte_v1:
        server = monte_trio.Server(echo, handshake=monte_trio.MonteV1Handshake())
        identity = None
    else:
        identity = (
            monte_trio.Identity.load(identity_file)
            if identity_file is not None
            else monte_trio.Identity.generate()
        )
        # AcceptAnyKey lets any client in: the traffic is encrypted and the server is
        # authenticated to clients that pin its key, but clients are anonymous. To accept
        # only known clients, pin their keys instead:
        #     trust=monte_trio.PinnedKeys(["<client public key>", ...])
        # or learn them on first use: trust=monte_trio.KnownKeysFile("known_clients").
        server = monte_trio.Server(echo, identity=identity, trust=monte_trio.AcceptAnyKey())

    # Catch Ctrl-C and SIGTERM ourselves so that we can shut down gracefully.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, port, "127.0.0.1")
            host, real_port = listeners[0].socket.getsockname()[:2]
            print(f"listening on {host}:{real_port}", flush=True)
            if identity is not None:
                print(f"public key: {identity.public_key}", flush=True)
            async for _ in signals:
                break
            # Stop accepting, let in-flight requests finish, close every connection.
            await server.shutdown()
    stats = server.statistics()
    print(f"served {stats.requests_received} requests", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A minimal monte_trio echo server.")
    parser.add_argument("--port", type=int, default=5000, help="0 picks a free port")
    parser.add_argument("--identity", metavar="FILE", help="the server's private key file")
    parser.add_argument("--monte-v1", action="store_true", help="speak Go monte's protocol")
    args = parser.parse_args()
    trio.run(main, args.port, args.identity, args.monte_v1)
