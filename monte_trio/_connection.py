"""A connection: calls in both directions over one secure stream.

Theory of operation
-------------------

A :class:`Connection` is an async context manager. Entering it opens a nursery whose
service scope holds exactly two long-lived tasks that touch the stream, plus a pool of
handler workers:

* The **writer** owns ``send``. Callers encode their frame into the *outbox* (a plain list
  of record plaintexts) and wake the writer if it is parked. The writer swaps the whole
  outbox out, seals it into one buffer and performs one ``send_all``, so a burst of N
  messages costs one wake-up and one system call, not N. ``send`` callers also leave a
  waiter that the writer wakes once their bytes are written. A caller cancelled while its
  record is still in the outbox blanks its slot (nothing is sent); once the writer has
  taken the batch the record goes out whole. Either way, no record is ever cut in half.

  One exception saves two task switches per call when the connection is quiet: a caller
  of ``send`` or ``request`` (or a handler worker with a reply) that finds the writer
  parked and the outbox empty, and no other request or handler in flight, writes its
  record itself. The stream is record-safe (see
  :class:`~monte_trio.SecureStream`): if that caller is cancelled part-way, the stream
  keeps the unsent rest and the writer sends it next. The writer is not woken while such
  a *direct write* is in progress; whatever was queued meanwhile is handed to it when the
  write ends.
* The **reader** owns ``receive``. It decrypts every record of a chunk, routes replies to
  the waiting callers through the :class:`~monte_trio._dispatcher.Dispatcher` (one
  wake-up each), and appends incoming requests to the *inbox*.
* **Handler workers** take requests from the inbox and run the user's async handler, so
  a handler may itself call back over the same connection without deadlocking (Go monte
  runs handlers inline in its reader and deadlocks there). Workers are long-lived and started
  only as concurrency requires, up to ``max_concurrent_handlers``; at most one idle worker
  is woken per burst, and it wakes another only if the inbox still holds work once it
  starts a handler. When the inbox holds ``max_concurrent_handlers`` requests the reader
  stops reading, so a fast peer is held back by TCP instead of buffered in memory.
* A handler that is a plain function (not ``async def``) cannot await anything, so it
  cannot deadlock: the reader calls it **inline**, with no hand-off to a worker, and
  queues its reply. The reader stops reading while the send queue is full, so a peer
  whose requests outrun the replies is held back by TCP here too.
* The **memory budget** (``max_held_bytes``) bounds what the peer makes the connection
  hold, whatever the message sizes. The reader charges each incoming body handed to the
  workers when it accepts it; when the handler returns, the body's charge is swapped for
  the reply's (the body is no longer referenced by the connection), and the reply's charge
  is released once it is written (or at once for a one-way message, a cancelled request,
  a reply nobody can receive). The reader stops reading while
  ``held > 0 and held + bytes being reassembled >= max_held_bytes``: one int compare per
  message. ``held > 0`` means a message as large as the budget is always accepted when
  nothing else is held, so the budget can never deadlock by itself. Inline handlers hold
  nothing beyond the call: their replies are bounded by the send queue (see above).

Closing: :meth:`Connection.aclose` is graceful: new calls are refused, the native profile
sends GOAWAY, in-flight handlers and requests get ``grace_period`` seconds to finish, the
writer is flushed, then the service scope is cancelled and the stream closed. Whatever
ends the connection (a close, EOF, a transport error, a protocol violation), every caller
still waiting gets :class:`~monte_trio.ConnectionClosed` (or its retry-safe subclass
:class:`~monte_trio.RequestNotProcessed`) and none is left hanging.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import logging
import struct
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING

import attrs
import outcome
import trio

from ._config import ConnectionConfig
from ._dispatcher import Dispatcher
from ._exceptions import (
    ConnectionClosed,
    LocalProtocolError,
    RemoteError,
    RemoteProtocolError,
    RequestNotProcessed,
)
from ._proto._frames import Frame, FrameKind, id_after
from ._proto._native import CONTROL_BURST, CONTROL_RATE, HEADER, fit_text
from ._secure_stream import SecureStream
from ._util import escape_peer_text

if TYPE_CHECKING:
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

_ONEWAY = FrameKind.ONEWAY.value
_REQUEST = FrameKind.REQUEST.value
_REPLY = FrameKind.REPLY.value
_ERROR = FrameKind.ERROR.value
_CANCEL = FrameKind.CANCEL.value
_PING = FrameKind.PING.value
_PONG = FrameKind.PONG.value
_GOAWAY = FrameKind.GOAWAY.value
_U32 = struct.Struct(">I")
_HEADER_SIZE = HEADER.size
_PING_PAYLOAD = struct.Struct(">d")
# What a failed write raises: each ends the connection (see Connection._write_failed).
_WRITE_ERRORS = (
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    LocalProtocolError,
)


@attrs.define(eq=False)
class Request:
    """An incoming request or one-way message, as given to a handler.

    A slotted attrs class, made once per message: it is not frozen, because a frozen
    class costs a few hundred nanoseconds more to create, but nothing reads it back
    after the handler, so changing its attributes has no effect.

    Attributes:
        body: the message body.
        id: the request id (0 for a one-way message).
        oneway: ``True`` for a one-way message: the handler's return value is ignored.
        connection: the connection it arrived on; the handler may call the peer back on it.
    """

    body: bytes
    id: int
    oneway: bool
    connection: Connection = attrs.field(repr=False)

    @property
    def peer_public_key(self) -> PublicKey | None:
        """The peer's authenticated static key (native profile), for authorisation."""
        return self.connection.peer_public_key


