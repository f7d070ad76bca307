"""Streaming calls over a connection: messages rather than bytes, modelled on trio's channels.

Three shapes (docs/wire-native.rst, "Streams and streaming calls"):

* **bidirectional** (:meth:`Connection.open_call <monte_trio.Connection.open_call>`): a
  :class:`Call`, a :class:`trio.abc.Channel` of ``bytes`` both ways;
* **upload** (:meth:`Connection.upload <monte_trio.Connection.upload>`): an
  :class:`UploadCall`, a :class:`trio.abc.SendChannel` whose :meth:`~UploadCall.finish`
  returns the handler's single reply;
* **download** (:meth:`Connection.download <monte_trio.Connection.download>`): a
  :class:`DownloadCall`, a :class:`trio.abc.ReceiveChannel` of the handler's replies.

The peer serves them with a ``call_handler`` taking an :class:`IncomingCall`. Each call
has its own flow control on top of the connection's: a send waits for the call's credit,
and credit goes back to the sender only as the receiving application takes each message,
so a slow reader stops its sender and nothing else.

This module is the Trio side of one call (:class:`_Core`: the per-id receive buffer, the
credit waits, failures made fresh on each raise) and the handler runner; the connection's
:class:`~monte_trio._streams.Streams` registry opens ids and routes the session's events
to the cores.
"""

from __future__ import annotations

import enum
import inspect
import logging
import traceback
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

import trio

from ._exceptions import (
    CallCancelled,
    ConnectionClosed,
    LocalProtocolError,
    RemoteError,
    RequestNotProcessed,
)
from ._proto._wire2 import MESSAGE_COST, RETRY_SAFE, ErrorCode
from ._util import NoPublicConstructor, escape_peer_text

if TYPE_CHECKING:
    from ._client import Client
    from ._connection import Connection
    from ._keys import PublicKey
    from ._proto._session import Session
    from ._streams import Streams
    from ._writer import Writer

__all__ = [
    "Call",
    "CallHandler",
    "CallShape",
    "DownloadCall",
    "IncomingCall",
    "UploadCall",
    "client_opening",
    "connection_opening",
]

logger = logging.getLogger("monte_trio")

_T = TypeVar("_T")
_C = TypeVar("_C")

_CANCELLED = int(ErrorCode.CANCELLED)
_INTERNAL = int(ErrorCode.INTERNAL)
_REASSIGNMENTS = 3
"""How many times a client moves a call refused before anything was sent (as request())."""
RECEIVE_RUN = 32
"""Messages :meth:`_Core.receive` may return in a row from its buffer without yielding to
other tasks (each one is still a cancellation point): a task switch per message would
cost more than the message."""
SEND_RUN = 64
"""Messages an async generator handler may yield in a row before its task yields to
other tasks, while the call's credit and the send queue take them at once."""
SEND_RUN_BYTES = 64 * 1024
"""... and bytes: the writer then packs and writes the run together."""

Failure = Callable[[], BaseException]
"""Makes the exception a failed call raises (a fresh one each time)."""


class CallShape(enum.IntEnum):
    """The shape of a streaming call (the byte its CALL frame carries)."""

    UPLOAD = 1
    """Many messages from the caller, one reply from the handler."""
    DOWNLOAD = 2
    """One request from the caller, many messages from the handler."""
    BIDIRECTIONAL = 3
    """Many messages each way."""


def _error_failure(ident: int, code: int, text: str) -> Failure:
    """What the peer's ERROR on our call ``ident`` raises."""
    text = escape_peer_text(text)
    if code in RETRY_SAFE:
        message = (
            f"the peer refused streaming call {ident}: {text}; nothing was processed, so it "
            "is safe to make the call again"
        )
        return lambda: RequestNotProcessed(message)
    if code == _CANCELLED:
        message = (
            f"the peer cancelled streaming call {ident} before its end (its handler was "
            f"cancelled): {text}"
        )
        return lambda: CallCancelled(message)
    return lambda: RemoteError(text)


def _not_processed_failure(message: str) -> Failure:
    return lambda: RequestNotProcessed(message)


