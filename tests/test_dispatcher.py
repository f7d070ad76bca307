"""Unit tests of the Dispatcher (reply routing) and its ReplyChannel."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from monte_trio import ConnectionClosed
from monte_trio._dispatcher import Dispatcher, ReplyChannel

TIMEOUT = 5


# Call ids (parity, order, never wrapping) are the session's since wire v2: see
# tests/test_session.py. Here a stand-in allocates them as the session does.


class _Dispatcher(Dispatcher):
    """A Dispatcher with the session's id allocation (1, 3, 5 ... or 2, 4, 6 ...)."""

    def __init__(self, *, first_id: int) -> None:
        super().__init__()
        self.next_id = first_id

    def allocate(self) -> tuple[int, ReplyChannel]:
        ident, self.next_id = self.next_id, self.next_id + 2
        return ident, self.add(ident)


# ---- the pending table ---------------------------------------------------------------------


def test_truth_and_length_follow_the_pending_calls() -> None:
    d = _Dispatcher(first_id=2)
    assert not d
    assert len(d) == 0
    ident, _ = d.allocate()
    assert d
    assert len(d) == 1
    assert d.discard(ident)
    assert not d


# ---- deliver / discard / fail -------------------------------------------------------------


async def test_deliver_routes_to_the_right_channel() -> None:
    with trio.fail_after(TIMEOUT):
        d = _Dispatcher(first_id=1)
        (a, ca), (b, cb) = d.allocate(), d.allocate()
        assert d.deliver(b, (2, b"for b", None))
        assert d.deliver(a, (2, b"for a", None))
        assert await ca.receive() == (2, b"for a", None)
        assert await cb.receive() == (2, b"for b", None)
        assert len(d) == 0
        assert d.dropped == 0


def test_unknown_or_duplicate_reply_is_dropped_and_counted() -> None:
    d = _Dispatcher(first_id=1)
    ident, _ = d.allocate()
    assert not d.deliver(99, (2, b"unknown", None))
    assert d.dropped == 1
    assert d.deliver(ident, (2, b"ok", None))
    assert not d.deliver(ident, (2, b"again", None))
    assert d.dropped == 2


def test_discard_forgets_and_late_reply_is_dropped() -> None:
    d = _Dispatcher(first_id=1)
    ident, _ = d.allocate()
    assert d.discard(ident) is True
    assert d.discard(ident) is False
    assert len(d) == 0
    assert not d.deliver(ident, (2, b"late", None))
    assert d.dropped == 1


async def test_delivery_to_a_closed_channel_counts_as_dropped() -> None:
    with trio.fail_after(TIMEOUT):
        d = _Dispatcher(first_id=1)
        ident, channel = d.allocate()
        await channel.aclose()
        assert not d.deliver(ident, (2, b"late", None))
        assert d.dropped == 1
        assert len(d) == 0


async def test_fail_one() -> None:
    with trio.fail_after(TIMEOUT):
        d = _Dispatcher(first_id=1)
        (a, ca), (b, _) = d.allocate(), d.allocate()
        assert d.fail(a, ConnectionClosed("gone"))
        assert not d.fail(a, ConnectionClosed("again"))
        assert d.pending_ids() == [b]
        with pytest.raises(ConnectionClosed, match="gone"):
            await ca.receive()


async def test_fail_all_fails_every_waiter_with_its_own_error() -> None:
    d = _Dispatcher(first_id=2)
    channels = [d.allocate() for _ in range(5)]
    assert d.pending_ids() == [2, 4, 6, 8, 10]
    results: dict[int, str] = {}

    async def wait(ident: int, channel: ReplyChannel) -> None:
        try:
            await channel.receive()
        except ConnectionClosed as exc:
            results[ident] = exc.reason

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for ident, channel in channels[:3]:  # these are parked in receive()
                nursery.start_soon(wait, ident, channel)
            await trio.testing.wait_all_tasks_blocked()
            d.fail_all(lambda ident: ConnectionClosed(f"closed {ident}"))
            for ident, channel in channels[3:]:  # these receive after the failure
                nursery.start_soon(wait, ident, channel)
    assert results == {i: f"closed {i}" for i in (2, 4, 6, 8, 10)}
    assert len(d) == 0
    assert d.pending_ids() == []


# ---- ReplyChannel -------------------------------------------------------------------------


async def test_channel_receive_after_deliver_then_end_of_channel() -> None:
    with trio.fail_after(TIMEOUT):
        ch = ReplyChannel()
        assert ch.deliver((2, b"reply", None))
        assert not ch.deliver((2, b"second", None))
        assert not ch.fail(ConnectionClosed("x"))
        assert await ch.receive() == (2, b"reply", None)
        with pytest.raises(trio.EndOfChannel):
            await ch.receive()


async def test_channel_wakes_a_waiting_receiver_once() -> None:
    with trio.fail_after(TIMEOUT):
        ch = ReplyChannel()
        got: list[tuple[int, bytes, object]] = []

        async def receiver() -> None:
            got.append(await ch.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            assert ch.deliver((3, b"error text", None))
            assert not ch.deliver((2, b"too late", None))
        assert got == [(3, b"error text", None)]
        with pytest.raises(trio.EndOfChannel):
            await ch.receive()


async def test_channel_second_receiver_is_busy() -> None:
    ch = ReplyChannel()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ch.receive)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await ch.receive()
            ch.deliver((2, b"", None))


async def test_channel_cancel_while_waiting_then_deliver_later() -> None:
    ch = ReplyChannel()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ch.receive)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):  # one receiver is waiting
                await ch.receive()
            nursery.cancel_scope.cancel()
        # The cancelled waiter left no trace: a later delivery is kept for a new receiver
        # (who would get BusyResourceError if the waiter were still registered).
        assert ch.deliver((2, b"after cancel", None))
        assert await ch.receive() == (2, b"after cancel", None)


async def test_channel_fail_raises_in_receiver() -> None:
    with trio.fail_after(TIMEOUT):
        ch = ReplyChannel()
        assert ch.fail(ConnectionClosed("boom"))
        with pytest.raises(ConnectionClosed, match="boom"):
            await ch.receive()
        with pytest.raises(trio.EndOfChannel):
            await ch.receive()


async def test_channel_aclose_ignores_later_delivery() -> None:
    with trio.fail_after(TIMEOUT):
        ch = ReplyChannel()
        await ch.aclose()
        assert not ch.deliver((2, b"late", None))
        with pytest.raises(trio.EndOfChannel):
            await ch.receive()


async def test_channel_aclose_discards_a_delivered_reply() -> None:
    with trio.fail_after(TIMEOUT):
        ch = ReplyChannel()
        assert ch.deliver((2, b"unread", None))
        await ch.aclose()
        with pytest.raises(trio.EndOfChannel):
            await ch.receive()


async def test_channel_cancelled_receive_does_not_consume_a_ready_reply() -> None:
    # Trio's rule: an operation that raises Cancelled did not happen. A receive cancelled
    # with the reply already there must leave it for the next receive.
    with trio.fail_after(TIMEOUT):
        ch = ReplyChannel()
        ch.deliver((2, b"x", None))
        with trio.CancelScope() as scope:
            scope.cancel()
            await ch.receive()
        assert scope.cancelled_caught
        assert await ch.receive() == (2, b"x", None)