AsyncHandler = Callable[[Request], Awaitable[bytes | None]]
"""An ``async def`` handler: it runs in a handler worker task and may await anything,
including calls back to the peer over ``request.connection``."""

InlineHandler = Callable[[Request], bytes | None]
"""A plain-function handler: the connection's reader calls it inline, which saves a task
switch per request. It must return promptly and never block: while it runs, nothing more
is read from that connection."""

Handler = AsyncHandler | InlineHandler
"""What serves requests and one-way messages: it returns the reply body (``None`` means an
empty reply); for one-way messages the return value is ignored.

An ``async def`` function (or any callable whose call is a coroutine function) runs in a
handler worker, concurrently with others, up to ``max_concurrent_handlers``. A plain
function runs inline in the connection's reader: the fastest choice for handlers that
compute their reply without waiting for anything."""


def is_async_handler(handler: object) -> bool:
    """Whether ``handler`` is called as a coroutine function (else it runs inline)."""
    while isinstance(handler, functools.partial):
        handler = handler.func
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 (an instance with async __call__)
    )


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
        queued_bytes: record plaintext bytes queued for the writer now.
        running_handlers: handlers running now.
        rtt: the last keepalive round-trip time in seconds (native), else ``None``.
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


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


# Module constants: an enum member lookup costs ~50 ns, tested on every call.
_OPEN = _State.OPEN
_CLOSING = _State.CLOSING
_CLOSED = _State.CLOSED


class _Written:
    """A ``send`` caller waiting for its records to be written."""

    __slots__ = ("batch", "start", "stop", "task")

    def __init__(self, task: trio.lowlevel.Task, batch: list[bytes | None], start: int) -> None:
        self.task: trio.lowlevel.Task | None = task
        self.batch = batch
        self.start = start
        self.stop = len(batch)


def _reply_body(reply: object) -> bytes:
    """Check what a handler returned: the reply body, bytes-like or ``None``."""
    if reply is None:
        return b""
    if isinstance(reply, bytes | bytearray | memoryview):
        return reply  # type: ignore[return-value]  # the codecs take any bytes-like body
    hint = ""
    if inspect.isawaitable(reply):
        if inspect.iscoroutine(reply):
            reply.close()
        hint = (
            "; it is awaitable, but the handler is not an async function, so it was "
            "called inline: define it with async def"
        )
    raise TypeError(
        f"the handler returned a {type(reply).__name__}; it must return bytes or None{hint}"
    )


async def _no_handler(request: Request) -> bytes | None:
    raise LocalProtocolError("this side accepts no requests (no handler was given)")


