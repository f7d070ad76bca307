"""Serving the peer's calls: :class:`Request`, the handler kinds and the worker pool.

* **Handler workers** take requests from the *inbox* and run the user's async handler, so
  a handler may itself call back over the same connection without deadlocking (Go monte
  runs handlers inline in its reader and deadlocks there). Workers are long-lived and
  started only as concurrency requires, up to ``max_concurrent_handlers``; at most one idle
  worker is woken per burst, and it wakes another only if the inbox still holds work once
  it starts a handler. A worker serves request after request under one cancel scope,
  replaced only once a CANCEL has cancelled it (a scope per request would cost more than
  a small handler).
* The kind is chosen explicitly, never guessed from the function: a plain function
  wrapped with :func:`inline` (an :class:`InlineHandler`) cannot await anything, so it
  cannot deadlock: the reader calls it **inline**, with no hand-off to a worker, and its
  reply goes into the session's queue. Anything else is an async handler: whatever it
  returns is awaited (a plain function passed unwrapped is refused at its first call).
* A **nested call** (the peer's handler calling us back while it serves one of our
  calls) runs in a task of its own, outside ``max_concurrent_handlers``: every wait then
  points down the call tree, so callbacks cannot deadlock on busy handlers. A worker marks
  the call it serves in a context variable, so a call its handler makes back over
  ``request.connection`` carries that call as its parent.
* When a handler is done with a body the session returns its credit (``consumed``); its
  reply or error reply goes into the session, which holds it while the peer's reply window
  is short (the reader never waits for that).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import math
import traceback
import types
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio

from ._exceptions import LocalProtocolError
from ._proto._wire2 import ErrorCode

if TYPE_CHECKING:
    from ._connection import Connection
    from ._keys import PublicKey

__all__ = [
    "AsyncHandler",
    "BodyHandler",
    "Handler",
    "HandlerPool",
    "InlineHandler",
    "Request",
    "current_call",
    "inline",
    "without_cancelled",
]

logger = logging.getLogger("monte_trio")

_CoroutineType = types.CoroutineType

current_call: contextvars.ContextVar[tuple[object, int] | None] = contextvars.ContextVar(
    "monte_trio_current_call", default=None
)
"""``(connection, call_id)`` of the peer's call the current handler serves: a call the
handler makes back over the same connection is *nested* under it."""


@attrs.define(eq=False)
class Request:
    """An incoming request or one-way message, as given to a handler.

    A slotted attrs class, made once per message: it is not frozen, because a frozen
    class costs a few hundred nanoseconds more to create. After the handler only
    :attr:`compress_reply` is read back; changing the other attributes has no effect.

    Attributes:
        body: the message body.
        call_id: the call's id, which its reply carries (0 for a one-way message).
        oneway: ``True`` for a one-way message: the handler's return value is ignored.
        connection: the connection it arrived on; the handler may call the peer back on it.
        compress_reply: whether the reply may be compressed (native profile, when both
            sides allow compression: ``ConnectionConfig.compression``). A handler sets it
            to ``False`` before it returns a reply that holds a secret next to data the
            caller chose (see docs/security.rst, "Compression"); the reply then travels
            as it is.
    """

    body: bytes
    call_id: int
    oneway: bool
    connection: Connection = attrs.field(repr=False)
    compress_reply: bool = True

    @property
    def peer_public_key(self) -> PublicKey | None:
        """The peer's authenticated static key (native profile), for authorisation."""
        return self.connection.peer_public_key


AsyncHandler = Callable[[Request], Awaitable[bytes | None]]
"""An async handler: any callable that returns an awaitable of the reply body (an
``async def`` function, a lambda or :func:`functools.partial` returning a coroutine, an
object with an ``async def __call__``). It runs in a handler worker task and may await
anything, including calls back to the peer over ``request.connection``."""


