"""Byte streams over a connection: :class:`Stream`, and the driver of a connection's streams.

The sans-IO session (:mod:`monte_trio._proto._session`) owns every rule of a stream: ids
and slots (``max_streams``), the two levels of windows, END, RESET and STOP, and the fair
packing of their frames. This module is the Trio side:

* :class:`Stream` is one stream seen by the application, a
  :class:`trio.abc.HalfCloseableStream`. Its receiving half is a buffer of the chunks
  that arrived (bounded by the stream's window: credit goes back only when the
  application reads, with ``read_done``) and at most one waiting task; its sending half
  puts bytes into the session as far as credit allows and waits for more credit
  (``EV_CALL_CREDIT``), never holding the connection's write role while it waits.
* :class:`Streams` is the connection's part: it opens streams (waiting for a slot while
  the peer's ``max_streams`` are in use: credit, not refusal), routes the session's
  stream events from the reader to their :class:`Stream`, runs the ``stream_handler`` for
  each stream the peer opens (in the connection's service nursery, at most
  ``max_streams`` at once), and fails every stream when the connection ends.

The plumbing (a receive buffer with one waiting task, credit waits on the stream's id and
on the connection's window, failures made fresh on each raise) is per id and knows nothing
of bytes beyond the buffer: streaming calls (messages rather than bytes) can route their
events through the same registry.

Errors follow trio's stream contract: a stream closed locally raises
:exc:`trio.ClosedResourceError`; the peer's RESET or STOP raises
:exc:`~monte_trio.StreamReset` (a :exc:`trio.BrokenResourceError`); the end of the
connection raises :exc:`trio.BrokenResourceError` with the connection's
:exc:`~monte_trio.ConnectionClosed` as its cause.
"""

from __future__ import annotations

import logging
import math
import operator
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast, final

import trio

from ._calls_api import CallHandler, CallShape, _Core, serve_call
from ._calls_api import _error_failure as _call_error_failure
from ._calls_api import _lost_failure as _call_lost_failure
from ._calls_api import _not_processed_failure as _call_not_processed
from ._exceptions import ConnectionClosed, LocalProtocolError, StreamReset
from ._proto._session import (
    EV_CALL_CREDIT,
    EV_DATA,
    EV_END,
    EV_MESSAGE,
    EV_RESET,
    EV_STOP,
    EV_STREAM_OPENED,
)
from ._proto._wire2 import MESSAGE_COST, ErrorCode
from ._util import NoPublicConstructor

if TYPE_CHECKING:
    from ._connection import Connection
    from ._keys import PublicKey
    from ._proto._session import Session

__all__ = ["Stream", "StreamHandler", "Streams"]

logger = logging.getLogger("monte_trio")

_T = TypeVar("_T")

_CHUNK = 64 * 1024
"""Bytes handed to the session at a time by ``send_all`` (a larger payload is cut)."""
_RECEIVE_SIZE = 64 * 1024
"""What ``receive_some()`` returns at most when ``max_bytes`` is not given."""
_PROBE_INTERVAL = 1.0
"""Seconds between two round-trip probes (PING) while streams are read: the windows grow
toward the bandwidth-delay product only once the round trip is known."""

_REFUSED = int(ErrorCode.REFUSED)
_CANCELLED = int(ErrorCode.CANCELLED)
_INTERNAL = int(ErrorCode.INTERNAL)

Failure = Callable[[], BaseException]
"""Makes the exception a failed half raises (a fresh one each time)."""


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code {code}"


def _reset_failure(ident: int, code: int, *, stopped: bool) -> Failure:
    """What the peer's RESET (``stopped=False``) or STOP raises on stream ``ident``."""
    if stopped:
        what = f"the peer stopped reading stream {ident} ({_code_name(code)})"
    else:
        what = f"the peer reset stream {ident} ({_code_name(code)})"
    if code == _REFUSED:
        why = (
            "it serves no streams (it has no stream_handler) or it is shutting down; "
            "nothing was processed, so it is safe to open the stream again"
        )
    elif code == _INTERNAL:
        why = "its stream handler raised"
    elif code == _CANCELLED:
        why = "it closed or cancelled its end before the stream's end"
    else:
        why = "its application aborted the stream"
    if not stopped:
        why += "; what arrived may be incomplete"
    message = f"{what}: {why}"
    return lambda: StreamReset(message, code, ident)


