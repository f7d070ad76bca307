"""The sans-IO session: every protocol decision of one connection (native wire version 2).

One :class:`Session` per connection, built after the handshake from both hellos and the
side. It owns call ids and their parity, the calls in flight both ways, the credit ledger
(call slots S, request window W, reply window W_r, nested allowance k), the control lane
(pong, ping, cancels, credit updates, goaway), keepalive and the grace period, packing
frames into record plaintexts and parsing received plaintexts into events. It never
performs I/O, never reads a clock (time is an argument) and never imports trio.
:class:`~monte_trio._proto._session_v1.MonteV1Session` offers the same driver-facing
surface for Go monte's wire.

Errors: anything the peer does wrong moves the session to ``ERROR`` and raises
:exc:`RemoteProtocolError` once (``error_code`` says what the final GOAWAY carries; take it
with :meth:`Session.records_to_send`); nothing else leaves the session. Local misuse
(sending after close, a body over the peer's maximum, a reply for an unknown id) raises
:exc:`LocalProtocolError` and changes nothing.

Why one module of this size: the session is one state machine, and its invariants (every
byte of credit returned exactly once, a call slot freed only by the terminal frame, the
GOAWAY barrier, the control budget) span both directions; kept in one class they can be
read and checked together, as h11 keeps its ``Connection`` and aioquic its
``QuicConnection`` (about 3,000 lines). With streams and streaming calls it is about 2,000
lines: the connection-level windows, the id space, GOAWAY and the fair packer are shared by
unary calls and streams, so they stay together; per-stream state and its window rule live
in :mod:`~monte_trio._proto._calls`. The codec (header layout, hello, constants) lives in
:mod:`~monte_trio._proto._wire2`, Go monte's session in
:mod:`~monte_trio._proto._session_v1`.

How a driver uses this
----------------------
* **Reader task**: open records, ``events = session.receive_records(plaintexts)`` (a list
  of 4-tuples ``(EV_*, id, a, b)``, see the ``EV_`` constants), dispatch them: requests and
  one-ways to handlers, replies and errors to callers' channels, EV_CANCEL to the handler,
  EV_GOAWAY fails the listed ids as RequestNotProcessed. If ``session.credit_changed``
  moved, retry the FIFO credit waiters. If ``session.wants_write``, wake the writer.
* **Writer task**: ``plaintexts = session.records_to_send(sealer.max_plaintext,
  max_bytes=128 * 1024)`` then ``seal_many`` and one ``send_all``; repeat while
  ``wants_write``.
* **Callers**: ``call_id = session.send_request(body)`` (``None``: no credit now; wait
  FIFO and retry after ``credit_changed`` moves; check ``can_open`` first, False means
  fail with RequestNotProcessed); ``send_oneway(body) -> bool`` likewise; when the caller
  takes (or drops) its reply, ``delivered(call_id)``; when it gives up, ``cancel(call_id)``.
  A handler's nested call passes ``parent=<the id it is serving>``.
* **Handlers**: when done with a request body, ``consumed(call_id)`` (one-way:
  ``consumed(0, len(body))``); answer with ``send_reply(call_id, body)`` or
  ``send_error(call_id, code, text)``; after EV_CANCEL, answer with
  ``send_error(call_id, ErrorCode.CANCELLED, "")`` once the handler has really ended.
* **Timers**: ``move_on_at(session.get_timer())`` in the reader (or a timer task), then
  ``events = session.handle_timer(now)``; EV_CLOSED means close the connection.
  ``reader_paused(True/False)`` around any pause of the reader caused by our own
  back-pressure, so it never counts as the peer's silence.
* **Close**: ``start_close()`` queues GOAWAY; close TCP when ``finished`` (or EV_CLOSED).
* **Streams and streaming calls** (docs/wire-native.rst, "Streams and streaming calls";
  per-id state in :mod:`~monte_trio._proto._calls`): ``open_stream()`` /
  ``open_call(shape)`` return an id or ``None`` (no slot: wait FIFO, retry after
  ``credit_changed`` moves). A writer calls ``send_data(id, data, end)`` (returns the bytes
  accepted; wait for ``(EV_CALL_CREDIT, id or 0, ...)`` before retrying the rest) or
  ``send_message(id, body, end) -> bool`` likewise, and ``send_end(id)``; it never holds
  the write role while waiting. The reader routes EV_STREAM_OPENED to ``stream_handler``,
  EV_DATA and EV_MESSAGE to the stream's receive buffer, EV_END to a clean EOF, EV_RESET
  to a failed read (truncated), EV_STOP to failing the stream's senders (the RESET answer
  is already queued), EV_ERROR on a call to its caller. When the application has taken
  data: ``read_done(id, len(data) or the EV_MESSAGE's cost, now=clock)``. On EV_PONG:
  ``observe_rtt(now - sent_at)``; while streams carry data, ``ping(now)`` every few RTTs so
  windows can grow. Giving up: ``cancel(id)`` (opener), ``reset(id, code)`` /
  ``stop(id, code)`` (either side; ``aclose()`` with unread data calls both), and a call's
  acceptor fails with ``send_error(id, code, text)``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Final

from .._exceptions import LocalProtocolError, RemoteProtocolError
from ._calls import (
    HALF_CLOSED,
    HALF_ENDING,
    HALF_OPEN,
    HALF_RESETTING,
    SHAPE_BIDIRECTIONAL,
    SHAPE_STREAM,
    Channel,
    update_due,
)
from ._compression import (
    DEFAULT_THRESHOLD,
    ENVELOPE_SIZE,
    FLAG_COMPRESSED,
    CompressionError,
    Compressor,
    agree,
    compress,
    decompress_body,
    read_envelope,
)
from ._wire2 import (
    CONTROL_BURST,
    CONTROL_RATE,
    FLAG_END,
    FLAG_MORE,
    FLAG_NESTED,
    HEADER,
    ID_LIMIT,
    MAX_CONTROL_PAYLOAD,
    MAX_ERROR_TEXT,
    MESSAGE_COST,
    SLICE,
    STREAM_ABORT_BURST,
    STREAM_ABORT_RATE,
    CreditLimit,
    ErrorCode,
    Hello2,
    Kind,
)

__all__ = [
    "CLOSED",
    "CLOSING",
    "ERROR",
    "EV_CALL_CREDIT",
    "EV_CANCEL",
    "EV_CLOSED",
    "EV_DATA",
    "EV_END",
    "EV_ERROR",
    "EV_GOAWAY",
    "EV_MESSAGE",
    "EV_ONEWAY",
    "EV_PONG",
    "EV_REPLY",
    "EV_REQUEST",
    "EV_RESET",
    "EV_STOP",
    "EV_STREAM_OPENED",
    "OPEN",
    "Event",
    "Session",
]

OPEN: Final = 0
CLOSING: Final = 1
"""A GOAWAY was sent or received: no new non-nested calls either way."""
CLOSED: Final = 2
"""Finished (grace expired, or the peer went silent): close the transport."""
ERROR: Final = 3
"""A protocol violation: the session raised RemoteProtocolError once; only the final GOAWAY
is still sent."""

EV_REQUEST: Final = 1
"""``(EV_REQUEST, id, body, parent)``: run a handler; ``parent`` is 0 or the call the
peer's handler was serving (a nested call, outside the handler cap)."""
EV_ONEWAY: Final = 2
"""``(EV_ONEWAY, 0, body, 0)``: run the one-way handler; then ``consumed(0, len(body))``."""
EV_REPLY: Final = 3
"""``(EV_REPLY, id, body, 0)``: the reply of our call; ``delivered(id)`` once taken."""
EV_ERROR: Final = 4
"""``(EV_ERROR, id, code, text)``: our call failed remotely (REFUSED = safe to retry)."""
EV_CANCEL: Final = 5
"""``(EV_CANCEL, id, 0, 0)``: the peer cancelled a call we are handling."""
EV_GOAWAY: Final = 6
"""``(EV_GOAWAY, last_id, code, failed)``: the peer is closing; ``failed`` is a tuple of
our call ids it never processed (safe to retry); calls waiting for credit fail likewise."""
EV_PONG: Final = 7
"""``(EV_PONG, ping_id, sent_at, 0)``: our keepalive was answered (rtt = now - sent_at)."""
EV_CLOSED: Final = 8
"""``(EV_CLOSED, code, reason, 0)``: the session ended (peer silent, grace expired)."""
EV_STREAM_OPENED: Final = 9
"""``(EV_STREAM_OPENED, id, shape, 0)``: the peer opened a byte stream (shape 0) or a
streaming call (``SHAPE_UPLOAD``, ``SHAPE_DOWNLOAD``, ``SHAPE_BIDIRECTIONAL``)."""
EV_DATA: Final = 10
"""``(EV_DATA, id, data, 0)``: bytes on a stream; ``read_done(id, n)`` as they are read."""
EV_MESSAGE: Final = 11
"""``(EV_MESSAGE, id, body, cost)``: one message of a streaming call; ``read_done(id,
cost)`` once the application took it."""
EV_END: Final = 12
"""``(EV_END, id, 0, 0)``: the peer half-closed (END) its sending half: nothing follows."""
EV_RESET: Final = 13
"""``(EV_RESET, id, code, 0)``: the peer aborted its sending half; what it sent may be
truncated (a reader must fail, never report a clean end)."""
EV_STOP: Final = 14
"""``(EV_STOP, id, code, 0)``: the peer will not read our sending half: the session has
discarded our unsent data and queued RESET(code); senders on ``id`` must fail."""
EV_CALL_CREDIT: Final = 15
"""``(EV_CALL_CREDIT, id, available, 0)``: our credit on stream ``id`` grew (wake its
sender); id 0: the connection-level data window grew (wake every blocked sender)."""

Event = tuple[int, int, object, object]

_pack = HEADER.pack
_unpack = HEADER.unpack_from
_ONEWAY: Final = 0x01
_REQUEST: Final = 0x02
_REPLY: Final = 0x03
_ERROR: Final = 0x04
_CONT: Final = 0x05
_STREAM: Final = 0x06
_CALL: Final = 0x07
_DATA: Final = 0x08
_FIRST_CONTROL: Final = 0x10
_PING_PAYLOAD_SIZE: Final = 8
_SAMPLE_FROM: Final = 64 * 1024
"""Bodies from this size are compressed only if a sample of them shrinks: compressing
1 MiB of random bytes costs LZ4 about 1 ms for nothing, its sample about 10 us."""
_SAMPLE_PIECE: Final = 4096
_SAMPLE_PIECES: Final = 4


