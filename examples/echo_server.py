"""A minimal monte_trio echo server: every request is answered with its own body.

Run it (Ctrl-C or SIGTERM stops it gracefully; the exit status is then 130 or 0)::

    python examples/echo_server.py --port 5000
    python examples/echo_server.py --port 5000 --identity server.key --client-key=KEY

It prints ``listening on HOST:PORT`` and, for the native profile, ``public key: KEY``: give
that key to clients so they can pin it (``echo_client.py --server-key=KEY``). With
``--identity`` the key is stable across restarts (create the file with
``python -m monte_trio keygen server.key``); without it a fresh key is made each run.
``--client-key=KEY`` (repeatable) admits only clients holding one of those keys; without it
any client is served (encrypted, but clients are anonymous), with a warning.

``--monte-v1`` speaks Go monte's protocol instead, to serve Go monte clients; it encrypts
but authenticates nobody.
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio

import monte_trio


async def echo(request: monte_trio.Request) -> bytes | None:
    """The handler: called for each request and one-way message."""
    if request.oneway:
        print(f"one-way message: {request.body!r}", flush=True)
        return None  # the return value of a one-way message is ignored
    return request.body  # the reply


async def main(
    port: int, identity_file: str | None, client_keys: list[str], monte_v1: bool
) -> int:
    if monte_v1:
        server = monte_trio.Server(echo, handshake=monte_trio.MonteV1Handshake())
        identity = None
    else:
        identity = (
            monte_trio.Identity.load(identity_file)
            if identity_file is not None
            else monte_trio.Identity.generate()
        )
        # The trust policy decides which clients get in. PinnedKeys admits exactly the
        # given keys; KnownKeysFile("known_clients") would learn them on first use.
        # AcceptAnyKey lets any client in: the traffic is encrypted and the server is
        # authenticated to clients that pin its key, but clients are anonymous.
        trust: monte_trio.TrustPolicy
        if client_keys:
            trust = monte_trio.PinnedKeys(client_keys)
        else:
            print("warning: no --client-key: serving any client", file=sys.stderr, flush=True)
            trust = monte_trio.AcceptAnyKey()
        server = monte_trio.Server(echo, identity=identity, trust=trust)

    # Catch Ctrl-C and SIGTERM ourselves so that we can shut down gracefully.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, port, "127.0.0.1")
            host, real_port = listeners[0].socket.getsockname()[:2]
            print(f"listening on {host}:{real_port}", flush=True)
            if identity is not None:
                print(f"public key: {identity.public_key}", flush=True)
            stopped_by: int = signal.SIGTERM
            async for signum in signals:
                stopped_by = signum
                break
            # Stop accepting, let in-flight requests finish, close every connection.
            await server.shutdown()
    stats = server.statistics()
    print(f"served {stats.requests_received} requests", flush=True)
    # 130: the usual status of a program stopped by Ctrl-C; SIGTERM is a normal stop.
    return 130 if stopped_by == signal.SIGINT else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A minimal monte_trio echo server.")
    parser.add_argument("--port", type=int, default=5000, help="0 picks a free port")
    parser.add_argument("--identity", metavar="FILE", help="the server's private key file")
    parser.add_argument(
        "--client-key",
        action="append",
        default=[],
        metavar="KEY",
        help="serve only clients holding this key (repeatable; write --client-key=KEY)",
    )
    parser.add_argument("--monte-v1", action="store_true", help="speak Go monte's protocol")
    args = parser.parse_args()
    try:
        status = trio.run(main, args.port, args.identity, args.client_key, args.monte_v1)
    except monte_trio.MonteError as exc:  # for example: an unreadable key file
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:  # Ctrl-C before the signal receiver was in place
        status = 130
    sys.exit(status)