def _refused_failure(message: str, ident: int) -> Failure:
    """What a stream the peer never accepted raises (it is safe to open it again)."""
    return lambda: StreamReset(message, _REFUSED, ident)


def _lost_failure(reason: ConnectionClosed) -> Failure:
    """What a stream raises once its connection has ended."""

    def make() -> BaseException:
        error = trio.BrokenResourceError(f"the stream's connection ended: {reason.reason}")
        error.__cause__ = reason
        return error

    return make


@final
class Stream(trio.abc.HalfCloseableStream, metaclass=NoPublicConstructor):
    """A byte stream over a connection: a :class:`trio.abc.HalfCloseableStream`.

    Get one from :meth:`Connection.open_stream <monte_trio.Connection.open_stream>` or
    :meth:`Client.open_stream <monte_trio.Client.open_stream>`, or as the argument of a
    ``stream_handler`` (:class:`~monte_trio.Server`, :func:`~monte_trio.open_client`) when
    the peer opens one. Either side can open streams; many run over one connection, each
    with its own flow control, interleaved fairly with each other and with calls.

    * :meth:`send_all` waits for credit: the peer grants a window per stream (its
      ``stream_window``, growing while its application reads fast) and one per
      connection, and returns its credit only as its application reads. A reader that
      stops reading therefore stops this sender, and nothing else on the connection.
    * :meth:`send_eof` half-closes: the peer reads what was sent, then ``b""``; it may
      go on sending.
    * :meth:`aclose` ends the sending half cleanly (after what was already sent) and, if
      the peer's half has not ended, tells the peer to stop sending (its senders get
      :exc:`~monte_trio.StreamReset` with code 5, CANCELLED); unread data is dropped and
      its credit freed. :meth:`reset` aborts both halves.
    * The peer's abort makes :meth:`receive_some` (after a reset) or :meth:`send_all`
      (after a stop) raise :exc:`~monte_trio.StreamReset`, a
      :exc:`trio.BrokenResourceError`; the end of the connection raises
      :exc:`trio.BrokenResourceError` (its cause is the connection's
      :exc:`~monte_trio.ConnectionClosed`).

    Cancelling a blocked :meth:`receive_some` loses nothing. Cancelling a :meth:`send_all`
    leaves the connection and the stream's receiving half usable; if part of its data had
    been accepted, the sending half is broken (trio's contract: the peer got an unknown
    part): later sends raise :exc:`trio.BrokenResourceError`, and :meth:`aclose` resets
    that half, so the peer never mistakes the truncated data for a complete stream.
    """

    _get_one_with = "open_stream() on a Connection or Client, or a stream_handler"

    __slots__ = (
        "_chunks",
        "_conn",
        "_eof",
        "_eof_sent",
        "_id",
        "_offset",
        "_ours",
        "_receiving",
        "_recv_error",
        "_recv_lot",
        "_send_broken",
        "_send_busy",
        "_send_error",
        "_send_lot",
        "_session",
        "_space_waiting",
        "_streams",
        "_writer",
        "buffered",
        "closed",
    )

    def __init__(self, streams: Streams, ident: int, *, ours: bool) -> None:
        conn = streams.connection
        self._streams = streams
        self._conn = conn
        self._session = streams.session
        self._writer = conn._writer
        self._id = ident
        self._ours = ours
        # Receiving half: chunks in arrival order (the first read from _offset).
        self._chunks: deque[bytes] = deque()
        self._offset = 0
        self._eof = False  # the peer's END arrived
        self._recv_error: Failure | None = None
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._receiving = False
        # Sending half.
        self._send_busy = False
        self._send_error: Failure | None = None
        self._send_broken = False  # a send_all was cancelled part-way
        self._eof_sent = False
        self._send_lot = trio.lowlevel.ParkingLot()
        self._space_waiting = False
        self.buffered: int = 0
        """Bytes received and not yet read."""
        self.closed: bool = False
        """Whether :meth:`aclose` (or :meth:`reset`) was called."""

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<monte_trio.Stream {self._id} on {self._conn.name!r} {state}>"

    # -- properties ------------------------------------------------------------------------

    @property
    def connection(self) -> Connection:
        """The connection the stream runs over."""
        return self._conn

    @property
    def peer_public_key(self) -> PublicKey | None:
        """The peer's authenticated static key (the connection's
        :attr:`~monte_trio.Connection.peer_public_key`), for authorisation."""
        return self._conn.peer_public_key

    @property
    def stream_id(self) -> int:
        """The stream's id on its connection (odd if the dialing side opened it)."""
        return self._id

    # -- receiving -------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Wait for data and return up to ``max_bytes`` of it (64 KiB if not given);
        ``b""`` once the peer has half-closed (:meth:`send_eof` or :meth:`aclose` on its
        side) and everything before it was read.

        Reading returns the stream's credit to the peer: a stream nobody reads holds at
        most its window and stops its sender. Cancelling a waiting call loses nothing.

        Raises:
            StreamReset: the peer reset the stream (what arrived may be incomplete).
            trio.BrokenResourceError: the connection ended before the peer's end.
            trio.ClosedResourceError: this stream was closed (before or during the call).
            trio.BusyResourceError: another task is receiving on this stream.
        """
        if max_bytes is None:
            limit = _RECEIVE_SIZE
        else:
            limit = operator.index(max_bytes)
            if limit < 1:
                raise ValueError(f"max_bytes must be at least 1, got {limit}")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if self._chunks or self._eof or self._recv_error is not None or self.closed:
                await trio.lowlevel.checkpoint_if_cancelled()
                data = self._take(limit)
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            while not (self._chunks or self._eof or self._recv_error is not None or self.closed):
                await self._recv_lot.park()
            return self._take(limit)
        finally:
            self._receiving = False

    def _take(self, limit: int) -> bytes:
        if self.closed:
            raise trio.ClosedResourceError("this stream was closed")
        chunks = self._chunks
        if not chunks:
            if self._recv_error is not None:
                raise self._recv_error()
            return b""
        taken: list[bytes] = []
        room = limit
        while chunks and room:
            first = chunks[0]
            offset = self._offset
            available = len(first) - offset
            if available <= room:
                chunks.popleft()
                self._offset = 0
                taken.append(first[offset:] if offset else first)
                room -= available
            else:
                taken.append(first[offset : offset + room])
                self._offset = offset + room
                room = 0
        data = taken[0] if len(taken) == 1 else b"".join(taken)
        self.buffered -= len(data)
        self._streams.was_read(self._id, len(data))
        return data

    # -- sending ---------------------------------------------------------------------------

    def _check_send(self) -> None:
        if self.closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError(
                "send_eof() was called on this stream: its sending half has ended"
            )
        if self._send_error is not None:
            raise self._send_error()
        if self._send_broken:
            raise trio.BrokenResourceError(
                "a send_all() on this stream was cancelled part-way: the peer has an unknown "
                "part of its data, so nothing more can be sent; close the stream"
            )

    def _can_send(self) -> bool:
        session = self._session
        if session.send_queue_bytes >= self._streams.queue_limit:
            return False
        credit = session.stream_credit(self._id)
        if credit is None or credit["send"] <= 0:
            return False
        ledger = session.data_ledger
        return ledger["granted"] > ledger["sent"]

    async def _wait_credit(self) -> None:
        """Park until credit may have moved (or the stream failed or closed)."""
        session = self._session
        if session.send_queue_bytes >= self._streams.queue_limit:
            # Stream data is kept below half of max_send_queue, so that calls on the same
            # connection never wait for room behind it (they take turns with it instead).
            self._space_waiting = True
            try:
                await self._writer.space.park()
            finally:
                self._space_waiting = False
        else:
            await self._send_lot.park()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, waiting for the peer's credit as needed.

        It returns once every byte is in the connection's send queue (the connection's
        writer sends it, fairly interleaved with other streams and calls); a payload of
        any size is cut into frames. The wait for credit is the back-pressure of a peer
        that reads slowly.

        Raises:
            StreamReset: the peer stopped reading this stream.
            trio.BrokenResourceError: the connection ended, or an earlier
                :meth:`send_all` was cancelled part-way.
            trio.ClosedResourceError: this stream was closed, or :meth:`send_eof` called.
            trio.BusyResourceError: another task is sending on this stream.
        """
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._send_busy = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_send()
            whole = type(data) is bytes
            view = memoryview(data)
            if view.itemsize != 1 or view.ndim != 1:
                view = view.cast("B")
            total = view.nbytes
            session = self._session
            writer = self._writer
            queue_limit = self._streams.queue_limit
            ident = self._id
            offset = 0
            try:
                while offset < total:
                    if session.send_queue_bytes >= queue_limit:
                        await self._wait_credit()
                        self._check_send()
                        continue
                    end = min(total, offset + _CHUNK)
                    if whole and offset == 0 and end == total:
                        piece: bytes = data  # type: ignore[assignment]
                    else:
                        piece = bytes(view[offset:end])
                    try:
                        taken = session.send_data(ident, piece)
                    except LocalProtocolError as exc:
                        self._check_send()  # the connection is ending
                        raise trio.BrokenResourceError(
                            "the stream's connection is ending"
                        ) from exc
                    offset += taken
                    writer.wake()
                    if taken < len(piece):
                        await self._wait_credit()
                        self._check_send()
            except BaseException:
                if 0 < offset < total:
                    self._send_broken = True
                raise
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._send_busy = False

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until :meth:`send_all` can accept at least one byte at once (credit from
        the peer on this stream and on the connection, room in the send queue).

        Raises:
            as :meth:`send_all`.
        """
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._send_busy = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                self._check_send()
                if self._can_send():
                    break
                waited = True
                await self._wait_credit()
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._send_busy = False

    async def send_eof(self) -> None:
        """Half-close: the peer reads what was sent, then ``b""``. Receiving goes on.
        Calling it again does nothing.

        Raises:
            StreamReset: the peer had stopped reading this stream.
            trio.BrokenResourceError: the connection ended, or a :meth:`send_all` was
                cancelled part-way.
            trio.ClosedResourceError: this stream was closed.
            trio.BusyResourceError: another task is sending on this stream.
        """
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._send_busy = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self.closed:
                raise trio.ClosedResourceError("this stream was closed")
            if not self._eof_sent:
                self._check_send()
                try:
                    self._session.send_end(self._id)
                except LocalProtocolError as exc:
                    self._check_send()  # the connection is ending
                    raise trio.BrokenResourceError("the stream's connection is ending") from exc
                self._eof_sent = True
                self._writer.wake()
                self._streams.half_closed(self)
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._send_busy = False

    # -- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the stream; idempotent, and immediate (it closes even if cancelled).

        The sending half ends cleanly after what was already sent (unless a
        :meth:`send_all` was cancelled part-way: then it is reset); if the peer's half has
        not ended, the peer is told to stop sending (code 5, CANCELLED). Data not read is
        dropped and its credit freed. Tasks blocked on this stream raise
        :exc:`trio.ClosedResourceError`.
        """
        self._close(_CANCELLED, abort=False)
        await trio.lowlevel.checkpoint()

    async def reset(self, code: int = _CANCELLED) -> None:
        """Abort the stream both ways and close it: data not yet sent is dropped, the
        peer's reads raise :exc:`~monte_trio.StreamReset` with ``code`` (never a clean
        end) and so do its sends.

        Args:
            code: 0 to 65,535, carried to the peer: 5 (CANCELLED, the default), 6
                (INTERNAL), or a code of your application's.
        """
        if not 0 <= code <= 0xFFFF:
            raise ValueError(f"a reset code is 0 to 65535, got {code}")
        self._close(code, abort=True)
        await trio.lowlevel.checkpoint()

    def _close(self, code: int, *, abort: bool) -> None:
        """Close now (no checkpoint): what aclose, reset and the handler runner share."""
        if self.closed:
            return
        self.closed = True
        session = self._session
        ident = self._id
        if self._streams.alive:
            try:
                if self._send_error is None and (abort or not self._eof_sent):
                    if abort or self._send_broken:
                        session.reset(ident, code)
                    else:
                        session.send_end(ident)
                if not self._eof and self._recv_error is None:
                    session.stop(ident, code)
            except LocalProtocolError:
                pass  # the session has ended: the connection is failing every stream
            self._writer.wake()
        self._chunks.clear()
        self._offset = 0
        self.buffered = 0
        self._wake_all()
        self._streams.forget(self)

    def _wake_all(self) -> None:
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()
        if self._space_waiting:
            self._writer.space.unpark_all()

    # -- events (from the connection's reader) ---------------------------------------------

    def _on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self.buffered += len(data)
        if self._recv_lot:
            self._recv_lot.unpark_all()

    def _on_end(self) -> None:
        self._eof = True
        self._recv_lot.unpark_all()

    def _on_reset(self, code: int) -> None:
        self._recv_error = _reset_failure(self._id, code, stopped=False)
        self._chunks.clear()  # truncated: never delivered as if it were complete
        self._offset = 0
        self.buffered = 0
        self._recv_lot.unpark_all()

    def _on_stop(self, code: int) -> None:
        if self._send_error is None:
            self._send_error = _reset_failure(self._id, code, stopped=True)
        self._send_lot.unpark_all()
        if self._space_waiting:
            self._writer.space.unpark_all()

    def _fail(self, failure: Failure) -> None:
        """The stream can no longer be used: both halves raise ``failure`` (data already
        received stays readable; a half already ended stays ended)."""
        if not self._eof and self._recv_error is None:
            self._recv_error = failure
        if self._send_error is None:
            self._send_error = failure
        self._wake_all()

    @property
    def _ended_by_peer(self) -> bool:
        return self._eof or self._recv_error is not None


