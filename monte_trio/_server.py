"""The server: listeners, a connection limit, a handshake per connection, graceful shutdown.

:meth:`Server.serve` follows :func:`trio.serve_tcp`: run it with ``nursery.start`` and it
reports the listeners through ``task_status.started``. Cancelling it stops everything at
once; :meth:`Server.shutdown` stops gracefully: accepting stops, handshakes in progress are
abandoned, every connection closes gracefully (GOAWAY, in-flight handlers finish within the
grace period, queued replies are flushed), and ``serve`` returns.

At most ``max_conns`` connections are served at once. An accepted socket beyond that waits
up to ``conn_wait_timeout`` seconds for a slot, then is closed (Go monte's
``MaxConnWaitTimeout``); meanwhile the listener keeps accepting.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence

import attrs
import trio

from ._client import ConnectionState, ConnectionStateHook
from ._config import ConnectionConfig
from ._connection import Connection, Handler
from ._exceptions import HandshakeError
from ._handshake import Handshake, resolve_handshake
from ._keys import Identity
from ._trust import TrustPolicy

__all__ = ["Server", "ServerStatistics", "serve"]

logger = logging.getLogger("monte_trio")

# Errors from accept() that mean "out of resources, try again later" (as trio handles them).
_ACCEPT_CAPACITY_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS")
    if hasattr(errno, name)
)
_ACCEPT_RETRY_DELAY = 0.1


@attrs.frozen
class ServerStatistics:
    """A snapshot of a server's counters (see :meth:`Server.statistics`).

    Attributes:
        connections_accepted: sockets accepted.
        connections_active: connections established (handshake done) and open now.
        connections_refused: sockets closed because no slot freed up in time.
        handshake_failures: handshakes that failed or timed out.
        requests_received: requests handed to the handler, over all connections.
        messages_received: one-way messages handed to the handler, over all connections.
    """

    connections_accepted: int
    connections_active: int
    connections_refused: int
    handshake_failures: int
    requests_received: int
    messages_received: int


class Server:
    """Serves a handler to every client that connects.

    Args:
        handler: serves each request and one-way message; its ``request.connection`` can
            also call the client back.
        handshake: the handshake; by default the native profile built from ``identity``,
            ``trust`` and ``psk`` (see :func:`~monte_trio.open_client`).
        identity: the server's static key; a fresh one is generated if not given (clients
            pinning the server's key need a stable one: load it from a file).
        trust: which client keys to accept (required for the native profile).
        psk: a 32-byte pre-shared key every client must hold (native profile).
        config: limits and timers of each connection.
        max_conns: connections served at once.
        conn_wait_timeout: seconds an accepted socket waits for a free slot.
        handshake_timeout: seconds allowed for each handshake.
        connection_state: called with ``(connection, "new")`` and
            ``(connection, "closed")`` as connections come and go.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        handshake: Handshake | None = None,
        identity: Identity | None = None,
        trust: TrustPolicy | None = None,
        psk: bytes | None = None,
        config: ConnectionConfig | None = None,
        max_conns: int = 1024,
        conn_wait_timeout: float = 3.0,
        handshake_timeout: float = 3.0,
        connection_state: ConnectionStateHook | None = None,
    ) -> None:
        if max_conns < 1:
            raise ValueError("max_conns must be at least 1")
        self._handler = handler
        self.handshake = resolve_handshake(handshake, identity=identity, trust=trust, psk=psk)
        self.config = config or ConnectionConfig()
        self.max_conns = max_conns
        self._conn_wait_timeout = conn_wait_timeout
        self._handshake_timeout = handshake_timeout
        self._hook = connection_state
        self._slots = trio.Semaphore(max_conns)
        self._connections: set[Connection] = set()
        self._handshaking: set[trio.CancelScope] = set()
        self._accept_scope: trio.CancelScope | None = None
        self._shutting_down = False
        self._shutdown_grace = self.config.grace_period
        self._stopped = trio.Event()
        self.listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
        self._accepted = 0
        self._refused = 0
        self._handshake_failures = 0
        self._done_requests = 0
        self._done_messages = 0

    @property
    def connections(self) -> frozenset[Connection]:
        """The connections being served now."""
        return frozenset(self._connections)

    def statistics(self) -> ServerStatistics:
        """Return a snapshot of the server's counters."""
        live = [c.statistics() for c in self._connections]
        return ServerStatistics(
            connections_accepted=self._accepted,
            connections_active=len(self._connections),
            connections_refused=self._refused,
            handshake_failures=self._handshake_failures,
            requests_received=self._done_requests + sum(s.requests_received for s in live),
            messages_received=self._done_messages + sum(s.messages_received for s in live),
        )

    async def serve(
        self,
        port: int,
        host: str | bytes | None = None,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``port`` (0 picks a free one) and serve until shut down or cancelled.

        ``task_status.started`` reports the :class:`trio.SocketListener` objects, as
        :func:`trio.serve_tcp` does.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        await self.serve_listeners(listeners, task_status=task_status)

    async def serve_listeners(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on already-open listeners until shut down or cancelled; closes them."""
        if self._accept_scope is not None:
            raise RuntimeError("a Server serves only once; make a new one")
        self.listeners = list(listeners)
        try:
            async with trio.open_nursery() as conn_nursery:
                with trio.CancelScope() as accept_scope:
                    self._accept_scope = accept_scope
                    async with trio.open_nursery() as accept_nursery:
                        for listener in self.listeners:
                            accept_nursery.start_soon(self._accept_loop, listener, conn_nursery)
                        task_status.started(self.listeners)  # type: ignore[arg-type]
                for listener in self.listeners:
                    await trio.aclose_forcefully(listener)
        finally:
            # Shielded: when serve() is cancelled, aclose_forcefully would re-raise the
            # enclosing cancellation, skipping the other listeners and _stopped, and a
            # shutdown() waiting for _stopped would then wait forever.
            with trio.CancelScope(shield=True):
                for listener in self.listeners:
                    await trio.aclose_forcefully(listener)
            self._stopped.set()

    async def shutdown(self, grace_period: float | None = None) -> None:
        """Stop gracefully and wait until :meth:`serve` has returned.

        Args:
            grace_period: seconds each connection's in-flight work may take to finish;
                defaults to the configuration's ``grace_period``.
        """
        if self._accept_scope is None:
            raise RuntimeError("the server is not serving")
        grace = self.config.grace_period if grace_period is None else grace_period
        self._shutdown_grace = grace
        self._shutting_down = True
        self._accept_scope.cancel()
        for scope in self._handshaking:
            scope.cancel()
        async with trio.open_nursery() as nursery:
            for conn in list(self._connections):
                nursery.start_soon(conn.close_gracefully, grace)
        await self._stopped.wait()

    def _is_shutting_down(self) -> bool:
        return self._shutting_down

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], conn_nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                logger.error(
                    "accept failed (%s): out of file descriptors or memory; retrying in %.1f s",
                    errno.errorcode.get(exc.errno or 0, exc.errno),
                    _ACCEPT_RETRY_DELAY,
                )
                await trio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            self._accepted += 1
            conn_nursery.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        peer = _peer_name(stream)
        acquired = False
        conn: Connection | None = None
        try:
            with trio.move_on_after(self._conn_wait_timeout):
                await self._slots.acquire()
                acquired = True
            if not acquired:
                self._refused += 1
                logger.warning(
                    "%s: refused: %d connections already (max_conns); no slot freed within %s s",
                    peer,
                    self.max_conns,
                    self._conn_wait_timeout,
                )
                return
            if self._shutting_down:
                return
            with trio.CancelScope() as scope:
                self._handshaking.add(scope)
                scope.deadline = trio.current_time() + self._handshake_timeout
                try:
                    secure = await self.handshake.handshake(
                        stream, initiator=False, peer=None, config=self.config
                    )
                except HandshakeError as exc:
                    self._handshake_failures += 1
                    logger.info("%s: handshake failed: %s", peer, exc)
                    return
                finally:
                    self._handshaking.discard(scope)
            if scope.cancelled_caught:
                if not self._shutting_down:
                    self._handshake_failures += 1
                    logger.info(
                        "%s: handshake timed out after %s s", peer, self._handshake_timeout
                    )
                return
            if self._is_shutting_down():  # it may have started during the handshake
                return
            conn = Connection(secure, handler=self._handler, config=self.config, name=peer)
            async with conn:
                self._connections.add(conn)
                if self._hook is not None:
                    self._hook(conn, ConnectionState.NEW)
                if self._is_shutting_down():
                    # shutdown() began while this connection was starting, so it did not
                    # see it: close it the same way.
                    await conn.close_gracefully(self._shutdown_grace)
                await conn.wait_closed()
        finally:
            if conn is not None and conn in self._connections:
                self._connections.discard(conn)
                stats = conn.statistics()
                self._done_requests += stats.requests_received
                self._done_messages += stats.messages_received
                if self._hook is not None:
                    self._hook(conn, ConnectionState.CLOSED)
            if acquired:
                self._slots.release()
            await trio.aclose_forcefully(stream)


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "peer"
    try:
        name = sock.getpeername()
    except OSError:
        return "peer"
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(name)


async def serve(
    handler: Handler,
    port: int,
    host: str | bytes | None = None,
    *,
    handshake: Handshake | None = None,
    identity: Identity | None = None,
    trust: TrustPolicy | None = None,
    psk: bytes | None = None,
    config: ConnectionConfig | None = None,
    max_conns: int = 1024,
    conn_wait_timeout: float = 3.0,
    handshake_timeout: float = 3.0,
    connection_state: ConnectionStateHook | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``port`` until cancelled, like :func:`trio.serve_tcp`.

    A shortcut for ``Server(handler, ...).serve(port, host)``; keep a :class:`Server`
    instead when you want a graceful :meth:`Server.shutdown`. The arguments are
    :class:`Server`'s.
    """
    server = Server(
        handler,
        handshake=handshake,
        identity=identity,
        trust=trust,
        psk=psk,
        config=config,
        max_conns=max_conns,
        conn_wait_timeout=conn_wait_timeout,
        handshake_timeout=handshake_timeout,
        connection_state=connection_state,
    )
    await server.serve(port, host, task_status=task_status)
