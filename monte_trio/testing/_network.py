"""A deterministic, fault-injecting, in-memory network for tests.

This module owns :class:`FaultyNetwork`: a simulated network of named hosts, its
listeners and links, and the faults requested on demand (drop, stall, cut, corrupt,
partition, host shutdown): which links and directions each applies to. It works at
byte-stream level and knows nothing of the RPC protocol above it.

The other parts live beside it, one job each:

* ``_faults.py``: the values that describe faults (:class:`FaultKind`, :class:`Link`,
  :class:`FaultEvent`, :class:`ChaosConfig`) and the reproducible event log;
* ``_pipe.py``: the pipe engine, which moves bytes in flight and injects the faults drawn
  per segment (its docstring gives the theory of operation);
* ``_stream.py``: the two ends of a connection (:class:`NetworkStream`) and the listener
  (:class:`NetworkListener`).

Determinism: each pipe's random generator is seeded from the network seed and the link's
*name*, not from the order in which tasks happen to run. Under
:class:`trio.testing.MockClock` the same seed and the same calls therefore give the same
bytes and the same :attr:`FaultyNetwork.log`.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterable, Mapping

import attrs
import trio
from trio.lowlevel import checkpoint

from ._faults import (
    ChaosConfig,
    EventLog,
    FaultEvent,
    FaultKind,
    Link,
    check_non_negative,
    check_positive,
)
from ._pipe import LinkState, Pipe, PipeEngine
from ._stream import NetworkListener, NetworkStream

__all__ = ["FaultyNetwork", "NetworkStatistics"]


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
    latency: float = attrs.field(default=0.0, validator=check_non_negative)
    jitter: float = attrs.field(default=0.0, validator=check_non_negative)
    buffer_size: int = attrs.field(default=65536, validator=check_positive)
    max_segment: int = attrs.field(default=16384, validator=check_positive)
    chaos: ChaosConfig | None = None

    _log: EventLog = attrs.field(init=False, repr=False, factory=EventLog)
    _engine: PipeEngine = attrs.field(
        init=False,
        repr=False,
        default=attrs.Factory(lambda self: PipeEngine(self, self._log), takes_self=True),
    )
    _listeners: dict[str, NetworkListener] = attrs.field(init=False, repr=False, factory=dict)
    _pair_counts: dict[tuple[str, str], int] = attrs.field(init=False, repr=False, factory=dict)
    _next_id: int = attrs.field(init=False, repr=False, default=0)
    _down: set[str] = attrs.field(init=False, repr=False, factory=set)
    _groups: dict[str, int] | None = attrs.field(init=False, repr=False, default=None)
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
        self._log.now()
        if host in self._listeners:
            raise OSError(errno.EADDRINUSE, f"host {host!r} is already listening")
        listener = NetworkListener(host=host, on_close=self._unlisten)
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
        self._log.now()
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
        forward = Pipe(src=source, dst=host, direction=0, rng=random.Random(f"{name}:0"))
        backward = Pipe(src=host, dst=source, direction=1, rng=random.Random(f"{name}:1"))
        state = LinkState(link=link, pipes=(forward, backward))
        self._engine.links[link.id] = state
        self._connects += 1
        client = NetworkStream(engine=self._engine, state=state, out=forward, in_=backward)
        server = NetworkStream(engine=self._engine, state=state, out=backward, in_=forward)
        listener._enqueue(server)
        return client

    def links(self) -> list[Link]:
        """The links not yet closed at both ends (broken ones included), oldest first."""
        return [state.link for state in self._engine.links.values()]

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
        now = self._log.now()
        states = self._select_links(a, b)
        for state in states:
            self._engine.break_link(state)
            self._engine.record(now, FaultKind.DROP, state, None, "dropped")
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
        now = self._log.now()
        count = 0
        for state, pipe in self._select_pipes(src, dst, link):
            if not pipe.stalled:
                pipe.stalled = True
                count += 1
                self._engine.record(now, FaultKind.STALL, state, pipe, "stalled until heal()")
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
        now = self._log.now()
        count = 0
        for state, pipe in self._select_pipes(src, dst, link):
            count += 1
            cut_at = pipe.delivered + after
            pipe.cut_at = cut_at if pipe.cut_at is None else min(pipe.cut_at, cut_at)
            if pipe.sent >= pipe.cut_at:
                self._engine.fire_cut(now, state, pipe, in_send=False)
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
        self._log.now()
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
        now = self._log.now()
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
        self._engine.record(now, FaultKind.PARTITION, None, None, f"groups {described} | (others)")
        count = 0
        for state in list(self._engine.links.values()):
            if state.broken or self._reachable(state.link.source, state.link.host):
                continue
            count += 1
            if drop:
                self._engine.break_link(state)
                self._engine.record(now, FaultKind.DROP, state, None, "dropped by partition")
            else:
                for pipe in state.pipes:
                    pipe.partitioned = True
                self._engine.record(now, FaultKind.STALL, state, None, "stalled by partition")
        return count

    def heal(self) -> None:
        """Remove every stall (from :meth:`stall` or :meth:`partition`) and the partition.

        Chaos stalls and delays already drawn still run their course; shut-down hosts stay
        down (see :meth:`restart_host`); pending cuts and corruptions stay armed.
        """
        now = self._log.now()
        self._groups = None
        for state in self._engine.links.values():
            for pipe in state.pipes:
                if pipe.held:
                    pipe.stalled = pipe.partitioned = False
                    pipe.wake()
        self._engine.record(now, FaultKind.HEAL, None, None, "stalls and partition removed")

    def shutdown_host(self, host: str) -> int:
        """Take ``host`` down: break all its links and refuse connects to and from it.

        Connections waiting in its listener's backlog are discarded. The listener stays
        open, and accepts again after :meth:`restart_host`.

        Args:
            host: the host to take down.

        Returns:
            How many links were broken.
        """
        now = self._log.now()
        self._down.add(host)
        self._engine.record(now, FaultKind.SHUTDOWN, None, None, f"host {host!r} down")
        count = 0
        ids: set[int] = set()
        for state in list(self._engine.links.values()):
            if host in (state.link.source, state.link.host):
                ids.add(state.link.id)
                if not state.broken:
                    count += 1
                    self._engine.break_link(state)
                    self._engine.record(
                        now, FaultKind.DROP, state, None, f"host {host!r} shut down"
                    )
        listener = self._listeners.get(host)
        if listener is not None:
            for stream in listener._purge(ids):
                stream._close_now()
        return count

    def restart_host(self, host: str) -> None:
        """Bring ``host`` back up after :meth:`shutdown_host`."""
        now = self._log.now()
        if host in self._down:
            self._down.discard(host)
            self._engine.record(now, FaultKind.RESTART, None, None, f"host {host!r} up")

    # ---- public API: observation -----------------------------------------------------

    @property
    def log(self) -> list[FaultEvent]:
        """Every fault injected so far, in order of time (a new list each time).

        Events of the same instant are ordered by link name and direction, not by which
        task ran first, so the log of a seeded scenario under
        :class:`trio.testing.MockClock` is reproducible.
        """
        return self._log.events()

    def statistics(self) -> NetworkStatistics:
        """Return the network's counters (see :class:`NetworkStatistics`)."""
        engine = self._engine
        return NetworkStatistics(
            bytes_sent=engine.bytes_sent,
            bytes_delivered=engine.bytes_delivered,
            open_links=len(engine.links),
            connects=self._connects,
            refused=self._refused,
            faults=self._log.counts(),
        )

    # ---- internals ---------------------------------------------------------------------

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

    def _select_links(self, a: str | Link, b: str | None) -> list[LinkState]:
        if isinstance(a, Link):
            state = self._engine.links.get(a.id)
            return [state] if state is not None and not state.broken else []
        return [
            state
            for state in self._engine.links.values()
            if not state.broken
            and (
                (state.link.source == a and (b is None or state.link.host == b))
                or (state.link.host == a and (b is None or state.link.source == b))
            )
        ]

    def _select_pipes(self, src: str, dst: str, link: Link | None) -> list[tuple[LinkState, Pipe]]:
        if link is not None:
            if link.id not in self._engine.links:
                return []
            states = [self._engine.links[link.id]]
        else:
            states = list(self._engine.links.values())
        return [
            (state, pipe)
            for state in states
            if not state.broken
            for pipe in state.pipes
            if pipe.src == src and pipe.dst == dst
        ]

    def _unlisten(self, listener: NetworkListener) -> None:
        if self._listeners.get(listener.host) is listener:
            del self._listeners[listener.host]