@attrs.frozen
class InlineHandler:
    """A plain-function handler, chosen explicitly with :func:`inline`.

    The connection's reader calls :attr:`func` inline, which saves a task switch per
    request. It must return promptly and never block: while it runs, nothing more is read
    from that connection.

    Attributes:
        func: the plain function: it takes the :class:`Request` and returns the reply body
            (``None`` means an empty reply).
    """

    func: Callable[[Request], bytes | None]

    def __call__(self, request: Request) -> bytes | None:
        """Call the wrapped function."""
        return self.func(request)


def inline(func: Callable[[Request], bytes | None]) -> InlineHandler:
    """Mark a plain function as a handler that the connection's reader calls inline.

    For handlers that compute their reply without waiting for anything: no task switch per
    request, the fastest kind. Pass the result as ``handler=``::

        def add_one(request: monte_trio.Request) -> bytes:
            return bytes([request.body[0] + 1])

        server = monte_trio.Server(monte_trio.inline(add_one), ...)

    Args:
        func: takes the :class:`Request`, returns the reply body or ``None``.

    Raises:
        TypeError: ``func`` is not callable, or is already an :class:`InlineHandler`.
    """
    if isinstance(func, InlineHandler):
        raise TypeError("the handler is already inline; pass it as it is")
    if not callable(func):
        raise TypeError(f"inline() takes a function, not a {type(func).__name__}")
    return InlineHandler(func)


Handler = AsyncHandler | InlineHandler
"""What serves requests and one-way messages: it returns the reply body (``None`` means an
empty reply); for one-way messages the return value is ignored.

The kind is chosen explicitly. A callable returning an awaitable (:data:`AsyncHandler`)
runs in a handler worker, concurrently with others, up to ``max_concurrent_handlers``. A
plain function wrapped with :func:`monte_trio.inline` (:class:`InlineHandler`) runs inline
in the connection's reader: the fastest choice for handlers that compute their reply
without waiting for anything. A plain function passed unwrapped is a type error, and at
run time its call fails with a :exc:`TypeError` that names the fix."""

_NOT_AWAITABLE = (
    "the handler returned a {kind}, not an awaitable: a handler passed as it is must be "
    "async (async def, or a callable returning an awaitable); wrap a plain function with "
    "monte_trio.inline(func) to have it run inline"
)


def not_awaitable(reply: object) -> TypeError:
    """The error for a plain function passed as an async handler."""
    return TypeError(_NOT_AWAITABLE.format(kind=type(reply).__name__))


def reply_body(reply: object) -> bytes:
    """Check what a handler returned: the reply body, bytes-like or ``None``."""
    if reply is None:
        return b""
    if isinstance(reply, bytes | bytearray | memoryview):
        return reply  # type: ignore[return-value]  # the session takes any bytes-like body
    hint = ""
    if inspect.isawaitable(reply):
        if inspect.iscoroutine(reply):
            reply.close()
        hint = (
            "; it is awaitable, but the handler is wrapped with monte_trio.inline, so it "
            "was called inline and not awaited: pass the async handler unwrapped"
        )
    raise TypeError(
        f"the handler returned a {type(reply).__name__}; it must return bytes or None{hint}"
    )


def without_cancelled(exc: BaseException) -> BaseException | None:
    """``exc`` less the :exc:`trio.Cancelled` in it, as a cancel scope takes them: ``None``
    if it was only that (a ``Cancelled``, or a group of them from a nursery)."""
    if isinstance(exc, trio.Cancelled):
        return None
    split = getattr(exc, "split", None) if hasattr(exc, "exceptions") else None
    if split is None:
        return exc  # not an exception group
    rest: BaseException | None = split(trio.Cancelled)[1]
    return rest


_ServeBody = Callable[[bytes, int, "Connection"], Awaitable[bytes | None] | None]


