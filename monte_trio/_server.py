"""The server: listeners, admission limits, a handshake per connection, graceful shutdown.

:meth:`Server.serve` follows :func:`trio.serve_tcp`: run it with ``nursery.start`` and it
reports the listeners through ``task_status.started``. Cancelling it stops everything at
once; :meth:`Server.shutdown` stops gracefully: accepting stops, handshakes in progress are
abandoned, every connection closes gracefully (GOAWAY, in-flight handlers finish within the
grace period, queued replies are flushed), and ``serve`` returns.

Admission has two limits, because an unauthenticated socket must not be able to hold a
slot that an authenticated connection needs:

* ``max_handshakes`` (default 128) bounds the sockets in *admission*: accepted, and either
  handshaking or, handshake done, waiting for a connection slot. When a socket arrives and
  every admission slot is taken, the **oldest handshake still in progress is evicted** (its
  socket is closed) to make room. A legitimate handshake ends about one round trip after
  its accept, so the oldest one is almost always a socket that will never finish; the
  newcomer is served at once, without waiting for ``handshake_timeout``. To starve a
  legitimate client, an attacker must now open more than ``max_handshakes`` sockets within
  that client's handshake time (about 1,300 connects per second at a 100 ms round trip),
  a volumetric attack best filtered by the network (SYN cookies, per-address limits), not
  by one process. Peers whose handshake is done are never evicted: if every admission slot
  holds one, the new socket is closed at once.

  The alternatives were weaker: a shorter first-byte timeout still lets a burst of silent
  sockets queue ahead of the client (2,000 sockets through 128 slots at 0.5 s each is
  8 s), and refusing new sockets while full (sshd's ``MaxStartups``) keeps out precisely
  the fresh client. Evicting the oldest needs no second timer to tune, keeps memory and
  file descriptors for unauthenticated sockets bounded, and never touches a peer that has
  proved it speaks the protocol.

* ``max_conns`` (default 256) bounds established connections only. A connection takes
  its slot when its handshake completes. If none is free, the peer (whose handshake is
  done: it believes it is connected) waits up to ``conn_wait_timeout`` seconds, keeping
  its admission slot, then is closed (Go monte's ``MaxConnWaitTimeout``); a request it sent
  meanwhile fails with :class:`~monte_trio.ConnectionClosed`. The listener keeps accepting.

Evictions and refusals are counted in :class:`ServerStatistics` and logged as one WARNING
line per interval (the first at once, then at most one every 10 s, with the counts since
the previous line), never one line per socket: a flood must not become a log flood.
Handshake failures and timeouts are logged per socket at INFO, at most ``max_handshakes``
per ``handshake_timeout``.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Sequence

import attrs
import trio

from ._calls_api import CallHandler
from ._client import ConnectionState, ConnectionStateHook
from ._config import ConnectionConfig
from ._connection import Connection, Handler
from ._exceptions import HandshakeError
from ._handshake import Handshake
from ._keys import Identity
from ._native_handshake import resolve_handshake
from ._secure_stream import SecureStream
from ._streams import StreamHandler
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

# At most one WARNING line about evicted and refused sockets per this many seconds.
_OVERLOAD_REPORT_INTERVAL = 10.0


@attrs.frozen
class ServerStatistics:
    """A snapshot of a server's counters (see :meth:`Server.statistics`).

    Attributes:
        connections_accepted: sockets accepted.
        connections_active: connections established (handshake done) and open now.
        connections_refused: sockets closed, handshake done, because no connection slot
            (``max_conns``) freed up within ``conn_wait_timeout``, or closed at once
            because every admission slot held such a waiting peer.
        handshakes_in_progress: sockets in admission now (handshaking, or waiting for a
            connection slot); at most ``max_handshakes``.
        handshakes_evicted: handshakes in progress closed to admit a newer socket while
            ``max_handshakes`` were in admission.
        handshake_failures: handshakes that failed or timed out (evictions not included).
        requests_received: requests handed to the handler, over all connections.
        messages_received: one-way messages handed to the handler, over all connections.
    """

    connections_accepted: int
    connections_active: int
    connections_refused: int
    handshakes_in_progress: int
    handshakes_evicted: int
    handshake_failures: int
    requests_received: int
    messages_received: int


@attrs.define(eq=False)
class _Admission:
    """One accepted socket between accept and an established connection."""

    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    handshaking: bool = True
    evicted: bool = False


class Server:
    """Serves a handler to every client that connects.

    Args:
        handler: serves each request and one-way message (see
            :data:`~monte_trio.Handler`: an async handler, or a plain function wrapped
            with :func:`~monte_trio.inline`); its ``request.connection`` can also call
            the client back. ``None`` refuses them (a server of streams only).
        stream_handler: serves each byte stream a client opens (see
            :data:`~monte_trio.StreamHandler`), like :func:`trio.serve_tcp`'s handler: it
            runs in a task of the connection, at most ``max_streams``
            (:class:`~monte_trio.ConnectionConfig`) at once per connection, and the
            stream is closed when it returns. Without it, streams are refused.
        call_handler: serves each streaming call a client opens (see
            :data:`~monte_trio.CallHandler`), in a task of the connection, at most
            ``max_streams`` at once per connection (shared with streams). Without it,
            streaming calls are refused (the caller gets
            :exc:`~monte_trio.RequestNotProcessed`).
        handshake: the handshake; by default the native profile built from ``identity``,
            ``trust`` and ``psk`` (see :func:`~monte_trio.open_client`).
        identity: the server's static key; a fresh one is generated if not given (clients
            pinning the server's key need a stable one: load it from a file).
        trust: which client keys to accept (required for the native profile).
        psk: a 32-byte pre-shared key every client must hold (native profile).
        config: limits and timers of each connection.
        max_conns: established connections served at once. A connection takes its slot
            when its handshake completes.
        max_handshakes: sockets in admission at once: handshaking, or handshake done and
            waiting for a connection slot. When a socket arrives and all are taken, the
            oldest handshake still in progress is closed to make room (a socket that has
            not finished its handshake in the time a legitimate client takes is most
            likely one that never will); if none is in progress, the new socket is
            closed. Default 128: far more concurrent handshakes than the server can
            compute (each costs about a millisecond of CPU), and few enough that
            unauthenticated sockets hold little memory and no connection slot.
        conn_wait_timeout: seconds a peer whose handshake is done waits for a free
            connection slot before it is closed.
        handshake_timeout: seconds allowed for each handshake.
        connection_state: called with ``(connection, ConnectionState.NEW)`` and
            ``(connection, ConnectionState.CLOSED)`` as connections come and go.

    Evictions and refusals are logged as one WARNING line per 10 s at most, with the
    counts since the previous line, and counted in :meth:`statistics`.
    """

    def __init__(
        self,
        handler: Handler | None,
        *,
        stream_handler: StreamHandler | None = None,
        call_handler: CallHandler | None = None,
        handshake: Handshake | None = None,
        identity: Identity | None = None,
        trust: TrustPolicy | None = None,
        psk: bytes | None = None,
        config: ConnectionConfig | None = None,
        max_conns: int = 256,
        max_handshakes: int = 128,
        conn_wait_timeout: float = 3.0,
        handshake_timeout: float = 3.0,
        connection_state: ConnectionStateHook | None = None,
    ) -> None:
        if max_conns < 1:
            raise ValueError("max_conns must be at least 1")
        if max_handshakes < 1:
            raise ValueError("max_handshakes must be at least 1")
        self._handler = handler
        self._stream_handler = stream_handler
        self._call_handler = call_handler
        self.handshake: Handshake = resolve_handshake(
            handshake, identity=identity, trust=trust, psk=psk
        )
        self.config: ConnectionConfig = config or ConnectionConfig()
        if stream_handler is not None and not self.config.max_streams:
            raise ValueError(
                "a stream_handler needs ConnectionConfig max_streams above 0 (streams are "
                "turned off at 0)"
            )
        if call_handler is not None and not self.config.max_streams:
            raise ValueError(
                "a call_handler needs ConnectionConfig max_streams above 0 (streams and "
                "streaming calls are turned off at 0)"
            )
        self.max_conns = max_conns
        self.max_handshakes = max_handshakes
        self._conn_wait_timeout = conn_wait_timeout
        self._handshake_timeout = handshake_timeout
        self._hook = connection_state
        self._slots = trio.Semaphore(max_conns)
        self._connections: set[Connection] = set()
        # Sockets in admission, oldest first (a dict is an insertion-ordered set).
        self._admitting: dict[_Admission, None] = {}
        self._accept_scope: trio.CancelScope | None = None
        self._shutting_down = False
        self._shutdown_grace = self.config.grace_period
        self._stopped = trio.Event()
        self.listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
        self._accepted = 0
        self._refused = 0
        self._evicted = 0
        self._handshake_failures = 0
        self._done_requests = 0
        self._done_messages = 0
        # Evictions and refusals not yet reported in the log, and when the next report
        # may be written.
        self._unreported_evicted = 0
        self._unreported_refused = 0
        self._next_report = -math.inf
        self._report_due = trio.Event()

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
            handshakes_in_progress=len(self._admitting),
            handshakes_evicted=self._evicted,
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

        Raises:
            OSError: the listeners could not be opened (the port is in use, the address is
                not local, ...); the message names the address and keeps the system's
                reason, and ``errno`` is the system's.
        """
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            # OSError(errno, ...) picks the subclass matching errno (PermissionError, ...).
            kind = type(OSError(exc.errno, "")) if exc.errno is not None else OSError
            error = kind(f"cannot listen on {_listen_address(host, port)}: {exc}")
            error.errno = exc.errno
            raise error from exc
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
                        accept_nursery.start_soon(self._report_overload_periodically)
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
            self._report_overload()
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
        for admission in self._admitting:
            admission.scope.cancel()
        async with trio.open_nursery() as nursery:
            for conn in list(self._connections):
                nursery.start_soon(conn.close_gracefully, grace)
        await self._stopped.wait()

    def _is_shutting_down(self) -> bool:
        return self._shutting_down

    # -- overload reports ------------------------------------------------------------------

    def _note_overload(self, *, evicted: int = 0, refused: int = 0) -> None:
        """Count an eviction or refusal; log it now if no report was written recently."""
        self._evicted += evicted
        self._refused += refused
        self._unreported_evicted += evicted
        self._unreported_refused += refused
        if trio.current_time() >= self._next_report:
            self._report_overload()
        else:
            self._report_due.set()

    def _report_overload(self) -> None:
        if not (self._unreported_evicted or self._unreported_refused):
            return
        logger.warning(
            "server overloaded: %d handshakes in progress closed to admit newer sockets "
            "(max_handshakes=%d) and %d sockets closed with no connection slot free "
            "(max_conns=%d, conn_wait_timeout=%s s) since the last report; reports come "
            "at most every %.0f s",
            self._unreported_evicted,
            self.max_handshakes,
            self._unreported_refused,
            self.max_conns,
            self._conn_wait_timeout,
            _OVERLOAD_REPORT_INTERVAL,
        )
        self._unreported_evicted = self._unreported_refused = 0
        self._next_report = trio.current_time() + _OVERLOAD_REPORT_INTERVAL

    async def _report_overload_periodically(self) -> None:
        while True:
            await self._report_due.wait()
            self._report_due = trio.Event()
            await trio.sleep_until(self._next_report)
            self._report_overload()

    # -- admission ---------------------------------------------------------------------------

    def _admit(self) -> _Admission | None:
        """Take an admission slot for a new socket, evicting the oldest handshake in
        progress if they are all taken; ``None`` if no slot can be had."""
        if len(self._admitting) >= self.max_handshakes:
            oldest = next((a for a in self._admitting if a.handshaking), None)
            if oldest is None:
                # Every slot holds a peer whose handshake is done, waiting for a
                # connection slot: the server is full.
                return None
            oldest.evicted = True
            oldest.scope.cancel()
            del self._admitting[oldest]
            self._note_overload(evicted=1)
        admission = _Admission()
        self._admitting[admission] = None
        return admission

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
            admission = self._admit()
            if admission is None:
                self._note_overload(refused=1)
                await trio.aclose_forcefully(stream)
                continue
            conn_nursery.start_soon(self._handle, stream, admission)

    async def _handle(self, stream: trio.abc.Stream, admission: _Admission) -> None:
        peer = _peer_name(stream)
        acquired = False
        conn: Connection | None = None
        try:
            try:
                secure = await self._admission(stream, admission, peer)
                acquired = secure is not None
            finally:
                self._admitting.pop(admission, None)
            if secure is None or self._is_shutting_down():
                return
            conn = Connection(
                secure,
                handler=self._handler,
                config=self.config,
                name=peer,
                stream_handler=self._stream_handler,
                call_handler=self._call_handler,
            )
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

    async def _admission(
        self, stream: trio.abc.Stream, admission: _Admission, peer: str
    ) -> SecureStream | None:
        """Run the handshake, then take a connection slot: the secure stream, holding a
        slot, or ``None`` (the socket is to be closed; nothing is held)."""
        with admission.scope:  # cancelled by an eviction or by shutdown()
            with trio.move_on_after(self._handshake_timeout) as timer:
                try:
                    secure = await self.handshake.handshake(
                        stream, initiator=False, peer=None, config=self.config
                    )
                except HandshakeError as exc:
                    self._handshake_failures += 1
                    logger.info("%s: handshake failed: %s", peer, exc)
                    return None
            if timer.cancelled_caught:
                self._handshake_failures += 1
                logger.info("%s: handshake timed out after %s s", peer, self._handshake_timeout)
                return None
            admission.handshaking = False
            with trio.move_on_after(self._conn_wait_timeout):
                await self._slots.acquire()
                return secure
            self._note_overload(refused=1)
            logger.debug(
                "%s: closed: no connection slot freed within %s s", peer, self._conn_wait_timeout
            )
            return None
        if admission.evicted:
            logger.debug("%s: handshake closed to admit a newer socket", peer)
        return None


def _listen_address(host: str | bytes | None, port: int) -> str:
    if host is None:
        return f"port {port} (all interfaces)"
    text = host.decode(errors="replace") if isinstance(host, bytes) else host
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


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
    handler: Handler | None,
    port: int,
    host: str | bytes | None = None,
    *,
    stream_handler: StreamHandler | None = None,
    call_handler: CallHandler | None = None,
    handshake: Handshake | None = None,
    identity: Identity | None = None,
    trust: TrustPolicy | None = None,
    psk: bytes | None = None,
    config: ConnectionConfig | None = None,
    max_conns: int = 256,
    max_handshakes: int = 128,
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
        stream_handler=stream_handler,
        call_handler=call_handler,
        handshake=handshake,
        identity=identity,
        trust=trust,
        psk=psk,
        config=config,
        max_conns=max_conns,
        max_handshakes=max_handshakes,
        conn_wait_timeout=conn_wait_timeout,
        handshake_timeout=handshake_timeout,
        connection_state=connection_state,
    )
    await server.serve(port, host, task_status=task_status)
