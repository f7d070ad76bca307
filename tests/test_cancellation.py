"""Cancelling a caller at each point of a call's life.

Whatever the point, a cancelled call must never cut a record in half (the stream stays
decodable), never leave its pending entry behind, and the connection must keep serving.

The points: (a) before the call is enqueued, (b) while it is queued behind a writer that
is blocked, (c) while the writer is writing it, (d) while it awaits its reply. A blocked
writer is made with a :class:`~monte_trio.testing.FaultyNetwork` link whose direction is
stalled and whose buffer is small, so ``send_all`` parks part-way through a batch.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import pytest
import trio
import trio.testing
from helpers import Recorder, is_native, network_connection_pair

from monte_trio import (
    Connection,
    ConnectionConfig,
    Handler,
    Handshake,
)
from monte_trio.testing import FaultyNetwork

BIG = 3000  # bytes: more than the link buffer, less than a monte-v1 record
# Without compression: the bodies must fill the link as they are.
CONFIG = ConnectionConfig(keepalive_interval=None, grace_period=1, compression=())


def faulty_pair(
    profile: Handshake, network: FaultyNetwork, handler: Handler
) -> AbstractAsyncContextManager[tuple[Connection, Connection]]:
    """Two connections over ``network``: (client, server); the server serves ``handler``."""
    return network_connection_pair(profile, network, server_handler=handler, config=CONFIG)


async def still_serving(client: Connection, server: Connection, handler: Recorder) -> None:
    """100 more requests (concurrent) get their own replies; nothing is left pending."""
    replies: dict[bytes, bytes] = {}

    async def one(i: int) -> None:
        body = b"after-%03d" % i
        replies[body] = await client.request(body)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
    assert replies == {b"after-%03d" % i: b"re:after-%03d" % i for i in range(100)}
    assert all(handler.seen[body] == 1 for body in replies)
    await trio.testing.wait_all_tasks_blocked()
    assert client.statistics().pending_requests == 0
    assert server.statistics().pending_requests == 0
    assert server.statistics().running_handlers == 0
    assert not client.closed
    assert not server.closed


def network() -> FaultyNetwork:
    return FaultyNetwork(seed=2, latency=0.005, buffer_size=512, max_segment=512)


@pytest.mark.parametrize("call", ["request", "send"])
async def test_a_cancelled_before_the_call_sends_nothing(
    autojump_clock: trio.testing.MockClock, profile: Handshake, call: str
) -> None:
    handler = Recorder()
    with trio.fail_after(60):
        async with faulty_pair(profile, network(), handler) as (client, server):
            before = client.statistics()
            with trio.CancelScope() as scope:
                scope.cancel()
                if call == "request":
                    await client.request(b"never")
                else:
                    await client.send(b"never")
            assert scope.cancelled_caught
            after = client.statistics()
            assert after.requests_sent == before.requests_sent
            assert after.messages_sent == before.messages_sent
            assert after.pending_requests == 0
            assert after.queued_bytes == 0
            await still_serving(client, server, handler)
            assert handler.seen[b"never"] == 0


@pytest.mark.parametrize("call", ["request", "send"])
async def test_b_cancelled_while_queued_behind_a_blocked_writer(
    autojump_clock: trio.testing.MockClock, profile: Handshake, call: str
) -> None:
    handler = Recorder()
    net = network()
    big = b"B" * BIG
    with trio.fail_after(60):
        async with faulty_pair(profile, net, handler) as (client, server):
            net.stall("client", "server")
            client.send_nowait(big)
            await trio.testing.wait_all_tasks_blocked()
            # The writer took the big message and is stuck in send_all (full link buffer).
            assert client.statistics().queued_bytes == 0
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def victim() -> None:
                    with scope:
                        if call == "request":
                            await client.request(b"victim")
                        else:
                            await client.send(b"victim")

                nursery.start_soon(victim)
                await trio.testing.wait_all_tasks_blocked()
                assert client.statistics().queued_bytes > 0  # queued behind the writer
                scope.cancel()
            assert scope.cancelled_caught
            assert client.statistics().pending_requests == 0  # the entry is gone
            net.heal()
            await still_serving(client, server, handler)
            assert handler.seen[big] == 1  # the record being written went out whole
            if call == "send":
                # Since the session (wire v2): a one-way message that got its credit is
                # queued for good; cancelling the wait for its write does not unsend it.
                # It goes out whole, after the big one, and is handled once.
                assert handler.seen[b"victim"] == 1
            elif is_native(profile):
                # written, then CANCEL right behind it in the same batch: the server drops
                # it from its inbox before a handler takes it; no reply is sent
                assert handler.seen[b"victim"] == 0
                assert client.statistics().replies_dropped == 0
            else:
                # monte-v1 has no CANCEL: the server runs it; its reply is dropped
                assert handler.seen[b"victim"] == 1
                assert client.statistics().replies_dropped == 1


@pytest.mark.parametrize("call", ["request", "send"])
async def test_c_cancelled_while_being_written_goes_out_whole(
    autojump_clock: trio.testing.MockClock, profile: Handshake, call: str
) -> None:
    handler = Recorder()
    net = network()
    big = b"W" * BIG
    with trio.fail_after(60):
        async with faulty_pair(profile, net, handler) as (client, server):
            net.stall("client", "server")
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def victim() -> None:
                    with scope:
                        if call == "request":
                            await client.request(big)
                        else:
                            await client.send(big)

                nursery.start_soon(victim)
                await trio.testing.wait_all_tasks_blocked()
                stats = client.statistics()
                assert stats.queued_bytes == 0  # the writer took it: being written now
                scope.cancel()
            assert scope.cancelled_caught
            assert client.statistics().pending_requests == 0
            net.heal()
            await still_serving(client, server, handler)
            # the peer decoded the whole record and handled it (a native CANCEL comes in
            # the next batch, after the instant handler has already run)
            assert handler.seen[big] == 1
            if call == "request" and not is_native(profile):
                assert client.statistics().replies_dropped == 1


@pytest.mark.parametrize("body", [b"slow", b"slow-shielded"])
async def test_d_cancelled_while_awaiting_the_reply(
    autojump_clock: trio.testing.MockClock, profile: Handshake, body: bytes
) -> None:
    handler = Recorder()
    with trio.fail_after(60):
        async with faulty_pair(profile, network(), handler) as (client, server):
            with trio.move_on_after(1) as scope:
                await client.request(body)
            assert scope.cancelled_caught
            assert handler.started.is_set()
            assert client.statistics().pending_requests == 0
            if body == b"slow" and is_native(profile):
                # the CANCEL frame reached the server and cancelled the handler
                await trio.sleep(0.1)
                assert handler.cancelled == [body]
                assert server.statistics().running_handlers == 0
                handler.release.set()
                await trio.sleep(0.1)
                assert client.statistics().replies_dropped == 0  # no reply was sent
            else:
                # the handler runs to the end; its late reply is dropped
                handler.release.set()
                await trio.sleep(0.1)
                assert handler.cancelled == []
                # native: the session absorbs an answer to a cancelled call (and credits
                # it back at once), so the connection never sees it; monte-v1 counts it.
                assert client.statistics().replies_dropped == (0 if is_native(profile) else 1)
            await still_serving(client, server, handler)


async def test_cancel_at_every_instant_of_a_call(
    autojump_clock: trio.testing.MockClock, profile: Handshake
) -> None:
    """Sweep the cancel time over a whole round trip (latency 5 ms, each way), with other
    traffic in flight, and check the connection after each."""
    handler = Recorder()
    with trio.fail_after(600):
        async with faulty_pair(profile, network(), handler) as (client, server):
            step = 0.0005
            for n in range(30):  # 0 .. 14.5 ms: before, queued, written, awaiting reply
                body = b"sweep-%02d" % n
                async with trio.open_nursery() as nursery:
                    # other traffic, so the writer is busy at various points
                    nursery.start_soon(client.request, b"other-%02d" % n)
                    nursery.start_soon(client.send, b"oneway-%02d" % n)
                    with trio.move_on_after(n * step):
                        if n % 2:
                            await client.request(body)
                        else:
                            await client.send(body)
                await trio.sleep(0.05)
                assert client.statistics().pending_requests == 0
                assert handler.seen[body] <= 1
                assert handler.seen[b"other-%02d" % n] == 1
                assert handler.seen[b"oneway-%02d" % n] == 1
            await still_serving(client, server, handler)
