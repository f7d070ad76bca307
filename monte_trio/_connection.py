"""A connection: calls in both directions over one secure stream, driven by a session.

Theory of operation
-------------------

Every protocol decision (call ids, credit, cancel, goaway, keepalive, packing and parsing
frames) is made by the connection's sans-IO session (:mod:`monte_trio._proto._session`:
``Session`` for the native profile, ``MonteV1Session`` for Go monte's wire), built from
the :class:`~monte_trio._handshake.SessionFacts` the handshake returned. The connection
only drives it. Entering it opens a nursery whose service scope holds:

* the **reader** (this module): ``receive_records`` -> ``session.receive_records`` ->
  events: answers to the callers' :class:`~monte_trio._dispatcher.ReplyChannel`, requests
  and one-way messages to the :class:`~monte_trio._handlers.HandlerPool`, cancels to the
  running handlers, goaways to the callers they fail, moved credit to the FIFO of callers
  waiting for it. Native: it **never stops reading**: credit, not a paused socket, bounds
  what the peer can make us hold, so a ping, a reply to our own call or a goaway is
  processed at once even while every handler is busy. Its timer (keepalive, the grace
  period, idle_timeout) is ``move_on_at`` around the receive: a stuck writer cannot stop
  it. monte-v1 has no credit: there the reader pauses while ``max_concurrent_handlers``
  requests are queued, and tells the session, so the pause is never taken for silence.
* the **writer** (:mod:`monte_trio._writer`): the session's queue to the socket, packed,
  sealed and sent in batches; direct writes from callers on quiet connections.
* the **handlers** (:mod:`monte_trio._handlers`): inline plain functions, the worker pool,
  nested calls in tasks of their own.

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
import logging
import math
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
from ._handlers import (
    AsyncHandler,
    Handler,
    HandlerPool,
    InlineHandler,
    Request,
    current_call,
    is_async_handler,
)
from ._proto._session import (
    CLOSED as SESSION_CLOSED,
)
from ._proto._session import (
    EV_CANCEL,
    EV_CLOSED,
    EV_ERROR,
    EV_GOAWAY,
    EV_ONEWAY,
    EV_PONG,
    EV_REPLY,
    EV_REQUEST,
    Session,
)
from ._proto._session_v1 import MonteV1Session
from ._proto._wire2 import RETRY_SAFE
from ._secure_stream import SecureStream
from ._util import escape_peer_text
from ._writer import WRITE_ERRORS, Writer

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
    "is_async_handler",
]

logger = logging.getLogger("monte_trio")

_SERVICE_INTERVAL = 0.1
"""Seconds between two ``handle_timer`` calls while frames arrive (control budget)."""
_CREDIT_DELAY = 0.005
"""Seconds a small credit return may wait for a write to ride on before the writer sends
it alone: a lone CREDIT frame costs a wake-up, a seal and a system call on this side and
a read on the peer's, as much as the message it pays for."""
_CREDIT_NOW = 64 * 1024
"""Returned credit at or above this is sent at once (a peer may be waiting for it)."""
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


