"""A deterministic, fault-injecting, in-memory network for tests.

This module owns :class:`FaultyNetwork`: a simulated network of named hosts whose
connections are :class:`trio.abc.HalfCloseableStream` pairs, and the faults it can inject
into them (drop, stall, cut, corrupt, partition, host shutdown), on demand or at random
from a seed (:class:`ChaosConfig`). It works at byte-stream level and knows nothing of the
RPC protocol above it.

Theory of operation
-------------------

A connection is a :class:`Link` with two ends (two :class:`NetworkStream` objects) and two
one-way *pipes*. A pipe is a FIFO of *segments*; each segment carries its bytes and a
``deliver_at`` time on the trio clock (now + latency + seeded jitter + any chaos delay,
never earlier than the previous segment's, so bytes stay in order).

There are no background tasks. Everything happens in the calls the user makes:

* ``send_all`` cuts its data into segments, decides every random fault for each segment
  *at that moment* from the pipe's own :class:`random.Random`, and appends the segments to
  the pipe. It parks (on a :class:`trio.lowlevel.ParkingLot`, never polling) while the
  pipe holds ``buffer_size`` or more undelivered bytes: back-pressure is real.
* ``receive_some`` looks at the head segment: if the pipe is stalled it parks until
  :meth:`FaultyNetwork.heal`; if the segment is not due yet it parks until ``deliver_at``
  (with :func:`trio.move_on_at`); otherwise it returns bytes from that one segment only,
  so a chunk given to ``send_all`` may arrive in several pieces.
* A fault that breaks a link sets, for each pipe, the offset past which nothing is
  delivered; receivers raise :class:`trio.BrokenResourceError` on reaching it and senders
  raise it at once.

Determinism: each pipe's random generator is seeded from the network seed and the link's
*name* (source, host, how many links that pair opened before it, direction), not from the
order in which tasks happen to run, and trio shuffles tasks that wake together. Under
:class:`trio.testing.MockClock` the same seed and the same calls therefore give the same
bytes and the same :attr:`FaultyNetwork.log`. The log is kept sorted by time; within one
instant, events of the user's fault calls come first, in call order, then those drawn
inside ``send_all``, by (link name, direction, sequence), so that events of two tasks woken
together always appear in the same order.
"""

from __future__ import annotations

import bisect
import enum
import errno
import math
import operator
import random
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import trio
from trio.lowlevel import ParkingLot, checkpoint

from .._util import ConflictDetector

__all__ = [
    "ChaosConfig",
    "FaultEvent",
    "FaultKind",
    "FaultyNetwork",
    "Link",
    "NetworkListener",
    "NetworkStatistics",
    "NetworkStream",
]


