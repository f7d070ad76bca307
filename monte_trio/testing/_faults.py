"""The faults of a :class:`~monte_trio.testing.FaultyNetwork` and their record.

This module owns the values that describe faults: what kinds there are
(:class:`FaultKind`), which connection one hit (:class:`Link`), one recorded fault
(:class:`FaultEvent`), the probabilities of random ones (:class:`ChaosConfig`), and the
:class:`EventLog` that keeps the events in a reproducible order. It moves no bytes; the
pipe engine (``_pipe.py``) and the network (``_network.py``) inject the faults and record
them here.
"""

from __future__ import annotations

import bisect
import enum
from typing import Any

import attrs
import trio

__all__ = [
    "ChaosConfig",
    "EventLog",
    "FaultEvent",
    "FaultKind",
    "Link",
    "check_non_negative",
    "check_positive",
]


def _check_probability(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be between 0 and 1, got {value!r}")


def check_non_negative(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    """An attrs validator: ``value`` must be a number >= 0 (NaN is refused)."""
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def check_positive(_instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    """An attrs validator: ``value`` must be an integer >= 1."""
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
    stall_duration: float = attrs.field(default=1.0, validator=check_non_negative)
    delay_probability: float = attrs.field(default=0.0, validator=_check_probability)
    max_delay: float = attrs.field(default=0.1, validator=check_non_negative)
    fragment: bool = False


def _now_or_none() -> float | None:
    try:
        return trio.current_time()
    except RuntimeError:
        return None


@attrs.define(eq=False)
class EventLog:
    """The fault events of one network, sorted by time, reproducibly within an instant.

    Times are seconds since the *epoch*: the trio time when the log was made, or of its
    first :meth:`now` inside trio if it was made outside. Within one instant, events
    recorded without an ``order`` (the user's fault calls) come first, in call order; then
    those recorded with one (drawn inside ``send_all``), sorted by it, so that events of
    two tasks woken together do not depend on which of them trio ran first.
    """

    _epoch: float | None = attrs.field(factory=_now_or_none)
    _entries: list[tuple[tuple[Any, ...], FaultEvent]] = attrs.field(factory=list)
    _seq: int = 0

    def now(self) -> float:
        """The trio time (``0.0`` outside trio); fixes the epoch at the first call inside
        trio."""
        now = _now_or_none()
        if now is None:
            return 0.0
        if self._epoch is None:
            self._epoch = now
        return now

    def record(
        self,
        now: float,
        kind: FaultKind,
        detail: str,
        *,
        link: Link | None = None,
        src: str | None = None,
        dst: str | None = None,
        chaos: bool = False,
        order: tuple[Any, ...] | None = None,
    ) -> None:
        """Add an event that happened at trio time ``now``.

        Args:
            now: the trio time of the event.
            kind: what happened.
            detail: the human-readable description.
            link: the link affected, if any.
            src: for one-way faults, the sending host.
            dst: for one-way faults, the receiving host.
            chaos: whether chaos chose the fault.
            order: a key ordering this event among those of the same instant that
                tasks record (``None``: the user's call, ordered by call).
        """
        epoch = self._epoch if self._epoch is not None else now
        time = round(now - epoch, 9)
        key: tuple[Any, ...]
        if order is None:
            self._seq += 1
            key = (time, 0, self._seq)
        else:
            key = (time, 1, *order)
        event = FaultEvent(
            time=time, kind=kind, link=link, src=src, dst=dst, detail=detail, chaos=chaos
        )
        bisect.insort(self._entries, (key, event), key=lambda item: item[0])

    def events(self) -> list[FaultEvent]:
        """Every event so far, in order (a new list each time)."""
        return [event for _key, event in self._entries]

    def counts(self) -> dict[str, int]:
        """How many events of each :class:`FaultKind` (by its value) were recorded."""
        counts: dict[str, int] = {}
        for _key, event in self._entries:
            counts[event.kind.value] = counts.get(event.kind.value, 0) + 1
        return counts
