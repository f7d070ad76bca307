"""The client: a pool of connections to one server.

Pool bookkeeping is synchronous (who gets which connection is decided without awaiting),
and I/O is awaited afterwards, so a cancelled caller never leaves the pool inconsistent.
The rule is Go monte's: use an idle connection if there is one; otherwise dial a new one
while under ``max_conns``; otherwise use the least loaded. A connection that breaks fails
its own callers with :class:`~monte_trio.ConnectionClosed` and is dropped from the pool;
the next call dials a replacement. A caller whose connection refuses its call before any
of it was sent (:class:`~monte_trio.RequestNotProcessed`: the connection started closing)
picks again, as httpcore's pool loop does, a bounded number of times.

The module is a little over 500 lines because :class:`Client` carries every call shape the
pool serves (requests, one-way messages, method calls and typed proxies), each choosing a
connection the same way; the method-call machinery itself is in ``_services``.

Every connection's tasks live in the client's nursery, which the ``async with`` block of
:func:`open_client` owns: nothing runs after the block ends.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio

from ._calls_api import (
    Call,
    CallHandler,
    CallShape,
    DownloadCall,
    UploadCall,
    client_opening,
)
from ._config import ConnectionConfig
from ._connection import Connection, Handler
from ._exceptions import (
    ConnectError,
    ConnectionClosed,
    HandshakeError,
    HandshakeTimeout,
    RequestNotProcessed,
)
from ._handshake import Handshake
from ._keys import Identity
from ._native_handshake import resolve_handshake
from ._services._caller import (
    UNTYPED,
    call_on,
    current_metadata,
    decode_reply,
    encode_call,
    make_proxy,
    notify_on,
)
from ._services._codecs import get_codec
from ._services._retry import backoff
from ._services._router import Middleware
from ._services._streaming import MethodCall, MethodStream, client_opener
from ._streams import Stream, StreamHandler
from ._trust import TrustPolicy
from ._util import NoPublicConstructor

__all__ = ["Client", "ClientStatistics", "ConnectionState", "open_client"]

logger = logging.getLogger("monte_trio")

_REASSIGNMENTS = 3
"""How many times a call refused by its connection before any of it was sent (the
connection started closing) is moved to another one before its error is raised."""

Dialer = Callable[[], Awaitable[trio.abc.Stream]]
"""Opens a new transport stream to the server (for tests: an in-memory network)."""


class ConnectionState(enum.Enum):
    """The events reported to a ``connection_state`` hook, as Go monte's connection states.

    A hook is called as ``hook(connection, event)`` in the task that runs the connection;
    it must return promptly and not raise.
    """

    NEW = "new"
    """The connection is established (handshake done) and about to serve calls."""
    CLOSED = "closed"
    """The connection has ended and left the pool or server (its ``close_reason`` says
    why)."""


ConnectionStateHook = Callable[[Connection, ConnectionState], None]

_T = TypeVar("_T")
_P = TypeVar("_P")


@attrs.frozen
class ClientStatistics:
    """A snapshot of a client's pool (see :meth:`Client.statistics`).

    Attributes:
        open_connections: connections in the pool now.
        dialing: dials in progress.
        dials: successful dials so far.
        dial_failures: dial or handshake attempts that failed.
    """

    open_connections: int
    dialing: int
    dials: int
    dial_failures: int


class Client(trio.abc.AsyncResource, metaclass=NoPublicConstructor):
    """A pool of up to ``max_conns`` connections to one server.

    Get one from :func:`open_client`; it has no public constructor. The calls mirror
    :class:`~monte_trio.Connection`'s and pick a connection for you.
    """

    _get_one_with = "monte_trio.open_client()"

    def __init__(
        self,
        nursery: trio.Nursery,
        dial: Dialer,
        *,
        peer: str,
        handshake: Handshake,
        handler: Handler | None,
        config: ConnectionConfig,
        max_conns: int,
        dial_attempts: int,
        dial_timeout: float,
        handshake_timeout: float,
        connection_state: ConnectionStateHook | None,
        dial_backoff: float = 0.0,
        max_dial_backoff: float = 10.0,
        middleware: Sequence[Middleware] = (),
        stream_handler: StreamHandler | None = None,
        call_handler: CallHandler | None = None,
    ) -> None:
        if max_conns < 1:
            raise ValueError("max_conns must be at least 1")
        if dial_attempts < 1:
            raise ValueError("dial_attempts must be at least 1")
        self._nursery = nursery
        self._dial_transport = dial
        self.peer = peer
        self._handshake = handshake
        self._handler = handler
        self._stream_handler = stream_handler
        self._call_handler = call_handler
        self._config = config
        self._max_conns = max_conns
        self._dial_attempts = dial_attempts
        self._dial_timeout = dial_timeout
        self._handshake_timeout = handshake_timeout
        self._hook = connection_state
        self._conns: list[Connection] = []
        self._dialing = 0
        self._open_count = 0  # open connections, as the last _pick_now() counted them
        self._dials = 0
        self._dial_failures = 0
        self._dial_finished = trio.lowlevel.ParkingLot()
        self._closed = False
        self._nowait_conn: Connection | None = None
        if dial_backoff < 0 or max_dial_backoff < 0:
            raise ValueError("dial_backoff and max_dial_backoff cannot be negative")
        self._dial_backoff = dial_backoff
        self._max_dial_backoff = max_dial_backoff
        self._failed_in_a_row = 0
        self._next_dial_at = -math.inf
        self._middleware = tuple(middleware)

    @property
    def connections(self) -> list[Connection]:
        """The open connections of the pool."""
        return [c for c in self._conns if not c.closed]

    def statistics(self) -> ClientStatistics:
        """Return a snapshot of the pool's counters."""
        return ClientStatistics(
            open_connections=len(self.connections),
            dialing=self._dialing,
            dials=self._dials,
            dial_failures=self._dial_failures,
        )

    # -- calls -----------------------------------------------------------------------------

    async def request(self, body: bytes, *, compress: bool = True) -> bytes:
        """Send a request on a pooled connection and return the reply.

        A call that its connection refuses before any of it was sent (the connection
        started closing while the call waited for credit or room, or the peer sent GOAWAY)
        is moved to another connection, or to a new one, up to three times; so is a call
        the peer declared it did not process.

        See :meth:`Connection.request <monte_trio.Connection.request>` for the errors
        and for ``compress`` (``False``: send the body uncompressed);
        additionally :class:`~monte_trio.ConnectError` if no connection could be opened,
        and :class:`~monte_trio.HandshakeError` if the handshake failed.
        """
        for attempt in range(_REASSIGNMENTS + 1):
            conn = self._pick_now()
            if conn is None:
                conn = await self._pick()
            try:
                return await conn.request(body, compress=compress)
            except RequestNotProcessed as exc:
                self._reassigning(attempt, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    async def send(self, body: bytes, *, compress: bool = True) -> None:
        """Send a one-way message on a pooled connection; return once it is written.

        A message refused before it was queued (its connection started closing) is moved
        to another connection, as :meth:`request` does. ``compress=False`` sends the
        body uncompressed (see :meth:`Connection.request
        <monte_trio.Connection.request>`).
        """
        for attempt in range(_REASSIGNMENTS + 1):
            conn = self._pick_now()
            if conn is None:
                conn = await self._pick()
            try:
                await conn.send(body, compress=compress)
                return
            except RequestNotProcessed as exc:
                self._reassigning(attempt, exc)

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call the server's method ``method`` with these arguments; return its result.

        Untyped: the result is what the codec decodes (see :meth:`proxy` for typed
        calls). The arguments are encoded with the codec (``ConnectionConfig.codec``); a
        single ``bytes`` argument, and a ``bytes`` result, travel untouched. The remaining
        time of the enclosing cancel scopes' deadline goes with the call: the method is
        cancelled when it passes. A call refused before any of it was sent moves to
        another connection, as :meth:`request` does. Client middleware (``open_client``'s
        ``middleware``) runs around it. A call made inside a
        :func:`~monte_trio.call_metadata` block carries its metadata.

        Raises:
            RemoteMethodError: the call failed at the server (a subclass:
                :exc:`~monte_trio.MethodNotFound`, :exc:`~monte_trio.InvalidArguments`);
                or, instead, the exception registered under the error's name
                (:func:`~monte_trio.remote_error`).
            CodecError: the arguments do not encode (nothing was sent), or the reply
                does not decode.
            ValueError: the method name is longer than 65,535 bytes of UTF-8, or client
                middleware made the metadata go over its limits (nothing was sent).

        See :meth:`request` for the errors of the call itself.
        """
        return await self._invoke(method, args, kwargs, False, UNTYPED)

    def proxy(self, protocol: Callable[..., _P], *, namespace: str = "") -> _P:
        """A proxy whose methods call the server's: ``protocol``'s methods, typed.

        ``protocol`` is a :class:`typing.Protocol` class (any class works) whose public
        ``async def`` methods the server serves (:meth:`Router.add_service
        <monte_trio.Router.add_service>`); mypy sees the proxy as an instance of it, so a
        wrong argument or result type is a type error::

            kv = client.proxy(KeyValue, namespace="kv")
            value = await kv.get("key")    # calls "kv.get"

        Methods marked :func:`~monte_trio.idempotent` on the Protocol are sent marked
        idempotent, and moved to another connection (up to three times) when theirs
        fails. With a typed codec (``msgpack``), results are converted to the methods'
        return annotations.

        Args:
            protocol: the Protocol class. (Typed as a callable returning the Protocol:
                mypy refuses a Protocol class where ``type[P]`` is expected.)
            namespace: prefixed to each method's name with a dot, as the server
                registered them.

        Raises:
            TypeError: ``protocol`` is not a class with public methods.
        """
        proxy: _P = make_proxy(
            protocol, namespace, self._invoke, self._notify, client_opener(self)
        )
        return proxy

    def stream(
        self, method: str, /, *args: Any, **kwargs: Any
    ) -> AbstractAsyncContextManager[MethodStream]:
        """Call the server's server-streaming method ``method``: ``async with
        client.stream("tail", "app.log") as results: async for result in results:``
        (a :class:`~monte_trio.MethodStream`).

        The arguments, deadline and metadata go with the call as :meth:`call` sends
        them; the call is a streaming call (:meth:`download`) on a pooled connection,
        made on entering the block (an open refused before anything was sent moves to
        another connection). Leaving the block early cancels the method at the server.
        Client middleware runs around the opening of the call (``CallInfo.kind`` says
        which kind). See :ref:`services-streaming`.
        """
        return client_opener(self).stream(method, args, kwargs)

    def stream_call(
        self, method: str, /, *args: Any, **kwargs: Any
    ) -> AbstractAsyncContextManager[MethodCall]:
        """Call the server's client-streaming or bidirectional method ``method``:
        ``async with client.stream_call("total") as call:``, then ``await
        call.send(item)`` and ``await call.finish()`` (or ``receive()`` the results): a
        :class:`~monte_trio.MethodCall`. Otherwise as :meth:`stream`."""
        return client_opener(self).stream_call(method, args, kwargs)

    async def notify(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        """Call the server's method ``method`` as a one-way message: no reply comes back.

        The call is encoded as :meth:`call` encodes it and sent as :meth:`send` sends a
        message: it returns once the call is written (a call refused before it was
        queued moves to another connection). The server runs the method under the
        call's deadline, if any, and discards its result; an error (an unknown method,
        arguments that do not fit, an exception) is logged at the server, never sent
        back. Client middleware runs around it (``CallInfo.oneway`` is ``True``, and
        ``await next()`` returns ``None``). A Protocol's methods declared
        :func:`~monte_trio.oneway` are sent this way by a proxy.

        Raises:
            CodecError: the arguments do not encode (nothing was sent).
            ValueError: the method name is longer than 65,535 bytes of UTF-8, or client
                middleware made the metadata go over its limits (nothing was sent).

        See :meth:`send` for the errors of the message itself.
        """
        await self._notify(method, args, kwargs)

    async def _notify(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        codec = get_codec(self._config.codec)
        for attempt in range(_REASSIGNMENTS + 1):
            conn = self._pick_now()
            if conn is None:
                conn = await self._pick()
            try:
                await notify_on(conn, codec, name, args, kwargs, self._middleware)
                return
            except RequestNotProcessed as exc:
                self._reassigning(attempt, exc)

    async def _invoke(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        idempotent: bool,
        result_type: Any,
    ) -> Any:
        codec = get_codec(self._config.codec)
        for attempt in range(_REASSIGNMENTS + 1):
            conn = self._pick_now()
            if conn is None:
                conn = await self._pick()
            try:
                if self._middleware:
                    return await call_on(
                        conn, codec, name, args, kwargs, idempotent, result_type, self._middleware
                    )
                body = encode_call(codec, name, args, kwargs, idempotent, current_metadata())
                return decode_reply(codec, name, await conn.request(body), result_type)
            except RequestNotProcessed as exc:
                self._reassigning(attempt, exc)
            except ConnectionClosed:
                # It may have run: only an idempotent call moves to another connection.
                if not idempotent or attempt >= _REASSIGNMENTS or self._closed:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _reassigning(self, attempt: int, exc: RequestNotProcessed) -> None:
        """A call was not processed: re-raise its error if it may not move again."""
        if attempt >= _REASSIGNMENTS or self._closed:
            raise exc
        logger.debug("%s: moving a call to another connection: %s", self.peer, exc)

    def send_nowait(self, body: bytes, *, compress: bool = True) -> None:
        """Queue a one-way message on an open connection and return at once
        (``compress=False``: uncompressed, as for :meth:`send`).

        The connection used last is kept while it has room, so a burst of messages is
        batched into few large writes; when its queue is full, the least loaded other
        connection with room is used.

        Raises:
            trio.WouldBlock: no open connection has room in its send queue (or none is
                open: this call cannot dial). Fall back to ``await client.send(body)``,
                which waits for room and dials if needed.
            RequestNotProcessed: the client is closed.
        """
        conn = self._nowait_conn
        if conn is not None and not conn.closed:
            try:
                conn.send_nowait(body, compress=compress)
                return
            except (trio.WouldBlock, RequestNotProcessed):
                pass
        if self._closed:
            raise _client_closed()
        for candidate in sorted(self.connections, key=_load):
            if candidate is not conn:
                try:
                    candidate.send_nowait(body, compress=compress)
                except (trio.WouldBlock, RequestNotProcessed):
                    continue
                self._nowait_conn = candidate
                return
        raise trio.WouldBlock

    async def open_stream(self) -> Stream:
        """Open a byte stream (a :class:`~monte_trio.Stream`) to the server's
        ``stream_handler``, on a connection of the pool (dialing one if the rule says so).

        See :meth:`Connection.open_stream <monte_trio.Connection.open_stream>`; an open
        refused before anything was sent (its connection started closing) moves to another
        connection, as :meth:`request` does. The stream belongs to its connection: if that
        connection breaks, the stream does too (it is not moved).
        """
        for attempt in range(_REASSIGNMENTS + 1):
            conn = self._pick_now()
            if conn is None:
                conn = await self._pick()
            try:
                return await conn.open_stream()
            except RequestNotProcessed as exc:
                self._reassigning(attempt, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def open_call(
        self, first: bytes | None = None, *, compress: bool = True
    ) -> AbstractAsyncContextManager[Call]:
        """Open a bidirectional streaming call on a pooled connection (see
        :meth:`Connection.open_call <monte_trio.Connection.open_call>`). An open refused
        before anything was sent (its connection started closing) moves to another
        connection, as :meth:`request` does; once open, the call belongs to its
        connection."""
        return client_opening(self, CallShape.BIDIRECTIONAL, first, compress)

    def upload(self, *, compress: bool = True) -> AbstractAsyncContextManager[UploadCall]:
        """Open an upload on a pooled connection (see :meth:`Connection.upload
        <monte_trio.Connection.upload>` and :meth:`open_call`)."""
        return client_opening(self, CallShape.UPLOAD, None, compress)

    def download(
        self, body: bytes, *, compress: bool = True
    ) -> AbstractAsyncContextManager[DownloadCall]:
        """Open a download on a pooled connection (see :meth:`Connection.download
        <monte_trio.Connection.download>` and :meth:`open_call`)."""
        return client_opening(self, CallShape.DOWNLOAD, body, compress)

    async def connection(self) -> Connection:
        """Return a connection of the pool, dialing one if the rule says so."""
        conn = await self._pick()
        await trio.lowlevel.checkpoint()
        return conn

    async def _pick(self) -> Connection:
        while True:
            conn = self._pick_now()
            if conn is not None:
                return conn
            if self._closed:
                raise _client_closed()
            if self._open_count + self._dialing < self._max_conns:
                return await self._dial()
            # Every slot is a dial in progress: wait for one to finish, then decide again.
            await self._dial_finished.park()

    def _pick_now(self) -> Connection | None:
        """The connection a call takes, if that needs no dial and no wait: an idle one,
        else the least loaded once the pool is full. The choice is made without yielding,
        so concurrent callers see each other's load: the caller's own call (which follows
        at once) makes the connection busy."""
        if self._closed:
            return None
        best: Connection | None = None
        best_load = 0
        open_count = 0
        for conn in self._conns:  # on every call: each load is computed once
            if conn.closed:
                continue
            open_count += 1
            load = conn._load
            if load == 0:
                return conn
            if best is None or load < best_load:
                best, best_load = conn, load
        self._open_count = open_count
        if open_count + self._dialing < self._max_conns:
            return None  # dial another
        return best

    # -- dialing ---------------------------------------------------------------------------

    def _dial_failed(self) -> None:
        """Count a failed dial; the next one waits a backoff that grows with each failure
        in a row."""
        self._dial_failures += 1
        self._failed_in_a_row += 1
        delay = backoff(self._failed_in_a_row, self._dial_backoff, self._max_dial_backoff)
        self._next_dial_at = trio.current_time() + delay

    async def _dial(self) -> Connection:
        self._dialing += 1
        try:
            if self._failed_in_a_row and self._dial_backoff:
                await trio.sleep_until(self._next_dial_at)
            transport = await self._open_transport()
            try:
                with trio.fail_after(self._handshake_timeout):
                    secure = await self._handshake.handshake(
                        transport, initiator=True, peer=self.peer, config=self._config
                    )
            except trio.TooSlowError:
                await trio.aclose_forcefully(transport)
                self._dial_failed()
                raise HandshakeTimeout(
                    f"the handshake with {self.peer} did not complete within "
                    f"{self._handshake_timeout} s; is it a monte_trio server of the same "
                    "profile?"
                ) from None
            except BaseException as exc:
                await trio.aclose_forcefully(transport)
                if isinstance(exc, HandshakeError):
                    self._dial_failed()
                raise
            if self._closed:
                await trio.aclose_forcefully(secure)
                raise RequestNotProcessed(
                    "the client was closed while a connection was dialed for this call; it "
                    "was not sent"
                )
            conn: Connection = await self._nursery.start(self._run_connection, secure)
            self._dials += 1
            self._failed_in_a_row = 0
            return conn
        finally:
            self._dialing -= 1
            self._dial_finished.unpark_all()

    async def _open_transport(self) -> trio.abc.Stream:
        error: BaseException | None = None
        for _ in range(self._dial_attempts):
            try:
                with trio.fail_after(self._dial_timeout):
                    return await self._dial_transport()
            except trio.TooSlowError as exc:
                error = exc
            except OSError as exc:
                error = exc
        self._dial_failed()
        what = "timed out" if isinstance(error, trio.TooSlowError) else str(error)
        raise ConnectError(
            f"could not connect to {self.peer} ({self._dial_attempts} attempt(s), "
            f"dial_timeout {self._dial_timeout} s): {what}",
            self.peer,
        ) from error

    async def _run_connection(
        self, secure: trio.abc.Stream, *, task_status: trio.TaskStatus[Connection]
    ) -> None:
        from ._secure_stream import SecureStream

        assert isinstance(secure, SecureStream)
        conn = Connection(
            secure,
            handler=self._handler,
            config=self._config,
            name=self.peer,
            stream_handler=self._stream_handler,
            call_handler=self._call_handler,
        )
        try:
            async with conn:
                self._conns.append(conn)
                task_status.started(conn)
                if self._hook is not None:
                    self._hook(conn, ConnectionState.NEW)
                if self._closed:  # aclose() ran while this connection was starting
                    await conn.aclose()
                await conn.wait_closed()
        finally:
            if conn in self._conns:
                self._conns.remove(conn)
                if self._hook is not None:
                    self._hook(conn, ConnectionState.CLOSED)

    # -- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close every connection gracefully (each within its grace period). Idempotent."""
        self._closed = True
        self._dial_finished.unpark_all()
        async with trio.open_nursery() as nursery:
            for conn in list(self._conns):
                nursery.start_soon(conn.aclose)


