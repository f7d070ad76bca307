"""The pipe engine of a :class:`~monte_trio.testing.FaultyNetwork`: bytes in flight.

This module owns the one-way *pipes* that carry a link's bytes, and the
:class:`PipeEngine` that moves bytes through them and injects the faults that happen to
bytes in flight (chaos drawn per segment, pending cuts and corruptions, breaking a link).
The streams (``_stream.py``) call it; the network (``_network.py``) owns it and decides
which pipes a fault applies to.

Theory of operation
-------------------

A link (:class:`LinkState`) has two pipes, one per direction. A pipe is a FIFO of
*segments*; each carries its bytes and a ``deliver_at`` time on the trio clock (now +
latency + seeded jitter + any chaos delay, never earlier than the previous segment's, so
bytes stay in order).

There are no background tasks. ``send_all`` cuts its data into segments
(:meth:`PipeEngine.segment_size`) and hands each to :meth:`PipeEngine.push`, which decides
every random fault for that segment *at that moment* from the pipe's own
:class:`random.Random` and appends it; the stream parks on the pipe's
:class:`trio.lowlevel.ParkingLot` while the pipe holds ``buffer_size`` or more undelivered
bytes. ``receive_some`` takes bytes from the due head segment only
(:meth:`PipeEngine.deliver`), so a chunk given to ``send_all`` may arrive in several
pieces. Breaking a link sets, for each pipe, the offset past which nothing is delivered
(``broken_at``); receivers raise :class:`trio.BrokenResourceError` on reaching it.

Determinism: each pipe's generator is seeded from the network seed and the link's *name*
(source, host, how many links that pair opened before it, direction), not from the order
in which tasks run, and the events drawn here are logged with that name as their order
key (see :class:`~monte_trio.testing._faults.EventLog`).
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Protocol

import attrs
from trio.lowlevel import ParkingLot

from ._faults import ChaosConfig, EventLog, FaultKind, Link

__all__ = ["LinkState", "NetworkSettings", "Pipe", "PipeEngine", "Segment"]


class NetworkSettings(Protocol):
    """The network parameters the engine reads at each call (they may be reassigned)."""

    @property
    def latency(self) -> float: ...
    @property
    def jitter(self) -> float: ...
    @property
    def buffer_size(self) -> int: ...
    @property
    def max_segment(self) -> int: ...
    @property
    def chaos(self) -> ChaosConfig | None: ...


@attrs.define(eq=False)
class Segment:
    """Bytes sent by one push, delivered from ``pos`` on once ``deliver_at`` is reached."""

    data: bytearray
    deliver_at: float
    pos: int = 0


@attrs.define(eq=False)
class Pipe:
    """One direction of a link: bytes sent by ``src``, received by ``dst``."""

    src: str
    dst: str
    direction: int  # 0: source -> host, 1: host -> source
    rng: random.Random
    lot: ParkingLot = attrs.Factory(ParkingLot)
    segments: deque[Segment] = attrs.Factory(deque)
    buffered: int = 0  # bytes accepted, not yet delivered
    sent: int = 0  # bytes accepted in total
    delivered: int = 0  # bytes delivered in total
    last_deliver_at: float = -math.inf
    eof_at: float | None = None  # set by send_eof/aclose: b"" from then on, once drained
    receiver_closed: bool = False
    broken_at: int | None = None  # nothing past this offset is ever delivered
    cut_at: int | None = None  # pending cut: break when ``sent`` reaches it
    stalled: bool = False  # FaultyNetwork.stall, until heal
    partitioned: bool = False  # stalled by a partition, until heal
    corrupt_pending: int = 0
    seq: int = 0  # events logged for this pipe from send_all

    @property
    def held(self) -> bool:
        """Whether delivery is stopped by a stall or a partition."""
        return self.stalled or self.partitioned

    def wake(self) -> None:
        """Wake every task parked on this pipe, to look at it again."""
        self.lot.unpark_all()


@attrs.define(eq=False)
class LinkState:
    """A link and its two pipes (``pipes[0]``: source -> host)."""

    link: Link
    pipes: tuple[Pipe, Pipe]
    broken: bool = False
    closed_ends: int = 0

    def name_key(self) -> tuple[str, str, int]:
        """The link's name, independent of task scheduling."""
        return (self.link.source, self.link.host, self.link.index)


