"""A connection: calls in both directions over one secure stream, driven by a session.

Theory of operation
-------------------

Every protocol decision (call ids, credit, cancel, goaway, keepalive, packing and parsing
frames) is made by the connection's sans-IO session (:mod:`monte_trio._proto._session`:
``Session`` for the native profile, ``MonteV1Session`` for Go monte's wire), built from
the :class:`~monte_trio._handshake.SessionFacts` the handshake returned. The connection
only drives it. Entering it opens a nursery whose service scope holds:

* the **reader** (:mod:`monte_trio._reader`): records -> session -> events, dispatched to
  the callers' :class:`~monte_trio._dispatcher.ReplyChannel`, the handlers and the callers
  waiting for credit. Native: it **never stops reading** (credit bounds what the peer can
  make us hold), and its timer (keepalive, the grace period, idle_timeout, a deferred
  credit flush) is the deadline around its receive.
* the **writer** (:mod:`monte_trio._writer`): the session's queue to the socket, packed,
  sealed and sent in batches; direct writes from callers on quiet connections.
* the **handlers** (:mod:`monte_trio._handlers`): inline plain functions, the worker pool,
  nested calls in tasks of their own.

This module is the connection's public surface (the calls, with their documentation),
its lifecycle and the wiring of the parts; at about 700 lines it stays one module because
what is left is one object's API. Each task's job lives in its own module.

Outgoing calls take credit before they enter the session (a FIFO per kind of credit, so no
task holds the write role while it waits); a caller cancelled after its grant passes the
wake-up on to the next one. Closing: :meth:`Connection.aclose` is graceful: new calls are
refused, the native profile sends GOAWAY, in-flight handlers and calls get
``grace_period`` seconds to finish, the writer is flushed, then the service scope is
cancelled and the stream closed. Whatever ends the connection, every caller still waiting
gets :class:`~monte_trio.ConnectionClosed` (or its retry-safe subclass
:class:`~monte_trio.RequestNotProcessed`) and none is left hanging.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import outcome
import trio

from ._calls_api import (
    Call,
    CallHandler,
    CallShape,
    DownloadCall,
    UploadCall,
    connection_opening,
)
from ._config import ConnectionConfig
from ._dispatcher import Dispatcher
from ._exceptions import (
    ConnectionClosed,
    LocalProtocolError,
    RemoteError,
    RequestNotProcessed,
)
from ._handlers import (
    AsyncHandler,
    Handler,
    HandlerPool,
    InlineHandler,
    Request,
    current_call,
)
from ._proto._session import (
    CLOSED as SESSION_CLOSED,
)
from ._proto._session import (
    EV_REPLY,
    Session,
)
from ._proto._session_v1 import MonteV1Session
from ._proto._wire2 import RETRY_SAFE
from ._reader import Reader
from ._secure_stream import SecureStream
from ._services import _caller as _methods
from ._services import _streaming
from ._streams import Stream, StreamHandler, Streams
from ._util import escape_peer_text
from ._writer import CREDIT_DELAY, CREDIT_SHARE, WRITE_ERRORS, Writer

if TYPE_CHECKING:
    from ._handshake import SessionFacts
    from ._keys import PublicKey

__all__ = [
    "AsyncHandler",
    "Connection",
    "ConnectionStatistics",
    "Handler",
    "InlineHandler",
    "Request",
]

logger = logging.getLogger("monte_trio")

_P = TypeVar("_P")

_V1_CANCELLED = 1024
"""monte-v1: cancelled calls whose late reply is still recognised (and counted as dropped)
before the session forgets them (Go handlers may never reply)."""


@attrs.frozen
class ConnectionStatistics:
    """A snapshot of a connection's counters (see :meth:`Connection.statistics`).

    Attributes:
        requests_sent: requests written or queued by this side.
        replies_received: replies (and error replies) routed to a waiting caller.
        replies_dropped: replies that arrived after their caller gave up.
        messages_sent: one-way messages queued by this side.
        requests_received: requests from the peer handed to a handler.
        messages_received: one-way messages from the peer handed to a handler.
        pending_requests: this side's requests awaiting a reply now.
        queued_bytes: message bytes queued for the writer now.
        running_handlers: handlers running now.
        rtt: the last keepalive round-trip time in seconds (native), else ``None``.
        open_streams: streams (:class:`~monte_trio.Stream`) open now, either side's,
            not yet closed by this side's application.
        stream_bytes_buffered: bytes received on those streams and not yet read: at
            most the streams' windows (see docs/reliability.rst, "Memory budget").
    """

    requests_sent: int
    replies_received: int
    replies_dropped: int
    messages_sent: int
    requests_received: int
    messages_received: int
    pending_requests: int
    queued_bytes: int
    running_handlers: int
    rtt: float | None
    open_streams: int = 0
    stream_bytes_buffered: int = 0


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


# Module constants: an enum member lookup costs ~50 ns, tested on every call.
_OPEN = _State.OPEN
_CLOSING = _State.CLOSING
_CLOSED = _State.CLOSED


class Connection(trio.abc.AsyncResource):
    """One secure connection, with calls in both directions.

    Normally obtained from :func:`~monte_trio.open_client` (through a
    :class:`~monte_trio.Client`) or given to a server's handler as ``request.connection``.
    Use it as an async context manager; leaving the block closes it gracefully.

    Args:
        stream: the secure stream a :class:`~monte_trio.Handshake` produced (its
            ``facts`` say which session to run).
        handler: serves the peer's requests and one-way messages (see :data:`Handler`:
            an async handler runs in a worker task, a plain function wrapped with
            :func:`~monte_trio.inline` in the reader); ``None`` refuses them.
        config: limits and timers; defaults to :class:`~monte_trio.ConnectionConfig`\\ ().
        name: a label for logs (for example the peer's address).
        stream_handler: runs for each :class:`~monte_trio.Stream` the peer opens (see
            :data:`~monte_trio.StreamHandler`); ``None`` refuses them.
        call_handler: runs for each streaming call the peer opens (see
            :data:`~monte_trio.CallHandler`); ``None`` refuses them (the caller gets
            :exc:`~monte_trio.RequestNotProcessed`).
    """

    def __init__(
        self,
        stream: SecureStream,
        *,
        handler: Handler | None = None,
        config: ConnectionConfig | None = None,
        name: str = "",
        stream_handler: StreamHandler | None = None,
        call_handler: CallHandler | None = None,
    ) -> None:
        self._stream = stream
        self.facts: SessionFacts = stream.facts
        facts = self.facts
        self._config = config = config or ConnectionConfig()
        self.name: str = name or ("client" if facts.initiator else "server") + " connection"
        try:
            now = trio.current_time()
        except RuntimeError:
            now = 0.0
        self._session: Session | MonteV1Session = facts.new_session(config, now)
        self._native = isinstance(self._session, Session)
        self._max_send = facts.max_message_size
        self._state = _OPEN
        self._close_reason: ConnectionClosed | None = None
        self._dispatcher = Dispatcher()
        self._writer = Writer(
            stream,
            self._session,
            write_timeout=config.write_timeout,
            max_send_queue=config.max_send_queue,
            on_error=self._write_failed,
            on_credit_held=self.defer_flush,
        )
        local = facts.local_hello
        if local is not None:
            self._writer.credit_now = min(local.request_window, local.reply_window) // CREDIT_SHARE
        self._handlers = HandlerPool(self, handler, max_workers=config.max_concurrent_handlers)
        self._streams = Streams(self, stream_handler, call_handler)
        self._call_waiters = trio.lowlevel.ParkingLot()
        self._oneway_waiters = trio.lowlevel.ParkingLot()
        self._credit_seen = 0
        self._pending_full = False  # a caller waits for room among the pending requests
        self._reader_scope: trio.CancelScope | None = None
        self._flush_at = math.inf
        self.reply_queued = False  # an inline handler queued an answer during this batch
        self._v1_cancelled: deque[int] = deque()
        self._peer_last_processed: int | None = None
        self._peer_closed = False
        self._rtt: float | None = None
        self._requests_sent = 0
        self._replies_received = 0
        self._messages_sent = 0
        self._services: trio.Nursery | None = None
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._closed = trio.Event()
        self._progress = trio.Event()  # set when calls or handlers end (graceful close)

    # -- properties ------------------------------------------------------------------------

    @property
    def profile(self) -> str:
        """The wire profile, ``"native"`` or ``"monte-v1"``."""
        return self.facts.profile

    @property
    def peer_public_key(self) -> PublicKey | None:
        """The peer's authenticated static key (native profile); ``None`` for monte-v1."""
        return self.facts.peer_public_key

    @property
    def initiator(self) -> bool:
        """Whether this side dialed the connection."""
        return self.facts.initiator

    @property
    def closed(self) -> bool:
        """Whether the connection is closing or closed (no new calls are accepted)."""
        return self._state is not _OPEN

    @property
    def close_reason(self) -> ConnectionClosed | None:
        """Why the connection ended, once it has."""
        return self._close_reason

    @property
    def _load(self) -> int:
        """How busy the connection is: pending requests, plus 1 if messages are queued
        (the client pool's measure)."""
        return len(self._dispatcher) + (
            1 if self._session.send_queue_bytes or self._writer.direct else 0
        )

    def statistics(self) -> ConnectionStatistics:
        """Return a snapshot of this connection's counters."""
        handlers = self._handlers
        return ConnectionStatistics(
            requests_sent=self._requests_sent,
            replies_received=self._replies_received,
            replies_dropped=self._dispatcher.dropped,
            messages_sent=self._messages_sent,
            requests_received=handlers.requests_received,
            messages_received=handlers.messages_received,
            pending_requests=len(self._dispatcher),
            queued_bytes=self._session.send_queue_bytes,
            running_handlers=handlers.busy,
            rtt=self._rtt,
            open_streams=self._streams.open_count,
            stream_bytes_buffered=self._streams.buffered,
        )

    def __repr__(self) -> str:
        return f"<monte_trio.Connection {self.name!r} {self.profile} {self._state.value}>"

    def _is_closed(self) -> bool:
        return self._state is _CLOSED

    # -- streams ---------------------------------------------------------------------------

    async def open_stream(self) -> Stream:
        """Open a byte stream (a :class:`~monte_trio.Stream`) to the peer's
        ``stream_handler``.

        While the peer's ``max_streams`` streams of this side are open, it waits for one
        to end: a limit given as credit, never a refusal. A peer without a
        ``stream_handler`` refuses the stream: its first read or send raises
        :exc:`~monte_trio.StreamReset` with code 4 (REFUSED).

        Raises:
            LocalProtocolError: streams cannot run on this connection: the monte-v1
                profile, or a hello (ours or the peer's) with ``max_streams`` 0; the
                message says which. Nothing was sent; the connection is still usable.
            RequestNotProcessed: the connection is closing or closed: no stream was
                opened, it is safe to open one on another connection.
        """
        return await self._streams.open()

    # -- streaming calls -------------------------------------------------------------------

    def open_call(
        self, first: bytes | None = None, *, compress: bool = True
    ) -> AbstractAsyncContextManager[Call]:
        """Open a bidirectional streaming call to the peer's ``call_handler``:
        ``async with connection.open_call() as call:`` (a :class:`~monte_trio.Call`).

        ``first``, if given, is sent as the first message. Entering waits while the
        peer's ``max_streams`` are all in use (credit, not refusal); leaving the block
        cancels the call at the peer if it is not finished. See
        :class:`~monte_trio.Call` for sending, receiving and the errors.

        Raises:
            LocalProtocolError: calls cannot run on this connection (monte-v1, or
                ``max_streams`` 0 on either side), or ``first`` is too large.
            RequestNotProcessed: the connection is closing or closed: nothing was sent.
        """
        return connection_opening(self, CallShape.BIDIRECTIONAL, first, compress)

    def upload(self, *, compress: bool = True) -> AbstractAsyncContextManager[UploadCall]:
        """Open an upload (many messages, one reply): ``async with connection.upload()
        as call:`` then ``await call.send(part)`` and ``reply = await call.finish()``
        (an :class:`~monte_trio.UploadCall`; as :meth:`open_call` otherwise)."""
        return connection_opening(self, CallShape.UPLOAD, None, compress)

    def download(
        self, body: bytes, *, compress: bool = True
    ) -> AbstractAsyncContextManager[DownloadCall]:
        """Open a download (one request, many replies): ``async with
        connection.download(body) as replies: async for part in replies:`` (a
        :class:`~monte_trio.DownloadCall`; as :meth:`open_call` otherwise)."""
        return connection_opening(self, CallShape.DOWNLOAD, body, compress)

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> Connection:
        if self._nursery_manager is not None:
            raise RuntimeError("a Connection can be entered only once")
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        try:
            await nursery.start(self._run)
        except BaseException as exc:
            if not await self._nursery_manager.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._nursery_manager is not None
        try:
            if exc is None:
                await self.aclose()
            else:
                self._finish(ConnectionClosed(f"the connection's block raised {exc!r}"))
        finally:
            # The service tasks never raise (they turn every failure into the connection's
            # close reason), so the block's own exception is left to propagate as itself
            # rather than wrapped in an ExceptionGroup by the nursery.
            self._finish(ConnectionClosed("the connection was closed"))
            await self._nursery_manager.__aexit__(None, None, None)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as services:
                self._services = services
                self._handlers.nursery = services
                services.start_soon(self._guarded, Reader(self).run, name=f"{self.name} reader")
                services.start_soon(self._guarded, self._writer.run, name=f"{self.name} writer")
                task_status.started()
        finally:
            self._finish(ConnectionClosed("the connection was closed"))
            try:
                # Raises Cancelled when an enclosing scope is cancelled; _closed must be
                # set regardless, or close_gracefully() would wait for it forever.
                await trio.aclose_forcefully(self._stream)
            finally:
                self._closed.set()

    async def _guarded(self, service: Callable[[], Awaitable[None]]) -> None:
        """Run a service task; whatever it raises ends this connection, never more."""
        try:
            await service()
        except Exception as exc:
            logger.error("%s: closing after an internal error", self.name, exc_info=exc)
            self._fail(f"the connection failed: {exc!r}", exc)

    async def wait_closed(self) -> None:
        """Wait until the connection has ended and its stream is closed."""
        await self._closed.wait()

    async def aclose(self) -> None:
        """Close gracefully within the configured ``grace_period``; idempotent.

        See :meth:`close_gracefully`.
        """
        await self.close_gracefully(self._config.grace_period)

    async def close_gracefully(self, grace_period: float) -> None:
        """Close gracefully, letting in-flight work take up to ``grace_period`` seconds.

        New calls are refused at once. The native profile tells the peer with GOAWAY which
        of its requests will be processed. Running handlers and this side's requests in
        flight get ``grace_period`` seconds to finish; queued records are then flushed and
        the stream closed. If the caller is cancelled, the connection is closed at once.
        Idempotent.
        """
        if self._state is _CLOSED:
            if self._services is not None:
                with trio.CancelScope(shield=True):
                    await self._closed.wait()
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._close_gracefully(grace_period)
        finally:
            self._finish(ConnectionClosed("the connection was closed locally"))
            if self._services is not None:
                with trio.CancelScope(shield=True):
                    await self._closed.wait()

    def _stop_accepting(self) -> None:
        """The peer is closing (GOAWAY or end of stream): no new calls from this side."""
        if self._state is _OPEN:
            self._state = _CLOSING

    def _start_closing(self) -> None:
        if self._state is _OPEN:
            self._state = _CLOSING
            self._session.start_close()
            self._writer.wake()
            self._call_waiters.unpark_all()
            self._oneway_waiters.unpark_all()
            self._streams.refuse_openers()

    async def _close_gracefully(self, grace_period: float) -> None:
        self._start_closing()
        with trio.move_on_after(grace_period):
            # Native: also wait for the peer's GOAWAY. Whatever the peer wrote before it
            # learned that we are closing is ordered before its GOAWAY, so no message it
            # has already written is lost.
            while (
                self._handlers.active
                or len(self._dispatcher)
                or self._streams.active
                or (self._native and self._peer_last_processed is None and not self._peer_closed)
            ) and self._state is not _CLOSED:
                self._progress = trio.Event()
                await self._progress.wait()
            await self._flush()

    def _finish(self, reason: ConnectionClosed) -> None:
        """End the connection now: fail every waiter and cancel the service tasks."""
        if self._state is _CLOSED:
            return
        self._state = _CLOSED
        self._close_reason = reason
        self._fail_pending(reason.reason)
        self._streams.fail_all(reason)
        self._writer.fail_waiters(lambda: ConnectionClosed(reason.reason))
        self._call_waiters.unpark_all()
        self._oneway_waiters.unpark_all()
        self._progress.set()
        self._handlers.idle.set()
        if self._services is not None:
            self._services.cancel_scope.cancel()

    def _fail_pending(self, reason: str) -> None:
        """Fail this side's calls awaiting answers: safe to retry if the peer said so."""
        peer_last = self._peer_last_processed

        def error_for(ident: int) -> ConnectionClosed:
            if peer_last is not None and ident > peer_last:
                return RequestNotProcessed(
                    f"the peer shut down without processing the request with call id {ident} "
                    f"(it processed call ids up to {peer_last}); it is safe to retry"
                )
            return ConnectionClosed(reason)

        self._dispatcher.fail_all(error_for)

    def _closed_error(self) -> ConnectionClosed:
        """The error for a call the connection's end interrupted after it was queued."""
        if self._close_reason is not None:
            return ConnectionClosed(self._close_reason.reason)
        return ConnectionClosed("the connection is closing")

    def _refused(self) -> RequestNotProcessed:
        """The error for a call refused before any of it was sent: safe to retry."""
        if self._close_reason is not None:
            why = f"the connection is closed ({self._close_reason.reason})"
        elif self._peer_last_processed is not None:
            why = "the peer is shutting down (it sent GOAWAY)"
        elif self._peer_closed:
            why = "the peer closed the connection"
        elif self._state is _OPEN:
            why = "the connection is ending"
        else:
            why = "the connection is closing"
        return RequestNotProcessed(
            f"{why}; this call was not sent, it is safe to retry on another connection"
        )

    def _fail(self, reason: str, cause: BaseException | None = None) -> None:
        if self._state is not _CLOSED:
            logger.debug("%s: %s", self.name, reason)
        error = ConnectionClosed(reason)
        error.__cause__ = cause
        self._finish(error)

    async def _write_directly(self) -> None:
        """Write what the session holds from the calling task (the writer is quiet).

        Raises:
            ConnectionClosed: the write failed, and the connection with it.
        """
        try:
            await self._writer.write_directly()
        except WRITE_ERRORS as exc:
            self._write_failed(exc, self._config.write_timeout)
            raise self._closed_error() from exc

    def _write_failed(self, exc: BaseException, write_timeout: float | None) -> None:
        if isinstance(exc, trio.TooSlowError):
            self._fail(f"a write blocked for more than {write_timeout} s (write_timeout)")
        elif isinstance(exc, LocalProtocolError):
            self._fail(f"could not seal a record: {exc}", exc)
        else:
            self._fail(f"the connection was lost while writing: {exc}", exc)

    # -- outgoing calls --------------------------------------------------------------------

    def _check_size(self, body: bytes) -> None:
        if len(body) > self._max_send:
            raise LocalProtocolError(
                f"message of {len(body)} bytes exceeds the peer's maximum of "
                f"{self._max_send} (max_message_size)"
            )

    def _parent(self) -> int:
        """The peer's call the current handler serves on this connection, if any."""
        current = current_call.get()
        if current is not None and current[0] is self:
            return current[1]
        return 0

    async def _open_call(self, body: bytes, compress: bool = True) -> int:
        """Take credit for a call carrying ``body`` and put it into the session."""
        session = self._session
        parent = self._parent() if self._native else 0
        waiters = self._call_waiters
        dispatcher = self._dispatcher
        max_pending = self._config.max_pending_requests
        queued = False
        try:
            while True:
                if self._state is not _OPEN and not parent:
                    raise self._refused()
                # Nested calls are bounded by nested_allowance instead: making them wait
                # for our own calls' replies could deadlock the call tree.
                if (not waiters or queued) and (parent or len(dispatcher) < max_pending):
                    try:
                        ident = session.send_request(body, parent=parent, compress=compress)
                    except LocalProtocolError:
                        if session.state >= SESSION_CLOSED or not parent:
                            raise self._refused() from None  # closing: nothing was sent
                        if self._state is _CLOSED:
                            raise self._refused() from None
                        parent = 0  # the handler already answered: an ordinary call
                        continue
                    if ident is not None:
                        if queued and waiters:
                            waiters.unpark()  # credit may be left for the next one
                        return ident
                if len(dispatcher) >= max_pending and not parent:
                    self._pending_full = True
                queued = True
                await waiters.park()
        except BaseException:
            if queued and waiters:
                waiters.unpark()  # pass the wake-up on
            raise

    def _call_ended(self) -> None:
        """A call left the pending table: wake a caller waiting for room in it."""
        if self._pending_full and len(self._dispatcher) < self._config.max_pending_requests:
            self._pending_full = False
            self._call_waiters.unpark()

    async def request(self, body: bytes, *, compress: bool = True) -> bytes:
        """Send a request and return the peer's reply.

        Cancel it with a cancel scope (for example ``trio.fail_after``); its reply, if it
        comes later, is dropped, and the native profile tells the peer's handler to stop.
        A call that waits, for credit (the peer's call slots or request window), for room
        in the send queue (``max_send_queue``) or for room among the pending requests
        (``max_pending_requests``), waits in order of arrival.

        The body is compressed when both sides allow it (``ConnectionConfig.compression``)
        and it is at least ``compression_threshold`` bytes long; ``compress=False`` sends
        it as it is: do that for a body that holds a secret next to data an attacker may
        choose (see :ref:`Security: Compression <security-compression>`).

        Raises:
            ConnectionClosed: the connection ended before the reply arrived; the peer may
                or may not have processed the request.
            RequestNotProcessed: the request was certainly not processed: the connection
                was closing or closed before it was sent, or the peer shut down without
                processing it. It is safe to retry on another connection.
            RemoteError: the peer's handler raised (native profile).
            LocalProtocolError: ``body`` is larger than the message size limit (nothing
                was sent; the connection is still usable).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._state is not _OPEN and not self._parent():
            raise self._refused()
        self._check_size(body)
        dispatcher = self._dispatcher
        writer = self._writer
        session = self._session
        if session.send_queue_bytes >= writer.max_send_queue:
            await writer.wait_for_space(self._is_closed)
        # Direct only when no other call is in flight: callers that run together (many
        # requests on one connection) are better served by one batched write.
        direct = not dispatcher and writer.quiet
        ident = None
        if (
            self._native
            and self._state is _OPEN
            and not self._call_waiters
            and len(dispatcher) < self._config.max_pending_requests
            and session.can_open
        ):
            # Credit at once (the common case): no waiting loop, no extra coroutine.
            try:
                ident = session.send_request(body, parent=self._parent(), compress=compress)
            except LocalProtocolError:
                ident = None  # a nested call whose parent has ended: the loop decides
        if ident is None:
            ident = await self._open_call(body, compress)
        channel = dispatcher.add(ident)
        self._requests_sent += 1
        try:
            if direct and writer.quiet:
                await self._write_directly()
            else:
                writer.wake()
            kind, payload, detail = await channel.receive()
        except BaseException:
            if dispatcher.discard(ident) and self._state is not _CLOSED:
                self._cancel(ident)
            self._call_ended()
            raise
        self._call_ended()
        self._replies_received += 1
        if kind == EV_REPLY:
            session.delivered(ident)
            if not dispatcher:
                self._progress.set()
            self.credit_returned(len(payload) + 64)
            return payload
        self._progress.set()
        # The peer's text: escaped (no terminal escapes, no control characters) and cut,
        # since callers print it and put it in logs.
        text = escape_peer_text(payload.decode("utf-8", errors="replace"))
        if detail in RETRY_SAFE:
            raise RequestNotProcessed(f"the peer refused the request with call id {ident}: {text}")
        raise RemoteError(text)

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call the peer's method ``method`` (served by a :class:`~monte_trio.Router`)
        and return its result; as :meth:`Client.call <monte_trio.Client.call>`, on this
        connection (no client middleware, no moving to another connection)."""
        return await _methods.connection_invoke(self, method, args, kwargs, False)

    async def notify(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        """Call the peer's method ``method`` as a one-way message: return once it is
        written; as :meth:`Client.notify <monte_trio.Client.notify>`, on this connection
        (no client middleware, no moving to another connection)."""
        await _methods.connection_notify(self, method, args, kwargs)

    def proxy(self, protocol: Callable[..., _P], *, namespace: str = "") -> _P:
        """A typed proxy of the peer's methods, as :meth:`Client.proxy
        <monte_trio.Client.proxy>`, on this connection: a handler calls the peer back
        with ``request.connection.proxy(SomeProtocol)``."""
        proxy: _P = _methods.make_proxy(
            protocol,
            namespace,
            functools.partial(_methods.connection_invoke, self),
            functools.partial(_methods.connection_notify, self),
            _streaming.connection_opener(self),
        )
        return proxy

    def stream(
        self, method: str, /, *args: Any, **kwargs: Any
    ) -> AbstractAsyncContextManager[_streaming.MethodStream]:
        """Call the peer's server-streaming method ``method``: ``async with
        connection.stream("tail", "app.log") as results:``; as :meth:`Client.stream
        <monte_trio.Client.stream>`, on this connection (no client middleware)."""
        return _streaming.connection_opener(self).stream(method, args, kwargs)

    def stream_call(
        self, method: str, /, *args: Any, **kwargs: Any
    ) -> AbstractAsyncContextManager[_streaming.MethodCall]:
        """Call the peer's client-streaming or bidirectional method ``method``; as
        :meth:`Client.stream_call <monte_trio.Client.stream_call>`, on this connection."""
        return _streaming.connection_opener(self).stream_call(method, args, kwargs)

    async def send(self, body: bytes, *, compress: bool = True) -> None:
        """Send a one-way message and return once it has been written to the socket.

        It waits for credit (the peer's request window) and for room in the send queue,
        in order of arrival. Once it has credit the message is in the send queue and goes
        out whole even if the caller is cancelled while waiting for the write.
        ``compress=False`` sends the body uncompressed, as for :meth:`request`.

        Raises:
            ConnectionClosed: the connection ended before the message was written.
            RequestNotProcessed: the connection was closing or closed before the message
                was queued: it was not sent, it is safe to send it on another connection.
            LocalProtocolError: ``body`` is larger than the message size limit (nothing
                was sent; the connection is still usable).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._state is not _OPEN:
            raise self._refused()
        self._check_size(body)
        writer = self._writer
        if self._session.send_queue_bytes >= writer.max_send_queue:
            await writer.wait_for_space(self._is_closed)
        session = self._session
        if (
            not self._oneway_waiters
            and session.state < SESSION_CLOSED
            and session.send_oneway(body, compress=compress)
        ):
            self._messages_sent += 1  # credit at once (the common case): no wait, no task
            if writer.quiet:
                await self._write_directly()
                return
        else:
            direct = writer.quiet
            await self._queue_oneway(body, compress)
            if direct and writer.quiet:
                await self._write_directly()
                return
        await writer.wait_written()

    async def _queue_oneway(self, body: bytes, compress: bool = True) -> None:
        session = self._session
        waiters = self._oneway_waiters
        queued = False
        try:
            while True:
                if self._state is not _OPEN or session.state >= SESSION_CLOSED:
                    raise self._refused()
                if (not waiters or queued) and session.send_oneway(body, compress=compress):
                    self._messages_sent += 1
                    if queued and waiters:
                        waiters.unpark()
                    return
                queued = True
                await waiters.park()
        except BaseException:
            if queued and waiters:
                waiters.unpark()
            raise

    def send_nowait(self, body: bytes, *, compress: bool = True) -> None:
        """Queue a one-way message for the writer and return at once (``compress`` as
        for :meth:`request`).

        Raises:
            trio.WouldBlock: no credit (the peer's request window is spent), the send
                queue is full (``max_send_queue``), or another sender is already waiting;
                wait with :meth:`send` or retry later.
            RequestNotProcessed: the connection is closing or closed (nothing was sent).
            LocalProtocolError: ``body`` is larger than the message size limit (nothing
                was sent; the connection is still usable).
        """
        session = self._session
        if self._state is not _OPEN or session.state >= SESSION_CLOSED:
            raise self._refused()
        if (
            session.send_queue_bytes >= self._writer.max_send_queue
            or self._oneway_waiters
            or len(body) > self._max_send
            or not session.send_oneway(body, compress=compress)
        ):
            if len(body) > self._max_send:
                self._check_size(body)
            raise trio.WouldBlock
        self._messages_sent += 1
        self._writer.wake()

    async def _flush(self) -> None:
        """Wait until everything queued so far has been written."""
        if self._state is _CLOSED:
            return
        try:
            await self._writer.wait_written()
        except ConnectionClosed:
            pass

    def _cancel(self, ident: int) -> None:
        """Our caller gave up on call ``ident``."""
        if self._native:
            self._session.cancel(ident)
            self._writer.wake()
            self._credit_moved()
            return
        # monte-v1: remember the last cancelled calls, so a late reply is recognised and
        # counted as dropped; older ones are forgotten (Go handlers may never reply).
        cancelled = self._v1_cancelled
        cancelled.append(ident)
        if len(cancelled) > _V1_CANCELLED:
            self._session.cancel(cancelled.popleft())

    def credit_returned(self, nbytes: int) -> None:
        """``nbytes`` of credit went back into the session: send it at once if it is
        large, else let it ride on the next write (see :meth:`defer_flush`)."""
        writer = self._writer
        writer.owed += nbytes
        if writer.task is None:
            return  # the writer is awake (or writing): it packs the credit
        if writer.owed >= writer.credit_now:
            writer.wake()
        else:
            self.defer_flush()

    def defer_flush(self) -> None:
        """Something small (credit, a pong) waits with nothing else to write: let it ride
        on the next write, or have the writer send it alone within ``CREDIT_DELAY`` (the
        reader's timer: the reader is the one task that always comes back)."""
        if self._flush_at != math.inf:
            return  # already due sooner than a new delay would be
        due = trio.current_time() + CREDIT_DELAY
        if due < self._flush_at:
            self._flush_at = due
            scope = self._reader_scope
            if scope is not None and due < scope.deadline:
                scope.deadline = due

    def _credit_moved(self) -> None:
        seen = self._session.credit_changed
        if seen != self._credit_seen:
            self._credit_seen = seen
            if self._call_waiters:
                self._call_waiters.unpark()
            if self._oneway_waiters:
                self._oneway_waiters.unpark()


# Re-exported for outcome's type checkers (reschedule with errors).
_ = outcome