def _load(conn: Connection) -> int:
    return conn._load


def _client_closed() -> RequestNotProcessed:
    return RequestNotProcessed("the client is closed; this call was not sent")


@asynccontextmanager
async def open_client(
    host: str | None = None,
    port: int | None = None,
    *,
    handshake: Handshake | None = None,
    identity: Identity | None = None,
    trust: TrustPolicy | None = None,
    psk: bytes | None = None,
    handler: Handler | None = None,
    config: ConnectionConfig | None = None,
    max_conns: int = 4,
    dial_attempts: int = 1,
    dial_timeout: float = 3.0,
    handshake_timeout: float = 3.0,
    connection_state: ConnectionStateHook | None = None,
    connect: Dialer | None = None,
    dial_backoff: float = 0.0,
    max_dial_backoff: float = 10.0,
    middleware: Sequence[Middleware] = (),
    stream_handler: StreamHandler | None = None,
    call_handler: CallHandler | None = None,
) -> AsyncIterator[Client]:
    """Open a client for the server at ``host``:``port``.

    The first connection is dialed on entry, so an unreachable server or a refused
    handshake fails here. More are dialed as concurrency requires, up to ``max_conns``.
    Leaving the block closes every connection gracefully.

    Args:
        host: the server's host name or address.
        port: the server's port.
        handshake: the handshake to use; by default the native profile
            (:class:`~monte_trio.NativeHandshake`) built from ``identity``, ``trust`` and
            ``psk``. Pass :class:`~monte_trio.MonteV1Handshake` to talk to Go monte.
        identity: this client's static key; a fresh one is generated if not given.
        trust: which server keys to accept (required for the native profile):
            :class:`~monte_trio.PinnedKeys`, :class:`~monte_trio.KnownKeysFile`, or
            :class:`~monte_trio.AcceptAnyKey` by explicit choice.
        psk: a 32-byte pre-shared key both sides must hold (native profile).
        handler: serves requests the server sends to this client (see
            :data:`~monte_trio.Handler`).
        config: limits and timers of each connection.
        max_conns: the most connections to keep to the server.
        dial_attempts: TCP connection attempts before a dial fails.
        dial_timeout: seconds allowed for each TCP connection attempt.
        handshake_timeout: seconds allowed for each handshake.
        connection_state: called with ``(connection, ConnectionState.NEW)`` and
            ``(connection, ConnectionState.CLOSED)`` as connections come and go.
        connect: instead of ``host`` and ``port``, an async function that opens a new
            transport stream (for example over :mod:`monte_trio.testing`'s network).
        dial_backoff: after a failed dial (TCP or handshake), the next one waits a random
            time between 0 and ``dial_backoff`` seconds, a ceiling that doubles with each
            failure in a row (full jitter) ...
        max_dial_backoff: ... up to this many seconds. A successful dial resets it. The
            wait is part of the call that dials, so the caller's cancel scope bounds it.
            ``dial_backoff=0`` (the default) dials again at once.
        middleware: run around each method call made with :meth:`Client.call` or a
            proxy, the first outermost (see :data:`~monte_trio.Middleware`; the call's
            ``side`` is ``"client"``).
        stream_handler: runs for each :class:`~monte_trio.Stream` the server opens on a
            connection of the pool (see :data:`~monte_trio.StreamHandler`); without it,
            such streams are refused. The client opens streams with
            :meth:`Client.open_stream` either way.
        call_handler: runs for each streaming call the server opens on a connection of
            the pool (see :data:`~monte_trio.CallHandler`); without it, such calls are
            refused.

    Raises:
        ConnectError: the server could not be reached (name resolution, refused,
            unreachable, ``dial_timeout``).
        HandshakeError: the handshake failed (wrong profile, untrusted key, wrong psk).
    """
    if connect is None:
        if host is None or port is None:
            raise TypeError("open_client needs host and port, or connect=")
        peer = f"{host}:{port}"
        dial_host, dial_port = host, port

        async def connect_tcp() -> trio.abc.Stream:
            return await trio.open_tcp_stream(dial_host, dial_port)

        connect = connect_tcp
    else:
        peer = f"{host}:{port}" if host is not None else "peer"
    hs = resolve_handshake(handshake, identity=identity, trust=trust, psk=psk)
    # Errors of the first dial and of the caller's block are re-raised as themselves after
    # the nursery, not wrapped in an ExceptionGroup by it.
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        client = Client._create(
            nursery,
            connect,
            peer=peer,
            handshake=hs,
            handler=handler,
            config=config or ConnectionConfig(),
            max_conns=max_conns,
            dial_attempts=dial_attempts,
            dial_timeout=dial_timeout,
            handshake_timeout=handshake_timeout,
            connection_state=connection_state,
            dial_backoff=dial_backoff,
            max_dial_backoff=max_dial_backoff,
            middleware=middleware,
            stream_handler=stream_handler,
            call_handler=call_handler,
        )
        try:
            await client._dial()
        except BaseException as exc:
            error = exc
            nursery.cancel_scope.cancel()
        else:
            try:
                yield client
            except BaseException as exc:
                error = exc
            finally:
                with trio.CancelScope(shield=True) as scope:
                    # Bounded: each connection's graceful close is limited by its grace.
                    scope.deadline = trio.current_time() + client._config.grace_period + 1.0
                    await client.aclose()
                nursery.cancel_scope.cancel()
    if error is not None:
        raise error