class Connection(trio.abc.AsyncResource):
    """One secure connection, with calls in both directions.

    Normally obtained from :func:`~monte_trio.open_client` (through a
    :class:`~monte_trio.Client`) or given to a server's handler as ``request.connection``.
    Use it as an async context manager; leaving the block closes it gracefully.

    Args:
        stream: the secure stream a :class:`~monte_trio.Handshake` produced.
        handler: serves the peer's requests and one-way messages (see :data:`Handler`:
            an ``async def`` function runs in a worker task, a plain function inline in the
            reader); ``None`` refuses them.
        config: limits and timers; defaults to :class:`~monte_trio.ConnectionConfig`\\ ().
        name: a label for logs (for example the peer's address).
    """

    def __init__(
        self,
        stream: SecureStream,
        *,
        handler: Handler | None = None,
        config: ConnectionConfig | None = None,
        name: str = "",
    ) -> None:
        self._stream = stream
        self._codec = stream.codec
        self._handler: AsyncHandler = _no_handler
        self._inline: InlineHandler | None = None
        if handler is not None and is_async_handler(handler):
            self._handler = handler  # type: ignore[assignment]
        elif handler is not None:
            self._inline = handler  # type: ignore[assignment]
        self._config = config = config or ConnectionConfig()
        self.name = name or ("client" if stream.initiator else "server") + " connection"
        self._native = FrameKind.CANCEL in self._codec.kinds
        self._state = _OPEN
        self._close_reason: ConnectionClosed | None = None
        self._dispatcher = Dispatcher(
            first_id=1 if stream.initiator else 2, max_pending=config.max_pending_requests
        )
        # writer side
        self._outbox: list[bytes | None] = []
        self._outbox_bytes = 0
        self._written: list[_Written] = []
        self._writing: list[_Written] = []  # waiters of the batch being written now
        self._writer_task: trio.lowlevel.Task | None = None
        self._direct = False  # a caller is writing (see the module docstring)
        self._space = trio.lowlevel.ParkingLot()
        self._max_send_queue = config.max_send_queue
        # reader / handler side
        self._inbox: deque[Frame] = deque()
        self._idle_workers: list[trio.lowlevel.Task] = []
        self._workers = 0
        self._spare = 0  # workers woken or started that have not taken a request yet
        self._busy = 0
        self._reader_parked: trio.lowlevel.Task | None = None
        # native: the peer's requests in progress, queued (None) or running (their scope)
        self._handler_scopes: dict[int, trio.CancelScope | None] = {}
        self._reader_paused = False  # held back by our own back-pressure
        # The memory budget (see the module docstring): bytes of incoming bodies and of
        # their replies the connection holds now; of them, replies in the outbox, released
        # by the writer once written.
        self._held = 0
        self._outbox_held = 0
        self._budget = config.max_held_bytes
        self._last_request_accepted = 0
        self._idle = trio.Event()
        self._idle.set()
        # peer's goaway
        self._peer_last_processed: int | None = None
        self._peer_closed = False
        self._last_heard = 0.0
        self._rtt: float | None = None
        self._pong: tuple[int, bytes] | None = None  # the PONG owed (the latest PING's)
        self._control_tokens = float(CONTROL_BURST)
        self._control_at = 0.0
        # counters
        self._requests_sent = 0
        self._replies_received = 0
        self._messages_sent = 0
        self._requests_received = 0
        self._messages_received = 0
        # structure
        self._services: trio.Nursery | None = None
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._closed = trio.Event()

    # -- properties ------------------------------------------------------------------------

    @property
    def profile(self) -> str:
        """The wire profile, ``"native"`` or ``"monte-v1"``."""
        return self._stream.profile

    @property
    def peer_public_key(self) -> PublicKey | None:
        """The peer's authenticated static key (native profile); ``None`` for monte-v1."""
        return self._stream.peer_public_key

    @property
    def initiator(self) -> bool:
        """Whether this side dialed the connection."""
        return self._stream.initiator

    @property
    def closed(self) -> bool:
        """Whether the connection is closing or closed (no new calls are accepted)."""
        return self._state is not _OPEN

    @property
    def close_reason(self) -> ConnectionClosed | None:
        """Why the connection ended, once it has."""
        return self._close_reason

    @property
    def load(self) -> int:
        """How busy the connection is: pending requests, plus 1 if records are queued."""
        return len(self._dispatcher) + (1 if self._outbox or self._direct else 0)

    def statistics(self) -> ConnectionStatistics:
        """Return a snapshot of this connection's counters."""
        return ConnectionStatistics(
            requests_sent=self._requests_sent,
            replies_received=self._replies_received,
            replies_dropped=self._dispatcher.dropped,
            messages_sent=self._messages_sent,
            requests_received=self._requests_received,
            messages_received=self._messages_received,
            pending_requests=len(self._dispatcher),
            queued_bytes=self._outbox_bytes,
            running_handlers=self._busy,
            rtt=self._rtt,
        )

    def __repr__(self) -> str:
        return f"<monte_trio.Connection {self.name!r} {self.profile} {self._state.value}>"

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
                self._last_heard = self._control_at = trio.current_time()
                services.start_soon(self._guarded, self._reader, name=f"{self.name} reader")
                services.start_soon(self._guarded, self._writer, name=f"{self.name} writer")
                if self._native and self._config.keepalive_interval is not None:
                    services.start_soon(
                        self._guarded, self._keepalive, name=f"{self.name} keepalive"
                    )
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

    async def _close_gracefully(self, grace_period: float) -> None:
        if self._state is _OPEN:
            self._state = _CLOSING
            if self._native:
                self._send_control(_GOAWAY, self._last_request_accepted)
        with trio.move_on_after(grace_period):
            # Native: also wait for the peer's GOAWAY. Whatever the peer wrote before it
            # learned that we are closing is ordered before its GOAWAY, so no message it
            # has already written is lost.
            while (
                self._busy
                or self._inbox
                or len(self._dispatcher)
                or (self._native and self._peer_last_processed is None and not self._peer_closed)
            ) and not self._closed_now:
                self._idle = trio.Event()
                await self._idle.wait()
            await self._flush()

    @property
    def _closed_now(self) -> bool:
        return self._state is _CLOSED

    def _finish(self, reason: ConnectionClosed) -> None:
        """End the connection now: fail every waiter and cancel the service tasks."""
        if self._state is _CLOSED:
            return
        self._state = _CLOSED
        self._close_reason = reason
        self._fail_pending(reason.reason)
        for waiter in (*self._writing, *self._written):
            if waiter.task is not None:
                trio.lowlevel.reschedule(
                    waiter.task, outcome.Error(ConnectionClosed(reason.reason))
                )
                waiter.task = None
        self._writing = []
        self._written = []
        self._outbox = []
        self._outbox_bytes = 0
        self._space.unpark_all()
        self._idle.set()
        if self._services is not None:
            self._services.cancel_scope.cancel()

    def _fail_pending(self, reason: str) -> None:
        """Fail this side's requests awaiting replies: safe to retry if the peer said so."""
        peer_last = self._peer_last_processed

        def error_for(ident: int) -> ConnectionClosed:
            if peer_last is not None and (peer_last == 0 or id_after(ident, peer_last)):
                return RequestNotProcessed(
                    f"the peer shut down without processing request {ident} "
                    f"(it processed up to {peer_last}); it is safe to retry"
                )
            return ConnectionClosed(reason)

        self._dispatcher.fail_all(error_for)

    def _closed_error(self) -> ConnectionClosed:
        if self._close_reason is not None:
            return ConnectionClosed(self._close_reason.reason)
        return ConnectionClosed("the connection is closing; open a new one")

    # -- outgoing calls --------------------------------------------------------------------

    async def request(self, body: bytes) -> bytes:
        """Send a request and return the peer's reply.

        Cancel it with a cancel scope (for example ``trio.fail_after``); its reply, if it
        comes later, is dropped, and the native profile tells the peer's handler to stop.

        Raises:
            ConnectionClosed: the connection ended before the reply arrived.
            RequestNotProcessed: the peer shut down without processing it: safe to retry.
            RemoteError: the peer's handler raised (native profile).
            LimitExceeded: too many requests are pending on this connection.
            LocalProtocolError: ``body`` is larger than the message size limit.
        """
        await self._ready_to_queue()
        # Direct only when no other request is in flight: callers that run together
        # (many requests on one connection) are better served by one batched write.
        direct = not self._dispatcher and self._writer_idle
        ident, channel = self._dispatcher.allocate()
        records: list[bytes | None] = [] if direct else self._outbox
        try:
            size = self._codec.encode(_REQUEST, ident, body, records)
        except BaseException:
            self._dispatcher.discard(ident)
            raise
        self._requests_sent += 1
        if direct:
            try:
                await self._write_directly(records)
            except BaseException:
                self._dispatcher.discard(ident)
                raise
        else:
            self._outbox_bytes += size
            self._wake_writer()
        try:
            kind, payload = await channel.receive()
        except BaseException:
            if self._dispatcher.discard(ident) and self._native and self._state is _OPEN:
                self._send_control(_CANCEL, ident)
            raise
        self._replies_received += 1
        if kind == _ERROR:
            # The peer's text: escaped (no terminal escapes, no control characters) and
            # cut, since callers print it and put it in logs.
            raise RemoteError(escape_peer_text(payload.decode("utf-8", errors="replace")))
        return payload

    async def send(self, body: bytes) -> None:
        """Send a one-way message and return once it has been written to the socket.

        If cancelled before the writer took the message, it is not sent; after that it is
        sent whole, and the caller learns nothing more.

        Raises:
            ConnectionClosed: the connection ended before the message was written.
            LocalProtocolError: ``body`` is larger than the message size limit.
        """
        await self._ready_to_queue()
        if self._writer_idle:
            records: list[bytes | None] = []
            self._codec.encode(_ONEWAY, 0, body, records)
            self._messages_sent += 1
            await self._write_directly(records)
            return
        waiter = _Written(trio.lowlevel.current_task(), self._outbox, len(self._outbox))
        self._enqueue(_ONEWAY, 0, body)
        waiter.stop = len(self._outbox)
        self._written.append(waiter)
        self._messages_sent += 1
        self._wake_writer()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            if waiter.batch is self._outbox:
                for i in range(waiter.start, waiter.stop):
                    self._outbox[i] = None
            waiter.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def send_nowait(self, body: bytes) -> None:
        """Queue a one-way message for the writer and return at once.

        Raises:
            trio.WouldBlock: the send queue is full (``max_send_queue``); wait with
                :meth:`send` or retry later.
            ConnectionClosed: the connection is closing or closed.
            LocalProtocolError: ``body`` is larger than the message size limit.
        """
        if self._state is not _OPEN:
            raise self._closed_error()
        if self._outbox_bytes >= self._max_send_queue:
            raise trio.WouldBlock
        self._enqueue(_ONEWAY, 0, body)
        self._messages_sent += 1
        self._wake_writer()

    async def _ready_to_queue(self) -> None:
        """The start of every call: a cancellation point, room in the send queue, and a
        connection still open."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._outbox_bytes >= self._max_send_queue:
            await self._wait_for_space()
        if self._state is not _OPEN:
            raise self._closed_error()

    async def _wait_for_space(self) -> None:
        while self._outbox_bytes >= self._max_send_queue and self._state is not _CLOSED:
            await self._space.park()

    def _enqueue(self, kind: int, ident: int, payload: bytes) -> None:
        self._outbox_bytes += self._codec.encode(kind, ident, payload, self._outbox)

    def _send_control(self, kind: int, ident: int, payload: bytes = b"") -> None:
        """Queue a frame written on behalf of the protocol. It never raises: a frame that
        cannot be encoded ends this connection (with a logged reason) instead.

        It counts in the send queue like a call, without waiting for room: what the peer
        can make us queue here is bounded elsewhere. CANCEL: one per request of ours
        (``max_pending_requests``); GOAWAY: one; keepalive PING: one per interval; an
        inline handler's error reply: the reader stops once the send queue is full. Error
        replies of async handlers go through ``_reply`` (budget and send queue), and the
        owed PONG is one frame kept as state (``_control``)."""
        try:
            self._enqueue(kind, ident, payload)
        except LocalProtocolError as exc:
            logger.warning("%s: closing: could not send a protocol frame: %s", self.name, exc)
            self._fail(f"could not send a protocol frame: {exc}", exc)
            return
        self._wake_writer()

    def _wake_writer(self) -> None:
        task = self._writer_task
        if task is not None and not self._direct:
            self._writer_task = None
            trio.lowlevel.reschedule(task)

    @property
    def _writer_idle(self) -> bool:
        """Whether a caller may write directly: the writer is parked with nothing queued,
        and the stream is record-safe (a cancelled write cannot cut a record)."""
        return (
            self._writer_task is not None
            and not self._direct
            and not self._outbox
            and not self._written
            and self._pong is None
            and self._stream.record_safe
            and not self._stream.has_unsent
        )

    async def _write_directly(self, records: list[bytes | None]) -> None:
        """Write ``records`` from the calling task while the writer is idle.

        The stream is record-safe: if the caller is cancelled part-way, the unsent rest
        of its records is kept by the stream and the writer sends it next, so no record
        is ever cut in half. Records queued meanwhile go to the writer afterwards, in
        order. The write is bounded by ``write_timeout`` like the writer's.

        Raises:
            ConnectionClosed: the write failed; the connection is closed.
        """
        write_timeout = self._config.write_timeout
        self._direct = True
        try:
            if write_timeout is None:
                await self._stream.send_records(records)
            else:
                with trio.fail_after(write_timeout):
                    await self._stream.send_records(records)
        except _WRITE_ERRORS as exc:
            self._write_failed(exc, write_timeout)
            raise self._closed_error() from exc
        finally:
            self._direct = False
            if self._outbox or self._written or self._pong or self._stream.has_unsent:
                self._wake_writer()

    async def _flush(self) -> None:
        """Wait until everything queued so far has been written."""
        if self._state is _CLOSED:
            return
        waiter = _Written(trio.lowlevel.current_task(), self._outbox, len(self._outbox))
        self._written.append(waiter)
        self._wake_writer()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            waiter.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        except ConnectionClosed:
            pass

    # -- the writer ------------------------------------------------------------------------

    async def _writer(self) -> None:
        stream = self._stream
        write_timeout = self._config.write_timeout
        try:
            while True:
                if (
                    not self._outbox
                    and not self._written
                    and self._pong is None
                    and not stream.has_unsent
                ):
                    self._writer_task = trio.lowlevel.current_task()

                    def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
                        self._writer_task = None
                        return trio.lowlevel.Abort.SUCCEEDED

                    await trio.lowlevel.wait_task_rescheduled(abort)
                    continue
                batch, self._outbox = self._outbox, []
                self._outbox_bytes = 0
                held, self._outbox_held = self._outbox_held, 0
                if self._pong is not None:  # after whole messages: never inside one
                    (ping_id, ping_payload), self._pong = self._pong, None
                    self._codec.encode(_PONG, ping_id, ping_payload, batch)
                written, self._written = self._written, []
                self._writing = written
                self._space.unpark_all()
                if batch or stream.has_unsent:
                    if write_timeout is None:
                        await stream.send_records(batch)
                    else:
                        with trio.fail_after(write_timeout):
                            await stream.send_records(batch)
                else:
                    await trio.lowlevel.checkpoint()
                if held:
                    self._release(held)  # the replies of that batch are written
                self._writing = []
                for waiter in written:
                    if waiter.task is not None:
                        trio.lowlevel.reschedule(waiter.task)
                        waiter.task = None
        except _WRITE_ERRORS as exc:
            self._write_failed(exc, write_timeout)

    def _write_failed(self, exc: BaseException, write_timeout: float | None) -> None:
        if isinstance(exc, trio.TooSlowError):
            self._fail(f"a write blocked for more than {write_timeout} s (write_timeout)")
        elif isinstance(exc, LocalProtocolError):
            self._fail(f"could not seal a record: {exc}", exc)
        else:
            self._fail(f"the connection was lost while writing: {exc}", exc)

    def _fail(self, reason: str, cause: BaseException | None = None) -> None:
        if self._state is not _CLOSED:
            logger.debug("%s: %s", self.name, reason)
        error = ConnectionClosed(reason)
        error.__cause__ = cause
        self._finish(error)

    # -- the reader ------------------------------------------------------------------------

    async def _reader(self) -> None:
        stream = self._stream
        decode = self._codec.decode
        deliver = self._dispatcher.deliver
        inbox = self._inbox
        limit = self._config.max_concurrent_handlers
        inline = self._inline is not None
        idle_timeout = self._config.idle_timeout
        codec = self._codec
        budget = self._budget
        try:
            while True:
                if idle_timeout is None:
                    records = await stream.receive_records()
                else:
                    with trio.move_on_after(idle_timeout) as idle_scope:
                        records = await stream.receive_records()
                    if idle_scope.cancelled_caught:
                        self._fail(f"nothing received for {idle_timeout} s (idle_timeout)")
                        return
                if not records:
                    await self._drain_after_eof()
                    return
                if self._native:
                    self._last_heard = trio.current_time()
                for plaintext in records:
                    frame = decode(plaintext)
                    if frame is None:
                        # A fragment: the message being reassembled counts in the budget.
                        while self._held and self._held + codec.reassembling >= budget:
                            await self._pause_reading()
                        continue
                    kind = frame[0]
                    if kind in (_REPLY, _ERROR):
                        if deliver(frame[1], (kind, frame[2])):
                            continue
                    elif kind in (_REQUEST, _ONEWAY):
                        self._take_request(frame)
                        if inline:
                            if self._outbox_bytes >= self._max_send_queue:
                                # inline replies (or error replies) outran the writer
                                self._reader_paused = True
                                try:
                                    await self._wait_for_space()
                                finally:
                                    self._resume_reading()
                        else:
                            # The memory budget: held back until handlers finish and
                            # their replies are written.
                            while self._held >= budget:
                                await self._pause_reading()
                    else:
                        self._control(frame)
                if self._state is _CLOSING and not self._busy and not inbox:
                    self._idle.set()
                while len(inbox) >= limit:
                    await self._pause_reading()
        except RemoteProtocolError as exc:
            logger.warning("%s: closing: %s", self.name, exc)
            self._fail(f"the peer broke the protocol: {exc}", exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(f"the connection was lost while reading: {exc}", exc)

    async def _pause_reading(self) -> None:
        """Hold the reader back (our own back-pressure, not the peer's silence) until a
        worker takes a request or budget is released; the caller checks again."""
        self._reader_parked = trio.lowlevel.current_task()
        self._reader_paused = True

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._reader_parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            self._resume_reading()

    def _release(self, size: int) -> None:
        """Give ``size`` bytes back to the memory budget and let a paused reader check."""
        self._held -= size
        if self._reader_parked is not None:
            task, self._reader_parked = self._reader_parked, None
            trio.lowlevel.reschedule(task)

    def _resume_reading(self) -> None:
        """The reader is no longer held back by us. What the peer sent meanwhile waited in
        buffers, so its silence is counted from now on, not from before the pause."""
        self._reader_paused = False
        self._last_heard = trio.current_time()

    async def _drain_after_eof(self) -> None:
        """The peer closed its end: finish the work it already handed us, then close.

        Nothing more can arrive, so this side's pending requests fail now; but requests and
        messages the peer sent before closing still reach the handler, and handlers already
        running finish, within the grace period. Their replies, which nobody can receive
        any more, are dropped.
        """
        reason = "the peer closed the connection"
        self._peer_closed = True
        if self._state is _OPEN:
            self._state = _CLOSING
        self._fail_pending(reason)
        self._idle.set()
        with trio.move_on_after(self._config.grace_period):
            while (self._busy or self._inbox) and not self._closed_now:
                self._idle = trio.Event()
                await self._idle.wait()
        self._fail(reason)

    def _take_request(self, frame: Frame) -> None:
        if frame[0] == _REQUEST:
            if self._state is not _OPEN and self._native:
                # After our GOAWAY, requests beyond the id it announced are not processed:
                # the peer fails them as safe to retry.
                return
            ident = frame[1]
            self._last_request_accepted = ident
            if self._native and self._inline is None:
                scopes = self._handler_scopes
                if ident in scopes:
                    raise RemoteProtocolError(
                        f"the peer sent request {ident} again while it is still in "
                        "progress; a request id is reused only after its reply"
                    )
                scopes[ident] = None  # queued
        if self._inline is not None:
            self._serve_inline(frame)
            return
        self._held += len(frame[2])
        self._inbox.append(frame)
        if self._spare == 0:
            self._add_worker()

    def _add_worker(self) -> None:
        if self._idle_workers:
            self._spare += 1
            trio.lowlevel.reschedule(self._idle_workers.pop())
        elif self._workers < self._config.max_concurrent_handlers:
            assert self._services is not None
            self._workers += 1
            self._spare += 1
            self._services.start_soon(self._guarded, self._worker, name=f"{self.name} handler")

    def _control(self, frame: Frame) -> None:
        kind, ident, payload = frame
        scopes = self._handler_scopes
        if kind == _CANCEL and ident in scopes:
            scope = scopes.pop(ident)
            if scope is not None:
                scope.cancel()
            else:  # not started yet: drop it from the inbox
                for queued in self._inbox:
                    if queued[1] == ident and queued[0] == _REQUEST:
                        self._inbox.remove(queued)
                        self._release(len(queued[2]))
                        break
            return
        # Every other control frame costs us work and carries no request: budgeted.
        self._spend_control_budget(kind)
        if kind == _PING:
            # At most one PONG is owed: the latest PING's, written by the writer. It counts
            # in the send queue like any queued record (the writer empties both at once).
            owed = self._pong
            if owed is not None:
                self._outbox_bytes -= _HEADER_SIZE + len(owed[1])
            self._pong = (ident, payload)
            self._outbox_bytes += _HEADER_SIZE + len(payload)
            self._wake_writer()
        elif kind == _PONG:
            if len(payload) == _PING_PAYLOAD.size:
                (sent_at,) = _PING_PAYLOAD.unpack(payload)
                self._rtt = max(0.0, trio.current_time() - sent_at)
        elif kind == _GOAWAY:
            self._peer_last_processed = ident
            if self._state is _OPEN:
                # Answer with our own GOAWAY: it tells the peer which of its requests we
                # accepted, and that nothing new from us follows it.
                self._state = _CLOSING
                self._send_control(_GOAWAY, self._last_request_accepted)
            # Requests the peer will never process fail now, safe to retry. Ids are
            # compared in allocation order (serial-number arithmetic); 0: none processed.
            for pending in self._dispatcher.pending_ids():
                if ident == 0 or id_after(pending, ident):
                    self._dispatcher.fail(
                        pending,
                        RequestNotProcessed(
                            f"the peer is shutting down and did not process request "
                            f"{pending} (it processed up to {ident}); it is safe to retry"
                        ),
                    )
            self._idle.set()

    def _spend_control_budget(self, kind: int) -> None:
        """A token bucket: CONTROL_BURST frames at once, CONTROL_RATE per second after."""
        now = trio.current_time()
        tokens = self._control_tokens + (now - self._control_at) * CONTROL_RATE
        self._control_at = now
        if tokens < 1.0:
            raise RemoteProtocolError(
                f"the peer sent control frames ({FrameKind(kind).name} last) faster than "
                f"{CONTROL_RATE} per second after a burst of {CONTROL_BURST}"
            )
        self._control_tokens = min(float(CONTROL_BURST), tokens) - 1.0

    # -- handlers --------------------------------------------------------------------------

    async def _worker(self) -> None:
        inbox = self._inbox
        me = trio.lowlevel.current_task()
        try:
            while True:
                if not inbox:
                    self._idle_workers.append(me)
                    self._spare -= 1

                    def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
                        # Runs in whichever task cancelled us: never call current_task() here.
                        self._idle_workers.remove(me)
                        self._spare += 1
                        return trio.lowlevel.Abort.SUCCEEDED

                    await trio.lowlevel.wait_task_rescheduled(abort)
                    continue
                self._spare -= 1
                if self._reader_parked is not None:
                    task, self._reader_parked = self._reader_parked, None
                    trio.lowlevel.reschedule(task)
                if len(inbox) > 1 and self._spare == 0:
                    self._add_worker()
                self._busy += 1
                try:
                    # No local keeps the frame: its body is freed when the handler is done
                    # with it, as the memory budget assumes.
                    await self._serve(inbox.popleft())
                finally:
                    self._busy -= 1
                    self._spare += 1
                    if not self._busy and not inbox:
                        self._idle.set()
        finally:
            self._workers -= 1

    def _request_for(self, frame: Frame) -> Request:
        """The handler's view of an incoming request or message (and count it)."""
        kind, ident, body = frame
        oneway = kind == _ONEWAY
        if oneway:
            self._messages_received += 1
        else:
            self._requests_received += 1
        return Request(body, ident, oneway, self)

    async def _serve(self, frame: Frame) -> None:
        """Run the handler for a request the reader charged to the memory budget, and
        queue its reply (or error reply), which takes over the charge until written."""
        charged = len(frame[2])
        request = self._request_for(frame)
        del frame
        ident, oneway = request.id, request.oneway
        kind = _REPLY
        try:
            if self._native and not oneway:
                scopes = self._handler_scopes
                with trio.CancelScope() as scope:
                    scopes[ident] = scope
                    try:
                        reply = _reply_body(await self._handler(request))
                    finally:
                        if scopes.get(ident) is scope:
                            del scopes[ident]
                if scope.cancelled_caught:
                    self._release(charged)
                    return  # the caller cancelled: it expects no reply
            else:
                reply = _reply_body(await self._handler(request))
        except Exception as exc:
            # An error reply for the peer's request takes the same path as a reply: it is
            # charged to the budget and waits for room in the send queue, so a peer that
            # never reads cannot make us queue error replies without bound.
            error = self._handler_failed(request, exc)
            if error is None:
                self._release(charged)
                return
            kind, reply = _ERROR, error
        del request  # the body is the handler's now: only the reply is held
        if oneway or self._state is _CLOSED or self._peer_closed:
            self._release(charged)  # nobody is left to read a reply
            return
        self._held += len(reply) - charged
        charged = len(reply)
        # Encoded at once and the reply dropped: the records are its only copy from here.
        records: list[bytes | None] = []
        size = self._encode_reply(kind, ident, reply, records)
        del reply
        if size is None:
            self._release(charged)
            return
        await self._reply(records, size, charged)

    def _serve_inline(self, frame: Frame) -> None:
        """Run a plain-function handler in the reader and queue its reply."""
        assert self._inline is not None
        request = self._request_for(frame)
        try:
            reply = self._inline(request)
            if type(reply) is not bytes:
                reply = _reply_body(reply)
        except Exception as exc:
            # Queued at once, like an inline reply: the reader stops reading once the
            # send queue is full, so these are bounded by max_send_queue (plus one).
            error = self._handler_failed(request, exc)
            if error is not None:
                self._send_control(_ERROR, request.id, error)
            return
        if request.oneway or self._state is _CLOSED or self._peer_closed:
            return
        self._reply_nowait(_REPLY, request.id, reply)

    async def _reply(self, records: list[bytes | None], size: int, charged: int) -> None:
        """Write a handler's encoded reply (or error reply) of ``size`` bytes, once the send
        queue has room. It holds ``charged`` bytes of the memory budget, released once it
        is written (by the writer, if queued) or dropped."""
        if self._outbox_bytes >= self._max_send_queue:
            try:
                await self._wait_for_space()
            except BaseException:
                self._release(charged)
                raise
        if self._state is _CLOSED or self._peer_closed:
            self._release(charged)
            return
        if self._busy == 1 and not self._inbox and self._writer_idle:  # the only handler
            try:
                with contextlib.suppress(ConnectionClosed):  # the connection has ended
                    await self._write_directly(records)
            finally:
                self._release(charged)
            return
        self._outbox.extend(records)
        self._outbox_bytes += size
        self._outbox_held += charged
        self._wake_writer()

    def _reply_nowait(self, kind: int, ident: int, payload: bytes) -> None:
        """Queue an inline handler's reply for the writer, without waiting for room in the
        send queue (the reader stops reading while the send queue is full)."""
        size = self._encode_reply(kind, ident, payload, self._outbox)
        if size is not None:
            self._outbox_bytes += size
            self._wake_writer()

    def _encode_reply(
        self, kind: int, ident: int, payload: bytes, out: list[bytes | None]
    ) -> int | None:
        """Encode a reply into ``out`` and return its size. A reply too large to send
        becomes an error reply (native), or ends the connection (monte-v1 cannot report
        it): ``None``."""
        try:
            return self._codec.encode(kind, ident, payload, out)
        except LocalProtocolError as exc:
            if not self._native:
                self._fail(f"a handler's reply could not be sent: {exc}", exc)
                return None
            message = fit_text(f"the reply could not be sent: {exc}", self._codec.max_message_size)
            return self._codec.encode(_ERROR, ident, message, out)

    def _handler_failed(self, request: Request, exc: Exception) -> bytes | None:
        """Log a handler's exception; return the error reply's text to send, if any."""
        if request.oneway:
            logger.error("%s: handler raised on a one-way message", self.name, exc_info=exc)
            return None
        if not self._native:
            # monte-v1 has no error reply: rather than leave the caller waiting forever,
            # end the connection so every caller on it learns at once.
            logger.error(
                "%s: handler raised; monte-v1 cannot report errors, closing the connection",
                self.name,
                exc_info=exc,
            )
            self._fail(f"the handler for request {request.id} raised {exc!r}", exc)
            return None
        logger.info("%s: handler raised for request %d: %r", self.name, request.id, exc)
        if not self._config.expose_errors:
            message = "the handler raised an exception"
        elif self._config.expose_tracebacks:
            message = "".join(traceback.format_exception(exc))
        else:
            message = f"{type(exc).__name__}: {exc}"
        if self._state is _CLOSED or self._peer_closed:
            return None
        return fit_text(message, self._codec.max_message_size)

    # -- keepalive (native) ----------------------------------------------------------------

    async def _keepalive(self) -> None:
        interval = self._config.keepalive_interval
        tolerance = self._config.keepalive_tolerance
        assert interval is not None
        ping_id = 0
        while True:
            await trio.sleep(interval)
            # Time the reader spends held back by our own back-pressure is not silence.
            silent = 0.0 if self._reader_paused else trio.current_time() - self._last_heard
            if silent >= tolerance:
                self._fail(
                    f"the peer was silent for {silent:.1f} s (keepalive_tolerance "
                    f"{tolerance} s); it is presumed dead"
                )
                return
            ping_id = (ping_id + 1) % 2**32
            self._send_control(_PING, ping_id, _PING_PAYLOAD.pack(trio.current_time()))