class _CreditWaiters:
    """Callers waiting for credit, first come first served (one FIFO per kind)."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: deque[list[trio.lowlevel.Task | None]] = deque()

    def __bool__(self) -> bool:
        return bool(self._queue)

    async def wait(self) -> None:
        """Wait until woken (credit moved): the caller then retries at the head."""
        slot: list[trio.lowlevel.Task | None] = [trio.lowlevel.current_task()]
        self._queue.append(slot)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            slot[0] = None
            try:
                self._queue.remove(slot)
            except ValueError:  # pragma: no cover (already woken)
                pass
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake_one(self) -> None:
        """Wake the head waiter; it retries and wakes the next if credit is left."""
        while self._queue:
            slot = self._queue.popleft()
            task = slot[0]
            if task is not None:
                slot[0] = None
                trio.lowlevel.reschedule(task)
                return

    def wake_all(self) -> None:
        """Wake every waiter (the connection is closing: they fail)."""
        queue, self._queue = self._queue, deque()
        for slot in queue:
            if slot[0] is not None:
                trio.lowlevel.reschedule(slot[0])
                slot[0] = None


class Connection(trio.abc.AsyncResource):
    """One secure connection, with calls in both directions.

    Normally obtained from :func:`~monte_trio.open_client` (through a
    :class:`~monte_trio.Client`) or given to a server's handler as ``request.connection``.
    Use it as an async context manager; leaving the block closes it gracefully.

    Args:
        stream: the secure stream a :class:`~monte_trio.Handshake` produced (its
            ``facts`` say which session to run).
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
        self.facts: SessionFacts = stream.facts
        facts = self.facts
        self._config = config = config or ConnectionConfig()
        self.name = name or ("client" if facts.initiator else "server") + " connection"
        try:
            now = trio.current_time()
        except RuntimeError:
            now = 0.0
        self._session: Session | MonteV1Session = facts.new_session(config, now)
        self._native = isinstance(self._session, Session)
        self._max_send = facts.max_message_size
        self._state = _OPEN
        self._close_reason: ConnectionClosed | None = None
        self._dispatcher = Dispatcher(max_pending=config.max_pending_requests)
        self._writer = Writer(
            stream,
            self._session,
            write_timeout=config.write_timeout,
            max_send_queue=config.max_send_queue,
            on_error=self._write_failed,
        )
        self._handlers = HandlerPool(self, handler, max_workers=config.max_concurrent_handlers)
        self._call_waiters = _CreditWaiters()
        self._oneway_waiters = _CreditWaiters()
        self._credit_seen = 0
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
    def load(self) -> int:
        """How busy the connection is: pending requests, plus 1 if messages are queued."""
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
        )

    def __repr__(self) -> str:
        return f"<monte_trio.Connection {self.name!r} {self.profile} {self._state.value}>"

    def _is_closed(self) -> bool:
        return self._state is _CLOSED

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
                services.start_soon(self._guarded, self._reader, name=f"{self.name} reader")
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

    def _start_closing(self) -> None:
        if self._state is _OPEN:
            self._state = _CLOSING
            self._session.start_close()
            self._writer.wake()
            self._call_waiters.wake_all()
            self._oneway_waiters.wake_all()

    async def _close_gracefully(self, grace_period: float) -> None:
        self._start_closing()
        with trio.move_on_after(grace_period):
            # Native: also wait for the peer's GOAWAY. Whatever the peer wrote before it
            # learned that we are closing is ordered before its GOAWAY, so no message it
            # has already written is lost.
            while (
                self._handlers.active
                or len(self._dispatcher)
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
        self._writer.fail_waiters(lambda: ConnectionClosed(reason.reason))
        self._call_waiters.wake_all()
        self._oneway_waiters.wake_all()
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
                    f"the peer shut down without processing request {ident} "
                    f"(it processed up to {peer_last}); it is safe to retry"
                )
            return ConnectionClosed(reason)

        self._dispatcher.fail_all(error_for)

    def _closed_error(self) -> ConnectionClosed:
        if self._close_reason is not None:
            return ConnectionClosed(self._close_reason.reason)
        if self._peer_last_processed is not None:
            return RequestNotProcessed(
                "the peer is shutting down (it sent GOAWAY); this call was not sent, it is "
                "safe to retry on a new connection"
            )
        return ConnectionClosed("the connection is closing; open a new one")

    def _ended(self) -> ConnectionClosed:
        """The error for a call refused because the connection (or its session) ended."""
        if self._close_reason is None and self._state is _OPEN:
            return ConnectionClosed("the connection is ending (the peer broke the protocol)")
        return self._closed_error()

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

    async def _open_call(self, body: bytes) -> int:
        """Take credit for a call carrying ``body`` and put it into the session."""
        session = self._session
        parent = self._parent() if self._native else 0
        waiters = self._call_waiters
        queued = False
        try:
            while True:
                if self._state is not _OPEN and not parent:
                    raise self._closed_error()
                if not waiters or queued:
                    try:
                        ident = session.send_request(body, parent=parent)
                    except LocalProtocolError:
                        if session.state >= SESSION_CLOSED:
                            raise self._ended() from None
                        if not parent or self._state is _CLOSED:
                            raise
                        parent = 0  # the handler already answered: an ordinary call
                        continue
                    if ident is not None:
                        if queued and waiters:
                            waiters.wake_one()  # credit may be left for the next one
                        return ident
                queued = True
                await waiters.wait()
        except BaseException:
            if queued and waiters:
                waiters.wake_one()  # pass the wake-up on
            raise

    async def request(self, body: bytes) -> bytes:
        """Send a request and return the peer's reply.

        Cancel it with a cancel scope (for example ``trio.fail_after``); its reply, if it
        comes later, is dropped, and the native profile tells the peer's handler to stop.
        A call that waits for credit (the peer's call slots or request window) waits in
        order of arrival.

        Raises:
            ConnectionClosed: the connection ended before the reply arrived.
            RequestNotProcessed: the peer shut down without processing it: safe to retry.
            RemoteError: the peer's handler raised (native profile).
            LimitExceeded: too many requests are pending on this connection.
            LocalProtocolError: ``body`` is larger than the message size limit.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._state is not _OPEN and not self._parent():
            raise self._closed_error()
        self._check_size(body)
        dispatcher = self._dispatcher
        dispatcher.check_room()
        writer = self._writer
        session = self._session
        if session.send_queue_bytes >= writer.max_send_queue:
            await writer.wait_for_space(self._is_closed)
        # Direct only when no other call is in flight: callers that run together (many
        # requests on one connection) are better served by one batched write.
        direct = not dispatcher and writer.quiet
        ident = await self._open_call(body)
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
            raise
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
            raise RequestNotProcessed(f"the peer refused request {ident}: {text}")
        raise RemoteError(text)

    async def send(self, body: bytes) -> None:
        """Send a one-way message and return once it has been written to the socket.

        It waits for credit (the peer's request window) and for room in the send queue,
        in order of arrival. Once it has credit the message is in the send queue and goes
        out whole even if the caller is cancelled while waiting for the write.

        Raises:
            ConnectionClosed: the connection ended before the message was written.
            LocalProtocolError: ``body`` is larger than the message size limit.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._state is not _OPEN:
            raise self._closed_error()
        self._check_size(body)
        writer = self._writer
        if self._session.send_queue_bytes >= writer.max_send_queue:
            await writer.wait_for_space(self._is_closed)
        direct = writer.quiet
        await self._queue_oneway(body)
        if direct and writer.quiet:
            await self._write_directly()
            return
        await writer.wait_written()

    async def _queue_oneway(self, body: bytes) -> None:
        session = self._session
        waiters = self._oneway_waiters
        queued = False
        try:
            while True:
                if self._state is not _OPEN:
                    raise self._closed_error()
                if session.state >= SESSION_CLOSED:
                    raise self._ended()
                if (not waiters or queued) and session.send_oneway(body):
                    self._messages_sent += 1
                    if queued and waiters:
                        waiters.wake_one()
                    return
                queued = True
                await waiters.wait()
        except BaseException:
            if queued and waiters:
                waiters.wake_one()
            raise

    def send_nowait(self, body: bytes) -> None:
        """Queue a one-way message for the writer and return at once.

        Raises:
            trio.WouldBlock: no credit (the peer's request window is spent), the send
                queue is full (``max_send_queue``), or another sender is already waiting;
                wait with :meth:`send` or retry later.
            ConnectionClosed: the connection is closing or closed.
            LocalProtocolError: ``body`` is larger than the message size limit.
        """
        session = self._session
        if self._state is not _OPEN or session.state >= SESSION_CLOSED:
            raise self._ended()
        if (
            session.send_queue_bytes >= self._writer.max_send_queue
            or self._oneway_waiters
            or len(body) > self._max_send
            or not session.send_oneway(body)
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
        if writer.owed >= _CREDIT_NOW:
            writer.wake()
        else:
            self.defer_flush()

    def defer_flush(self) -> None:
        """Something small (credit, a pong) waits with nothing else to write: let it ride
        on the next write, or have the writer send it alone within ``_CREDIT_DELAY`` (the
        reader's timer: the reader is the one task that always comes back)."""
        due = trio.current_time() + _CREDIT_DELAY
        if due < self._flush_at:
            self._flush_at = due
            scope = self._reader_scope
            if scope is not None and due < scope.deadline:
                scope.deadline = due

    def _credit_moved(self) -> None:
        seen = self._session.credit_changed
        if seen != self._credit_seen:
            self._credit_seen = seen
            self._call_waiters.wake_one()
            self._oneway_waiters.wake_one()

    # -- the reader ------------------------------------------------------------------------

    async def _reader(self) -> None:
        stream = self._stream
        session = self._session
        deliver = self._dispatcher.deliver
        handlers = self._handlers
        take = handlers.take
        writer = self._writer
        native = self._native
        limit = self._config.max_concurrent_handlers
        idle_timeout = self._config.idle_timeout
        next_service = 0.0
        idle_at = math.inf
        try:
            while True:
                # One cancel scope per timer expiry, not per receive: its deadline is only
                # moved when the timer changes (entering and leaving a scope with a deadline
                # cost about as much as the rest of the loop). Nothing in the loop awaits
                # except the receive, so the deadline can only interrupt that.
                with trio.CancelScope() as scope:
                    self._reader_scope = scope
                    while True:
                        timer = session.get_timer()
                        deadline = self._flush_at
                        if idle_timeout is not None:
                            idle_at = trio.current_time() + idle_timeout
                            if idle_at < deadline:
                                deadline = idle_at
                        if timer is not None and timer < deadline:
                            deadline = timer
                        if deadline != scope.deadline:
                            scope.deadline = deadline
                        records = await stream.receive_records()
                        if not records:
                            break
                        if native:
                            now = trio.current_time()
                            if now >= next_service:
                                # Refill the control budget before charging this batch.
                                self._on_events(session.handle_timer(now))
                                next_service = now + _SERVICE_INTERVAL
                            # Record by record: what came before a violation is still
                            # delivered (a record packs many frames, so this costs little).
                            for record in records:
                                for event in session.receive_records([record]):
                                    kind = event[0]
                                    if kind == EV_REPLY:
                                        ident = event[1]
                                        if not deliver(ident, (EV_REPLY, event[2], None)):  # type: ignore[arg-type]
                                            session.delivered(ident)
                                    elif kind in (EV_REQUEST, EV_ONEWAY):
                                        take(event[1], event[2], event[3])  # type: ignore[arg-type]
                                    else:
                                        self._on_events((event,))
                        else:
                            # monte-v1 may pause below: no deadline may cut that short.
                            self._reader_scope = None
                            scope.deadline = math.inf
                            await self._v1_events(session.receive_records(records))
                        del records
                        if session.wants_write and writer.task is not None:
                            if (
                                self.reply_queued
                                or session.send_queue_bytes
                                or writer.owed >= _CREDIT_NOW
                            ):
                                writer.wake()
                            else:
                                self.defer_flush()  # credit or a pong only: it may ride along
                        self.reply_queued = False
                        if session.credit_changed != self._credit_seen:
                            self._credit_moved()
                        if not native:
                            while len(handlers.inbox) >= limit:
                                await self._pause_reading()
                            self._reader_scope = scope
                self._reader_scope = None
                if not scope.cancelled_caught:
                    await self._drain_after_eof()
                    return
                now = trio.current_time()
                if now >= idle_at:
                    self._fail(f"nothing received for {idle_timeout} s (idle_timeout)")
                    return
                if now >= self._flush_at:
                    self._flush_at = math.inf
                timer = session.get_timer()
                if timer is not None and now >= timer:
                    self._on_events(session.handle_timer(now))
                    next_service = now + _SERVICE_INTERVAL
                if session.wants_write:
                    writer.wake()
        except RemoteProtocolError as exc:
            logger.warning("%s: closing: %s", self.name, exc)
            await self._send_final_goaway()
            self._fail(f"the peer broke the protocol: {exc}", exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(f"the connection was lost while reading: {exc}", exc)

    async def _v1_events(self, events: list[tuple[int, int, object, object]]) -> None:
        """monte-v1 has no credit: the reader is held back by the send queue (inline
        replies that outran the writer) after each request, and by the handler cap."""
        session = self._session
        writer = self._writer
        inline = self._handlers.inline is not None
        for kind, ident, body, _ in events:
            if kind == EV_REPLY:
                self._dispatcher.deliver(ident, (EV_REPLY, body, None))  # type: ignore[arg-type]
                continue
            self._handlers.take(ident, body, 0)  # type: ignore[arg-type]
            if inline and session.send_queue_bytes >= writer.max_send_queue:
                writer.wake()
                session.reader_paused(True)
                try:
                    await writer.wait_for_space(self._is_closed)
                finally:
                    session.reader_paused(False)

    async def _send_final_goaway(self) -> None:
        """After a protocol violation: the session's final GOAWAY, if the writer is idle."""
        writer = self._writer
        if not self._native or not writer.quiet:
            return
        with trio.move_on_after(1.0):
            try:
                await writer.write_directly()
            except WRITE_ERRORS:
                pass

    def _on_events(self, events: object) -> None:
        """The session's less frequent events (see ``_proto._session``)."""
        for event in events:  # type: ignore[attr-defined]
            kind, ident, a, b = event
            if kind == EV_ERROR:
                if not self._dispatcher.deliver(ident, (EV_ERROR, b.encode(), a)):
                    pass
            elif kind == EV_CANCEL:
                self._handlers.cancel(ident)
            elif kind == EV_GOAWAY:
                self._on_goaway(ident, a, b)
            elif kind == EV_PONG:
                self._rtt = max(0.0, trio.current_time() - a)
            elif kind == EV_CLOSED:
                self._fail(
                    "the peer was silent for longer than keepalive_tolerance "
                    f"({self._config.keepalive_tolerance} s); it is presumed dead"
                    if "keepalive" in str(a)
                    else f"the connection ended: {a}"
                )

    def _on_goaway(self, last: int, code: int, failed: tuple[int, ...]) -> None:
        self._peer_last_processed = last
        for ident in failed:
            self._dispatcher.fail(
                ident,
                RequestNotProcessed(
                    f"the peer is shutting down and did not process request {ident} "
                    f"(it processed up to {last}); it is safe to retry"
                ),
            )
        if self._state is _OPEN:
            self._state = _CLOSING
        self._call_waiters.wake_all()
        self._oneway_waiters.wake_all()
        self._writer.wake()
        self._progress.set()

    async def _pause_reading(self) -> None:
        """monte-v1: hold the reader back (our own back-pressure, not the peer's silence)
        until a worker takes a request."""
        self._handlers.reader_parked = trio.lowlevel.current_task()
        self._session.reader_paused(True)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._handlers.reader_parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            self._session.reader_paused(False)

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
        self._call_waiters.wake_all()
        self._oneway_waiters.wake_all()
        self._progress.set()
        with trio.move_on_after(self._config.grace_period):
            while self._handlers.active and self._state is not _CLOSED:
                self._handlers.idle = trio.Event()
                await self._handlers.idle.wait()
        self._fail(reason)


# Re-exported for outcome's type checkers (reschedule with errors).
_ = outcome
