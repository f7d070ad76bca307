"""The reader task of a :class:`~monte_trio.Connection`: records in, session events out.

It receives records, feeds them to the session (record by record, so what came before a
violation is still delivered) and dispatches the events: replies and errors to the
callers' reply channels, requests and one-way messages to the handlers, cancels to the
running handlers, goaways to the callers they fail, moved credit to the callers waiting
for it. Native: it **never stops reading**: credit, not a paused socket, bounds what the
peer can make us hold, so a ping, a reply to our own call or a goaway is processed at once
even while every handler is busy. Its timer (the session's ticks, ``idle_timeout``, a
deferred credit flush) is the deadline of one cancel scope around the receive, so a writer
stuck on a full socket cannot stop it. monte-v1 has no credit: there the reader pauses
while ``max_concurrent_handlers`` requests are queued and while inline replies fill the
send queue, and tells the session, so the pause is never taken for silence.

The reader belongs to its connection (it reads and sets the connection's state, as the
handler pool and the writer do); it is a module of its own because it is one job.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio

from ._exceptions import RemoteProtocolError, RequestNotProcessed
from ._proto._session import (
    EV_CALL_CREDIT,
    EV_CANCEL,
    EV_CLOSED,
    EV_DATA,
    EV_ERROR,
    EV_GOAWAY,
    EV_MESSAGE,
    EV_ONEWAY,
    EV_PONG,
    EV_REPLY,
    EV_REQUEST,
    EV_STREAM_OPENED,
)
from ._writer import WRITE_ERRORS

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["Reader"]

logger = logging.getLogger("monte_trio")

_SERVICE_INTERVAL = 0.1
"""Seconds between two ``handle_timer`` calls while frames arrive (control budget)."""


class Reader:
    """The reader task of ``connection`` (run it with :meth:`run` in the service nursery)."""

    __slots__ = ("_conn",)

    def __init__(self, connection: Connection) -> None:
        self._conn = connection

    async def run(self) -> None:
        conn = self._conn
        stream = conn._stream
        session = conn._session
        deliver = conn._dispatcher.deliver
        handlers = conn._handlers
        take = handlers.take
        streams = conn._streams
        on_data = streams.on_data
        on_message = streams.on_message
        writer = conn._writer
        native = conn._native
        limit = conn._config.max_concurrent_handlers
        idle_timeout = conn._config.idle_timeout
        next_service = 0.0
        idle_at = math.inf
        streamed = False
        try:
            while True:
                # One cancel scope per timer expiry, not per receive: its deadline is only
                # moved when the timer changes (entering and leaving a scope with a deadline
                # cost about as much as the rest of the loop). Nothing in the loop awaits
                # except the receive, so the deadline can only interrupt that.
                with trio.CancelScope() as scope:
                    conn._reader_scope = scope
                    while True:
                        timer = session.get_timer()
                        deadline = conn._flush_at
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
                                    elif kind == EV_DATA:
                                        on_data(event[1], event[2])  # type: ignore[arg-type]
                                        streamed = True
                                    elif kind == EV_MESSAGE:
                                        on_message(event[1], event[2], event[3])  # type: ignore[arg-type]
                                        streamed = True
                                    else:
                                        self._on_events((event,))
                        else:
                            # monte-v1 may pause below: no deadline may cut that short.
                            conn._reader_scope = None
                            scope.deadline = math.inf
                            await self._v1_events(session.receive_records(records))
                        del records
                        if (
                            session.wants_write or session.credit_owed
                        ) and writer.task is not None:
                            if (
                                conn.reply_queued
                                or session.send_queue_bytes
                                or writer.owed >= writer.credit_now
                            ):
                                writer.wake()
                            else:
                                conn.defer_flush()  # credit or a pong only: it may ride along
                        conn.reply_queued = False
                        if session.credit_changed != conn._credit_seen:
                            conn._credit_moved()
                            streams.credit_moved()
                        if streamed:
                            # Stream data arrived: a data-window update may be due (the
                            # sender may be blocked on it), so it does not wait for a flush.
                            streamed = False
                            if session.wants_write:
                                writer.wake()
                        if not native:
                            while len(handlers.inbox) >= limit:
                                await self._pause_reading()
                            conn._reader_scope = scope
                conn._reader_scope = None
                if not scope.cancelled_caught:
                    await self._drain_after_eof()
                    return
                now = trio.current_time()
                if now >= idle_at:
                    conn._fail(f"nothing received for {idle_timeout} s (idle_timeout)")
                    return
                if now >= conn._flush_at:
                    conn._flush_at = math.inf
                    session.flush_credit()
                timer = session.get_timer()
                if timer is not None and now >= timer:
                    self._on_events(session.handle_timer(now))
                    next_service = now + _SERVICE_INTERVAL
                if session.wants_write:
                    writer.wake()
        except RemoteProtocolError as exc:
            logger.warning("%s: closing: %s", conn.name, exc)
            await self._send_final_goaway()
            conn._fail(f"the peer broke the protocol: {exc}", exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            conn._fail(f"the connection was lost while reading: {exc}", exc)

    async def _v1_events(self, events: list[tuple[int, int, object, object]]) -> None:
        """monte-v1 has no credit: the reader is held back by the send queue (inline
        replies that outran the writer) after each request, and by the handler cap."""
        conn = self._conn
        session = conn._session
        writer = conn._writer
        inline = conn._handlers.inline is not None
        for kind, ident, body, _ in events:
            if kind == EV_REPLY:
                conn._dispatcher.deliver(ident, (EV_REPLY, body, None))  # type: ignore[arg-type]
                continue
            conn._handlers.take(ident, body, 0)  # type: ignore[arg-type]
            if inline and session.send_queue_bytes >= writer.max_send_queue:
                writer.wake()
                session.reader_paused(True)
                try:
                    await writer.wait_for_space(conn._is_closed)
                finally:
                    session.reader_paused(False)

    async def _send_final_goaway(self) -> None:
        """After a protocol violation: the session's final GOAWAY, if the writer is idle."""
        conn = self._conn
        writer = conn._writer
        if not conn._native or not writer.quiet:
            return
        with trio.move_on_after(1.0):
            try:
                await writer.write_directly()
            except WRITE_ERRORS:
                pass

    def _on_events(self, events: object) -> None:
        """The session's less frequent events (see ``_proto._session``)."""
        conn = self._conn
        for event in events:  # type: ignore[attr-defined]
            kind, ident, a, b = event
            if kind == EV_ERROR:
                if not conn._dispatcher.deliver(ident, (EV_ERROR, b.encode(), a)):
                    conn._streams.on_call_error(ident, a, b)  # a streaming call's
            elif kind == EV_CANCEL:
                conn._handlers.cancel(ident)
            elif kind == EV_GOAWAY:
                self._on_goaway(ident, a, b)
            elif kind == EV_PONG:
                conn._rtt = rtt = max(0.0, trio.current_time() - a)
                conn._session.observe_rtt(rtt)  # type: ignore[union-attr]
            elif EV_STREAM_OPENED <= kind <= EV_CALL_CREDIT:
                conn._streams.on_event(kind, ident, a)
            elif kind == EV_CLOSED:
                conn._fail(
                    "the peer was silent for longer than keepalive_tolerance "
                    f"({conn._config.keepalive_tolerance} s); it is presumed dead"
                    if "keepalive" in str(a)
                    else f"the connection ended: {a}"
                )

    def _on_goaway(self, last: int, code: int, failed: tuple[int, ...]) -> None:
        conn = self._conn
        conn._peer_last_processed = last
        for ident in failed:
            conn._dispatcher.fail(
                ident,
                RequestNotProcessed(
                    "the peer is shutting down and did not process the request with call id "
                    f"{ident} (it processed call ids up to {last}); it is safe to retry"
                ),
            )
        conn._stop_accepting()
        conn._call_waiters.unpark_all()
        conn._oneway_waiters.unpark_all()
        conn._streams.goaway(last, failed)
        conn._writer.wake()
        conn._progress.set()

    async def _pause_reading(self) -> None:
        """monte-v1: hold the reader back (our own back-pressure, not the peer's silence)
        until a worker takes a request."""
        conn = self._conn
        conn._handlers.reader_parked = trio.lowlevel.current_task()
        conn._session.reader_paused(True)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            conn._handlers.reader_parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            conn._session.reader_paused(False)

    async def _drain_after_eof(self) -> None:
        """The peer closed its end: finish the work it already handed us, then close.

        Nothing more can arrive, so this side's pending requests fail now; but requests and
        messages the peer sent before closing still reach the handler, and handlers already
        running finish, within the grace period. Their replies, which nobody can receive
        any more, are dropped.
        """
        conn = self._conn
        reason = "the peer closed the connection"
        conn._peer_closed = True
        conn._stop_accepting()
        conn._fail_pending(reason)
        conn._call_waiters.unpark_all()
        conn._oneway_waiters.unpark_all()
        conn._streams.refuse_openers()
        conn._progress.set()
        with trio.move_on_after(conn._config.grace_period):
            while conn._handlers.active and not conn._is_closed():
                conn._handlers.idle = trio.Event()
                await conn._handlers.idle.wait()
        conn._fail(reason)