class _Violation(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _violation(code: ErrorCode, message: str) -> _Violation:
    return _Violation(code, message)


def _item_cost(item: list[Any]) -> int:
    """What a queued message holds of its window: its body's length + 64, the length
    before compression (from the envelope) if it was compressed."""
    body = item[3]
    size = int.from_bytes(body[1:ENVELOPE_SIZE], "big") if item[5] else len(body)
    return size + MESSAGE_COST


def _sample_shrinks(compressor: Compressor, body: bytes) -> bool:
    """Whether four 4 KiB pieces spread over a large body compress by at least 1/16
    (already compressed or encrypted data does not: it is sent as it is, unread)."""
    step = (len(body) - _SAMPLE_PIECE) // (_SAMPLE_PIECES - 1)
    sample = b"".join(body[i * step : i * step + _SAMPLE_PIECE] for i in range(_SAMPLE_PIECES))
    out = compress(compressor.codec, sample, compressor.level)
    return out is not None and len(out) <= len(sample) - len(sample) // 16


def _compression_violation(exc: CompressionError) -> _Violation:
    return _Violation(ErrorCode(exc.code), str(exc))


class Session:
    """One native (wire version 2) connection's protocol state.

    Args:
        initiator: whether this side dialed (odd call ids) or accepted (even).
        local: the hello this side sent (what it accepts).
        peer: the hello the peer sent (already checked by :meth:`Hello2.decode`).
        now: the driver's clock at creation (keepalive ticks count from it).
        keepalive_interval: seconds between keepalive ticks, or ``None`` for none.
        keepalive_tolerance: silence (with a ping outstanding) after which the peer is dead.
        grace_period: seconds a graceful close gives in-flight calls.
        first_id: the first call id to allocate (tests of id exhaustion).
        control_burst: budgeted control frames accepted at once ...
        control_rate: ... and refilled per second.
        stream_window_cap: the largest a stream's receive window grows to (auto-tuning
            toward the bandwidth-delay product); the memory bound uses it.
        credit_floor: window credit returned in amounts below this many bytes is held
            back (:attr:`credit_owed`) until it reaches the floor or the driver calls
            :meth:`flush_credit`, instead of riding on every record; 0 sends it with the
            next record.
        abort_burst: streams the peer may open and then abort (RESET, STOP) at once ...
        abort_rate: ... and per second after that.
        compression_threshold: bodies shorter than this are sent as they are; longer ones
            are compressed with the codec both hellos list (docs/wire-native.rst,
            "Compression"), unless the call opts out.
    """

    __slots__ = (
        "_abort_burst",
        "_abort_rate",
        "_aborts",
        "_accepted",
        "_blocked_replies",
        "_budget",
        "_budget_at",
        "_burst",
        "_call_max_in",
        "_call_max_out",
        "_cancels",
        "_cap",
        "_cflag",
        "_ch_in",
        "_ch_out",
        "_channels",
        "_compressor",
        "_credit_dirty",
        "_credit_floor",
        "_cthreshold",
        "_d_blocked",
        "_d_blocked_at",
        "_d_blocked_out",
        "_d_limit_in",
        "_d_limit_out",
        "_d_read",
        "_d_recv",
        "_d_used_out",
        "_d_window",
        "_goaway_in",
        "_goaway_out",
        "_goaway_sent",
        "_grace",
        "_grace_at",
        "_heard",
        "_in",
        "_in_held",
        "_in_plain",
        "_interval",
        "_last_accepted",
        "_next_id",
        "_next_tick",
        "_out",
        "_out_plain",
        "_own_k",
        "_own_m",
        "_own_ms",
        "_own_s",
        "_own_sw",
        "_partial",
        "_paused",
        "_peer_k",
        "_peer_m",
        "_peer_ms",
        "_peer_parity",
        "_peer_s",
        "_peer_sw",
        "_ping",
        "_ping_at",
        "_ping_outstanding",
        "_ping_seq",
        "_pong",
        "_queue",
        "_r_held",
        "_r_limit_in",
        "_r_limit_out",
        "_r_pending",
        "_r_recv",
        "_r_used_out",
        "_rate",
        "_ready",
        "_reserve",
        "_sctrl",
        "_silent",
        "_silent_ticks",
        "_w_limit_in",
        "_w_limit_out",
        "_w_pending",
        "_w_recv",
        "_w_used_out",
        "credit_changed",
        "error_code",
        "highest_in",
        "highest_out",
        "initiator",
        "rtt",
        "send_queue_bytes",
        "state",
    )

    initiator: bool
    state: int
    credit_changed: int
    """Moves whenever credit or a slot was freed: retry the credit waiters when it does."""
    send_queue_bytes: int
    """Body bytes queued and not yet packed."""
    highest_out: int
    highest_in: int

    def __init__(
        self,
        *,
        initiator: bool,
        local: Hello2,
        peer: Hello2,
        now: float = 0.0,
        keepalive_interval: float | None = 15.0,
        keepalive_tolerance: float = 45.0,
        grace_period: float = 5.0,
        first_id: int | None = None,
        control_burst: int = CONTROL_BURST,
        control_rate: float = CONTROL_RATE,
        stream_window_cap: int = 16 * 1024 * 1024,
        abort_burst: int = STREAM_ABORT_BURST,
        abort_rate: float = STREAM_ABORT_RATE,
        credit_floor: int = 0,
        compression_threshold: int = DEFAULT_THRESHOLD,
    ) -> None:
        own_parity = 1 if initiator else 0
        if first_id is None:
            first_id = 1 if initiator else 2
        if first_id & 1 != own_parity or not 0 < first_id < 2**32:
            raise ValueError(f"first_id {first_id} has the wrong parity for this side")
        self.initiator = initiator
        self.state = OPEN
        self.error_code: int | None = None
        self.credit_changed = 0
        self.send_queue_bytes = 0
        self._next_id = first_id
        self.highest_out = 0
        self.highest_in = 0
        self._peer_parity = 1 - own_parity
        self._last_accepted = 0
        self._peer_m = peer.max_message_size
        self._own_m = local.max_message_size
        self._peer_s = peer.max_calls
        self._own_s = local.max_calls
        self._peer_k = peer.nested_allowance
        self._own_k = local.nested_allowance
        # Credit the peer granted us (cumulative limits) and what we sent against it.
        self._w_limit_out = peer.request_window
        self._w_used_out = 0
        self._r_limit_out = peer.reply_window
        self._r_used_out = 0
        self._reserve = peer.max_message_size + MESSAGE_COST
        # Credit we granted: advertised limits, received totals, and limits not yet sent.
        self._w_limit_in = local.request_window
        self._w_pending = local.request_window
        self._w_recv = 0
        self._r_limit_in = local.reply_window
        self._r_pending = local.reply_window
        self._r_recv = 0
        self._credit_dirty = False
        self._credit_floor = credit_floor
        # Calls. _out[id] = [parent, cancelled, nested_open, request_fully_sent]
        # _in[id] = [parent, cancelled, nested_open, terminal_queued]
        self._out: dict[int, list[int]] = {}
        self._out_plain = 0
        self._in: dict[int, list[int]] = {}
        self._in_plain = 0
        self._in_held: dict[int, int] = {}
        self._r_held: dict[int, int] = {}
        # Messages being reassembled: id -> [kind, parent, total, cost, drop, buffer,
        # compressed] (a compressed one's cost: its declared size + 64)
        self._partial: dict[int, list[Any]] = {}
        # Send queue: [kind, id, prefix, body, offset, flags] (flags: FLAG_COMPRESSED or
        # 0, for the first frame); replies waiting for W_r.
        self._queue: deque[list[Any]] = deque()
        self._blocked_replies: deque[tuple[int, int, bytes, int, int]] = deque()
        # Control lane (state, not a queue).
        self._pong: tuple[int, bytes] | None = None
        self._ping: tuple[int, bytes] | None = None
        self._ping_seq = 0
        self._ping_at: dict[int, float] = {}
        self._ping_outstanding = False
        self._cancels: dict[int, None] = {}
        self._goaway_out: tuple[int, int] | None = None
        self._goaway_sent = False
        self._goaway_in: tuple[int, int] | None = None
        self._burst = control_burst
        self._rate = control_rate
        self._budget = float(control_burst)
        self._budget_at = now
        # Keepalive and grace.
        self._interval = keepalive_interval
        self._next_tick = None if keepalive_interval is None else now + keepalive_interval
        self._silent = (
            0
            if keepalive_interval is None
            else max(1, math.ceil(keepalive_tolerance / keepalive_interval))
        )
        self._silent_ticks = 0
        self._heard = False
        self._paused = False
        self._grace = grace_period
        self._grace_at: float | None = None
        # Streams and streaming calls: enabled when both hellos offer them.
        both = bool(local.max_streams and peer.max_streams)
        self._own_ms = local.max_streams if both else 0
        self._peer_ms = peer.max_streams if both else 0
        self._own_sw = local.stream_window
        self._peer_sw = peer.stream_window
        self._call_max_in = min(self._own_m, local.stream_window // 2 - MESSAGE_COST)
        self._call_max_out = min(self._peer_m, peer.stream_window // 2 - MESSAGE_COST)
        self._cap = max(stream_window_cap, local.stream_window)
        self._channels: dict[int, Channel] = {}
        self._ch_out = 0
        self._ch_in = 0
        self._ready: deque[int] = deque()  # round-robin of channels with data to pack
        self._sctrl: dict[int, None] = {}  # channels (0: the connection) with control due
        # Connection-level data window: granted (in) and granted to us (out).
        self._d_window = local.data_window
        self._d_limit_in = local.data_window
        self._d_recv = 0
        self._d_read = 0
        self._d_blocked = False
        self._d_limit_out = peer.data_window
        self._d_used_out = 0
        self._d_blocked_at = -1
        self._d_blocked_out = False
        self._abort_burst = abort_burst
        self._abort_rate = abort_rate
        self._aborts = float(abort_burst)
        self.rtt: float | None = None
        # Compression: what we decompress (our hello), and what we compress with (the
        # first codec of the peer's list that ours holds too). A body shorter than
        # _cthreshold is never looked at: with no codec agreed, none is.
        self._accepted = local.compression
        self._cflag = FLAG_COMPRESSED if local.compression else 0
        codec = agree(local.compression, peer.compression)
        self._compressor = (
            None if codec is None else Compressor(codec, threshold=compression_threshold)
        )
        self._cthreshold = 1 << 62 if codec is None else compression_threshold

    # ------------------------------------------------------------------ queries
    @property
    def can_open(self) -> bool:
        """Whether new non-nested calls may start (no GOAWAY either way, ids left)."""
        return self.state == OPEN and self._goaway_out is None and self._next_id <= ID_LIMIT

    @property
    def wants_write(self) -> bool:
        """Whether :meth:`records_to_send` has something to pack."""
        return bool(
            self._queue
            or self._pong
            or self._ping
            or self._cancels
            or self._credit_dirty
            or self._ready
            or self._sctrl
        )

    @property
    def credit_owed(self) -> bool:
        """Whether returned window credit is held back below ``credit_floor``: the
        driver must call :meth:`flush_credit` within its delay (the peer may be waiting
        for it)."""
        return not self._credit_dirty and (
            self._w_pending != self._w_limit_in or self._r_pending != self._r_limit_in
        )

    def flush_credit(self) -> None:
        """Send the window credit held back below ``credit_floor`` with the next record."""
        if self._w_pending != self._w_limit_in or self._r_pending != self._r_limit_in:
            self._credit_dirty = True

    @property
    def finished(self) -> bool:
        """A graceful close is complete: close the transport."""
        if self.state >= CLOSED:
            return True
        return (
            self._goaway_sent
            and self._goaway_in is not None
            and not self._out
            and not self._in
            and not self._partial
            and not self.wants_write
            and not self._blocked_replies
            and not self._channels
        )

    @property
    def calls_open(self) -> tuple[int, int]:
        """``(ours, theirs)``: non-nested calls holding a slot on each side of the ledger."""
        return self._out_plain, self._in_plain

    @property
    def credit(self) -> dict[str, int]:
        """The ledger, for statistics and tests: what we may still send and what we hold."""
        return {
            "request_window": self._w_limit_out - self._w_used_out,
            "reply_window": self._r_limit_out - self._r_used_out,
            "slots": self._peer_s - self._out_plain,
            "request_bytes_held": sum(self._in_held.values()),
            "reply_bytes_held": sum(self._r_held.values()),
            "streams": self._peer_ms - self._ch_out,
            "data_window": self._d_limit_out - self._d_used_out,
        }

    @property
    def streams_open(self) -> tuple[int, int]:
        """``(ours, theirs)``: streams and streaming calls holding a slot on each side."""
        return self._ch_out, self._ch_in

    @property
    def data_ledger(self) -> dict[str, int]:
        """The connection-level data window, for statistics and tests: what we received
        and returned (credited back at once) and what we sent against the peer's grant."""
        return {
            "received": self._d_recv,
            "returned": self._d_read,
            "advertised": self._d_limit_in,
            "sent": self._d_used_out,
            "granted": self._d_limit_out,
        }

    def stream_credit(self, ident: int) -> dict[str, int] | None:
        """One stream's windows (``None`` once it is closed): ``send`` is the credit we
        may still use, ``window`` our receive window, ``unread`` what the application has
        not returned with :meth:`read_done`, ``unsent`` data accepted but not packed."""
        ch = self._channels.get(ident)
        if ch is None:
            return None
        return {
            "send": ch.s_limit - ch.s_used,
            "window": ch.r_window,
            "unread": ch.r_recv - ch.r_read,
            "unsent": ch.unsent,
        }

    def _check_sendable(self) -> None:
        if self.state >= CLOSED:
            raise LocalProtocolError("the connection is closed; open a new one")

    def _check_size(self, body: bytes) -> None:
        if len(body) > self._peer_m:
            raise LocalProtocolError(
                f"message of {len(body)} bytes exceeds the peer's maximum of {self._peer_m} "
                "(max_message_size)"
            )

    # ------------------------------------------------------------------ acting
    def send_request(self, body: bytes, *, parent: int = 0, compress: bool = True) -> int | None:
        """Open a call carrying ``body`` if credit allows; return its id, or ``None``.

        ``None`` means no credit now (slots, window or nested allowance): wait in FIFO
        order and retry after :attr:`credit_changed` moves. ``compress=False`` sends the
        body as it is even when compression was agreed (a body holding a secret next to
        data an attacker chose: docs/security.rst, "Compression").

        Raises:
            LocalProtocolError: the session is closed or closing (check :attr:`can_open`;
                nested calls are still allowed while closing), the body exceeds the peer's
                maximum, or ``parent`` is not a call this side is handling.
        """
        self._check_sendable()
        self._check_size(body)
        cost = len(body) + MESSAGE_COST
        if parent:
            entry = self._in.get(parent)
            if entry is None or entry[3]:
                raise LocalProtocolError(
                    f"nested call under {parent}, which this side is not handling"
                )
            if entry[2] >= self._peer_k or self._w_used_out + cost > self._w_limit_out:
                return None
            if self._next_id > 0xFFFFFFFF:
                raise LocalProtocolError("call ids are exhausted; open a new connection")
        else:
            if not self.can_open:
                raise LocalProtocolError("the connection is closing; retry on a new connection")
            if (
                self._out_plain >= self._peer_s
                or self._w_used_out + cost > self._w_limit_out - self._reserve
            ):
                return None
        ident = self._next_id
        self._next_id = ident + 2
        self.highest_out = ident
        self._w_used_out += cost
        if parent:
            self._in[parent][2] += 1
        else:
            self._out_plain += 1
        self._out[ident] = [parent, 0, 0, 0]
        prefix = parent.to_bytes(4, "big") if parent else b""
        flags = 0
        if compress and len(body) >= self._cthreshold:
            flags, body = self._squeeze(body)
        self._queue.append([_REQUEST, ident, prefix, body, 0, flags])
        self.send_queue_bytes += len(body)
        if self._next_id > ID_LIMIT and self._goaway_out is None:
            self.start_close(ErrorCode.ID_EXHAUSTED)
        return ident

    def send_oneway(self, body: bytes, *, compress: bool = True) -> bool:
        """Queue a one-way message if the request window allows (``False``: wait);
        ``compress`` as for :meth:`send_request`.

        Raises:
            LocalProtocolError: closed, or the body exceeds the peer's maximum.
        """
        size = len(body)
        if self.state >= CLOSED or size > self._peer_m:
            self._check_sendable()
            self._check_size(body)
        used = self._w_used_out + size + MESSAGE_COST
        if used > self._w_limit_out - self._reserve:
            return False
        self._w_used_out = used
        flags = 0
        if compress and size >= self._cthreshold:
            flags, body = self._squeeze(body)
            size = len(body)
        self._queue.append([_ONEWAY, 0, b"", body, 0, flags])
        self.send_queue_bytes += size
        return True

    def send_reply(self, call_id: int, body: bytes, *, compress: bool = True) -> None:
        """Answer call ``call_id`` (terminal). Held in the session while W_r is short;
        ``compress`` as for :meth:`send_request`.

        Raises:
            LocalProtocolError: not a call we are handling (or already answered), closed,
                or the body exceeds the peer's maximum (answer with an error instead).
        """
        self._terminal(call_id, _REPLY, body, compress)

    def send_error(self, call_id: int, code: int, text: str) -> None:
        """Fail call ``call_id`` (terminal) with ``code`` and ``text`` (cut to 998 bytes).

        Raises:
            LocalProtocolError: not a call we are handling (or already answered), or closed.
        """
        data = text.encode("utf-8", errors="replace")
        if len(data) > MAX_ERROR_TEXT:
            cut = MAX_ERROR_TEXT
            while cut and (data[cut] & 0xC0) == 0x80:
                cut -= 1
            data = data[:cut]
        self._terminal(call_id, _ERROR, int(code).to_bytes(2, "big") + data)

    def _terminal(self, call_id: int, kind: int, body: bytes, compress: bool = False) -> None:
        self._check_sendable()
        entry = self._in.get(call_id)
        if entry is None or entry[3]:
            ch = self._channels.get(call_id)
            if ch is not None and kind == _ERROR:
                self._channel_error_out(ch, body)
                return
            raise LocalProtocolError(f"call {call_id} is not awaiting an answer from us")
        if kind == _REPLY:
            self._check_size(body)
        entry[3] = 1
        self._queue_terminal(call_id, kind, body, compress)

    def _queue_terminal(
        self, call_id: int, kind: int, body: bytes, compress: bool = False
    ) -> None:
        cost = len(body) + MESSAGE_COST
        flags = 0
        if compress and len(body) >= self._cthreshold:
            # Now rather than when W_r allows: the reply goes out either way, and a held
            # reply holds fewer bytes. It costs what it would uncompressed.
            flags, body = self._squeeze(body)
        if self._blocked_replies or self._r_used_out + cost > self._r_limit_out:
            self._blocked_replies.append((kind, call_id, body, cost, flags))
            return
        self._r_used_out += cost
        self._queue.append([kind, call_id, b"", body, 0, flags])
        self.send_queue_bytes += len(body)

    def _unblock_replies(self) -> None:
        blocked = self._blocked_replies
        while blocked and self._r_used_out + blocked[0][3] <= self._r_limit_out:
            kind, call_id, body, cost, flags = blocked.popleft()
            self._r_used_out += cost
            self._queue.append([kind, call_id, b"", body, 0, flags])
            self.send_queue_bytes += len(body)

    def _squeeze(self, body: bytes) -> tuple[int, bytes]:
        """``(FLAG_COMPRESSED, envelope)`` or ``(0, body)`` (no codec agreed, or the body
        does not shrink): callers check the threshold first."""
        compressor = self._compressor
        if compressor is None:
            return 0, body
        if len(body) >= _SAMPLE_FROM and not _sample_shrinks(compressor, body):
            return 0, body
        return compressor.compress(body)

    def cancel(self, call_id: int) -> None:
        """Give up on our call ``call_id``: no event for it follows. A call not yet on the
        wire is withdrawn; otherwise CANCEL is sent and the slot stays held until the
        peer's terminal frame (ERROR CANCELLED, or a reply that crossed it).

        A stream or streaming call of ours is cancelled with RESET(CANCELLED) and
        STOP(CANCELLED) (withdrawn if its opening frame is not on the wire yet)."""
        ch = self._channels.get(call_id)
        if ch is not None:
            self._cancel_channel(ch)
            return
        entry = self._out.get(call_id)
        if entry is None or entry[1] or self.state >= CLOSED:
            return
        for item in self._queue:
            if item[1] == call_id and item[0] == _REQUEST:
                if item[4] == 0:  # nothing of it is on the wire yet: withdraw it
                    self._queue.remove(item)
                    self._withdraw(call_id, item)
                    return
                break
        entry[1] = 1
        self._cancels[call_id] = None

    def _withdraw(self, call_id: int, item: list[Any]) -> None:
        entry = self._out.pop(call_id)
        self._w_used_out -= _item_cost(item)
        self.send_queue_bytes -= len(item[3])
        self._end_out(entry)

    def _end_out(self, entry: list[int]) -> None:
        parent = entry[0]
        if parent:
            p = self._in.get(parent)
            if p is not None:
                p[2] -= 1
        else:
            self._out_plain -= 1
        self.credit_changed += 1

    def consumed(self, call_id: int, nbytes: int = 0) -> None:
        """The handler is done with a body: return its request-window credit (once).

        Args:
            call_id: the request's id, or 0 for a one-way message.
            nbytes: for a one-way message, ``len(body)``.
        """
        if call_id:
            cost = self._in_held.pop(call_id, None)
            if cost is None:
                return
        else:
            cost = nbytes + MESSAGE_COST
        self._w_pending += cost
        if self._w_pending - self._w_limit_in >= self._credit_floor:
            self._credit_dirty = True

    def delivered(self, call_id: int) -> None:
        """The caller took (or dropped) the reply of ``call_id``: return its W_r (once)."""
        cost = self._r_held.pop(call_id, None)
        if cost is not None:
            self._r_pending += cost
            if self._r_pending - self._r_limit_in >= self._credit_floor:
                self._credit_dirty = True

    def start_close(self, code: int = ErrorCode.NO_ERROR, *, now: float | None = None) -> None:
        """Queue GOAWAY (after everything queued so far) and refuse new calls from now on.

        Args:
            code: the GOAWAY's error code.
            now: the driver's clock; if given, the grace period starts.
        """
        if self.state >= CLOSED:
            return
        if now is not None and self._grace_at is None:
            self._grace_at = now + self._grace
        if self._goaway_out is None:
            # A barrier: it goes in the message queue, after everything queued before it.
            self._goaway_out = (self._last_accepted, int(code))
            self._queue.append(
                [Kind.GOAWAY, self._last_accepted, b"", int(code).to_bytes(2, "big"), 0, 0]
            )
            self.send_queue_bytes += 2
            self.state = CLOSING

    def reader_paused(self, paused: bool) -> None:
        """The driver's reader stopped (or resumed) reading by its own back-pressure: the
        time it is paused is not the peer's silence."""
        self._paused = paused

    # ------------------------------------------------------------------ streams
    def open_stream(self) -> int | None:
        """Open a byte stream; return its id, or ``None`` when the peer's max_streams are
        all in use (wait FIFO and retry after :attr:`credit_changed` moves: a slot frees
        when a stream is closed both ways).

        Raises:
            LocalProtocolError: closed or closing, or one of the hellos offers no streams.
        """
        return self._open_channel(_STREAM, SHAPE_STREAM)

    def open_call(self, shape: int) -> int | None:
        """Open a streaming call of ``shape`` (``SHAPE_UPLOAD``, ``SHAPE_DOWNLOAD`` or
        ``SHAPE_BIDIRECTIONAL``); its messages follow with :meth:`send_message`. Returns
        its id or ``None`` as :meth:`open_stream` does.

        Raises:
            LocalProtocolError: as :meth:`open_stream`, or an unknown shape.
        """
        if shape not in (1, 2, SHAPE_BIDIRECTIONAL):
            raise LocalProtocolError(f"unknown call shape {shape}; use 1, 2 or 3")
        return self._open_channel(_CALL, shape)

    def _open_channel(self, kind: int, shape: int) -> int | None:
        self._check_sendable()
        if not self.can_open:
            raise LocalProtocolError("the connection is closing; retry on a new connection")
        if not self._peer_ms:
            raise LocalProtocolError(
                "streams are not enabled on this connection (both hellos need max_streams)"
            )
        if self._ch_out >= self._peer_ms:
            return None
        ident = self._next_id
        self._next_id = ident + 2
        self.highest_out = ident
        self._ch_out += 1
        self._channels[ident] = Channel(
            ident, ours=True, shape=shape, send_limit=self._peer_sw, recv_window=self._own_sw
        )
        self._queue.append([kind, ident, b"", bytes([shape]) if shape else b"", 0, 0])
        if self._next_id > ID_LIMIT and self._goaway_out is None:
            self.start_close(ErrorCode.ID_EXHAUSTED)
        return ident

    def _sending(self, ident: int, messages: bool) -> Channel:
        ch = self._channels.get(ident)
        self._check_sendable()
        if ch is None or ch.send_state != HALF_OPEN:
            raise LocalProtocolError(f"stream {ident} is not open for sending")
        if ch.messages != messages:
            what = "send_message" if ch.messages else "send_data"
            raise LocalProtocolError(
                f"{ident} is a {'call' if ch.messages else 'stream'}: use {what}"
            )
        return ch

    def send_data(self, ident: int, data: bytes, end: bool = False) -> int:
        """Queue bytes on stream ``ident``; return how many were accepted.

        As many as both windows allow (the stream's and the connection's) are accepted
        and their credit taken; the rest is the caller's to retry after EV_CALL_CREDIT.
        ``end`` half-closes the stream once everything given was accepted (it is ignored
        when fewer bytes were). Running short of credit queues BLOCKED for the peer.

        Raises:
            LocalProtocolError: not a stream of this connection, or its sending half is
                already ended or reset.
        """
        ch = self._sending(ident, False)
        n = len(data)
        room = min(ch.s_limit - ch.s_used, self._d_limit_out - self._d_used_out)
        take = n if n <= room else max(room, 0)
        if take:
            ch.s_used += take
            self._d_used_out += take
            ch.send_buf.append([data if take == n else data[:take], 0, 0])
            self.send_queue_bytes += take
        if take < n:
            self._note_blocked(ch)
        elif end:
            ch.send_state = HALF_ENDING
        if take or ch.send_state == HALF_ENDING:
            self._mark_ready(ch)
        return take

    def send_message(
        self, ident: int, body: bytes, end: bool = False, *, compress: bool = True
    ) -> bool:
        """Queue one message on streaming call ``ident`` if both windows hold its cost
        (body + 64); ``False``: wait for EV_CALL_CREDIT and retry (BLOCKED is queued).
        ``end`` half-closes after it; the one message of a one-message half always does.
        ``compress`` as for :meth:`send_request`: a compressed message still costs its
        uncompressed size + 64 of the stream window, and its bytes on the wire of the
        connection's data window.

        Raises:
            LocalProtocolError: not a call, its sending half is ended, a one-message half
                already sent its message, or the body exceeds the largest call message
                (``min(M, stream_window / 2 - 64)`` of the peer).
        """
        ch = self._sending(ident, True)
        size = len(body)
        if size > self._call_max_out:
            raise LocalProtocolError(
                f"message of {size} bytes exceeds the largest message on a streaming call "
                f"({self._call_max_out}); send it over a stream"
            )
        if not ch.send_many:
            if ch.send_messages:
                raise LocalProtocolError(f"call {ident} sends exactly one message this way")
            end = True
        cost = size + MESSAGE_COST
        if ch.s_limit - ch.s_used < cost or self._d_limit_out - self._d_used_out < size:
            self._note_blocked(ch, cost, size)
            return False
        flags = 0
        if compress and size >= self._cthreshold:
            flags, body = self._squeeze(body)
            size = len(body)
        ch.s_used += cost
        self._d_used_out += size
        ch.send_messages += 1
        ch.send_buf.append([body, 0, flags])
        self.send_queue_bytes += size
        if end:
            ch.send_state = HALF_ENDING
        self._mark_ready(ch)
        return True

    def send_end(self, ident: int) -> None:
        """Half-close stream or call ``ident`` (END after the data already queued).

        Raises:
            LocalProtocolError: not open for sending, or a call's one-message half whose
                message was not sent (send it with :meth:`send_message` instead).
        """
        ch = self._channels.get(ident)
        if ch is not None and ch.messages and not ch.send_many and not ch.send_messages:
            raise LocalProtocolError(f"call {ident} must send its one message before END")
        ch = self._sending(ident, ch.messages if ch is not None else False)
        ch.send_state = HALF_ENDING
        self._mark_ready(ch)

    def _mark_ready(self, ch: Channel) -> None:
        if ch.wire_open and not ch.ready:
            ch.ready = True
            self._ready.append(ch.ident)

    def _note_blocked(self, ch: Channel, cost: int = 1, size: int = 1) -> None:
        """Queue BLOCKED for each window that fell short (once per limit value)."""
        if ch.s_limit - ch.s_used < cost and ch.blocked_at != ch.s_limit:
            ch.blocked_at = ch.s_limit
            ch.blocked_out = True
            self._sctrl[ch.ident] = None
        if self._d_limit_out - self._d_used_out < size and self._d_blocked_at != self._d_limit_out:
            self._d_blocked_at = self._d_limit_out
            self._d_blocked_out = True
            self._sctrl[0] = None

    def read_done(self, ident: int, nbytes: int, *, now: float | None = None) -> None:
        """The application consumed ``nbytes`` of stream ``ident`` (a call: the ``cost``
        of each EV_MESSAGE it took): return that credit, batched (see the module's rules).

        Args:
            ident: the stream or call.
            nbytes: bytes read (streams) or message costs (calls).
            now: the driver's clock; given, it lets the window grow toward the
                bandwidth-delay product (with :attr:`rtt`).
        """
        ch = self._channels.get(ident)
        if ch is not None and ch.note_read(nbytes, now, self.rtt, self._cap):
            self._sctrl[ident] = None

    def reset(self, ident: int, code: int = ErrorCode.CANCELLED) -> None:
        """Abort our sending half of ``ident``: unsent data is dropped (its credit taken
        back), RESET(code) goes out in the control lane and no END ever follows. Nothing
        happens if the half is already closed."""
        ch = self._channels.get(ident)
        if ch is None or ch.send_state in (HALF_RESETTING, HALF_CLOSED) or self.state >= CLOSED:
            return
        self._discard_unsent(ch)
        ch.send_state = HALF_RESETTING
        ch.reset_out = int(code)
        self._sctrl[ident] = None

    def stop(self, ident: int, code: int = ErrorCode.CANCELLED) -> None:
        """Ask the peer to abort its sending half of ``ident`` (STOP(code); it answers
        RESET). Data arriving meanwhile is discarded; no EV_DATA or EV_MESSAGE follows."""
        ch = self._channels.get(ident)
        if ch is None or ch.recv_state != HALF_OPEN or ch.stopping or self.state >= CLOSED:
            return
        ch.stopping = True
        ch.r_message = None
        ch.stop_out = int(code)
        self._sctrl[ident] = None

    def _cancel_channel(self, ch: Channel) -> None:
        if self.state >= CLOSED:
            return
        if ch.ours and not ch.wire_open:
            for item in self._queue:
                if item[1] == ch.ident and item[0] in (_STREAM, _CALL):
                    self._queue.remove(item)
                    break
            self._discard_unsent(ch)
            ch.send_state = ch.recv_state = HALF_CLOSED
            self._remove(ch)
            return
        self.reset(ch.ident, ErrorCode.CANCELLED)
        self.stop(ch.ident, ErrorCode.CANCELLED)

    def _channel_error_out(self, ch: Channel, body: bytes) -> None:
        if ch.ours or not ch.messages:
            raise LocalProtocolError(
                f"{ch.ident} is not a streaming call this side accepted: use reset() and stop()"
            )
        if ch.send_state not in (HALF_OPEN, HALF_ENDING):
            raise LocalProtocolError(f"call {ch.ident} has already ended its sending half")
        self._discard_unsent(ch)
        ch.send_state = HALF_RESETTING  # the ERROR, in the message queue, closes both halves
        ch.stopping = True
        ch.r_message = None
        self._queue.append([_ERROR, ch.ident, b"", body, 0, 0])
        self.send_queue_bytes += len(body)

    def _discard_unsent(self, ch: Channel) -> None:
        unsent = ch.unsent
        if unsent or ch.send_buf:
            self._d_used_out -= unsent
            self.send_queue_bytes -= unsent
            ch.send_buf.clear()
        if ch.ready:
            ch.ready = False
            self._ready.remove(ch.ident)

    def _remove(self, ch: Channel) -> None:
        """Both halves closed on this side: free the slot."""
        del self._channels[ch.ident]
        if ch.ready:
            ch.ready = False
            self._ready.remove(ch.ident)
        if ch.ours:
            self._ch_out -= 1
        else:
            self._ch_in -= 1
        self.credit_changed += 1

    def observe_rtt(self, seconds: float) -> None:
        """The driver measured a round trip (a PONG's ``now - sent_at``): the smoothed
        value (:attr:`rtt`) drives window growth."""
        rtt = self.rtt
        self.rtt = seconds if rtt is None else 0.875 * rtt + 0.125 * seconds

    def ping(self, now: float) -> bool:
        """Queue a PING to measure the round trip (none if one is outstanding)."""
        if self._ping_outstanding or self.state != OPEN:
            return False
        self._ping_seq = (self._ping_seq % 0xFFFFFFFF) + 1
        self._ping = (self._ping_seq, int(now * 1e6).to_bytes(8, "big", signed=True))
        self._ping_at = {self._ping_seq: now}
        self._ping_outstanding = True
        return True

    # ------------------------------------------------------------------ timers
    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next run, or ``None``."""
        if self.state >= CLOSED:
            return None
        tick = self._next_tick
        grace = self._grace_at
        if tick is None:
            return grace
        return tick if grace is None or tick < grace else grace

    def handle_timer(self, now: float) -> list[Event]:
        """Run keepalive ticks, refill the control budget, end the grace period.

        Returns:
            events; ``(EV_CLOSED, code, reason, 0)`` means close the connection now.
        """
        events: list[Event] = []
        if self.state >= CLOSED:
            return events
        self._budget = min(
            float(self._burst), self._budget + self._rate * max(0.0, now - self._budget_at)
        )
        self._aborts = min(
            float(self._abort_burst),
            self._aborts + self._abort_rate * max(0.0, now - self._budget_at),
        )
        self._budget_at = now
        if self._grace_at is not None and now >= self._grace_at:
            self.state = CLOSED
            events.append((EV_CLOSED, ErrorCode.NO_ERROR, "the grace period ended", 0))
            return events
        tick = self._next_tick
        if tick is None or now < tick or self._interval is None:
            return events
        self._next_tick = now + self._interval
        if self._heard or self._paused:
            self._heard = False
            self._silent_ticks = 0
            return events
        if self._ping_outstanding:
            self._silent_ticks += 1
            if self._silent_ticks >= self._silent:
                self.state = CLOSED
                events.append(
                    (EV_CLOSED, ErrorCode.NO_ERROR, "the peer did not answer keepalive pings", 0)
                )
            return events
        self._ping_seq = (self._ping_seq % 0xFFFFFFFF) + 1
        self._ping = (self._ping_seq, int(now * 1e6).to_bytes(8, "big", signed=True))
        self._ping_at = {self._ping_seq: now}
        self._ping_outstanding = True
        return events

    # ------------------------------------------------------------------ packing
    def records_to_send(self, max_plaintext: int, max_bytes: int | None = None) -> list[bytes]:
        """Pack what is queued into record plaintexts: control frames first, then messages
        in order (a GOAWAY after the messages queued before it).

        Args:
            max_plaintext: the largest plaintext the peer's records allow.
            max_bytes: stop once this many bytes are packed (the rest stays queued).
        """
        if self.state == ERROR:
            if self._goaway_out is not None and not self._goaway_sent:
                self._goaway_sent = True
                last, code = self._goaway_out
                return [_pack(Kind.GOAWAY, 0, 2, last) + code.to_bytes(2, "big")]
            return []
        if self.state == CLOSED:
            return []
        queue = self._queue
        if (
            len(queue) == 1
            and not self._credit_dirty
            and not self._ready
            and not (self._pong or self._ping or self._cancels or self._sctrl)
        ):
            # The common case of a quiet connection: one whole unary message (or one-way,
            # or error), no control frame.
            kind, ident, prefix, body, offset, flags = queue[0]
            n = len(body)
            if (
                kind < _CONT
                and not offset
                and not prefix
                and n <= max_plaintext - 8
                and n <= 65535
            ):
                queue.popleft()
                if kind == _ONEWAY:
                    self.send_queue_bytes -= n
                else:
                    self._sent(kind, ident, n)
                return [_pack(kind, flags, n, ident) + body]
        out: list[bytes] = []
        parts: list[bytes] = []
        size = 0
        if self._pong or self._ping or self._cancels or self._credit_dirty or self._sctrl:
            for frame in self._control_frames():
                if size + len(frame) > max_plaintext:
                    out.append(b"".join(parts))
                    parts = []
                    size = 0
                parts.append(frame)
                size += len(frame)
        limit = max_bytes if max_bytes is not None else 1 << 62
        produced = 0
        if not self._ready:
            size, produced = self._pack_queue(out, parts, size, 0, max_plaintext, limit)
        if self._ready and produced < limit:
            size, produced = self._interleave(out, parts, size, produced, max_plaintext, limit)
        if parts:
            out.append(b"".join(parts))
        return out

    def _pack_queue(
        self,
        out: list[bytes],
        parts: list[bytes],
        size: int,
        produced: int,
        max_plaintext: int,
        limit: int,
        turn_cap: int = 1 << 62,
        chunk_cap: int = 65535,
    ) -> tuple[int, int]:
        """Pack the message queue (requests, replies, one-ways, opening frames, GOAWAY)
        in order; with streams ready, one turn of at most ``turn_cap`` payload bytes in
        frames of at most ``chunk_cap``. Returns the open record's size and the bytes of
        closed records so far."""
        queue = self._queue
        chunk_max = min(chunk_cap, max_plaintext - 8)
        turn = 0
        while queue and produced < limit and turn < turn_cap:
            item = queue[0]
            kind, ident, prefix, body, offset, cflags = item
            blen = len(body)
            if offset == 0:
                n = len(prefix) + blen
                if n <= chunk_max:
                    if size + 8 + n > max_plaintext:
                        out.append(b"".join(parts))
                        produced += size
                        parts.clear()
                        size = 0
                    if prefix:
                        parts.append(_pack(kind, FLAG_NESTED | cflags, n, ident) + prefix)
                    else:
                        parts.append(_pack(kind, cflags, n, ident))
                    parts.append(body)
                    size += 8 + n
                    turn += n
                    queue.popleft()
                    if kind == _ONEWAY:
                        self.send_queue_bytes -= blen
                    else:
                        self._sent(kind, ident, blen)
                    continue
                # Fragmented: the first frame carries [parent] | u32 total | data (at least
                # 256 bytes of it: a compressed body's 5-byte envelope header whole).
                room = max_plaintext - size - 8 - len(prefix) - 4
                if room < 256:
                    out.append(b"".join(parts))
                    produced += size
                    parts.clear()
                    size = 0
                    room = max_plaintext - 8 - len(prefix) - 4
                room = min(room, chunk_cap - len(prefix) - 4)
                flags = FLAG_MORE | (FLAG_NESTED if prefix else 0) | cflags
                parts.append(
                    _pack(kind, flags, len(prefix) + 4 + room, ident)
                    + prefix
                    + blen.to_bytes(4, "big")
                    + body[:room]
                )
                size += 8 + len(prefix) + 4 + room
                turn += room
                item[4] = room
                continue
            take = min(blen - offset, chunk_max)
            if size + 8 + take > max_plaintext:
                out.append(b"".join(parts))
                produced += size
                parts.clear()
                size = 0
            last = offset + take >= blen
            parts.append(
                _pack(_CONT, 0 if last else FLAG_MORE, take, ident) + body[offset : offset + take]
            )
            size += 8 + take
            turn += take
            if last:
                queue.popleft()
                self._sent(kind, ident, blen)
            else:
                item[4] = offset + take
        return size, produced

    def _interleave(
        self,
        out: list[bytes],
        parts: list[bytes],
        size: int,
        produced: int,
        max_plaintext: int,
        limit: int,
    ) -> tuple[int, int]:
        """Fair scheduling: turns of at most SLICE payload bytes, round-robin between the
        message queue and each stream with data (control frames went first). A stream
        alone (no message queued, no other stream ready) takes what is left of this pack
        in one turn, in frames as large as a record allows: there is nobody to be fair
        to, and larger frames cost less to pack and parse."""
        queue = self._queue
        ready = self._ready
        channels = self._channels
        while produced < limit and (queue or ready):
            if queue:
                size, produced = self._pack_queue(
                    out, parts, size, produced, max_plaintext, limit, SLICE, SLICE
                )
            if ready and produced < limit:
                ch = channels.get(ready.popleft())
                if ch is None or not ch.ready:
                    continue
                ch.ready = False
                cap = SLICE if queue or ready else max(SLICE, limit - produced)
                size, produced = self._pack_channel(
                    ch, out, parts, size, produced, max_plaintext, cap
                )
                if ch.send_buf or ch.send_state == HALF_ENDING:
                    ch.ready = True
                    ready.append(ch.ident)
        return size, produced

    def _pack_channel(
        self,
        ch: Channel,
        out: list[bytes],
        parts: list[bytes],
        size: int,
        produced: int,
        max_plaintext: int,
        cap: int = SLICE,
    ) -> tuple[int, int]:
        """One turn of one stream: DATA frames of at most ``cap`` payload bytes in all (a
        call's message continues with MORE; END rides on the last frame; a compressed
        message's first frame carries its envelope header whole, or waits for the next
        turn)."""
        ident = ch.ident
        buf = ch.send_buf
        turn = 0
        while turn < cap:
            if not buf and ch.send_state != HALF_ENDING:
                break
            remaining = len(buf[0][0]) - buf[0][1] if buf else 0
            room = max_plaintext - size - 8
            if room < 0 or room < min(remaining, 256):
                out.append(b"".join(parts))
                parts.clear()
                produced += size
                size = 0
                room = max_plaintext - 8
            room = min(room, 65535, cap - turn)
            flags = 0
            take = 0
            if not buf:
                pieces: list[bytes] = []
            elif ch.messages:
                item = buf[0]
                data = item[0]
                offset = item[1]
                take = min(remaining, room)
                if not offset:
                    flags = item[2]
                    if flags and take < ENVELOPE_SIZE:
                        break
                if take == remaining:
                    buf.popleft()
                else:
                    item[1] = offset + take
                    flags |= FLAG_MORE
                pieces = [data[offset : offset + take] if take != len(data) else data]
            else:
                pieces = []
                while buf and take < room:
                    item = buf[0]
                    data = item[0]
                    offset = item[1]
                    t = min(len(data) - offset, room - take)
                    pieces.append(data if t == len(data) else data[offset : offset + t])
                    if offset + t == len(data):
                        buf.popleft()
                    else:
                        item[1] = offset + t
                    take += t
            if (
                not buf
                and not flags & FLAG_MORE
                and ch.send_state == HALF_ENDING
                # An empty message on a many-message half is a frame without flags, so
                # END follows alone; a one-message half's empty message is END alone.
                and not (pieces and not take and ch.send_many)
            ):
                flags |= FLAG_END
                ch.send_state = HALF_CLOSED
            parts.append(_pack(_DATA, flags, take, ident))
            parts.extend(pieces)
            size += 8 + take
            turn += take
            self.send_queue_bytes -= take
            if ch.send_state == HALF_CLOSED:
                if ch.recv_state == HALF_CLOSED:
                    self._remove(ch)
                break
        return size, produced

    def _sent(self, kind: int, ident: int, blen: int) -> None:
        """A message's last frame is packed."""
        self.send_queue_bytes -= blen
        if kind == _REQUEST:
            entry = self._out.get(ident)
            if entry is not None:
                entry[3] = 1
        elif kind == Kind.GOAWAY:
            self._goaway_sent = True
        elif kind in (_REPLY, _ERROR):
            entry = self._in.pop(ident, None)
            if entry is not None:
                parent = entry[0]
                if parent:
                    p = self._out.get(parent)
                    if p is not None:
                        p[2] -= 1
                else:
                    self._in_plain -= 1
            elif kind == _ERROR:
                ch = self._channels.get(ident)
                if ch is not None:  # a streaming call's ERROR ends both halves
                    ch.send_state = ch.recv_state = HALF_CLOSED
                    ch.reset_out = ch.stop_out = None
                    self._remove(ch)
        elif kind in (_STREAM, _CALL):
            ch = self._channels.get(ident)
            if ch is not None:
                ch.wire_open = True
                if ch.send_buf or ch.send_state == HALF_ENDING:
                    self._mark_ready(ch)
                if ch.reset_out is not None or ch.stop_out is not None or ch.blocked_out:
                    self._sctrl[ident] = None

    def _control_frames(self) -> list[bytes]:
        frames: list[bytes] = []
        if self._pong is not None:
            ident, payload = self._pong
            frames.append(_pack(Kind.PONG, 0, len(payload), ident) + payload)
            self._pong = None
        if self._credit_dirty:
            self._credit_dirty = False
            if self._w_pending != self._w_limit_in:
                self._w_limit_in = self._w_pending
                frames.append(
                    _pack(Kind.CREDIT, 0, 8, CreditLimit.REQUEST_WINDOW)
                    + self._w_pending.to_bytes(8, "big")
                )
            if self._r_pending != self._r_limit_in:
                self._r_limit_in = self._r_pending
                frames.append(
                    _pack(Kind.CREDIT, 0, 8, CreditLimit.REPLY_WINDOW)
                    + self._r_pending.to_bytes(8, "big")
                )
        for call_id in self._cancels:
            frames.append(_pack(Kind.CANCEL, 0, 0, call_id))
        self._cancels.clear()
        if self._sctrl:
            self._stream_control_frames(frames)
        if self._ping is not None:
            ident, payload = self._ping
            frames.append(_pack(Kind.PING, 0, len(payload), ident) + payload)
            self._ping = None
        return frames

    def _stream_control_frames(self, frames: list[bytes]) -> None:
        """RESET, STOP, WINDOW and BLOCKED due on channels (one of each at most; the
        latest WINDOW value wins), and the connection's data window (key 0)."""
        deferred: dict[int, None] = {}
        for ident in self._sctrl:
            if ident == 0:
                if self._d_blocked_out:
                    self._d_blocked_out = False
                    if self._d_blocked_at == self._d_limit_out:
                        frames.append(
                            _pack(Kind.BLOCKED, 0, 8, 0) + self._d_limit_out.to_bytes(8, "big")
                        )
                new = self._d_read + self._d_window
                if new > self._d_limit_in and update_due(
                    self._d_window, self._d_limit_in, self._d_read, self._d_blocked
                ):
                    self._d_limit_in = new
                    self._d_blocked = False
                    frames.append(
                        _pack(Kind.CREDIT, 0, 8, CreditLimit.DATA_WINDOW) + new.to_bytes(8, "big")
                    )
                continue
            ch = self._channels.get(ident)
            if ch is None:
                continue
            if not ch.wire_open:  # its opening frame is still queued: wait for it
                deferred[ident] = None
                continue
            if ch.stop_out is not None:
                frames.append(_pack(Kind.STOP, 0, 2, ident) + ch.stop_out.to_bytes(2, "big"))
                ch.stop_out = None
            if ch.r_dirty:
                ch.r_dirty = False
                new = ch.r_read + ch.r_window
                if new > ch.r_limit and ch.recv_state == HALF_OPEN and not ch.stopping:
                    ch.r_limit = new
                    ch.r_blocked = False
                    frames.append(_pack(Kind.WINDOW, 0, 8, ident) + new.to_bytes(8, "big"))
            if ch.blocked_out:
                ch.blocked_out = False
                if ch.blocked_at == ch.s_limit and ch.send_state == HALF_OPEN:
                    frames.append(_pack(Kind.BLOCKED, 0, 8, ident) + ch.s_limit.to_bytes(8, "big"))
            if ch.reset_out is not None:
                frames.append(_pack(Kind.RESET, 0, 2, ident) + ch.reset_out.to_bytes(2, "big"))
                ch.reset_out = None
                ch.send_state = HALF_CLOSED
                if ch.recv_state == HALF_CLOSED:
                    self._remove(ch)
        self._sctrl = deferred

    # ------------------------------------------------------------------ parsing
    def receive_records(self, plaintexts: list[bytes]) -> list[Event]:
        """Parse record plaintexts into events, in order.

        Raises:
            RemoteProtocolError: the peer broke the protocol (once; the session is then in
                ERROR and returns nothing more).
        """
        events: list[Event] = []
        if self.state >= CLOSED or not plaintexts:
            return events
        self._heard = True
        append = events.append
        unpack = _unpack
        own_m = self._own_m
        try:
            for pt in plaintexts:
                end = len(pt)
                if end == 0:
                    raise _violation(ErrorCode.FRAME_SIZE, "an empty record")
                off = 0
                while off < end:
                    if end - off < 8:
                        raise _violation(ErrorCode.FRAME_SIZE, "a frame header crosses a record")
                    kind, flags, length, ident = unpack(pt, off)
                    start = off + 8
                    off = start + length
                    if off > end:
                        raise _violation(
                            ErrorCode.FRAME_SIZE, f"a frame of {length} bytes crosses its record"
                        )
                    if flags == 0 and length <= own_m and kind == _ONEWAY:
                        if ident:
                            raise _violation(ErrorCode.PROTOCOL, "a one-way frame with an id")
                        cost = length + MESSAGE_COST
                        if self._w_recv + cost > self._w_limit_in:
                            raise _violation(
                                ErrorCode.FLOW_CONTROL, "a one-way message beyond the window"
                            )
                        self._w_recv += cost
                        append((EV_ONEWAY, 0, pt[start:off], 0))
                    elif flags == 0 and length <= own_m and kind == _REPLY:
                        self._on_terminal(ident, _REPLY, pt[start:off], events)
                    elif flags == 0 and length <= own_m and kind == _REQUEST:
                        if self._open_in(ident, 0, length + MESSAGE_COST):
                            self._in_held[ident] = length + MESSAGE_COST
                            append((EV_REQUEST, ident, pt[start:off], 0))
                    else:
                        self._frame(kind, flags, length, ident, pt, start, off, events)
        except _Violation as exc:
            self._fail(exc.code)
            raise RemoteProtocolError(
                f"{exc} ({ErrorCode(exc.code).name}); the connection was closed"
            ) from None
        return events

    def _fail(self, code: ErrorCode) -> None:
        self.state = ERROR
        self.error_code = int(code)
        self._goaway_out = (self._last_accepted, int(code))
        self._goaway_sent = False

    def _charge(self, what: str) -> None:
        self._budget -= 1
        if self._budget < 0:
            raise _violation(ErrorCode.ENHANCE_YOUR_CALM, f"control-frame flood ({what})")

    def _open_in(self, ident: int, parent: int, cost: int) -> bool:
        """A REQUEST's first frame: check id, window, slot; return False if dropped."""
        if ident & 1 != self._peer_parity or ident == 0:
            raise _violation(ErrorCode.PROTOCOL, f"request id {ident} has the wrong parity")
        if ident <= self.highest_in:
            raise _violation(ErrorCode.PROTOCOL, f"request id {ident} was already used")
        self.highest_in = ident
        if self._w_recv + cost > self._w_limit_in:
            raise _violation(ErrorCode.FLOW_CONTROL, f"request {ident} beyond the window")
        self._w_recv += cost
        if parent:
            p = self._out.get(parent)
            if p is None:
                raise _violation(ErrorCode.PROTOCOL, f"nested call {ident} names no open call")
            if p[2] >= self._own_k:
                raise _violation(
                    ErrorCode.FLOW_CONTROL, f"nested call {ident} beyond the allowance"
                )
            p[2] += 1
        elif self._goaway_out is not None:
            # After our GOAWAY: not accepted, not answered; the bytes are credited back.
            self._w_pending += cost
            self._credit_dirty = True
            return False
        else:
            if self._in_plain >= self._own_s:
                raise _violation(ErrorCode.FLOW_CONTROL, f"request {ident} beyond max_calls")
            self._in_plain += 1
            self._last_accepted = ident
        self._in[ident] = [parent, 0, 0, 0]
        return True

    def _on_terminal(self, ident: int, kind: int, body: bytes, events: list[Event]) -> None:
        """A complete REPLY or ERROR (after its W_r check is done here)."""
        cost = len(body) + MESSAGE_COST
        self._check_terminal_id(ident, cost)
        entry = self._out.pop(ident, None)
        if entry is None:
            if ident in self._channels:
                raise _violation(ErrorCode.PROTOCOL, f"a unary answer on stream {ident}")
            # A stale id (its call ended): credit back, charge the budget.
            self._r_pending += cost
            self._credit_dirty = True
            self._charge("answer to a closed call")
            return
        if not entry[3]:
            raise _violation(ErrorCode.PROTOCOL, f"call {ident} answered before it was sent")
        self._end_out(entry)
        if entry[1] or kind == _ERROR:
            self._r_pending += cost
            self._credit_dirty = True
            if entry[1]:
                return
            if len(body) < 2:
                raise _violation(ErrorCode.FRAME_SIZE, "an ERROR frame without a code")
            code = int.from_bytes(body[:2], "big")
            events.append((EV_ERROR, ident, code, body[2:].decode("utf-8", errors="replace")))
            return
        self._r_held[ident] = cost
        events.append((EV_REPLY, ident, body, 0))

    def _check_terminal_id(self, ident: int, cost: int) -> None:
        if ident & 1 == self._peer_parity or ident > self.highest_out:
            raise _violation(ErrorCode.PROTOCOL, f"an answer for call {ident}, never opened")
        if self._r_recv + cost > self._r_limit_in:
            raise _violation(ErrorCode.FLOW_CONTROL, f"the answer to {ident} beyond the window")
        self._r_recv += cost

    def _frame(
        self,
        kind: int,
        flags: int,
        length: int,
        ident: int,
        pt: bytes,
        start: int,
        end: int,
        events: list[Event],
    ) -> None:
        """Every frame but the unfragmented ONEWAY/REQUEST/REPLY fast paths."""
        if kind >= _FIRST_CONTROL:
            if kind >= 0x40:
                if kind >= 0x80:
                    raise _violation(ErrorCode.PROTOCOL, f"reserved frame kind {kind}")
                self._charge("unknown extension frame")
                return
            self._control(kind, flags, length, ident, pt[start:end], events)
            return
        if kind == _CONT:
            self._continuation(flags, length, ident, pt, start, end, events)
            return
        if kind == _DATA:
            self._data_in(flags, length, ident, pt, start, end, events)
            return
        if kind in (_STREAM, _CALL):
            self._channel_in(kind, flags, length, ident, pt[start:end], events)
            return
        if kind == _ERROR and ident in self._channels:
            self._channel_error_in(flags, ident, pt[start:end], events)
            return
        if kind not in (_ONEWAY, _REQUEST, _REPLY, _ERROR):
            raise _violation(ErrorCode.PROTOCOL, f"unknown frame kind {kind}")
        allowed = FLAG_MORE | (FLAG_NESTED if kind == _REQUEST else 0) | self._cflag
        if kind == _ERROR:
            allowed = 0
        if flags & ~allowed:
            raise _violation(ErrorCode.PROTOCOL, f"flags {flags:#x} not allowed on kind {kind}")
        pos = start
        parent = 0
        if flags & FLAG_NESTED:
            if end - pos < 4:
                raise _violation(ErrorCode.FRAME_SIZE, "a nested request without its parent")
            parent = int.from_bytes(pt[pos : pos + 4], "big")
            pos += 4
            if parent == 0:
                raise _violation(ErrorCode.PROTOCOL, "a nested request with parent 0")
        if kind == _ONEWAY and ident:
            raise _violation(ErrorCode.PROTOCOL, "a one-way frame with an id")
        if not flags & FLAG_MORE:
            size = end - pos
            if size > self._own_m:
                raise _violation(ErrorCode.FRAME_SIZE, f"a message of {size} bytes exceeds M")
            if kind == _ERROR and size > MAX_ERROR_TEXT + 2:
                raise _violation(ErrorCode.FRAME_SIZE, "an ERROR frame over 1,000 bytes")
            if flags & FLAG_COMPRESSED:
                # Charged by its size once decompressed, before it is decompressed.
                body = pt[pos:end]
                cost = self._envelope(body, self._own_m, size) + MESSAGE_COST
                drop = self._admit(kind, ident, parent, cost)
                if not drop:
                    body = self._inflate(body, self._own_m)
                self._complete(kind, ident, parent, body, cost, drop, events, True)
                return
            self._complete(kind, ident, parent, pt[pos:end], size + MESSAGE_COST, False, events)
            return
        # First frame of a fragmented message: total length, then data.
        if end - pos < 5:
            raise _violation(ErrorCode.FRAME_SIZE, "a first fragment without total or data")
        total = int.from_bytes(pt[pos : pos + 4], "big")
        pos += 4
        if ident in self._partial or (kind == _ONEWAY and 0 in self._partial):
            raise _violation(ErrorCode.PROTOCOL, f"a second message for id {ident} started")
        if total > self._own_m:
            raise _violation(ErrorCode.FRAME_SIZE, f"a message of {total} bytes exceeds M")
        if end - pos >= total:
            raise _violation(ErrorCode.PROTOCOL, "a fragmented message's first frame is all of it")
        compressed = flags & FLAG_COMPRESSED
        if compressed:
            cost = self._envelope(pt[pos : pos + ENVELOPE_SIZE], self._own_m, total)
            cost += MESSAGE_COST
        else:
            cost = total + MESSAGE_COST
        drop = self._admit(kind, ident, parent, cost)
        buffer = bytearray(pt[pos:end])
        self._partial[ident] = [kind, parent, total, cost, drop, buffer, compressed]

    def _admit(self, kind: int, ident: int, parent: int, cost: int) -> bool:
        """Charge a message's first frame (ONEWAY, REQUEST, REPLY) to its window;
        ``True``: the message is dropped when complete (not delivered)."""
        if kind == _ONEWAY:
            if self._w_recv + cost > self._w_limit_in:
                raise _violation(ErrorCode.FLOW_CONTROL, "a one-way message beyond the window")
            self._w_recv += cost
            return False
        if kind == _REQUEST:
            return not self._open_in(ident, parent, cost)
        self._check_terminal_id(ident, cost)
        drop = ident not in self._out
        if drop:
            if ident in self._channels:
                raise _violation(ErrorCode.PROTOCOL, f"a unary answer on stream {ident}")
            self._charge("answer to a closed call")
        return drop

    def _envelope(self, head: bytes, max_size: int, wire_size: int) -> int:
        """A compressed body's size once decompressed, from its envelope header."""
        try:
            return read_envelope(
                head, accepted=self._accepted, max_size=max_size, wire_size=wire_size
            )[1]
        except CompressionError as exc:
            raise _compression_violation(exc) from None

    def _inflate(self, payload: bytes, max_size: int) -> bytes:
        """A complete compressed body, decompressed (exactly its declared size)."""
        try:
            return decompress_body(payload, accepted=self._accepted, max_size=max_size)
        except CompressionError as exc:
            raise _compression_violation(exc) from None

    def _continuation(
        self,
        flags: int,
        length: int,
        ident: int,
        pt: bytes,
        start: int,
        end: int,
        events: list[Event],
    ) -> None:
        partial = self._partial.get(ident)
        if partial is None:
            raise _violation(ErrorCode.PROTOCOL, f"a continuation for id {ident} with no message")
        if flags & ~FLAG_MORE:
            raise _violation(ErrorCode.PROTOCOL, f"flags {flags:#x} not allowed on CONTINUATION")
        kind, parent, total, cost, drop, buffer, compressed = partial
        if length == 0 and flags & FLAG_MORE:
            raise _violation(ErrorCode.PROTOCOL, "an empty fragment flagged MORE")
        if len(buffer) + length > total:
            raise _violation(ErrorCode.FRAME_SIZE, f"message {ident} exceeds its announced total")
        buffer += pt[start:end]
        if flags & FLAG_MORE:
            if len(buffer) == total:
                raise _violation(ErrorCode.PROTOCOL, f"message {ident} full but flagged MORE")
            return
        if len(buffer) != total:
            raise _violation(ErrorCode.FRAME_SIZE, f"message {ident} ended short of its total")
        del self._partial[ident]
        body = bytes(buffer)
        if compressed and not drop:
            body = self._inflate(body, self._own_m)
        self._complete(kind, ident, parent, body, cost, drop, events, True)

    def _complete(
        self,
        kind: int,
        ident: int,
        parent: int,
        body: bytes,
        cost: int,
        drop: bool,
        events: list[Event],
        opened: bool = False,
    ) -> None:
        if kind == _ONEWAY:
            if not opened:
                if self._w_recv + cost > self._w_limit_in:
                    raise _violation(ErrorCode.FLOW_CONTROL, "a one-way message beyond the window")
                self._w_recv += cost
            events.append((EV_ONEWAY, 0, body, 0))
        elif kind == _REQUEST:
            if not opened:
                drop = not self._open_in(ident, parent, cost)
            if drop:
                return
            entry = self._in[ident]
            if entry[1]:
                # Cancelled while it arrived: credit back, answer CANCELLED ourselves.
                self._w_pending += cost
                self._credit_dirty = True
                entry[3] = 1
                self._queue_terminal(ident, _ERROR, int(ErrorCode.CANCELLED).to_bytes(2, "big"))
                return
            self._in_held[ident] = cost
            events.append((EV_REQUEST, ident, body, parent))
        elif opened:
            if drop:
                self._r_pending += cost
                self._credit_dirty = True
                return
            # W_r was checked at the first frame; finish as _on_terminal does.
            self._r_recv -= cost
            self._on_terminal(ident, kind, body, events)
        else:
            self._on_terminal(ident, kind, body, events)

    def _control(
        self, kind: int, flags: int, length: int, ident: int, payload: bytes, events: list[Event]
    ) -> None:
        if flags:
            raise _violation(ErrorCode.PROTOCOL, f"flags {flags:#x} on control kind {kind}")
        if length > MAX_CONTROL_PAYLOAD:
            raise _violation(ErrorCode.FRAME_SIZE, f"a control frame of {length} bytes")
        if kind == Kind.CREDIT:
            if length != 8:
                raise _violation(ErrorCode.FRAME_SIZE, "a CREDIT frame not of 8 bytes")
            value = int.from_bytes(payload, "big")
            if ident == CreditLimit.REQUEST_WINDOW:
                current = self._w_limit_out
            elif ident == CreditLimit.REPLY_WINDOW:
                current = self._r_limit_out
            elif ident == CreditLimit.CALLS:
                current = self._peer_s
            elif ident == CreditLimit.STREAMS:
                current = self._peer_ms
            elif ident == CreditLimit.DATA_WINDOW:
                current = self._d_limit_out
            else:
                raise _violation(ErrorCode.PROTOCOL, f"CREDIT for unknown limit {ident}")
            if value < current:
                raise _violation(ErrorCode.FLOW_CONTROL, "a CREDIT frame lowered a limit")
            if value == current:
                self._charge("CREDIT that grants nothing")
                return
            if ident == CreditLimit.REQUEST_WINDOW:
                self._w_limit_out = value
            elif ident == CreditLimit.REPLY_WINDOW:
                self._r_limit_out = value
                self._unblock_replies()
            elif ident == CreditLimit.CALLS:
                self._peer_s = min(value, 2**31)
            elif ident == CreditLimit.STREAMS:
                if not self._peer_ms:
                    raise _violation(ErrorCode.PROTOCOL, "CREDIT for streams, never enabled")
                self._peer_ms = min(value, 2**31)
            else:
                self._d_limit_out = value
                events.append((EV_CALL_CREDIT, 0, value - self._d_used_out, 0))
            self.credit_changed += 1
        elif kind == Kind.CANCEL:
            if length:
                raise _violation(ErrorCode.FRAME_SIZE, "a CANCEL frame with a payload")
            if ident & 1 != self._peer_parity or ident == 0 or ident > self.highest_in:
                raise _violation(ErrorCode.PROTOCOL, f"CANCEL of call {ident}, never opened")
            entry = self._in.get(ident)
            if entry is None and ident in self._channels:
                raise _violation(ErrorCode.PROTOCOL, f"CANCEL of stream {ident}: use RESET, STOP")
            if entry is None or entry[1] or entry[3]:
                self._charge("CANCEL of a closed call")
                return
            entry[1] = 1
            if ident not in self._partial:
                events.append((EV_CANCEL, ident, 0, 0))
        elif Kind.RESET <= kind <= Kind.BLOCKED:
            self._channel_control(kind, length, ident, payload, events)
        elif kind == Kind.PING:
            self._charge("PING")
            self._pong = (ident, payload)
        elif kind == Kind.PONG:
            sent = self._ping_at.pop(ident, None)
            if sent is None:
                self._charge("unsolicited PONG")
                return
            self._ping_outstanding = False
            self._silent_ticks = 0
            events.append((EV_PONG, ident, sent, 0))
        elif kind == Kind.GOAWAY:
            if length != 2:
                raise _violation(ErrorCode.FRAME_SIZE, "a GOAWAY frame not of 2 bytes")
            if ident and (
                ident & 1 != self._own_parity_of_peer_calls() or ident > self.highest_out
            ):
                raise _violation(ErrorCode.PROTOCOL, f"GOAWAY names call {ident}, never opened")
            if self._goaway_in is not None:
                self._charge("second GOAWAY")
                if ident > self._goaway_in[0]:
                    raise _violation(ErrorCode.PROTOCOL, "a second GOAWAY raised the last id")
                return
            code = int.from_bytes(payload, "big")
            self._goaway_in = (ident, code)
            failed = self._fail_above(ident)
            if self._goaway_out is None:
                self.start_close()
            self.state = CLOSING
            self.credit_changed += 1
            events.append((EV_GOAWAY, ident, code, failed))
        else:
            raise _violation(ErrorCode.PROTOCOL, f"unknown frame kind {kind}")

    def _fail_channels_above(self, last: int) -> tuple[int, ...]:
        """Our streams above a GOAWAY's id were never accepted: fail them (safe to retry),
        withdraw their opening frames, free their slots and data credit."""
        gone = [ch for i, ch in self._channels.items() if ch.ours and i > last]
        if not gone:
            return ()
        ids = {ch.ident for ch in gone}
        self._queue = deque(
            item for item in self._queue if not (item[0] in (_STREAM, _CALL) and item[1] in ids)
        )
        for ch in gone:
            self._discard_unsent(ch)
            ch.send_state = ch.recv_state = HALF_CLOSED
            self._remove(ch)
        return tuple(sorted(ids))

    # ------------------------------------------------------------------ stream parsing
    def _known_id(self, ident: int) -> bool:
        """Whether ``ident`` was ever opened (by either side)."""
        if ident == 0:
            return False
        if ident & 1 == self._peer_parity:
            return ident <= self.highest_in
        return ident <= self.highest_out

    def _named(self, ident: int, what: str) -> Channel | None:
        """The channel a frame names; None (charged) if it was closed; an error if never
        opened (or ours with its opening frame not yet sent)."""
        ch = self._channels.get(ident)
        if ch is not None:
            if ch.ours and not ch.wire_open:
                raise _violation(ErrorCode.PROTOCOL, f"{what} names stream {ident}, never opened")
            return ch
        if not self._known_id(ident):
            raise _violation(ErrorCode.PROTOCOL, f"{what} names stream {ident}, never opened")
        self._charge(f"{what} for a closed stream")
        return None

    def _channel_in(
        self, kind: int, flags: int, length: int, ident: int, payload: bytes, events: list[Event]
    ) -> None:
        """A STREAM or CALL frame: the peer opens a stream or a streaming call."""
        if flags:
            raise _violation(ErrorCode.PROTOCOL, f"flags {flags:#x} not allowed on kind {kind}")
        if kind == _STREAM:
            if length:
                raise _violation(ErrorCode.FRAME_SIZE, "a STREAM frame with a payload")
            shape = SHAPE_STREAM
        else:
            if length != 1:
                raise _violation(ErrorCode.FRAME_SIZE, "a CALL frame whose payload is not 1 byte")
            shape = payload[0]
            if shape not in (1, 2, SHAPE_BIDIRECTIONAL):
                raise _violation(ErrorCode.PROTOCOL, f"a CALL of unknown shape {shape}")
        if ident & 1 != self._peer_parity or ident == 0:
            raise _violation(ErrorCode.PROTOCOL, f"stream id {ident} has the wrong parity")
        if ident <= self.highest_in:
            raise _violation(ErrorCode.PROTOCOL, f"stream id {ident} was already used")
        self.highest_in = ident
        if not self._own_ms:
            raise _violation(ErrorCode.PROTOCOL, f"stream {ident} opened; streams are not enabled")
        if self._goaway_out is not None:
            return  # after our GOAWAY: not accepted; its data is discarded as a closed id's
        if self._ch_in >= self._own_ms:
            raise _violation(ErrorCode.FLOW_CONTROL, f"stream {ident} beyond max_streams")
        self._ch_in += 1
        self._last_accepted = ident
        self._channels[ident] = Channel(
            ident, ours=False, shape=shape, send_limit=self._peer_sw, recv_window=self._own_sw
        )
        events.append((EV_STREAM_OPENED, ident, shape, 0))

    def _data_in(
        self,
        flags: int,
        length: int,
        ident: int,
        pt: bytes,
        start: int,
        end: int,
        events: list[Event],
    ) -> None:
        if flags & ~(FLAG_MORE | FLAG_END | self._cflag):
            raise _violation(ErrorCode.PROTOCOL, f"flags {flags:#x} not allowed on DATA")
        # The connection-level window: checked, then returned at once (the data enters
        # its stream's buffer, bounded by the stream's own window).
        if self._d_recv + length > self._d_limit_in:
            raise _violation(ErrorCode.FLOW_CONTROL, "DATA beyond the connection data window")
        if length:
            self._d_recv += length
            self._d_read += length
            if 0 not in self._sctrl and update_due(
                self._d_window, self._d_limit_in, self._d_read, self._d_blocked
            ):
                self._sctrl[0] = None
        ch = self._channels.get(ident)
        if ch is None:
            if not self._known_id(ident):
                raise _violation(ErrorCode.PROTOCOL, f"DATA for stream {ident}, never opened")
            if not length:
                self._charge("empty DATA for a closed stream")
            return  # crossed a RESET, STOP or ERROR on the wire: discarded
        if ch.ours and not ch.wire_open:
            raise _violation(ErrorCode.PROTOCOL, f"DATA for stream {ident}, never opened")
        if ch.recv_state == HALF_CLOSED:
            raise _violation(ErrorCode.PROTOCOL, f"DATA on stream {ident} after its END or RESET")
        more = flags & FLAG_MORE
        ending = flags & FLAG_END
        if more and ending:
            raise _violation(ErrorCode.PROTOCOL, "END on a DATA frame flagged MORE")
        if flags & FLAG_COMPRESSED and not ch.messages:
            raise _violation(ErrorCode.PROTOCOL, f"a compressed DATA frame on byte stream {ident}")
        if ch.stopping:
            pass  # we sent STOP: discard until the peer's RESET (or an END that crossed it)
        elif not ch.messages:
            if more:
                raise _violation(ErrorCode.PROTOCOL, f"MORE on byte stream {ident}")
            if length:
                if ch.r_recv + length > ch.r_limit:
                    raise _violation(ErrorCode.FLOW_CONTROL, f"stream {ident} beyond its window")
                ch.r_recv += length
                events.append((EV_DATA, ident, pt[start:end], 0))
            elif not ending:
                self._charge("empty DATA")
        else:
            self._message_in(ch, flags, length, pt, start, end, events)
        if ending:
            if not ch.stopping:
                events.append((EV_END, ident, 0, 0))
            self._recv_closed(ch)

    def _message_in(
        self,
        ch: Channel,
        flags: int,
        length: int,
        pt: bytes,
        start: int,
        end: int,
        events: list[Event],
    ) -> None:
        """A DATA frame of a streaming call: a message, or part of one."""
        ident = ch.ident
        message = ch.r_message
        more = flags & FLAG_MORE
        ending = flags & FLAG_END
        if message is None and not flags & (FLAG_MORE | FLAG_COMPRESSED) and not length and ending:
            # END alone: no message; on a one-message half before its message, the
            # message is empty.
            if not ch.recv_many and not ch.r_messages:
                if ch.r_recv + MESSAGE_COST > ch.r_limit:
                    raise _violation(ErrorCode.FLOW_CONTROL, f"call {ident} beyond its window")
                ch.r_recv += MESSAGE_COST
                ch.r_messages = 1
                events.append((EV_MESSAGE, ident, b"", MESSAGE_COST))
            return
        if message is None:
            if not ch.recv_many and ch.r_messages:
                raise _violation(
                    ErrorCode.PROTOCOL, f"a second message on one-message call {ident}"
                )
            message = bytearray()
            # Compressed: the bytes so far must stay shorter than the size it declares.
            ch.r_size = (
                self._envelope(pt[start : start + ENVELOPE_SIZE], self._call_max_in, length)
                if flags & FLAG_COMPRESSED
                else 0
            )
        elif flags & FLAG_COMPRESSED:
            raise _violation(ErrorCode.PROTOCOL, f"COMPRESSED on a later frame of call {ident}")
        if more and not length:
            raise _violation(ErrorCode.PROTOCOL, "an empty DATA frame flagged MORE")
        size = ch.r_size
        if more:
            cost = length
        elif size:
            # The frame that ends a compressed message brings the rest of its cost: its
            # size once decompressed + 64, less the bytes charged as they came.
            cost = size + MESSAGE_COST - len(message)
        else:
            cost = length + MESSAGE_COST
        if ch.r_recv + cost > ch.r_limit:
            raise _violation(ErrorCode.FLOW_CONTROL, f"call {ident} beyond its window")
        ch.r_recv += cost
        message += pt[start:end]
        if len(message) > self._call_max_in:
            raise _violation(ErrorCode.FRAME_SIZE, f"a message on call {ident} over its maximum")
        if size and len(message) >= size:
            raise _violation(
                ErrorCode.PROTOCOL, f"a compressed message on call {ident} is not smaller"
            )
        if more:
            ch.r_message = message
            return
        ch.r_message = None
        ch.r_messages += 1
        if not ch.recv_many and not ending:
            raise _violation(
                ErrorCode.PROTOCOL, f"one-message call {ident}: its message lacks END"
            )
        body = self._inflate(bytes(message), self._call_max_in) if size else bytes(message)
        events.append((EV_MESSAGE, ident, body, len(body) + MESSAGE_COST))

    def _recv_closed(self, ch: Channel) -> None:
        ch.recv_state = HALF_CLOSED
        ch.stopping = False
        ch.r_message = None
        if ch.send_state == HALF_CLOSED:
            self._remove(ch)

    def _abort_guard(self, ch: Channel) -> None:
        """Rapid Reset: streams the peer opens and then aborts draw on their own bucket."""
        if not ch.ours and not ch.aborted:
            ch.aborted = True
            self._aborts -= 1
            if self._aborts < 0:
                raise _violation(
                    ErrorCode.ENHANCE_YOUR_CALM, "streams opened and aborted too fast"
                )

    def _channel_control(
        self, kind: int, length: int, ident: int, payload: bytes, events: list[Event]
    ) -> None:
        """RESET, STOP, WINDOW, BLOCKED."""
        if kind == Kind.RESET or kind == Kind.STOP:
            if length != 2:
                raise _violation(ErrorCode.FRAME_SIZE, f"a {Kind(kind).name} frame not of 2 bytes")
            code = int.from_bytes(payload, "big")
            ch = self._named(ident, Kind(kind).name)
            if ch is None:
                return
            if kind == Kind.RESET:
                if ch.recv_state == HALF_CLOSED:
                    raise _violation(ErrorCode.PROTOCOL, f"RESET of stream {ident} after its end")
                self._abort_guard(ch)
                if not ch.stopping:
                    events.append((EV_RESET, ident, code, 0))
                self._recv_closed(ch)
                return
            if ch.stop_in:
                self._charge("a second STOP")
                return
            ch.stop_in = True
            self._abort_guard(ch)
            if ch.send_state in (HALF_OPEN, HALF_ENDING):
                self._discard_unsent(ch)
                ch.send_state = HALF_RESETTING
                ch.reset_out = code
                self._sctrl[ident] = None
            events.append((EV_STOP, ident, code, 0))
            return
        if length != 8:
            raise _violation(ErrorCode.FRAME_SIZE, f"a {Kind(kind).name} frame not of 8 bytes")
        value = int.from_bytes(payload, "big")
        if kind == Kind.BLOCKED and ident == 0:
            if value == self._d_limit_in and not self._d_blocked:
                self._d_blocked = True
                if update_due(self._d_window, self._d_limit_in, self._d_read, True):
                    self._sctrl[0] = None
            else:
                self._charge("BLOCKED that is stale or repeated")
            return
        ch = self._named(ident, Kind(kind).name)
        if ch is None:
            return
        if kind == Kind.WINDOW:
            if value < ch.s_limit:
                raise _violation(
                    ErrorCode.FLOW_CONTROL, f"a WINDOW lowered stream {ident}'s limit"
                )
            if value == ch.s_limit:
                self._charge("WINDOW that grants nothing")
                return
            ch.s_limit = value
            self.credit_changed += 1
            events.append((EV_CALL_CREDIT, ident, value - ch.s_used, 0))
            return
        if (
            value == ch.r_limit
            and not ch.r_blocked
            and ch.recv_state == HALF_OPEN
            and not ch.stopping
        ):
            ch.r_blocked = True
            if update_due(ch.r_window, ch.r_limit, ch.r_read, True):
                ch.r_dirty = True
                self._sctrl[ident] = None
        else:
            self._charge("BLOCKED that is stale or repeated")

    def _channel_error_in(self, flags: int, ident: int, body: bytes, events: list[Event]) -> None:
        """The acceptor's ERROR on one of our streaming calls: terminal both ways."""
        ch = self._channels[ident]
        if flags:
            raise _violation(ErrorCode.PROTOCOL, f"flags {flags:#x} not allowed on kind 4")
        if not ch.ours or not ch.messages or not ch.wire_open:
            raise _violation(ErrorCode.PROTOCOL, f"ERROR on {ident}, not a call of ours")
        if not 2 <= len(body) <= MAX_ERROR_TEXT + 2:
            raise _violation(ErrorCode.FRAME_SIZE, "an ERROR frame without a code or over 1,000")
        self._discard_unsent(ch)
        ch.send_state = ch.recv_state = HALF_CLOSED
        ch.reset_out = ch.stop_out = None
        self._remove(ch)
        code = int.from_bytes(body[:2], "big")
        events.append((EV_ERROR, ident, code, body[2:].decode("utf-8", errors="replace")))

    def _own_parity_of_peer_calls(self) -> int:
        # GOAWAY names one of OUR calls (the last the peer accepted): our parity.
        return 1 - self._peer_parity

    def _fail_above(self, last: int) -> tuple[int, ...]:
        gone = [i for i, e in self._out.items() if i > last and not e[0]]
        failed = tuple(i for i in gone if not self._out[i][1])
        if self._channels:
            failed += self._fail_channels_above(last)
        if not gone:
            return failed
        keep: deque[list[Any]] = deque()
        for item in self._queue:
            if item[0] == _REQUEST and item[1] in gone and item[4] == 0:
                self._w_used_out -= _item_cost(item)
                self.send_queue_bytes -= len(item[3])
            else:
                keep.append(item)
        self._queue = keep
        for i in gone:
            self._end_out(self._out.pop(i))
        return failed
