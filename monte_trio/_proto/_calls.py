"""Streams and streaming calls: the per-id state the sans-IO session keeps for each.

A :class:`Channel` is one stream (bytes) or streaming call (messages) seen from one side:
its sending half (data accepted against the peer's credit and not yet packed, END or
RESET to pack) and its receiving half (the window we granted, the message being
reassembled). The session (:mod:`monte_trio._proto._session`) owns ids, slots, the
connection-level data window, the control lane and events; this module holds what is
local to one id, including the window-update rule (docs/wire-native.rst, "Streams and
streaming calls"). Nothing here performs I/O, reads a clock or imports trio.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from ._wire2 import SHAPE_DOWN, SHAPE_UP

__all__ = [
    "HALF_CLOSED",
    "HALF_ENDING",
    "HALF_OPEN",
    "HALF_RESETTING",
    "SHAPE_BIDIRECTIONAL",
    "SHAPE_DOWNLOAD",
    "SHAPE_STREAM",
    "SHAPE_UPLOAD",
    "Channel",
    "update_due",
]

SHAPE_STREAM: Final = 0
"""A byte stream (opened by a STREAM frame)."""
SHAPE_UPLOAD: Final = SHAPE_UP
"""A streaming call: many messages from the opener, one from the acceptor."""
SHAPE_DOWNLOAD: Final = SHAPE_DOWN
"""A streaming call: one message from the opener, many from the acceptor."""
SHAPE_BIDIRECTIONAL: Final = SHAPE_UP | SHAPE_DOWN
"""A streaming call: many messages each way."""

HALF_OPEN: Final = 0
HALF_ENDING: Final = 1
"""Sending half: END accepted, packed after the data queued before it."""
HALF_RESETTING: Final = 2
"""Sending half: RESET queued in the control lane, unsent data discarded."""
HALF_CLOSED: Final = 3
"""END or RESET packed (sending half), or received (receiving half)."""

_BLOCKED_FLOOR: Final = 1024


def update_due(window: int, limit: int, read: int, blocked: bool) -> bool:
    """Whether a receiver owes its peer a window update now.

    Args:
        window: the current window size.
        limit: the cumulative limit last advertised.
        read: bytes (costs) returned so far: the new limit would be ``read + window``.
        blocked: the peer said (BLOCKED) it cannot send under ``limit``.

    Half a window returned since the last update, or, when the peer is blocked, a
    quarter of it (at most 1,024 bytes: no silly-window ping-pong of tiny updates).
    """
    since = read + window - limit
    if since <= 0:
        return False
    if since * 2 >= window:
        return True
    return blocked and since >= min(_BLOCKED_FLOOR, window // 4)


class Channel:
    """One stream or streaming call, from this side.

    Args:
        ident: its id.
        ours: whether this side opened it.
        shape: :data:`SHAPE_STREAM` or a call's shape bits.
        send_limit: the peer's initial window for our data on it.
        recv_window: our initial window for the peer's data on it.
    """

    __slots__ = (
        "aborted",
        "blocked_at",
        "blocked_out",
        "ident",
        "messages",
        "ours",
        "r_blocked",
        "r_dirty",
        "r_last_at",
        "r_limit",
        "r_message",
        "r_messages",
        "r_read",
        "r_recv",
        "r_size",
        "r_window",
        "ready",
        "recv_many",
        "recv_state",
        "reset_out",
        "s_limit",
        "s_used",
        "send_buf",
        "send_many",
        "send_messages",
        "send_state",
        "shape",
        "stop_in",
        "stop_out",
        "stopping",
        "wire_open",
    )

    def __init__(
        self, ident: int, *, ours: bool, shape: int, send_limit: int, recv_window: int
    ) -> None:
        self.ident = ident
        self.ours = ours
        self.shape = shape
        self.messages = shape != SHAPE_STREAM
        # Which halves carry many messages (a call's other half carries exactly one).
        self.send_many = not self.messages or bool(shape & (SHAPE_UP if ours else SHAPE_DOWN))
        self.recv_many = not self.messages or bool(shape & (SHAPE_DOWN if ours else SHAPE_UP))
        self.wire_open = not ours  # our opening frame is packed (theirs: already received)
        self.ready = False  # in the session's round-robin of channels with data to pack
        # Sending half: accepted chunks [data, offset, flags] not yet packed (a call: one
        # whole message per chunk; flags: FLAG_COMPRESSED for its first frame, or 0).
        self.send_state = HALF_OPEN
        self.send_buf: deque[list[Any]] = deque()
        self.send_messages = 0
        self.s_limit = send_limit
        self.s_used = 0
        self.blocked_at = -1  # the limit at which we last queued BLOCKED
        self.blocked_out = False  # a BLOCKED waits for the control lane
        self.reset_out: int | None = None  # RESET code waiting for the control lane
        self.stop_out: int | None = None  # STOP code waiting for the control lane
        self.stop_in = False  # the peer's STOP arrived
        self.aborted = False  # charged to the abort guard already
        # Receiving half.
        self.recv_state = HALF_OPEN
        self.stopping = False  # we sent STOP: discard data until the peer's END or RESET
        self.r_window = recv_window
        self.r_limit = recv_window
        self.r_recv = 0
        self.r_read = 0
        self.r_blocked = False
        self.r_dirty = False
        self.r_last_at: float | None = None
        self.r_message: bytearray | None = None
        self.r_size = 0  # the message being received is compressed: its size once decompressed
        self.r_messages = 0

    @property
    def unsent(self) -> int:
        """Bytes accepted on the sending half and not yet packed."""
        return sum(len(item[0]) - item[1] for item in self.send_buf)

    @property
    def unsent_messages(self) -> int:
        """Whole or partly unsent messages on a call's sending half."""
        return len(self.send_buf) if self.messages else 0

    @property
    def closed(self) -> bool:
        """Both halves are closed: the slot is free on this side."""
        return self.send_state == HALF_CLOSED and self.recv_state == HALF_CLOSED

    def note_read(self, cost: int, now: float | None, rtt: float | None, cap: int) -> bool:
        """The application consumed ``cost``: return True if a WINDOW is now due.

        Growth toward the bandwidth-delay product: when an update falls due (half a
        window read) less than two round trips after the previous one, the window, not
        the reader, limits the rate: it doubles, up to ``cap``. Windows never shrink.
        """
        self.r_read += cost
        if self.recv_state != HALF_OPEN or self.stopping:
            return False
        if not update_due(self.r_window, self.r_limit, self.r_read, self.r_blocked):
            return False
        if now is not None:
            last = self.r_last_at
            if (
                last is not None
                and rtt is not None
                and now - last < 2 * rtt
                and self.r_window < cap
            ):
                self.r_window = min(cap, 2 * self.r_window)
            self.r_last_at = now
        self.r_dirty = True
        return True