def _lost_failure(reason: ConnectionClosed) -> Failure:
    def make() -> BaseException:
        error = ConnectionClosed(f"the call's connection ended: {reason.reason}")
        error.__cause__ = reason
        return error

    return make


class _Core:
    """One streaming call from this side: its receive buffer, credit waits and failures."""

    __slots__ = (
        "closed",
        "conn",
        "ended",
        "error",
        "ident",
        "inbox",
        "limit",
        "ours",
        "peer_cancelled",
        "receiving",
        "recv_error",
        "recv_lot",
        "scope",
        "send_error",
        "send_lot",
        "send_many",
        "sending",
        "sent",
        "sent_end",
        "session",
        "shape",
        "space_waiting",
        "streams",
        "unyielded",
        "writer",
    )

    def __init__(self, streams: Streams, ident: int, shape: CallShape, *, ours: bool) -> None:
        conn = streams.connection
        self.streams: Streams = streams
        self.conn: Connection = conn
        self.session: Session = streams.session
        self.writer: Writer = conn._writer
        self.ident: int = ident
        self.shape: CallShape = shape
        self.ours: bool = ours
        # Which of our halves carries many messages (the other carries exactly one).
        self.send_many: bool = shape == CallShape.BIDIRECTIONAL or (
            shape == (CallShape.UPLOAD if ours else CallShape.DOWNLOAD)
        )
        self.inbox: deque[tuple[bytes, int]] = deque()
        self.ended: bool = False  # the peer's END arrived
        self.error: Failure | None = None  # the call failed both ways (ERROR, connection)
        self.recv_error: Failure | None = None
        self.send_error: Failure | None = None
        self.recv_lot: trio.lowlevel.ParkingLot = trio.lowlevel.ParkingLot()
        self.send_lot: trio.lowlevel.ParkingLot = trio.lowlevel.ParkingLot()
        self.space_waiting: bool = False
        self.receiving: bool = False
        self.sending: bool = False
        self.sent: int = 0
        self.sent_end: bool = False
        self.closed: bool = False
        self.peer_cancelled: bool = False
        self.scope: trio.CancelScope | None = None
        self.unyielded: int = 0  # messages received in a row without a schedule point
        self.limit: int = 0  # max_message_size, once known

    @property
    def max_message_size(self) -> int:
        limit = self.limit
        if not limit:
            peer = self.conn.facts.peer_hello
            assert peer is not None  # calls run on native connections only
            limit = self.limit = min(peer.max_message_size, peer.stream_window // 2 - MESSAGE_COST)
        return limit

    @property
    def recv_done(self) -> bool:
        return self.ended or self.recv_error is not None or self.error is not None

    # -- receiving -------------------------------------------------------------------------

    def _recv_ready(self) -> bool:
        return bool(self.inbox) or self.recv_done or self.closed

    async def receive(self) -> bytes:
        if self.receiving:
            raise trio.BusyResourceError("another task is already receiving on this call")
        self.receiving = True
        try:
            if self._recv_ready():
                await trio.lowlevel.checkpoint_if_cancelled()
                body = self._take()
                # A run of buffered messages yields to other tasks once per RECEIVE_RUN
                # messages, not once each (the reader refills the buffer a record at a
                # time, so it arrives in runs).
                if self.unyielded < RECEIVE_RUN:
                    self.unyielded += 1
                else:
                    self.unyielded = 0
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return body
            self.unyielded = 0
            while not self._recv_ready():
                await self.recv_lot.park()
            return self._take()
        finally:
            self.receiving = False

    def _take(self) -> bytes:
        if self.closed:
            raise trio.ClosedResourceError("this call was closed")
        if self.inbox:
            body, cost = self.inbox.popleft()
            self.streams.was_read(self.ident, cost)
            return body
        if self.error is not None:
            raise self.error()
        if self.recv_error is not None:
            raise self.recv_error()
        raise trio.EndOfChannel

    # -- sending ---------------------------------------------------------------------------

    def _check_send(self) -> None:
        if self.closed:
            raise trio.ClosedResourceError("this call was closed")
        if self.error is not None:
            raise self.error()
        if self.send_error is not None:
            raise self.send_error()
        if self.sent_end:
            if self.send_many:
                raise trio.ClosedResourceError(
                    "send_eof() was called on this call: its sending half has ended"
                )
            raise trio.ClosedResourceError("this side of the call sends exactly one message")

    async def send(self, body: bytes, compress: bool) -> None:
        if self.sending:
            raise trio.BusyResourceError("another task is already sending on this call")
        self.sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_send()
            limit = self.max_message_size
            if len(body) > limit:
                raise LocalProtocolError(
                    f"message of {len(body)} bytes exceeds the largest message on a streaming "
                    f"call ({limit} bytes: the smaller of the peer's max_message_size and half "
                    "its stream_window less 64); cut it, or send it over a stream"
                )
            session = self.session
            queue_limit = self.streams.queue_limit
            while True:
                if session.send_queue_bytes >= queue_limit:
                    # Call data stays below half of max_send_queue, as stream data does.
                    self.space_waiting = True
                    try:
                        await self.writer.space.park()
                    finally:
                        self.space_waiting = False
                    self._check_send()
                    continue
                try:
                    accepted = session.send_message(self.ident, body, compress=compress)
                except LocalProtocolError as exc:
                    self._check_send()
                    raise trio.BrokenResourceError("the call's connection is ending") from exc
                if accepted:
                    break
                await self.send_lot.park()
                self._check_send()
            self.sent += 1
            if not self.send_many:
                self.sent_end = True
                self._half_closed()
            # The writer runs once this task next waits: messages sent in a row share
            # records (one write for many), instead of one write each.
            await trio.lowlevel.cancel_shielded_checkpoint()
            self.writer.wake()
        finally:
            self.sending = False

    def try_send(self, body: bytes) -> bool:
        """Queue one more message of a run at once, without waiting or yielding, if
        nothing stands in the way (the call's credit, room in the send queue, the call's
        state); ``False``: send it with :meth:`send`, which waits or raises."""
        if (
            self.sending
            or not self.send_many
            or self.sent_end
            or self.closed
            or self.error is not None
            or self.send_error is not None
            or len(body) > self.max_message_size
            or self.session.send_queue_bytes >= self.streams.queue_limit
        ):
            return False
        try:
            if not self.session.send_message(self.ident, body):
                return False
        except LocalProtocolError:
            return False
        self.sent += 1
        # The writer runs once this task next yields, and packs the whole run.
        self.writer.wake()
        return True

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.closed:
            raise trio.ClosedResourceError("this call was closed")
        if self.sent_end:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self.error is not None:
            raise self.error()
        if self.send_error is not None:
            raise self.send_error()
        if not self.send_many:
            raise LocalProtocolError(
                "this side of the call sends exactly one message, which ends it: send it "
                "with send()"
            )
        try:
            self.session.send_end(self.ident)
        except LocalProtocolError as exc:
            self._check_send()
            raise trio.BrokenResourceError("the call's connection is ending") from exc
        self.sent_end = True
        self.writer.wake()
        self._half_closed()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _half_closed(self) -> None:
        if self.ours and self.recv_done:
            self.streams.slot_frees_on_pack()

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close now: a call of ours not finished both ways is cancelled (RESET/STOP, or
        withdrawn if its CALL frame is not on the wire yet)."""
        if self.closed:
            return
        self.closed = True
        if self.streams.alive and self.error is None:
            finished = self.sent_end and self.recv_done
            if not finished:
                try:
                    if self.ours:
                        self.session.cancel(self.ident)
                    else:
                        if not self.sent_end and self.send_error is None:
                            self.session.send_end(self.ident)
                        if not self.recv_done:
                            self.session.stop(self.ident, _CANCELLED)
                except LocalProtocolError:
                    pass  # the session has ended: the connection fails every call
                self.writer.wake()
            if self.ours:
                self.streams.slot_frees_on_pack()
        self.inbox.clear()
        self._wake_all()
        self.streams.forget_call(self)

    def _wake_all(self) -> None:
        self.recv_lot.unpark_all()
        self.send_lot.unpark_all()
        if self.space_waiting:
            self.writer.space.unpark_all()

    # -- events (from the connection's reader) ---------------------------------------------

    def on_message(self, body: bytes, cost: int) -> None:
        self.inbox.append((body, cost))
        if self.recv_lot:
            self.recv_lot.unpark_all()

    def on_end(self) -> None:
        self.ended = True
        self.recv_lot.unpark_all()
        if self.sent_end:
            self._half_closed()

    def on_reset(self, code: int) -> None:
        if self.ours:
            message = f"the peer aborted streaming call {self.ident} ({_code_name(code)})"
            self.recv_error = lambda: CallCancelled(message)
        else:
            message = f"the caller cancelled streaming call {self.ident}"
            self.recv_error = lambda: CallCancelled(message)
            self._peer_cancel()
        self.recv_lot.unpark_all()

    def on_stop(self, code: int) -> None:
        if self.send_error is None:
            if self.ours:
                message = (
                    f"the peer's handler of streaming call {self.ident} reads no more "
                    f"messages (it has finished, {_code_name(code)})"
                )
                self.send_error = lambda: trio.BrokenResourceError(message)
            else:
                message = f"the caller cancelled streaming call {self.ident}"
                self.send_error = lambda: CallCancelled(message)
                self._peer_cancel()
        self.sent_end = self.sent_end or not self.ours
        self.send_lot.unpark_all()
        if self.space_waiting:
            self.writer.space.unpark_all()

    def _peer_cancel(self) -> None:
        self.peer_cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    def fail(self, failure: Failure) -> None:
        if self.error is None:
            self.error = failure
        self._wake_all()


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code {code}"


# -- the caller's side ----------------------------------------------------------------------


class _CallBase(metaclass=NoPublicConstructor):
    _get_one_with = (
        "open_call(), upload() or download() on a Connection or Client, or a call_handler"
    )
    __slots__ = ()
    _core: _Core

    @property
    def connection(self) -> Connection:
        """The connection the call runs over."""
        return self._core.conn

    @property
    def call_id(self) -> int:
        """The call's id on its connection."""
        return self._core.ident

    @property
    def max_message_size(self) -> int:
        """The largest message this side may send on the call: the smaller of the
        peer's ``max_message_size`` and half its ``stream_window`` less 64."""
        return self._core.max_message_size

    def __repr__(self) -> str:
        state = "closed" if self._core.closed else "open"
        return (
            f"<monte_trio.{type(self).__name__} {self._core.ident} on "
            f"{self._core.conn.name!r} {state}>"
        )


@final
class Call(_CallBase, trio.abc.Channel[bytes]):
    """A bidirectional streaming call: a :class:`trio.abc.Channel` of messages (``bytes``).

    Get one with ``async with connection.open_call() as call:`` (or on a
    :class:`~monte_trio.Client`). :meth:`send` waits for the call's credit (the peer's
    handler returns it as it takes each message); :meth:`receive` (or ``async for``)
    takes the handler's messages and returns their credit; :meth:`send_eof` ends this
    side's messages (the handler's ``receive`` then raises :exc:`trio.EndOfChannel`);
    leaving the block (or :meth:`aclose`) cancels the call at the peer if either side
    has not ended, so a cancel scope around the block cancels the handler.

    Errors, as :meth:`Connection.request <monte_trio.Connection.request>`'s:
    :exc:`~monte_trio.RemoteError` (the handler raised), :exc:`~monte_trio.CallCancelled`
    (the peer cancelled its handler), :exc:`~monte_trio.RequestNotProcessed` (refused
    before anything was processed: the peer has no ``call_handler`` or is shutting down;
    safe to retry), :exc:`~monte_trio.ConnectionClosed` (the connection ended). Messages
    that arrived before an error are still received first. :meth:`send` raises
    :exc:`trio.BrokenResourceError` once the handler has finished without reading on.
    """

    __slots__ = ("_core",)

    def __init__(self, core: _Core) -> None:
        self._core = core

    async def send(self, value: bytes, *, compress: bool = True) -> None:
        """Send one message, waiting for the call's credit.

        ``compress=False`` sends it uncompressed (a message holding a secret next to
        data an attacker chooses: see :ref:`Security: Compression <security-compression>`).
        Cancelling a waiting send loses nothing and sends nothing.

        Raises:
            LocalProtocolError: the message is larger than :attr:`max_message_size`
                (nothing was sent; the call is still usable).
            trio.ClosedResourceError: the call was closed, or :meth:`send_eof` called.
            trio.BrokenResourceError: the handler finished and reads no more messages.
            RemoteError, CallCancelled, RequestNotProcessed, ConnectionClosed: the call
                failed (see the class).
        """
        await self._core.send(value, compress)

    async def receive(self) -> bytes:
        """Wait for the handler's next message and return it.

        Every call is a cancellation point; taking messages that are already here yields
        to other tasks once per 32 in a row rather than at each (``async for`` over a
        fast call then costs no task switch per message).

        Raises:
            trio.EndOfChannel: the handler has sent all its messages.
            trio.ClosedResourceError: the call was closed.
            RemoteError, CallCancelled, RequestNotProcessed, ConnectionClosed: the call
                failed (see the class).
        """
        return await self._core.receive()

    async def send_eof(self) -> None:
        """End this side's messages: the handler receives what was sent, then
        :exc:`trio.EndOfChannel`. Receiving goes on. Calling it again does nothing."""
        await self._core.send_eof()

    async def aclose(self) -> None:
        """Close the call (idempotent, immediate): if it is not finished both ways, the
        peer's handler is cancelled (RESET and STOP with code 5, CANCELLED)."""
        self._core.close()
        await trio.lowlevel.checkpoint()


@final
class UploadCall(_CallBase, trio.abc.SendChannel[bytes]):
    """An upload: many messages to the peer's handler, then its single reply.

    ``async with connection.upload() as call:``, :meth:`send` each part, then
    ``reply = await call.finish()``. Leaving the block before :meth:`finish` returned
    cancels the call at the peer. Errors as :class:`Call`'s.
    """

    __slots__ = ("_core",)

    def __init__(self, core: _Core) -> None:
        self._core = core

    async def send(self, value: bytes, *, compress: bool = True) -> None:
        """Send one part, waiting for the call's credit (see :meth:`Call.send`)."""
        await self._core.send(value, compress)

    async def finish(self) -> bytes:
        """End the upload and return the handler's reply.

        Raises:
            RemoteError, CallCancelled, RequestNotProcessed, ConnectionClosed: as
                :class:`Call`'s.
        """
        core = self._core
        await core.send_eof()
        try:
            return await core.receive()
        except trio.EndOfChannel:  # pragma: no cover - the session requires the reply
            raise RemoteError("the handler ended the upload without a reply") from None

    async def aclose(self) -> None:
        """Close the call; an upload not finished is cancelled at the peer."""
        self._core.close()
        await trio.lowlevel.checkpoint()


@final
class DownloadCall(_CallBase, trio.abc.ReceiveChannel[bytes]):
    """A download: one request, then the handler's messages, with ``async for``.

    ``async with connection.download(request) as replies: async for part in replies:``.
    Leaving the block before the last message cancels the call at the peer. Errors as
    :class:`Call`'s.
    """

    __slots__ = ("_core",)

    def __init__(self, core: _Core) -> None:
        self._core = core

    async def receive(self) -> bytes:
        """The next message (see :meth:`Call.receive`); :exc:`trio.EndOfChannel` after
        the last."""
        return await self._core.receive()

    async def aclose(self) -> None:
        """Close the call; a download not finished is cancelled at the peer."""
        self._core.close()
        await trio.lowlevel.checkpoint()


class _Opening(Generic[_C]):
    """``async with``: open a call (waiting for a slot), close it on the way out."""

    __slots__ = ("_core", "_open", "_wrap")

    def __init__(self, open_core: Callable[[], Awaitable[_Core]], wrap: Callable[[_Core], _C]):
        self._open = open_core
        self._wrap = wrap
        self._core: _Core | None = None

    async def __aenter__(self) -> _C:
        if self._core is not None:
            raise RuntimeError("this call was already opened: open a new one")
        self._core = core = await self._open()
        return self._wrap(core)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        core = self._core
        assert core is not None
        core.close()
        if exc is None:
            await trio.lowlevel.checkpoint()


async def _open_core(
    conn: Connection, shape: CallShape, first: bytes | None, compress: bool
) -> _Core:
    core = await conn._streams.open_call(shape)
    if first is not None:
        try:
            await core.send(first, compress)
        except BaseException:
            core.close()
            raise
    return core


def _wrap(shape: CallShape) -> Callable[[_Core], Any]:
    if shape == CallShape.UPLOAD:
        return UploadCall._create
    if shape == CallShape.DOWNLOAD:
        return DownloadCall._create
    return Call._create


def connection_opening(
    conn: Connection, shape: CallShape, first: bytes | None, compress: bool
) -> _Opening[Any]:
    """What ``connection.open_call()``, ``upload()`` and ``download()`` return."""

    async def open_core() -> _Core:
        return await _open_core(conn, shape, first, compress)

    return _Opening(open_core, _wrap(shape))


def client_opening(
    client: Client, shape: CallShape, first: bytes | None, compress: bool
) -> _Opening[Any]:
    """As :func:`connection_opening`, on a pooled connection: an open refused before
    anything was sent moves to another connection, as ``request()`` does."""

    async def open_core() -> _Core:
        for attempt in range(_REASSIGNMENTS + 1):
            conn = await client._pick()
            try:
                return await _open_core(conn, shape, first, compress)
            except RequestNotProcessed as exc:
                client._reassigning(attempt, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    return _Opening(open_core, _wrap(shape))


# -- the handler's side ---------------------------------------------------------------------


@final
class IncomingCall(_CallBase, trio.abc.Channel[bytes]):
    """A streaming call the peer opened, as its ``call_handler`` sees it.

    :attr:`shape` says which: an **upload** (:meth:`receive` or ``async for`` the parts,
    then reply once: return the reply ``bytes`` from the handler, or ``await
    call.send(reply)``), a **download** (:meth:`receive` the one request, then
    :meth:`send` each message, or ``yield`` them from an async generator handler; the
    end follows when the handler returns), or **bidirectional** (both, in any order;
    :meth:`send_eof` ends this side's messages early).

    The handler runs under a cancel scope that the caller's cancellation cancels. An
    exception from it is sent to the caller as an error (code 6, INTERNAL: the caller
    gets :exc:`~monte_trio.RemoteError`, with the text unary handlers' errors carry:
    ``ConnectionConfig.expose_errors`` and ``expose_tracebacks``). :meth:`send` waits
    for the caller's credit: a caller that stops reading stops this handler.
    """

    __slots__ = ("_core",)

    def __init__(self, core: _Core) -> None:
        self._core = core

    @property
    def shape(self) -> CallShape:
        """Upload, download or bidirectional."""
        return self._core.shape

    @property
    def peer_public_key(self) -> PublicKey | None:
        """The caller's authenticated static key (for authorisation)."""
        return self._core.conn.peer_public_key

    async def receive(self) -> bytes:
        """The caller's next message; :exc:`trio.EndOfChannel` after its last.

        Raises:
            CallCancelled: the caller cancelled the call (the handler's scope is
                cancelled too).
            ConnectionClosed: the connection ended.
        """
        return await self._core.receive()

    async def send(self, value: bytes, *, compress: bool = True) -> None:
        """Send one message to the caller, waiting for its credit (an upload's one
        reply: a second raises :exc:`trio.ClosedResourceError`). See :meth:`Call.send`."""
        await self._core.send(value, compress)

    async def send_eof(self) -> None:
        """End this side's messages (done by itself when the handler returns)."""
        await self._core.send_eof()

    async def aclose(self) -> None:
        """End the call from this side now: this side's messages end, and the caller is
        told to stop sending if it has not ended (its sends raise
        :exc:`trio.BrokenResourceError`). Done by itself when the handler returns."""
        self._core.close()
        await trio.lowlevel.checkpoint()


CallHandler = Callable[[IncomingCall], "Awaitable[bytes | None] | AsyncIterator[bytes]"]
"""A call handler: ``async def handler(call: monte_trio.IncomingCall) -> bytes | None``
(a returned ``bytes`` is sent as the last message: an upload's reply), or an async
generator whose every yielded ``bytes`` is sent; the end (END) follows when it returns.
It runs in a task of the connection, at most ``max_streams`` at once."""


def _error_text(conn: Connection, exc: BaseException) -> str:
    config = conn._config
    if not config.expose_errors:
        return "the handler raised an exception"
    if config.expose_tracebacks:
        return "".join(traceback.format_exception(exc))
    return f"{type(exc).__name__}: {exc}"


async def _send_parts(core: _Core, parts: AsyncGenerator[object, Any]) -> None:
    """Send what an async generator handler yields. Parts yielded in a row are queued at
    once while credit and the send queue allow (:meth:`_Core.try_send`), up to
    :data:`SEND_RUN` messages or :data:`SEND_RUN_BYTES`; the task then yields (a
    checkpoint) and the writer packs the run. A part that cannot be queued at once is
    sent with :meth:`_Core.send` (it waits for credit), which ends the run."""
    run = 0
    run_bytes = 0
    try_send = core.try_send
    async with aclosing(parts):
        async for part in parts:
            if type(part) is not bytes:
                if not isinstance(part, bytes):
                    raise TypeError(f"a call handler yielded {type(part).__name__}: yield bytes")
                part = bytes(part)
            await trio.lowlevel.checkpoint_if_cancelled()  # nothing queued if cancelled
            if run < SEND_RUN and run_bytes < SEND_RUN_BYTES and try_send(part):
                run += 1
                run_bytes += len(part)
                continue
            run = run_bytes = 0
            await core.send(part, True)


async def serve_call(core: _Core, handler: CallHandler) -> None:
    """Run ``handler`` for the peer's call ``core``, then end the call."""
    conn = core.conn
    call: IncomingCall = IncomingCall._create(core)
    error: tuple[int, str] | None = None
    try:
        with trio.CancelScope() as scope:
            core.scope = scope
            if core.peer_cancelled:
                scope.cancel()
            try:
                result = handler(call)
                if inspect.isasyncgen(result):
                    await _send_parts(core, result)
                    reply: object = None
                else:
                    reply = await result  # type: ignore[misc]
                if reply is not None and not core.closed:
                    if not isinstance(reply, (bytes, bytearray, memoryview)):
                        raise TypeError(
                            f"a call handler returned {type(reply).__name__}: return bytes "
                            "(the last message, an upload's reply) or None"
                        )
                    await core.send(bytes(reply), True)
                if (
                    core.shape == CallShape.UPLOAD
                    and not core.sent
                    and not core.closed
                    and not core.peer_cancelled
                ):
                    error = (
                        _INTERNAL,
                        "the call handler returned without a reply: an upload's handler "
                        "returns its reply (bytes) or sends it",
                    )
            except Exception as exc:
                if core.peer_cancelled or core.error is not None:
                    pass  # the caller cancelled, or the connection ended: nobody to tell
                else:
                    logger.info(
                        "%s: call handler raised on call %d: %r", conn.name, core.ident, exc
                    )
                    error = (_INTERNAL, _error_text(conn, exc))
    except BaseException:
        if not core.peer_cancelled:
            error = (_CANCELLED, "the call's handler was cancelled (its connection is closing)")
        raise
    finally:
        core.scope = None
        if error is not None and not core.closed and core.streams.alive and core.error is None:
            try:
                core.session.send_error(core.ident, error[0], error[1])
                core.sent_end = True
                core.writer.wake()
            except LocalProtocolError:
                pass  # this side already ended its messages: the caller has them all
        core.close()