def _check_probability(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be between 0 and 1, got {value!r}")


def _check_non_negative(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _check_positive(_instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value!r}")


class FaultKind(enum.Enum):
    """The kinds of fault recorded in :attr:`FaultyNetwork.log`."""

    DROP = "drop"
    """A link was broken: both ends raise :class:`trio.BrokenResourceError`."""
    STALL = "stall"
    """Delivery in one direction stopped (until :meth:`FaultyNetwork.heal`, or for a while
    when injected by chaos)."""
    DELAY = "delay"
    """A segment (and so everything behind it) was delayed by chaos."""
    CUT = "cut"
    """A link broke after delivering part of the data sent (see :meth:`FaultyNetwork.cut`)."""
    CORRUPT = "corrupt"
    """One bit of a segment was flipped."""
    PARTITION = "partition"
    """The hosts were split into groups that cannot reach each other."""
    HEAL = "heal"
    """Stalls and partitions were removed."""
    SHUTDOWN = "shutdown"
    """A host went down."""
    RESTART = "restart"
    """A host came back up."""


@attrs.frozen
class Link:
    """One connection of the network, named by its two ends.

    Attributes:
        id: a number unique within the network, in the order connections were made.
        source: the host that connected (the ``source`` given to
            :meth:`FaultyNetwork.connect`).
        host: the host that accepted.
        index: how many links ``source`` had opened to ``host`` before this one. Together
            with the two host names it names the link independently of task scheduling;
            the link's random generator is seeded from that name.
    """

    id: int
    source: str
    host: str
    index: int

    def __str__(self) -> str:
        return f"link#{self.id} {self.source}->{self.host}"


@attrs.frozen
class FaultEvent:
    """One fault injected by the network, as recorded in :attr:`FaultyNetwork.log`.

    Attributes:
        time: when the fault took effect, in seconds of the trio clock since the network
            was first used (deterministic under :class:`trio.testing.MockClock`).
        kind: what happened.
        link: the link affected, or ``None`` for network-wide events (partition, heal,
            shutdown, restart).
        src: for one-way faults, the host whose sent bytes are affected; else ``None``.
        dst: for one-way faults, the host that receives them; else ``None``.
        detail: a human-readable description (offsets, bit positions, durations, groups).
        chaos: whether the fault was chosen at random by the :class:`ChaosConfig`, rather
            than requested by a method call.
    """

    time: float
    kind: FaultKind
    link: Link | None
    src: str | None
    dst: str | None
    detail: str
    chaos: bool = False

    def __str__(self) -> str:
        where = f" {self.link}" if self.link is not None else ""
        direction = f" ({self.src}->{self.dst} bytes)" if self.src is not None else ""
        origin = " (chaos)" if self.chaos else ""
        return f"t={self.time:.6f} {self.kind.value}{where}{direction}: {self.detail}{origin}"


@attrs.frozen
class ChaosConfig:
    """Random faults, drawn for every segment sent, from the network's seeded generators.

    The draws happen in :meth:`NetworkStream.send_all`, in the order drop, stall, delay,
    corrupt, each only if its probability is non-zero.

    Attributes:
        drop_probability: chance that the link breaks before a segment (as
            :meth:`FaultyNetwork.drop`).
        corrupt_probability: chance that one random bit of a segment is flipped.
        stall_probability: chance that delivery in that direction stops for
            ``stall_duration`` seconds from this segment on.
        stall_duration: how long a chaos stall lasts, in seconds.
        delay_probability: chance that a segment (and so those behind it) is delayed by a
            uniformly random time in ``[0, max_delay]``.
        max_delay: the longest chaos delay, in seconds.
        fragment: if true, data is cut into segments of random sizes between 1 and the
            network's ``max_segment``, so receivers see short reads.
    """

    drop_probability: float = attrs.field(default=0.0, validator=_check_probability)
    corrupt_probability: float = attrs.field(default=0.0, validator=_check_probability)
    stall_probability: float = attrs.field(default=0.0, validator=_check_probability)
    stall_duration: float = attrs.field(default=1.0, validator=_check_non_negative)
    delay_probability: float = attrs.field(default=0.0, validator=_check_probability)
    max_delay: float = attrs.field(default=0.1, validator=_check_non_negative)
    fragment: bool = False


@attrs.frozen
class NetworkStatistics:
    """A snapshot of a :class:`FaultyNetwork`'s counters (see
    :meth:`FaultyNetwork.statistics`).

    Attributes:
        bytes_sent: bytes accepted by ``send_all`` on every link.
        bytes_delivered: bytes returned by ``receive_some`` on every link.
        open_links: links not yet closed at both ends (broken ones included).
        connects: successful :meth:`FaultyNetwork.connect` calls.
        refused: refused :meth:`FaultyNetwork.connect` calls.
        faults: how many events of each :class:`FaultKind` (by its value) are in the log.
    """

    bytes_sent: int
    bytes_delivered: int
    open_links: int
    connects: int
    refused: int
    faults: Mapping[str, int]


@attrs.define(eq=False)
class _Segment:
    data: bytearray
    deliver_at: float
    pos: int = 0


@attrs.define(eq=False)
class _Pipe:
    """One direction of a link: bytes sent by ``src``, received by ``dst``."""

    src: str
    dst: str
    direction: int  # 0: source -> host, 1: host -> source
    rng: random.Random
    lot: ParkingLot = attrs.Factory(ParkingLot)
    segments: deque[_Segment] = attrs.Factory(deque)
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
        return self.stalled or self.partitioned

    def wake(self) -> None:
        self.lot.unpark_all()


@attrs.define(eq=False)
class _LinkState:
    link: Link
    pipes: tuple[_Pipe, _Pipe]
    broken: bool = False
    closed_ends: int = 0

    def name_key(self) -> tuple[str, str, int]:
        return (self.link.source, self.link.host, self.link.index)


@attrs.define(eq=False)
class NetworkStream(trio.abc.HalfCloseableStream):
    """One end of a connection of a :class:`FaultyNetwork`.

    It implements the whole :class:`trio.abc.HalfCloseableStream` contract:

    * :meth:`send_all` returns once its bytes are in the link's buffer; it waits while
      ``buffer_size`` bytes are still undelivered.
    * :meth:`receive_some` returns bytes of at most one segment (so possibly fewer than
      were sent in one ``send_all``), ``b""`` once the peer has sent EOF or closed and
      everything before has been delivered.
    * :meth:`send_eof` half-closes; :meth:`aclose` closes both directions (the peer sees
      EOF when receiving and :class:`trio.BrokenResourceError` when sending).
    * Faults raise :class:`trio.BrokenResourceError`; use after local close raises
      :class:`trio.ClosedResourceError`; two tasks sending (or two receiving) at once
      raise :class:`trio.BusyResourceError`.

    Streams are made by :meth:`FaultyNetwork.connect` and
    :meth:`NetworkListener.accept`, never directly.

    Attributes:
        link: the connection this stream is an end of.
        local_host: the host name of this end.
        remote_host: the host name of the other end.
    """

    _network: FaultyNetwork = attrs.field(alias="network")
    _state: _LinkState = attrs.field(alias="state")
    _out: _Pipe = attrs.field(alias="out")
    _in: _Pipe = attrs.field(alias="in_")
    _closed: bool = attrs.field(default=False, init=False)
    _eof_sent: bool = attrs.field(default=False, init=False)
    _send_conflict: ConflictDetector = attrs.field(
        init=False,
        factory=lambda: ConflictDetector("another task is using this stream for send"),
    )
    _receive_conflict: ConflictDetector = attrs.field(
        init=False,
        factory=lambda: ConflictDetector("another task is already receiving on this stream"),
    )

    @property
    def link(self) -> Link:
        """The connection this stream is an end of."""
        return self._state.link

    @property
    def local_host(self) -> str:
        """The host name of this end."""
        return self._out.src

    @property
    def remote_host(self) -> str:
        """The host name of the other end."""
        return self._out.dst

    def __repr__(self) -> str:
        return f"<NetworkStream {self.local_host} of {self.link}>"

    def _check_can_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called on this stream")
        if self._state.broken:
            raise trio.BrokenResourceError(f"{self.link} is broken")
        if self._out.receiver_closed:
            raise trio.BrokenResourceError(f"the peer closed {self.link}")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting while the link's buffer is full.

        Args:
            data: the bytes to send.

        Raises:
            trio.BusyResourceError: another task is sending on this stream.
            trio.BrokenResourceError: the link broke (a fault) or the peer closed.
            trio.ClosedResourceError: this stream was closed, or EOF was sent.
        """
        with self._send_conflict:
            self._check_can_send()
            await checkpoint()
            payload = bytes(data)
            pos = 0
            size = 0  # of the next segment, once chosen
            while True:
                self._check_can_send()
                if pos == len(payload):
                    return
                if not size:
                    size = self._network._segment_size(self._out, len(payload) - pos)
                if self._network.buffer_size - self._out.buffered < size:
                    await self._out.lot.park()
                    continue
                self._network._push(self._state, self._out, payload[pos : pos + size])
                pos += size
                size = 0

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the link's buffer has room (or the link is broken).

        Raises:
            trio.BusyResourceError: another task is sending on this stream.
            trio.ClosedResourceError: this stream was closed, or EOF was sent.
        """
        with self._send_conflict:
            if self._closed or self._eof_sent:
                raise trio.ClosedResourceError("this stream is closed for sending")
            await checkpoint()
            while True:
                if self._closed or self._eof_sent:
                    raise trio.ClosedResourceError("this stream is closed for sending")
                out = self._out
                if (
                    self._state.broken
                    or out.receiver_closed
                    or out.buffered < self._network.buffer_size
                ):
                    return
                await out.lot.park()

    async def send_eof(self) -> None:
        """Half-close: the peer receives ``b""`` after the data already sent.

        Calling it again is allowed and does nothing.

        Raises:
            trio.BusyResourceError: another task is sending on this stream.
            trio.ClosedResourceError: this stream was closed.
        """
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            await checkpoint()
            if not self._eof_sent:
                self._eof_sent = True
                self._network._send_eof(self._out)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive the next bytes, waiting for them to be sent and delivered.

        Args:
            max_bytes: return at most this many bytes (``None``: a whole segment).

        Returns:
            Some bytes, never more than ``max_bytes``; ``b""`` at end of stream.

        Raises:
            ValueError: ``max_bytes`` is less than 1.
            TypeError: ``max_bytes`` is not an integer.
            trio.BusyResourceError: another task is receiving on this stream.
            trio.BrokenResourceError: the link broke (a fault).
            trio.ClosedResourceError: this stream was closed.
        """
        with self._receive_conflict:
            if max_bytes is not None:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            await checkpoint()
            pipe = self._in
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                if pipe.broken_at is not None and pipe.delivered >= pipe.broken_at:
                    raise trio.BrokenResourceError(f"{self.link} is broken")
                deadline = math.inf
                if not pipe.held:
                    now = trio.current_time()
                    if pipe.segments:
                        head = pipe.segments[0]
                        if head.deliver_at <= now:
                            return self._network._deliver(pipe, head, max_bytes)
                        deadline = head.deliver_at
                    elif pipe.eof_at is not None:
                        if pipe.eof_at <= now:
                            return b""
                        deadline = pipe.eof_at
                with trio.move_on_at(deadline):
                    await pipe.lot.park()

    async def aclose(self) -> None:
        """Close this end: the peer sees EOF when receiving, a broken link when sending.

        Idempotent; it closes even when cancelled.
        """
        self._close_now()
        await checkpoint()

    def _close_now(self) -> None:
        if not self._closed:
            self._closed = True
            self._network._close_end(self._state, self._out, self._in)


@attrs.define(eq=False)
class NetworkListener(trio.abc.Listener[NetworkStream]):
    """Accepts the connections made to one host of a :class:`FaultyNetwork`.

    Made by :meth:`FaultyNetwork.listen`. Connections wait in an unbounded backlog until
    accepted; closing the listener closes the ones still waiting and frees the host name
    for another :meth:`FaultyNetwork.listen`.

    Attributes:
        host: the host name this listener accepts connections for.
    """

    _network: FaultyNetwork = attrs.field(alias="network", repr=False)
    host: str
    _backlog: deque[NetworkStream] = attrs.field(init=False, repr=False, factory=deque)
    _lot: ParkingLot = attrs.field(init=False, repr=False, factory=ParkingLot)
    _closed: bool = attrs.field(init=False, repr=False, default=False)

    async def accept(self) -> NetworkStream:
        """Wait for the next connection to this host.

        Returns:
            The host's end of the connection.

        Raises:
            trio.ClosedResourceError: the listener was closed.
        """
        await checkpoint()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this listener was closed")
            if self._backlog:
                return self._backlog.popleft()
            await self._lot.park()

    async def aclose(self) -> None:
        """Stop accepting; close connections not yet accepted. Idempotent."""
        if not self._closed:
            self._closed = True
            self._network._unlisten(self)
            while self._backlog:
                self._backlog.popleft()._close_now()
            self._lot.unpark_all()
        await checkpoint()

    def _enqueue(self, stream: NetworkStream) -> None:
        self._backlog.append(stream)
        self._lot.unpark_all()

    def _purge(self, host_links: set[int]) -> list[NetworkStream]:
        kept: deque[NetworkStream] = deque()
        purged: list[NetworkStream] = []
        for stream in self._backlog:
            (purged if stream.link.id in host_links else kept).append(stream)
        self._backlog = kept
        return purged


def _now_or_none() -> float | None:
    try:
        return trio.current_time()
    except RuntimeError:
        return None


@attrs.define(eq=False, kw_only=True)
class FaultyNetwork:
    """A simulated network of named hosts, with faults injected on demand or at random.

    Connections are :class:`NetworkStream` pairs. Each direction of a link is a bounded
    pipe with a latency; faults break, stall, cut short or corrupt them. Nothing runs in
    the background: delays and stalls are served inside ``receive_some``, so the network
    needs no nursery, and under :class:`trio.testing.MockClock` (``autojump_threshold=0``)
    a scenario with a given ``seed`` replays exactly (same bytes, same :attr:`log`).

    Example::

        net = FaultyNetwork(seed=1, latency=0.010)
        listener = net.listen("server")
        client = await net.connect("server")
        server = await listener.accept()
        net.stall("client", "server")   # requests stop arriving ...
        net.heal()                      # ... until now

    Replays are exact when the scenario itself is deterministic (no real I/O, no real
    clock) and ``latency`` is above zero, preferably with some ``jitter``: trio runs the
    tasks woken at the same instant in a random order, and with zero latency the hosts'
    tasks act at the same instants, so which of two of them sees a fault first may vary.

    One-way faults (:meth:`stall`, :meth:`cut`, :meth:`corrupt`) name the sending host
    ``src`` and the receiving host ``dst`` and apply to every current link between them
    in that direction (both directions of a link from a host to itself), or only to
    ``link`` if given.

    Args:
        seed: seeds every random choice (jitter, chaos, corrupted bit positions).
        latency: seconds between a byte being sent and it being deliverable; a connect
            takes two of them (a round trip).
        jitter: an extra delay drawn uniformly from ``[0, jitter]`` for each segment.
        buffer_size: undelivered bytes a direction of a link holds before ``send_all``
            waits.
        max_segment: the largest segment ``send_all`` cuts data into; a ``receive_some``
            returns bytes of at most one segment.
        chaos: random faults to inject; ``None`` for none. It can be replaced at any time
            (for example after the handshakes) by assigning :attr:`chaos`.
    """

    seed: int = 0
    latency: float = attrs.field(default=0.0, validator=_check_non_negative)
    jitter: float = attrs.field(default=0.0, validator=_check_non_negative)
    buffer_size: int = attrs.field(default=65536, validator=_check_positive)
    max_segment: int = attrs.field(default=16384, validator=_check_positive)
    chaos: ChaosConfig | None = None

    _epoch: float | None = attrs.field(init=False, repr=False, factory=_now_or_none)
    _listeners: dict[str, NetworkListener] = attrs.field(init=False, repr=False, factory=dict)
    _links: dict[int, _LinkState] = attrs.field(init=False, repr=False, factory=dict)
    _pair_counts: dict[tuple[str, str], int] = attrs.field(init=False, repr=False, factory=dict)
    _next_id: int = attrs.field(init=False, repr=False, default=0)
    _down: set[str] = attrs.field(init=False, repr=False, factory=set)
    _groups: dict[str, int] | None = attrs.field(init=False, repr=False, default=None)
    _events: list[tuple[tuple[Any, ...], FaultEvent]] = attrs.field(
        init=False, repr=False, factory=list
    )
    _net_seq: int = attrs.field(init=False, repr=False, default=0)
    _bytes_sent: int = attrs.field(init=False, repr=False, default=0)
    _bytes_delivered: int = attrs.field(init=False, repr=False, default=0)
    _connects: int = attrs.field(init=False, repr=False, default=0)
    _refused: int = attrs.field(init=False, repr=False, default=0)

    # ---- public API: connections ------------------------------------------------------

    def listen(self, host: str) -> NetworkListener:
        """Start accepting connections for ``host``.

        Args:
            host: the host name clients will :meth:`connect` to.

        Returns:
            The listener; close it to stop accepting.

        Raises:
            OSError: ``host`` already has an open listener (``EADDRINUSE``).
        """
        self._now()
        if host in self._listeners:
            raise OSError(errno.EADDRINUSE, f"host {host!r} is already listening")
        listener = NetworkListener(network=self, host=host)
        self._listeners[host] = listener
        return listener

    async def connect(self, host: str, *, source: str = "client") -> NetworkStream:
        """Open a connection from ``source`` to ``host``; it takes one round trip.

        The connection waits in the host's listener backlog until accepted.

        Args:
            host: the host to connect to.
            source: the name of the connecting host.

        Returns:
            The ``source`` end of the connection.

        Raises:
            ConnectionRefusedError: nobody listens on ``host``, either host is shut
                down, or they are in different partitions.
        """
        self._now()
        if self.latency > 0:
            await trio.sleep(2 * self.latency)
        else:
            await checkpoint()
        reason = self._refusal(source, host)
        listener = self._listeners.get(host)
        if listener is None:
            reason = reason or "nobody listens there"
        if reason is not None:
            self._refused += 1
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"connection from {source!r} to {host!r} refused: {reason}"
            )
        assert listener is not None
        index = self._pair_counts.get((source, host), 0)
        self._pair_counts[(source, host)] = index + 1
        link = Link(id=self._next_id, source=source, host=host, index=index)
        self._next_id += 1
        name = f"{self.seed}:{source}:{host}:{index}"
        forward = _Pipe(src=source, dst=host, direction=0, rng=random.Random(f"{name}:0"))
        backward = _Pipe(src=host, dst=source, direction=1, rng=random.Random(f"{name}:1"))
        state = _LinkState(link=link, pipes=(forward, backward))
        self._links[link.id] = state
        self._connects += 1
        client = NetworkStream(network=self, state=state, out=forward, in_=backward)
        server = NetworkStream(network=self, state=state, out=backward, in_=forward)
        listener._enqueue(server)
        return client

    def links(self) -> list[Link]:
        """The links not yet closed at both ends (broken ones included), oldest first."""
        return [state.link for state in self._links.values()]

    # ---- public API: faults ----------------------------------------------------------

    def drop(self, a: str | Link, b: str | None = None) -> int:
        """Break connections: every further send or receive on either end raises
        :class:`trio.BrokenResourceError` (receivers get nothing more, even bytes already
        sent).

        Args:
            a: a :class:`Link`, or a host name: all current links of that host ...
            b: ... or, if given, only those between ``a`` and ``b``.

        Returns:
            How many links were broken (already broken ones are not counted).
        """
        now = self._now()
        states = self._select_links(a, b)
        for state in states:
            self._break(state)
            self._log(now, FaultKind.DROP, state, None, "dropped")
        return len(states)

    def stall(self, src: str, dst: str, *, link: Link | None = None) -> int:
        """Stop delivering bytes from ``src`` to ``dst`` until :meth:`heal`.

        Bytes sent meanwhile are buffered (up to ``buffer_size``, then senders wait).

        Args:
            src: the sending host.
            dst: the receiving host.
            link: only this link.

        Returns:
            How many link directions were stalled.
        """
        now = self._now()
        count = 0
        for state, pipe in self._select_pipes(src, dst, link):
            if not pipe.stalled:
                pipe.stalled = True
                count += 1
                self._log(now, FaultKind.STALL, state, pipe, "stalled until heal()")
        return count

    def cut(self, src: str, dst: str, *, after: int, link: Link | None = None) -> int:
        """Deliver only ``after`` more bytes from ``src`` to ``dst``, then break the link.

        The byte count starts at what ``dst`` has received so far, so bytes already in
        flight count. The link breaks as soon as that many bytes have been sent: ``src``
        then gets :class:`trio.BrokenResourceError`, ``dst`` receives the ``after`` bytes
        and then gets it too (a record cut mid-way).

        Args:
            src: the sending host.
            dst: the receiving host.
            after: how many more bytes to deliver (>= 0).
            link: only this link.

        Returns:
            How many link directions were armed (or cut at once).

        Raises:
            ValueError: ``after`` is negative.
        """
        if after < 0:
            raise ValueError("after must be >= 0")
        now = self._now()
        count = 0
        for state, pipe in self._select_pipes(src, dst, link):
            count += 1
            cut_at = pipe.delivered + after
            pipe.cut_at = cut_at if pipe.cut_at is None else min(pipe.cut_at, cut_at)
            if pipe.sent >= pipe.cut_at:
                self._fire_cut(now, state, pipe, in_send=False)
        return count

    def corrupt(self, src: str, dst: str, *, count: int = 1, link: Link | None = None) -> int:
        """Flip one bit in each of the next ``count`` segments sent from ``src`` to ``dst``.

        The bit is chosen by the link's seeded generator. Bytes already sent are not
        affected.

        Args:
            src: the sending host.
            dst: the receiving host.
            count: how many segments to corrupt.
            link: only this link.

        Returns:
            How many link directions were armed.

        Raises:
            ValueError: ``count`` is negative.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        self._now()
        pipes = self._select_pipes(src, dst, link)
        for _state, pipe in pipes:
            pipe.corrupt_pending += count
        return len(pipes)

    def partition(self, *groups: Iterable[str], drop: bool = False) -> int:
        """Split the hosts into groups that cannot reach each other, until :meth:`heal`.

        Hosts named in no group form one more group together, so
        ``partition(["server"])`` isolates ``server``. A string is taken as a group of one
        host. Connects between groups are refused; existing links between groups stall
        (both directions) or, with ``drop=True``, break. A new partition replaces the
        previous one (links it stalled stay stalled until :meth:`heal`).

        Args:
            groups: the groups of host names.
            drop: break existing links between groups instead of stalling them.

        Returns:
            How many links were stalled or broken.

        Raises:
            ValueError: a host is named in two groups.
        """
        now = self._now()
        mapping: dict[str, int] = {}
        for number, group in enumerate(groups):
            members = [group] if isinstance(group, str) else list(group)
            for host in members:
                if mapping.get(host, number) != number:
                    raise ValueError(f"host {host!r} is in two groups")
                mapping[host] = number
        self._groups = mapping
        described = " | ".join(
            ",".join(sorted(h for h, n in mapping.items() if n == number))
            for number in range(len(groups))
        )
        self._log(now, FaultKind.PARTITION, None, None, f"groups {described} | (others)")
        count = 0
        for state in list(self._links.values()):
            if state.broken or self._reachable(state.link.source, state.link.host):
                continue
            count += 1
            if drop:
                self._break(state)
                self._log(now, FaultKind.DROP, state, None, "dropped by partition")
            else:
                for pipe in state.pipes:
                    pipe.partitioned = True
                self._log(now, FaultKind.STALL, state, None, "stalled by partition")
        return count

    def heal(self) -> None:
        """Remove every stall (from :meth:`stall` or :meth:`partition`) and the partition.

        Chaos stalls and delays already drawn still run their course; shut-down hosts stay
        down (see :meth:`restart_host`); pending cuts and corruptions stay armed.
        """
        now = self._now()
        self._groups = None
        for state in self._links.values():
            for pipe in state.pipes:
                if pipe.held:
                    pipe.stalled = pipe.partitioned = False
                    pipe.wake()
        self._log(now, FaultKind.HEAL, None, None, "stalls and partition removed")

    def shutdown_host(self, host: str) -> int:
        """Take ``host`` down: break all its links and refuse connects to and from it.

        Connections waiting in its listener's backlog are discarded. The listener stays
        open, and accepts again after :meth:`restart_host`.

        Args:
            host: the host to take down.

        Returns:
            How many links were broken.
        """
        now = self._now()
        self._down.add(host)
        self._log(now, FaultKind.SHUTDOWN, None, None, f"host {host!r} down")
        count = 0
        ids: set[int] = set()
        for state in list(self._links.values()):
            if host in (state.link.source, state.link.host):
                ids.add(state.link.id)
                if not state.broken:
                    count += 1
                    self._break(state)
                    self._log(now, FaultKind.DROP, state, None, f"host {host!r} shut down")
        listener = self._listeners.get(host)
        if listener is not None:
            for stream in listener._purge(ids):
                stream._close_now()
        return count

    def restart_host(self, host: str) -> None:
        """Bring ``host`` back up after :meth:`shutdown_host`."""
        now = self._now()
        if host in self._down:
            self._down.discard(host)
            self._log(now, FaultKind.RESTART, None, None, f"host {host!r} up")

    # ---- public API: observation -----------------------------------------------------

    @property
    def log(self) -> list[FaultEvent]:
        """Every fault injected so far, in order of time (a new list each time).

        Events of the same instant are ordered by link name and direction, not by which
        task ran first, so the log of a seeded scenario under
        :class:`trio.testing.MockClock` is reproducible.
        """
        return [event for _key, event in self._events]

    def statistics(self) -> NetworkStatistics:
        """Return the network's counters (see :class:`NetworkStatistics`)."""
        faults: dict[str, int] = {}
        for _key, event in self._events:
            faults[event.kind.value] = faults.get(event.kind.value, 0) + 1
        return NetworkStatistics(
            bytes_sent=self._bytes_sent,
            bytes_delivered=self._bytes_delivered,
            open_links=len(self._links),
            connects=self._connects,
            refused=self._refused,
            faults=faults,
        )

    # ---- internals ---------------------------------------------------------------------

    def _now(self) -> float:
        """The trio time; fixes the log's epoch at the first call inside trio."""
        now = _now_or_none()
        if now is None:
            return 0.0
        if self._epoch is None:
            self._epoch = now
        return now

    def _log(
        self,
        now: float,
        kind: FaultKind,
        state: _LinkState | None,
        pipe: _Pipe | None,
        detail: str,
        *,
        chaos: bool = False,
        in_send: bool = False,
    ) -> None:
        epoch = self._epoch if self._epoch is not None else now
        time = round(now - epoch, 9)
        key: tuple[Any, ...]
        if not in_send:
            # Called by the user's code: in call order.
            self._net_seq += 1
            key = (time, 0, self._net_seq)
        else:
            # Drawn inside send_all, maybe in one of several tasks woken together: in an
            # order that does not depend on which of them trio ran first.
            assert state is not None
            assert pipe is not None
            pipe.seq += 1
            key = (time, 1, state.name_key(), pipe.direction, pipe.seq)
        event = FaultEvent(
            time=time,
            kind=kind,
            link=state.link if state is not None else None,
            src=pipe.src if pipe is not None else None,
            dst=pipe.dst if pipe is not None else None,
            detail=detail,
            chaos=chaos,
        )
        bisect.insort(self._events, (key, event), key=lambda item: item[0])

    def _refusal(self, source: str, host: str) -> str | None:
        if host in self._down:
            return f"host {host!r} is shut down"
        if source in self._down:
            return f"host {source!r} is shut down"
        if not self._reachable(source, host):
            return "the hosts are partitioned"
        return None

    def _reachable(self, a: str, b: str) -> bool:
        if self._groups is None or a == b:
            return True
        return self._groups.get(a, -1) == self._groups.get(b, -1)

    def _select_links(self, a: str | Link, b: str | None) -> list[_LinkState]:
        if isinstance(a, Link):
            state = self._links.get(a.id)
            return [state] if state is not None and not state.broken else []
        return [
            state
            for state in self._links.values()
            if not state.broken
            and (
                (state.link.source == a and (b is None or state.link.host == b))
                or (state.link.host == a and (b is None or state.link.source == b))
            )
        ]

    def _select_pipes(
        self, src: str, dst: str, link: Link | None
    ) -> list[tuple[_LinkState, _Pipe]]:
        if link is not None:
            if link.id not in self._links:
                return []
            states = [self._links[link.id]]
        else:
            states = list(self._links.values())
        return [
            (state, pipe)
            for state in states
            if not state.broken
            for pipe in state.pipes
            if pipe.src == src and pipe.dst == dst
        ]

    def _break(self, state: _LinkState, keep: _Pipe | None = None) -> None:
        """Break a link; ``keep`` (if given) still delivers up to its ``cut_at``."""
        state.broken = True
        for pipe in state.pipes:
            limit = pipe.cut_at if pipe is keep and pipe.cut_at is not None else pipe.delivered
            pipe.broken_at = limit if pipe.broken_at is None else min(pipe.broken_at, limit)
            pipe.wake()

    def _fire_cut(self, now: float, state: _LinkState, pipe: _Pipe, *, in_send: bool) -> None:
        assert pipe.cut_at is not None
        self._break(state, keep=pipe)
        detail = f"link broken at byte {pipe.cut_at}"
        self._log(now, FaultKind.CUT, state, pipe, detail, in_send=in_send)

    @staticmethod
    def _flip_bit(pipe: _Pipe, segment: bytearray) -> str:
        bit = pipe.rng.randrange(len(segment) * 8)
        segment[bit // 8] ^= 1 << (bit % 8)
        return f"flipped bit {bit % 8} of byte {pipe.sent + bit // 8}"

    def _segment_size(self, pipe: _Pipe, remaining: int) -> int:
        """Choose the size of the next segment of ``pipe`` (``remaining`` bytes to send).

        It depends only on the pipe's generator and the data, never on how much room
        the buffer has at the moment, which depends on task scheduling.
        """
        size = min(self.max_segment, self.buffer_size)
        if self.chaos is not None and self.chaos.fragment:
            size = pipe.rng.randint(1, size)
        return min(size, remaining)

    def _push(self, state: _LinkState, pipe: _Pipe, data: bytes) -> None:
        """Append one segment to ``pipe``, injecting faults (the buffer has room)."""
        now = self._now()
        chaos = self.chaos
        if pipe.cut_at is not None:
            data = data[: pipe.cut_at - pipe.sent]
        segment = bytearray(data)
        deliver_at = now + self.latency
        if self.jitter:
            deliver_at += pipe.rng.uniform(0.0, self.jitter)
        if chaos is not None:
            if chaos.drop_probability and pipe.rng.random() < chaos.drop_probability:
                self._break(state)
                detail = f"dropped before byte {pipe.sent}"
                self._log(now, FaultKind.DROP, state, pipe, detail, chaos=True, in_send=True)
                return
            if chaos.stall_probability and pipe.rng.random() < chaos.stall_probability:
                deliver_at += chaos.stall_duration
                detail = f"stalled {chaos.stall_duration}s from byte {pipe.sent}"
                self._log(now, FaultKind.STALL, state, pipe, detail, chaos=True, in_send=True)
            if chaos.delay_probability and pipe.rng.random() < chaos.delay_probability:
                delay = pipe.rng.uniform(0.0, chaos.max_delay)
                deliver_at += delay
                detail = f"delayed {delay:.6f}s from byte {pipe.sent}"
                self._log(now, FaultKind.DELAY, state, pipe, detail, chaos=True, in_send=True)
            if chaos.corrupt_probability and pipe.rng.random() < chaos.corrupt_probability:
                detail = self._flip_bit(pipe, segment)
                self._log(now, FaultKind.CORRUPT, state, pipe, detail, chaos=True, in_send=True)
        if pipe.corrupt_pending and segment:
            pipe.corrupt_pending -= 1
            detail = self._flip_bit(pipe, segment)
            self._log(now, FaultKind.CORRUPT, state, pipe, detail, in_send=True)
        deliver_at = max(deliver_at, pipe.last_deliver_at)
        pipe.last_deliver_at = deliver_at
        if segment:
            pipe.segments.append(_Segment(data=segment, deliver_at=deliver_at))
        pipe.sent += len(segment)
        pipe.buffered += len(segment)
        self._bytes_sent += len(segment)
        pipe.wake()
        if pipe.cut_at is not None and pipe.sent >= pipe.cut_at:
            self._fire_cut(now, state, pipe, in_send=True)

    def _deliver(self, pipe: _Pipe, head: _Segment, max_bytes: int | None) -> bytes:
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
        self._bytes_delivered += count
        pipe.wake()
        return out

    def _send_eof(self, pipe: _Pipe) -> None:
        if pipe.eof_at is None:
            pipe.eof_at = max(self._now() + self.latency, pipe.last_deliver_at)
            pipe.wake()

    def _close_end(self, state: _LinkState, out: _Pipe, in_: _Pipe) -> None:
        self._send_eof(out)
        out.wake()
        in_.receiver_closed = True
        in_.segments.clear()
        in_.buffered = 0
        in_.wake()
        state.closed_ends += 1
        if state.closed_ends >= 2:
            self._links.pop(state.link.id, None)

    def _unlisten(self, listener: NetworkListener) -> None:
        if self._listeners.get(listener.host) is listener:
            del self._listeners[listener.host]
