"""The monte-v1 session: Go monte's wire behind the driver surface of :class:`Session`.

Go monte has no credit, no control lane, no fragments and no goaway, so this is a thin
router by id parity over :class:`~monte_trio._proto._frames.MonteV1Codec`; the events and
states are the native session's (:mod:`monte_trio._proto._session`).
"""

from __future__ import annotations

from typing import Final

from .._exceptions import LocalProtocolError, RemoteProtocolError
from ._frames import FrameKind, MonteV1Codec
from ._session import CLOSED, ERROR, EV_ONEWAY, EV_REPLY, EV_REQUEST, OPEN, Event

__all__ = ["MonteV1Session"]


class MonteV1Session:
    """Go monte's wire (``u32 seq | payload`` per record) behind the same driver surface.

    No credit, no control lane, no fragments, no goaway: ``send_request`` always returns an
    id, a cancelled call is forgotten at once, graceful close is "flush, then close". The
    driver keeps its handler cap (its reader pauses there; call :meth:`reader_paused`).

    Args:
        initiator: whether this side dialed (odd ids) or accepted (even ids).
        max_record_size: the largest record either side accepts.
    """

    __slots__ = ("_codec", "_next_id", "_out", "_queue", "closing", "send_queue_bytes", "state")

    closing: bool
    send_queue_bytes: int
    state: int

    def __init__(self, *, initiator: bool, max_record_size: int) -> None:
        self._codec = MonteV1Codec(initiator=initiator, max_record_size=max_record_size)
        self._next_id = 1 if initiator else 2
        self._out: set[int] = set()
        self._queue: list[bytes] = []
        self.send_queue_bytes = 0
        self.state = OPEN
        self.closing = False

    credit_changed: Final = 0

    @property
    def can_open(self) -> bool:
        """Whether new calls may start."""
        return self.state == OPEN and not self.closing

    @property
    def wants_write(self) -> bool:
        """Whether :meth:`records_to_send` has something to pack."""
        return bool(self._queue)

    credit_owed: Final = False
    """monte-v1 has no credit (the same driver reads this of both sessions)."""

    def flush_credit(self) -> None:
        """monte-v1 has no credit: nothing to send."""

    @property
    def finished(self) -> bool:
        """Closing and everything written."""
        return self.state >= CLOSED or (self.closing and not self._queue)

    def _enqueue(self, ident: int, body: bytes) -> None:
        out: list[bytes | None] = []
        self._codec.encode(FrameKind.REPLY if ident else FrameKind.ONEWAY, ident, body, out)
        self._queue.append(out[0])  # type: ignore[arg-type]
        self.send_queue_bytes += len(body)

    def send_request(self, body: bytes, *, parent: int = 0, compress: bool = True) -> int | None:
        """Queue a request; return its id (monte-v1 has no credit, and no compression:
        ``compress`` is ignored).

        Raises:
            LocalProtocolError: closed, or the body does not fit one record.
        """
        if not self.can_open and not parent:
            raise LocalProtocolError("the connection is closing; retry on a new connection")
        ident = self._next_id
        while ident in self._out or ident == 0:
            ident = (ident + 2) % 2**32
        self._enqueue(ident, body)
        self._next_id = (ident + 2) % 2**32
        self._out.add(ident)
        return ident

    def send_oneway(self, body: bytes, *, compress: bool = True) -> bool:
        """Queue a one-way message (seq 0); always True (``compress`` is ignored)."""
        if self.state >= CLOSED:
            raise LocalProtocolError("the connection is closed; open a new one")
        self._enqueue(0, body)
        return True

    def send_reply(self, call_id: int, body: bytes, *, compress: bool = True) -> None:
        """Answer the peer's request ``call_id`` (``compress`` is ignored)."""
        if self.state >= CLOSED:
            raise LocalProtocolError("the connection is closed; open a new one")
        self._enqueue(call_id, body)

    def send_error(self, call_id: int, code: int, text: str) -> None:
        """monte-v1 has no error frame.

        Raises:
            LocalProtocolError: always; the driver decides what to send instead.
        """
        raise LocalProtocolError("the monte-v1 profile cannot send error replies")

    def cancel(self, call_id: int) -> None:
        """Forget our call: a late reply is dropped (Go handlers may never reply)."""
        self._out.discard(call_id)

    def consumed(self, call_id: int, nbytes: int = 0) -> None:
        """No credit in monte-v1."""

    def delivered(self, call_id: int) -> None:
        """No credit in monte-v1."""

    def start_close(self, code: int = 0, *, now: float | None = None) -> None:
        """Refuse new calls; finished once the queue is written."""
        self.closing = True

    def reader_paused(self, paused: bool) -> None:
        """No keepalive in monte-v1."""

    def get_timer(self) -> float | None:
        """No timers in monte-v1."""
        return None

    def handle_timer(self, now: float) -> list[Event]:
        """No timers in monte-v1."""
        return []

    def records_to_send(self, max_plaintext: int, max_bytes: int | None = None) -> list[bytes]:
        """One plaintext per message, in order."""
        out = self._queue
        self._queue = []
        self.send_queue_bytes = 0
        return out

    def receive_records(self, plaintexts: list[bytes]) -> list[Event]:
        """Route by parity: seq 0 one-way, our parity a reply (dropped if not ours), else a
        request.

        Raises:
            RemoteProtocolError: a record shorter than its 4-byte seq.
        """
        events: list[Event] = []
        decode = self._codec.decode
        try:
            for pt in plaintexts:
                kind, ident, body = decode(pt)
                if kind == 0:
                    events.append((EV_ONEWAY, 0, body, 0))
                elif kind == FrameKind.REPLY:
                    if ident in self._out:
                        self._out.discard(ident)
                        events.append((EV_REPLY, ident, body, 0))
                else:
                    events.append((EV_REQUEST, ident, body, 0))
        except RemoteProtocolError:
            self.state = ERROR
            raise
        return events