class BodyHandler:
    """An async handler that the worker pool may call with the body itself.

    The library's own handlers (a :class:`~monte_trio.Router`) derive from it: the pool
    then calls its ``_serve_body`` instead of making a :class:`Request` and calling the
    handler with it, one object and one call less per request.
    """

    __slots__ = ()

    def _serve_body(
        self, body: bytes, call_id: int, connection: Connection
    ) -> Awaitable[bytes | None] | None:
        """What ``self(Request(body, call_id, call_id == 0, connection))`` returns; or
        ``None``: call the handler with the :class:`Request` instead (it may read or
        set more than the body, ``compress_reply`` for one)."""
        raise NotImplementedError


async def _no_handler(request: Request) -> bytes | None:
    # Not a LocalProtocolError: nothing this side sends breaks the protocol; the peer
    # gets an error reply (native) saying why.
    raise RuntimeError("this side accepts no requests (no handler was given)")


class HandlerPool:
    """The handlers of one connection: inline calls, the worker pool, nested-call tasks.

    Args:
        connection: the connection served (its session takes the answers).
        handler: the user's handler, or ``None`` to refuse requests.
        max_workers: ``max_concurrent_handlers``.
    """

    def __init__(
        self, connection: Connection, handler: Handler | None, *, max_workers: int
    ) -> None:
        self._conn = connection
        self._session = connection._session
        self.handler: AsyncHandler = _no_handler
        self.inline: Callable[[Request], bytes | None] | None = None
        self._body_server: _ServeBody | None = (
            handler._serve_body if isinstance(handler, BodyHandler) else None
        )
        if isinstance(handler, InlineHandler):
            self.inline = handler.func
        elif handler is not None:
            self.handler = handler
        self._kind_error_logged = False
        self._max_workers = max_workers
        self.inbox: deque[tuple[int, bytes, int]] = deque()
        self._idle_workers: list[trio.lowlevel.Task] = []
        self._workers = 0
        self._spare = 0  # workers woken or started that have not taken a request yet
        self.busy = 0
        self.nursery: trio.Nursery | None = None
        # native: the peer's requests in progress: queued (None) or running (their scope)
        self.scopes: dict[int, trio.CancelScope | None] = {}
        # worker scopes cancelled by a CANCEL, until their worker leaves them (a set, not
        # scope.cancel_called: that property reads the clock every time)
        self._spent: set[trio.CancelScope] = set()
        self.reader_parked: trio.lowlevel.Task | None = None
        self.idle = trio.Event()
        self.idle.set()
        self.requests_received = 0
        self.messages_received = 0

    @property
    def active(self) -> bool:
        """Whether any request is queued or running."""
        return bool(self.busy or self.inbox)

    def _settle(self) -> None:
        if not self.busy and not self.inbox:
            self.idle.set()
            self._conn._progress.set()

    # -- the reader's side -----------------------------------------------------------------

    def take(self, ident: int, body: bytes, parent: int) -> None:
        """A request (``ident`` > 0) or one-way message (0) from the reader."""
        if ident:
            self.requests_received += 1
        else:
            self.messages_received += 1
        if self.inline is not None:
            self._serve_inline(ident, body)
            return
        if self._conn._native and ident:
            self.scopes[ident] = None  # queued
        if parent:
            # Nested: outside the handler cap, in a task of its own.
            assert self.nursery is not None
            self.busy += 1
            self.idle = trio.Event() if self.idle.is_set() else self.idle
            self.nursery.start_soon(self._run_nested, ident, body)
            return
        self.inbox.append((ident, body, parent))
        if self.idle.is_set():
            self.idle = trio.Event()
        if self._spare == 0:
            self._add_worker()

    def cancel(self, ident: int) -> None:
        """The peer cancelled its call ``ident`` (native)."""
        if ident not in self.scopes:
            return
        scope = self.scopes[ident]
        if scope is not None:
            scope.cancel()  # the worker answers ERROR(CANCELLED) once the handler ended
            self._spent.add(scope)  # the worker replaces it after this call
            return
        for queued in self.inbox:
            if queued[0] == ident:
                self.inbox.remove(queued)
                break
        del self.scopes[ident]
        session = self._session
        session.consumed(ident)
        session.send_error(ident, ErrorCode.CANCELLED, "")
        self._settle()

    def _add_worker(self) -> None:
        if self._idle_workers:
            self._spare += 1
            trio.lowlevel.reschedule(self._idle_workers.pop())
        elif self._workers < self._max_workers:
            assert self.nursery is not None
            self._workers += 1
            self._spare += 1
            self.nursery.start_soon(
                self._conn._guarded, self._worker, name=f"{self._conn.name} handler"
            )

    # -- running handlers ------------------------------------------------------------------

    async def _worker(self) -> None:
        try:
            while True:
                # One cancel scope serves request after request: entering and leaving one
                # per request would cost more than a small handler. The peer's CANCEL
                # cancels it while it runs that call's handler (:meth:`cancel`); then it
                # is spent, and the worker enters a fresh one.
                answer = None
                with trio.CancelScope() as scope:
                    answer = await self._work(scope)
                self._spent.discard(scope)
                if answer is not None:  # a reply made after this scope was cancelled
                    await self._answer(*answer)
        finally:
            self._workers -= 1

    async def _work(self, scope: trio.CancelScope) -> tuple[int, bytes, bool] | None:
        """Serve requests from the inbox under ``scope`` until a CANCEL has cancelled it
        (the :exc:`trio.Cancelled` of the handler it stopped, or the reply of a handler
        that finished anyway, to send outside the spent scope)."""
        inbox = self.inbox
        me = trio.lowlevel.current_task()
        while True:
            if not inbox:
                self._idle_workers.append(me)
                self._spare -= 1
                self._settle()

                def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
                    # Runs in whichever task cancelled us: never call current_task() here.
                    self._idle_workers.remove(me)
                    self._spare += 1
                    return trio.lowlevel.Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)
                continue
            self._spare -= 1
            if self.reader_parked is not None:
                task, self.reader_parked = self.reader_parked, None
                trio.lowlevel.reschedule(task)
            if len(inbox) > 1 and self._spare == 0:
                self._add_worker()
            self.busy += 1
            try:
                ident, body, _ = inbox.popleft()
                answer = await self._serve(ident, body, scope)
                del body
            finally:
                self.busy -= 1
                self._spare += 1
            if scope in self._spent:
                return answer
            if not inbox and self._session.wants_write:
                # The end of a burst: the credit the handlers returned goes out soon.
                self._conn.credit_returned(0)

    async def _run_nested(self, ident: int, body: bytes) -> None:
        try:
            await self._conn._guarded(functools.partial(self._serve_alone, ident, body))
        finally:
            self.busy -= 1
            self._settle()
            self._conn.credit_returned(0)

    async def _serve_alone(self, ident: int, body: bytes) -> None:
        """Serve one request under a cancel scope of its own (a nested call's task)."""
        answer = None
        with trio.CancelScope() as scope:
            answer = await self._serve(ident, body, scope)
        self._spent.discard(scope)
        if answer is not None:
            await self._answer(*answer)

    async def _serve(
        self, ident: int, body: bytes, scope: trio.CancelScope
    ) -> tuple[int, bytes, bool] | None:
        """Run the async handler for one request under ``scope`` and queue its answer.

        Returns the reply instead if ``scope`` was cancelled meanwhile (the handler
        finished anyway): the caller sends it once out of the spent scope. A CANCEL that
        stops the handler answers the call here and lets the :exc:`trio.Cancelled`
        through to ``scope``. A :class:`BodyHandler` is given the body itself; any other
        handler a :class:`Request`.
        """
        conn = self._conn
        session = self._session
        size = len(body)
        request = None
        served = None if self._body_server is None else self._body_server(body, ident, conn)
        if served is None:
            request = Request(body, ident, not ident, conn)
        del body
        if not ident:
            try:
                if request is not None:
                    served = self._awaitable(self.handler(request))
                assert served is not None  # one of the two is set
                await served
            except Exception as exc:
                logger.error("%s: handler raised on a one-way message", conn.name, exc_info=exc)
            finally:
                session.consumed(0, size)
                conn._writer.owed += size + 64
            return None
        native = conn._native
        scopes = self.scopes
        if native:
            if ident not in scopes:  # cancelled (and answered) before it started
                close = getattr(served, "close", None)
                if close is not None:
                    close()  # a coroutine never run
                return None
            scopes[ident] = scope
        token = current_call.set((conn, ident))
        try:
            if request is not None:
                served = self._awaitable(self.handler(request))
            assert served is not None  # one of the two is set
            reply = await served
            del served
            if type(reply) is not bytes:
                reply = reply_body(reply)
        except Exception as exc:
            scopes.pop(ident, None)
            session.consumed(ident)
            text = self._failed(ident, exc)
            if text is not None:
                self._answer_error(ident, ErrorCode.INTERNAL, text)
            return None
        except BaseException as exc:
            # trio.Cancelled, or a group holding it (a nursery of the handler's).
            if not (native and scope in self._spent):
                raise  # not this call's CANCEL: the connection is closing
            # The peer's CANCEL stopped it; take what is not the cancellation as a scope
            # would, answer, and leave the spent scope to the worker.
            scopes.pop(ident, None)
            rest = without_cancelled(exc)
            if rest is not None and not isinstance(rest, Exception):
                raise rest from None  # KeyboardInterrupt and the like are not ours
            session.consumed(ident)
            text = "" if rest is None else self._failed(ident, rest)
            if text is not None:
                code = ErrorCode.CANCELLED if rest is None else ErrorCode.INTERNAL
                self._answer_error(ident, code, text)
            return None
        finally:
            current_call.reset(token)
        if native:
            del scopes[ident]
        compress = True if request is None else request.compress_reply
        del request
        session.consumed(ident)
        conn._writer.owed += size + 64
        if scope in self._spent:
            return ident, reply, compress
        if not self._answer_now(ident, reply, compress):
            await self._answer(ident, reply, compress)
        return None

    def _awaitable(self, result: object) -> Awaitable[bytes | None]:
        """What an async handler returned, checked: a plain function passed unwrapped
        returns its reply instead, which is refused with the fix (logged once)."""
        if type(result) is _CoroutineType or inspect.isawaitable(result):
            return result
        error = not_awaitable(result)
        if not self._kind_error_logged:
            self._kind_error_logged = True
            logger.error("%s: %s", self._conn.name, error)
        raise error

    def _serve_inline(self, ident: int, body: bytes) -> None:
        """Run a plain-function handler in the reader and queue its answer."""
        assert self.inline is not None
        session = self._session
        request = Request(body, ident, not ident, self._conn)
        try:
            reply = self.inline(request)
            if type(reply) is not bytes:
                reply = reply_body(reply)
        except Exception as exc:
            session.consumed(ident, len(body))
            if ident:
                text = self._failed(ident, exc)
                if text is not None:
                    self._answer_error(ident, ErrorCode.INTERNAL, text)
            else:
                logger.error(
                    "%s: handler raised on a one-way message", self._conn.name, exc_info=exc
                )
            return
        session.consumed(ident, len(body))
        self._conn._writer.owed += len(body) + 64
        if ident:
            self._queue_reply(ident, reply, request.compress_reply)
            self._conn.reply_queued = True  # the reader wakes the writer after the batch

    # -- deadlines of the calls served (a Router's, sent by its caller) ----------------------

    def deadline_scope(self, deadline: float) -> trio.CancelScope | None:
        """The cancel scope the call being served runs under, its deadline set to
        ``deadline``: setting a deadline on the worker's scope costs about half of
        entering and leaving a scope of its own. ``None`` where there is none to use
        (monte-v1, outside a handler of this connection, or the scope already has a
        deadline): the caller then enters a scope of its own.

        The caller must end it with :meth:`end_deadline` before the call's handler
        returns, and ask :meth:`deadline_passed` when it catches :exc:`trio.Cancelled`.
        """
        current = current_call.get()
        if current is None or current[0] is not self._conn:
            return None
        scope = self.scopes.get(current[1])
        if scope is None or scope in self._spent or scope.deadline != math.inf:
            return None
        scope.deadline = deadline
        return scope

    def deadline_passed(self, scope: trio.CancelScope) -> bool:
        """Whether ``scope`` (from :meth:`deadline_scope`) was cancelled by its deadline,
        not by the peer's CANCEL or a closing connection's."""
        return scope.cancel_called and scope not in self._spent

    def end_deadline(self, scope: trio.CancelScope) -> None:
        """Take the deadline off ``scope``; a scope it cancelled is spent (its worker
        sends the answer outside it and enters a fresh one)."""
        scope.deadline = math.inf
        if scope.cancel_called:
            self._spent.add(scope)

    def _answer_now(self, ident: int, reply: bytes, compress: bool) -> bool:
        """Queue a worker's reply and wake the writer, if that needs no waiting: there
        is room in the send queue and the reply is not to be written directly."""
        writer = self._conn._writer
        if self._session.send_queue_bytes >= writer.max_send_queue or (
            self.busy == 1 and not self.inbox and writer.quiet
        ):
            return False
        if self._queue_reply(ident, reply, compress):
            writer.wake()
        return True

    async def _answer(self, ident: int, reply: bytes, compress: bool = True) -> None:
        """Queue a worker's reply once the send queue has room; write it directly when
        this is the only handler and the connection is quiet."""
        conn = self._conn
        writer = conn._writer
        if self._session.send_queue_bytes >= writer.max_send_queue:
            await writer.wait_for_space(conn._is_closed)
        if not self._queue_reply(ident, reply, compress):
            return
        if self.busy == 1 and not self.inbox and writer.quiet:
            try:
                await writer.write_directly()
            except Exception as exc:
                conn._write_failed(exc, conn._config.write_timeout)
        else:
            writer.wake()

    def _queue_reply(self, ident: int, reply: bytes, compress: bool = True) -> bool:
        """Put a reply into the session; ``False`` if there is nobody to send it to."""
        conn = self._conn
        if conn._is_closed() or conn._peer_closed:
            return False
        try:
            self._session.send_reply(ident, reply, compress=compress)
        except LocalProtocolError as exc:
            if not conn._native:
                conn._fail(f"a handler's reply could not be sent: {exc}", exc)
                return False
            if conn._is_closed():
                return False
            self._answer_error(ident, ErrorCode.INTERNAL, f"the reply could not be sent: {exc}")
        return True

    def _answer_error(self, ident: int, code: int, text: str) -> None:
        conn = self._conn
        if conn._is_closed() or conn._peer_closed:
            return
        try:
            self._session.send_error(ident, code, text)
        except LocalProtocolError:
            return  # the session has ended: nobody can receive it
        conn._writer.wake()

    def _failed(self, ident: int, exc: Exception) -> str | None:
        """Log a handler's exception; return the error reply's text to send, if any."""
        conn = self._conn
        if not conn._native:
            # monte-v1 has no error reply: rather than leave the caller waiting forever,
            # end the connection so every caller on it learns at once.
            logger.error(
                "%s: handler raised; monte-v1 cannot report errors, closing the connection",
                conn.name,
                exc_info=exc,
            )
            conn._fail(f"the handler raised {exc!r} on the request with call id {ident}", exc)
            return None
        logger.info("%s: handler raised on the request with call id %d: %r", conn.name, ident, exc)
        config = conn._config
        if not config.expose_errors:
            return "the handler raised an exception"
        if config.expose_tracebacks:
            return "".join(traceback.format_exception(exc))
        return f"{type(exc).__name__}: {exc}"