StreamHandler = Callable[[Stream], Awaitable[None]]
"""A stream handler: ``async def handler(stream: monte_trio.Stream) -> None``, run for each
stream the peer opens (like :func:`trio.serve_tcp`'s handler), in a task of the
connection; the stream is closed when it returns. If it raises, the exception is logged
and the stream reset (code 6, INTERNAL), nothing else."""


class Streams:
    """A connection's streams: opening, the peer's events, the stream handler.

    Args:
        connection: the connection (its session, writer and service nursery).
        handler: runs for each stream the peer opens; ``None`` refuses them (RESET and
            STOP with code 4, REFUSED).
        call_handler: runs for each streaming call the peer opens; ``None`` refuses them
            (ERROR with code 4, REFUSED).
    """

    __slots__ = (
        "_call_handler",
        "_calls",
        "_conn",
        "_handler",
        "_live",
        "_max_handlers",
        "_next_probe",
        "_openers",
        "_running",
        "_session",
        "_slot_on_pack",
        "_waiting",
        "_writer",
        "alive",
        "connection",
        "queue_limit",
        "session",
    )

    def __init__(
        self,
        connection: Connection,
        handler: StreamHandler | None,
        call_handler: CallHandler | None = None,
    ) -> None:
        self.connection: Connection = connection
        self._conn = connection
        self._handler = handler
        self._call_handler = call_handler
        # Streams exist on native connections only (open() checks; monte-v1 has no events).
        self.session: Session = cast("Session", connection._session)
        self._session = self.session
        self._writer = connection._writer
        config = connection._config
        if handler is not None and not config.max_streams:
            raise ValueError(
                "a stream_handler needs ConnectionConfig max_streams above 0 (streams are "
                "turned off at 0)"
            )
        if call_handler is not None and not config.max_streams:
            raise ValueError(
                "a call_handler needs ConnectionConfig max_streams above 0 (streams and "
                "streaming calls are turned off at 0)"
            )
        self._live: dict[int, Stream] = {}
        self._calls: dict[int, _Core] = {}
        self._openers = trio.lowlevel.ParkingLot()
        self._slot_on_pack = False  # a slot of ours frees when the writer packs a frame
        self._running = 0
        self._waiting: deque[Stream | _Core] = deque()
        self._max_handlers = max(1, config.max_streams)
        self._next_probe = -math.inf
        self.alive: bool = True
        self.queue_limit: int = max(1, config.max_send_queue // 2)

    # -- queries ---------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether streams or calls are open (not closed by the application) or
        handlers run."""
        return bool(self._live) or bool(self._calls) or self._running > 0

    @property
    def open_count(self) -> int:
        """Streams open on this connection (not yet closed by the application)."""
        return len(self._live)

    @property
    def buffered(self) -> int:
        """Bytes received on the streams and not yet read."""
        return sum(stream.buffered for stream in self._live.values())

    # -- opening ---------------------------------------------------------------------------

    def _check_enabled(self) -> None:
        conn = self._conn
        facts = conn.facts
        local, peer = facts.local_hello, facts.peer_hello
        if local is None or peer is None:
            raise LocalProtocolError(
                "streams need the native profile: monte-v1 (Go monte's wire) has none"
            )
        if not local.max_streams:
            raise LocalProtocolError(
                "streams are turned off on this side (ConnectionConfig max_streams=0); "
                "leave max_streams above 0 (the default is 100) to open streams"
            )
        if not peer.max_streams:
            raise LocalProtocolError(
                "the peer does not accept streams: its hello offers none (max_streams 0 in "
                "its ConnectionConfig, or a version without streams); open streams to a "
                "peer that serves them (a Server or open_client given stream_handler=)"
            )

    async def open(self) -> Stream:
        """Open a stream, waiting while the peer's ``max_streams`` are all in use."""
        return await self._open(0, self._new_stream)

    def _new_stream(self, ident: int) -> Stream:
        stream: Stream = Stream._create(self, ident, ours=True)
        self._live[ident] = stream
        return stream

    async def open_call(self, shape: CallShape) -> _Core:
        """Open a streaming call, waiting while the peer's ``max_streams`` are in use."""

        def new_call(ident: int) -> _Core:
            core = _Core(self, ident, shape, ours=True)
            self._calls[ident] = core
            return core

        return await self._open(int(shape), new_call)

    async def _open(self, shape: int, register: Callable[[int], _T]) -> _T:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_enabled()
        conn = self._conn
        session = self._session
        lot = self._openers
        queued = False
        try:
            while True:
                if conn.closed:
                    raise conn._refused()
                if not lot or queued:
                    try:
                        ident = session.open_call(shape) if shape else session.open_stream()
                    except LocalProtocolError:
                        raise conn._refused() from None  # closing: nothing was sent
                    if ident is not None:
                        opened = register(ident)
                        self._writer.wake()
                        if queued and lot:
                            lot.unpark()  # a slot may be left for the next one
                        await trio.lowlevel.cancel_shielded_checkpoint()
                        return opened
                queued = True
                if self._slot_on_pack:
                    # One of our streams ended its last half locally: its slot frees
                    # once the writer has packed that frame.
                    self._slot_on_pack = False
                    try:
                        await self._writer.wait_written()
                    except ConnectionClosed:
                        pass
                    except BaseException:
                        self._slot_on_pack = True
                        raise
                else:
                    await lot.park()
        except BaseException:
            if queued and lot:
                lot.unpark()  # pass the wake-up on
            raise

    def credit_moved(self) -> None:
        """The session's credit moved (a slot may have freed): wake an opener."""
        if self._openers:
            self._openers.unpark()

    def half_closed(self, stream: Stream) -> None:
        """``stream`` queued the frame ending its sending half."""
        if stream._ours and stream._ended_by_peer:
            self.slot_frees_on_pack()

    def slot_frees_on_pack(self) -> None:
        """A stream or call of ours ended its last half locally: its slot frees once the
        writer has packed that frame (wake an opener to wait for that)."""
        self._slot_on_pack = True
        if self._openers:
            self._openers.unpark()

    def forget(self, stream: Stream) -> None:
        """``stream`` was closed by the application."""
        if self._live.pop(stream._id, None) is not None:
            if stream._ended_by_peer:
                self.half_closed(stream)
            self._conn._progress.set()

    def forget_call(self, core: _Core) -> None:
        """Call ``core`` was closed (by the application or its handler's end)."""
        if self._calls.pop(core.ident, None) is not None:
            self._conn._progress.set()

    # -- reading ---------------------------------------------------------------------------

    def was_read(self, ident: int, nbytes: int) -> None:
        """The application read ``nbytes`` of stream ``ident``: return that credit."""
        session = self._session
        now = trio.current_time()
        session.read_done(ident, nbytes, now=now)
        if now >= self._next_probe:
            # Measure the round trip, so that windows can grow toward the bandwidth-delay
            # product (a keepalive ping does too, but far less often).
            rtt = session.rtt
            self._next_probe = now + max(_PROBE_INTERVAL, 4 * rtt if rtt else 0.0)
            session.ping(now)
        if session.wants_write:
            self._writer.wake()

    # -- events ----------------------------------------------------------------------------

    def on_data(self, ident: int, data: bytes) -> None:
        """EV_DATA (the reader's fast path)."""
        stream = self._live.get(ident)
        if stream is not None:
            stream._on_data(data)
        else:  # nobody will read it (cannot happen: a closed stream is stopped)
            self._session.read_done(ident, len(data))

    def on_message(self, ident: int, body: bytes, cost: int) -> None:
        """EV_MESSAGE: one message of a streaming call (the reader's fast path)."""
        core = self._calls.get(ident)
        if core is not None:
            core.on_message(body, cost)
        else:  # nobody will read it (cannot happen: a closed call is stopped)
            self._session.read_done(ident, cost)

    def on_call_error(self, ident: int, code: int, text: str) -> None:
        """The peer's ERROR on one of our streaming calls (terminal both ways)."""
        core = self._calls.get(ident)
        if core is not None:
            core.fail(_call_error_failure(ident, code, text))
            self.credit_moved()  # its slot is free

    def on_event(self, kind: int, ident: int, value: Any) -> None:
        """The session's other stream events (see ``_proto._session``)."""
        if kind == EV_STREAM_OPENED:
            self._on_opened(ident, value)
            return
        if kind == EV_CALL_CREDIT:
            if ident == 0:  # the connection's data window: every blocked sender
                for each in self._live.values():
                    if each._send_lot:
                        each._send_lot.unpark_all()
                for each_call in self._calls.values():
                    if each_call.send_lot:
                        each_call.send_lot.unpark_all()
                return
            credited_call = self._calls.get(ident)
            if credited_call is not None:
                if credited_call.send_lot:
                    credited_call.send_lot.unpark_all()
                return
            credited = self._live.get(ident)
            if credited is not None and credited._send_lot:
                credited._send_lot.unpark_all()
            return
        if kind == EV_DATA:
            self.on_data(ident, value)
            return
        if kind == EV_MESSAGE:  # the reader's fast path takes these
            self.on_message(ident, value, len(value) + MESSAGE_COST)
            return
        core = self._calls.get(ident)
        if core is not None:
            if kind == EV_STOP:
                self._writer.wake()  # the session queued RESET in answer
                core.on_stop(value)
            elif kind == EV_END:
                core.on_end()
            elif kind == EV_RESET:
                core.on_reset(value)
            return
        stream = self._live.get(ident)
        if kind == EV_STOP:
            self._writer.wake()  # the session queued RESET in answer
            if stream is not None:
                stream._on_stop(value)
            return
        if stream is None:
            return
        if kind == EV_END:
            stream._on_end()
        elif kind == EV_RESET:
            stream._on_reset(value)

    def _on_opened(self, ident: int, shape: int) -> None:
        session = self._session
        if shape:
            if self._call_handler is None:
                session.send_error(
                    ident, _REFUSED, "this side serves no streaming calls (no call_handler)"
                )
                self._writer.wake()
                return
            core = _Core(self, ident, CallShape(shape), ours=False)
            self._calls[ident] = core
            if self._running < self._max_handlers:
                self._start(core)
            else:
                self._waiting.append(core)
            return
        if self._handler is None:
            # Refused: the peer's reads and sends raise StreamReset(REFUSED) at once.
            session.reset(ident, _REFUSED)
            session.stop(ident, _REFUSED)
            self._writer.wake()
            return
        stream: Stream = Stream._create(self, ident, ours=False)
        self._live[ident] = stream
        if self._running < self._max_handlers:
            self._start(stream)
        else:
            self._waiting.append(stream)

    def goaway(self, last: int, failed: tuple[int, ...]) -> None:
        """The peer is closing: our streams above ``last`` were never accepted."""
        for ident in failed:
            stream = self._live.get(ident)
            if stream is not None:
                message = (
                    f"the peer is shutting down and did not accept stream {ident} (it "
                    f"accepted ids up to {last}); nothing was processed, so it is safe to "
                    "open the stream again on another connection"
                )
                stream._fail(_refused_failure(message, ident))
            core = self._calls.get(ident)
            if core is not None:
                text = (
                    f"the peer is shutting down and did not accept streaming call {ident} "
                    f"(it accepted ids up to {last}); nothing was processed, so it is safe "
                    "to make the call again on another connection"
                )
                core.fail(_call_not_processed(text))
        self._openers.unpark_all()

    def refuse_openers(self) -> None:
        """The connection is closing: openers waiting for a slot give up."""
        self._openers.unpark_all()

    def fail_all(self, reason: ConnectionClosed) -> None:
        """The connection ended: every stream and opener fails."""
        self.alive = False
        failure = _lost_failure(reason)
        live, self._live = self._live, {}
        for stream in live.values():
            stream._fail(failure)
        calls, self._calls = self._calls, {}
        call_failure = _call_lost_failure(reason)
        for core in calls.values():
            core.fail(call_failure)
        self._waiting.clear()
        self._openers.unpark_all()

    # -- handlers --------------------------------------------------------------------------

    def _start(self, stream: Stream | _Core) -> None:
        nursery = self._conn._services
        assert nursery is not None  # events come from the reader, a service task
        self._running += 1
        if isinstance(stream, _Core):
            nursery.start_soon(
                self._serve_call, stream, name=f"{self._conn.name} call {stream.ident} handler"
            )
            return
        nursery.start_soon(
            self._serve, stream, name=f"{self._conn.name} stream {stream._id} handler"
        )

    async def _serve_call(self, core: _Core) -> None:
        handler = self._call_handler
        assert handler is not None
        try:
            await serve_call(core, handler)
        finally:
            self._handler_done()

    async def _serve(self, stream: Stream) -> None:
        handler = self._handler
        assert handler is not None
        try:
            await handler(stream)
        except Exception as exc:
            logger.error(
                "%s: stream handler raised on stream %d; the stream was reset",
                self._conn.name,
                stream._id,
                exc_info=exc,
            )
            stream._close(_INTERNAL, abort=True)
        finally:
            stream._close(_CANCELLED, abort=False)
            self._handler_done()

    def _handler_done(self) -> None:
        """A stream or call handler ended: start a waiting one."""
        self._running -= 1
        self._conn._progress.set()
        while self._waiting and self._running < self._max_handlers and self.alive:
            waiting = self._waiting.popleft()
            if waiting.closed:
                continue
            self._start(waiting)