@attrs.define(eq=False)
class PipeEngine:
    """Moves bytes through the pipes of every open link, injecting faults on the way.

    Args:
        settings: the network whose parameters apply.
        log: where faults are recorded.

    Attributes:
        links: the links not yet closed at both ends, by :attr:`Link.id`.
        bytes_sent: bytes accepted by pushes, on every link.
        bytes_delivered: bytes delivered, on every link.
    """

    settings: NetworkSettings
    log: EventLog
    links: dict[int, LinkState] = attrs.Factory(dict)
    bytes_sent: int = 0
    bytes_delivered: int = 0

    def record(
        self,
        now: float,
        kind: FaultKind,
        state: LinkState | None,
        pipe: Pipe | None,
        detail: str,
        *,
        chaos: bool = False,
        in_send: bool = False,
    ) -> None:
        """Log a fault of ``state`` (or of the network) and, if one-way, of ``pipe``.

        ``in_send``: the event was drawn inside ``send_all``, maybe in one of several
        tasks woken together, so it is ordered by the link's name rather than by call.
        """
        order = None
        if in_send:
            assert state is not None
            assert pipe is not None
            pipe.seq += 1
            order = (state.name_key(), pipe.direction, pipe.seq)
        self.log.record(
            now,
            kind,
            detail,
            link=state.link if state is not None else None,
            src=pipe.src if pipe is not None else None,
            dst=pipe.dst if pipe is not None else None,
            chaos=chaos,
            order=order,
        )

    def break_link(self, state: LinkState, keep: Pipe | None = None) -> None:
        """Break a link; ``keep`` (if given) still delivers up to its ``cut_at``."""
        state.broken = True
        for pipe in state.pipes:
            limit = pipe.cut_at if pipe is keep and pipe.cut_at is not None else pipe.delivered
            pipe.broken_at = limit if pipe.broken_at is None else min(pipe.broken_at, limit)
            pipe.wake()

    def fire_cut(self, now: float, state: LinkState, pipe: Pipe, *, in_send: bool) -> None:
        """Break the link of ``pipe``, whose pending cut is reached."""
        assert pipe.cut_at is not None
        self.break_link(state, keep=pipe)
        detail = f"link broken at byte {pipe.cut_at}"
        self.record(now, FaultKind.CUT, state, pipe, detail, in_send=in_send)

    @staticmethod
    def _flip_bit(pipe: Pipe, segment: bytearray) -> str:
        bit = pipe.rng.randrange(len(segment) * 8)
        segment[bit // 8] ^= 1 << (bit % 8)
        return f"flipped bit {bit % 8} of byte {pipe.sent + bit // 8}"

    def has_room(self, pipe: Pipe, size: int) -> bool:
        """Whether ``pipe`` can take a segment of ``size`` bytes without overfilling."""
        return self.settings.buffer_size - pipe.buffered >= size

    def segment_size(self, pipe: Pipe, remaining: int) -> int:
        """Choose the size of the next segment of ``pipe`` (``remaining`` bytes to send).

        It depends only on the pipe's generator and the data, never on how much room
        the buffer has at the moment, which depends on task scheduling.
        """
        settings = self.settings
        size = min(settings.max_segment, settings.buffer_size)
        if settings.chaos is not None and settings.chaos.fragment:
            size = pipe.rng.randint(1, size)
        return min(size, remaining)

    def push(self, state: LinkState, pipe: Pipe, data: bytes) -> None:
        """Append one segment to ``pipe``, injecting faults (the buffer has room)."""
        now = self.log.now()
        settings = self.settings
        chaos = settings.chaos
        if pipe.cut_at is not None:
            data = data[: pipe.cut_at - pipe.sent]
        segment = bytearray(data)
        deliver_at = now + settings.latency
        if settings.jitter:
            deliver_at += pipe.rng.uniform(0.0, settings.jitter)
        if chaos is not None:
            record = self.record
            if chaos.drop_probability and pipe.rng.random() < chaos.drop_probability:
                self.break_link(state)
                detail = f"dropped before byte {pipe.sent}"
                record(now, FaultKind.DROP, state, pipe, detail, chaos=True, in_send=True)
                return
            if chaos.stall_probability and pipe.rng.random() < chaos.stall_probability:
                deliver_at += chaos.stall_duration
                detail = f"stalled {chaos.stall_duration}s from byte {pipe.sent}"
                record(now, FaultKind.STALL, state, pipe, detail, chaos=True, in_send=True)
            if chaos.delay_probability and pipe.rng.random() < chaos.delay_probability:
                delay = pipe.rng.uniform(0.0, chaos.max_delay)
                deliver_at += delay
                detail = f"delayed {delay:.6f}s from byte {pipe.sent}"
                record(now, FaultKind.DELAY, state, pipe, detail, chaos=True, in_send=True)
            if chaos.corrupt_probability and pipe.rng.random() < chaos.corrupt_probability:
                detail = self._flip_bit(pipe, segment)
                record(now, FaultKind.CORRUPT, state, pipe, detail, chaos=True, in_send=True)
        if pipe.corrupt_pending and segment:
            pipe.corrupt_pending -= 1
            detail = self._flip_bit(pipe, segment)
            self.record(now, FaultKind.CORRUPT, state, pipe, detail, in_send=True)
        deliver_at = max(deliver_at, pipe.last_deliver_at)
        pipe.last_deliver_at = deliver_at
        if segment:
            pipe.segments.append(Segment(data=segment, deliver_at=deliver_at))
        pipe.sent += len(segment)
        pipe.buffered += len(segment)
        self.bytes_sent += len(segment)
        pipe.wake()
        if pipe.cut_at is not None and pipe.sent >= pipe.cut_at:
            self.fire_cut(now, state, pipe, in_send=True)

    def deliver(self, pipe: Pipe, head: Segment, max_bytes: int | None) -> bytes:
        """Take bytes from the (due) head segment of ``pipe``."""
        count = len(head.data) - head.pos
        if max_bytes is not None:
            count = min(count, max_bytes)
        if pipe.broken_at is not None:
            count = min(count, pipe.broken_at - pipe.delivered)
        out = bytes(head.data[head.pos : head.pos + count])
        head.pos += count
        if head.pos == len(head.data):
            pipe.segments.popleft()
        pipe.delivered += count
        pipe.buffered -= count
        self.bytes_delivered += count
        pipe.wake()
        return out

    def send_eof(self, pipe: Pipe) -> None:
        """End ``pipe``: its receiver gets ``b""`` once everything before is delivered."""
        if pipe.eof_at is None:
            pipe.eof_at = max(self.log.now() + self.settings.latency, pipe.last_deliver_at)
            pipe.wake()

    def close_end(self, state: LinkState, out: Pipe, in_: Pipe) -> None:
        """Close one end of a link (its outgoing pipe ``out``, incoming ``in_``)."""
        self.send_eof(out)
        out.wake()
        in_.receiver_closed = True
        in_.segments.clear()
        in_.buffered = 0
        in_.wake()
        state.closed_ends += 1
        if state.closed_ends >= 2:
            self.links.pop(state.link.id, None)
