"""A key-value service: methods by name, a typed error, and calls back to the caller.

Run it (Ctrl-C or SIGTERM stops it gracefully; the exit status is then 130 or 0)::

    python examples/kv_server.py --port 5000
    python examples/kv_server.py --port 5000 --identity server.key --client-key=KEY

then ``kv_client.py`` against it. It prints ``listening on HOST:PORT`` and ``public key:
KEY`` (give that key to clients so they can pin it: ``kv_client.py --server-key=KEY``).
``--identity`` and ``--client-key`` work as in ``echo_server.py``.

The service is the :class:`KeyValue` Protocol below, served under the namespace ``kv``:
``get``, ``put`` (declared idempotent: a client may send it again after a connection
failure), ``delete`` and ``keys``; a missing key raises :class:`NotFound`, which a client
that imports this module gets raised as itself. ``watch`` subscribes the connection it
came on: before each change is acknowledged, the server calls that connection back
through the :class:`Watcher` Protocol (the client serves it).

A method is a plain ``async def``; the connection a call came on reaches it through
:func:`monte_trio.current_call`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Protocol

import trio

import monte_trio

# -- the contract: what client and server both import ------------------------------------


@monte_trio.remote_error("kv.NotFound")
class NotFound(Exception):
    """No value is stored under the key (``details``: ``{"key": KEY}``)."""

    details: dict[str, str] | None = None


class KeyValue(Protocol):
    """The service the server offers, under the namespace ``kv``."""

    async def get(self, key: str) -> str:
        """The value stored under ``key``; raises :class:`NotFound`."""
        ...

    @monte_trio.idempotent
    async def put(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` (twice is the same as once)."""
        ...

    async def delete(self, key: str) -> None:
        """Forget ``key``; raises :class:`NotFound`."""
        ...

    async def keys(self) -> list[str]:
        """Every key, sorted."""
        ...

    async def watch(self, prefix: str) -> int:
        """Call this connection's :class:`Watcher` on each change of a key starting with
        ``prefix``; returns how many connections watch now."""
        ...


class Watcher(Protocol):
    """What a watching client serves: the server calls it back."""

    async def changed(self, key: str, value: str | None) -> None:
        """``key`` now holds ``value`` (``None``: it was deleted)."""
        ...


NAMESPACE = "kv"

# -- the server ----------------------------------------------------------------------------

NOTIFY_TIMEOUT = 1.0  # seconds a watcher has to acknowledge a change


class Store:
    """Implements :class:`KeyValue` (mypy checks it: see ``add_service`` below)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.watchers: dict[monte_trio.Connection, str] = {}  # connection -> prefix

    async def get(self, key: str) -> str:
        if key not in self.data:
            raise self.not_found(key)
        return self.data[key]

    async def put(self, key: str, value: str) -> None:
        self.data[key] = value
        await self.notify(key, value)

    async def delete(self, key: str) -> None:
        if self.data.pop(key, None) is None:
            raise self.not_found(key)
        await self.notify(key, None)

    async def keys(self) -> list[str]:
        return sorted(self.data)

    async def watch(self, prefix: str) -> int:
        self.watchers[monte_trio.current_call().connection] = prefix
        return len(self.watchers)

    @staticmethod
    def not_found(key: str) -> NotFound:
        error = NotFound(f"no key {key!r}")
        error.details = {"key": key}  # travels with the error
        return error

    async def notify(self, key: str, value: str | None) -> None:
        """Tell every watcher of ``key`` at once; forget those that fail or are slow."""

        async def tell(conn: monte_trio.Connection) -> None:
            with trio.move_on_after(NOTIFY_TIMEOUT) as scope:
                try:
                    await conn.proxy(Watcher).changed(key, value)
                except monte_trio.MonteError:  # closed, or it does not serve Watcher
                    scope.cancel()
            if scope.cancelled_caught:
                self.watchers.pop(conn, None)

        async with trio.open_nursery() as nursery:
            for conn, prefix in list(self.watchers.items()):
                if key.startswith(prefix):
                    nursery.start_soon(tell, conn)


def make_router(store: Store) -> monte_trio.Router:
    router = monte_trio.Router()
    service: KeyValue = store  # mypy: Store implements KeyValue
    router.add_service(service, KeyValue, namespace=NAMESPACE)
    return router


async def main(port: int, identity_file: str | None, client_keys: list[str]) -> int:
    identity = (
        monte_trio.Identity.load(identity_file)
        if identity_file is not None
        else monte_trio.Identity.generate()
    )
    trust: monte_trio.TrustPolicy
    if client_keys:
        trust = monte_trio.PinnedKeys(client_keys)
    else:
        print("warning: no --client-key: serving any client", file=sys.stderr, flush=True)
        trust = monte_trio.AcceptAnyKey()
    router = make_router(Store())
    server = monte_trio.Server(router, identity=identity, trust=trust)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, port, "127.0.0.1")
            host, real_port = listeners[0].socket.getsockname()[:2]
            print(f"listening on {host}:{real_port}", flush=True)
            print(f"public key: {identity.public_key}", flush=True)
            stopped_by: int = signal.SIGTERM
            async for signum in signals:
                stopped_by = signum
                break
            await server.shutdown()
    for name, stats in router.statistics().items():  # per method, on trio's clock
        if stats.calls:
            print(f"{name}: {stats.calls} calls, {stats.errors} errors", flush=True)
    return 130 if stopped_by == signal.SIGINT else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A monte_trio key-value service.")
    parser.add_argument("--port", type=int, default=5000, help="0 picks a free port")
    parser.add_argument("--identity", metavar="FILE", help="the server's private key file")
    parser.add_argument(
        "--client-key",
        action="append",
        default=[],
        metavar="KEY",
        help="serve only clients holding this key (repeatable; write --client-key=KEY)",
    )
    args = parser.parse_args()
    try:
        status = trio.run(main, args.port, args.identity, args.client_key)
    except monte_trio.MonteError as exc:  # for example: an unreadable key file
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:  # Ctrl-C before the signal receiver was in place
        status = 130
    sys.exit(status)
