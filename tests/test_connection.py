"""Connection: calls both ways, cancellation, limits, failure and graceful close.

Over memory streams (``open_connection_pair``) or the fault-injecting network, under the
autojump MockClock where time matters: deterministic, nothing sleeps on the real clock.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from helpers import echo, is_native, network_connection_pair

from monte_trio import (
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    Handshake,
    LocalProtocolError,
    RemoteError,
    Request,
)
from monte_trio.testing import FaultyNetwork, open_connection_pair

TIMEOUT = 30  # seconds; virtual under the autojump clock


def max_message(conn: Connection) -> int:
    return conn.facts.max_message_size


# ---- calls both ways ----------------------------------------------------------------------


async def test_requests_and_messages_both_ways(profile: Handshake) -> None:
    server_got: list[tuple[bool, bytes]] = []
    client_got: list[tuple[bool, bytes]] = []

    async def server_handler(req: Request) -> bytes:
        server_got.append((req.oneway, req.body))
        return b"server:" + req.body

    async def client_handler(req: Request) -> bytes:
        client_got.append((req.oneway, req.body))
        return b"client:" + req.body

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(
            profile, client_handler=client_handler, server_handler=server_handler
        ) as (client, server):
            assert client.initiator
            assert not server.initiator
            assert client.profile == server.profile == profile.profile
            assert await client.request(b"a") == b"server:a"
            assert await server.request(b"b") == b"client:b"
            await client.send(b"c")
            await server.send(b"d")
            assert await client.request(b"") == b"server:"
            assert await server.request(b"") == b"client:"
            cs, ss = client.statistics(), server.statistics()
    assert server_got == [(False, b"a"), (True, b"c"), (False, b"")]
    assert client_got == [(False, b"b"), (True, b"d"), (False, b"")]
    assert (cs.requests_sent, cs.replies_received, cs.messages_sent) == (2, 2, 1)
    assert (cs.requests_received, cs.messages_received) == (2, 1)
    assert (ss.requests_sent, ss.replies_received, ss.messages_sent) == (2, 2, 1)
    assert (ss.requests_received, ss.messages_received) == (2, 1)
    assert cs.pending_requests == ss.pending_requests == 0
    assert cs.replies_dropped == ss.replies_dropped == 0


async def test_call_ids_have_each_side_parity(monte_v1: Handshake) -> None:
    client_ids: list[int] = []
    server_ids: list[int] = []

    async def server_handler(req: Request) -> bytes:
        client_ids.append(req.call_id)
        return b""

    async def client_handler(req: Request) -> bytes:
        server_ids.append(req.call_id)
        return b""

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(
            monte_v1, client_handler=client_handler, server_handler=server_handler
        ) as (client, server):
            for _ in range(3):
                await client.request(b"")
                await server.request(b"")
                await client.send(b"")
    assert sorted(client_ids) == [0, 0, 0, 1, 3, 5]
    assert server_ids == [2, 4, 6]


async def test_many_concurrent_requests_get_their_own_replies(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(req: Request) -> bytes:
        # Reply out of order: later requests finish first.
        await trio.sleep(1 / (1 + int(req.body)))
        return req.body * 2

    results: dict[int, bytes] = {}

    async def call(conn: Connection, i: int) -> None:
        results[i] = await conn.request(str(i).encode())

    with trio.fail_after(TIMEOUT):
        async with (
            open_connection_pair(profile, server_handler=handler) as (client, _),
            trio.open_nursery() as nursery,
        ):
            for i in range(200):
                nursery.start_soon(call, client, i)
    assert results == {i: str(i).encode() * 2 for i in range(200)}


async def test_handler_calls_back_over_the_same_connection(profile: Handshake) -> None:
    # server handler -> client handler -> server handler again, all on one connection
    async def server_handler(req: Request) -> bytes:
        if req.body.startswith(b"inner"):
            return b"S(" + req.body + b")"
        inner = await req.connection.request(b"ask:" + req.body)
        return b"S[" + inner + b"]"

    async def client_handler(req: Request) -> bytes:
        deeper = await req.connection.request(b"inner " + req.body)
        return b"C[" + deeper + b"]"

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(
            profile, client_handler=client_handler, server_handler=server_handler
        ) as (client, _):
            replies = []
            async with trio.open_nursery() as nursery:

                async def call(i: int) -> None:
                    replies.append(await client.request(b"%d" % i))

                for i in range(20):
                    nursery.start_soon(call, i)
    assert sorted(replies) == sorted(b"S[C[S(inner ask:%d)]]" % i for i in range(20))


async def test_no_handler_refuses_requests(monte_v1: Handshake) -> None:
    # monte-v1 cannot send an error reply: the connection closes, the caller learns it.
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(monte_v1, server_handler=echo) as (client, server):
            with pytest.raises(ConnectionClosed):
                await server.request(b"x")
            await client.wait_closed()
            assert client.closed
            assert server.closed
            assert "no handler" in str(client.close_reason)


# ---- cancellation -------------------------------------------------------------------------


async def test_cancelled_request_leaves_connection_usable_and_late_reply_dropped(
    profile: Handshake,
) -> None:
    release = trio.Event()
    handler_cancelled = False

    async def handler(req: Request) -> bytes:
        nonlocal handler_cancelled
        if req.body == b"slow":
            try:
                await release.wait()
            except trio.Cancelled:
                handler_cancelled = True
                raise
        return b"reply to " + req.body

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler) as (client, server):
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def slow() -> None:
                    with scope:
                        await client.request(b"slow")

                nursery.start_soon(slow)
                await trio.testing.wait_all_tasks_blocked()
                assert client.statistics().pending_requests == 1
                assert server.statistics().running_handlers == 1
                scope.cancel()
            assert scope.cancelled_caught
            assert client.statistics().pending_requests == 0
            await trio.testing.wait_all_tasks_blocked()  # a native CANCEL is delivered
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert await client.request(b"next") == b"reply to next"
            await trio.testing.wait_all_tasks_blocked()
            stats = client.statistics()
            if is_native(profile):
                # native tells the handler to stop: no reply comes at all
                assert handler_cancelled
                assert stats.replies_dropped == 0
            else:
                assert not handler_cancelled
                assert stats.replies_dropped == 1
            assert stats.replies_received == 1
            assert not client.closed


async def test_send_cancelled_before_enqueue_sends_nothing(profile: Handshake) -> None:
    got: list[bytes] = []

    async def handler(req: Request) -> bytes:
        got.append(req.body)
        return b""

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler) as (client, _):
            with trio.CancelScope() as scope:
                scope.cancel()
                await client.send(b"never")
            assert scope.cancelled_caught
            with trio.CancelScope() as scope:
                scope.cancel()
                await client.request(b"never either")
            assert scope.cancelled_caught
            assert client.statistics().messages_sent == 0
            assert client.statistics().requests_sent == 0
            await client.send(b"after")
            assert await client.request(b"req") == b""
    assert got == [b"after", b"req"]


async def test_send_cancelled_while_queued_is_sent_whole(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    # The link is stalled, so the writer is stuck writing a first batch; a second send
    # waits in the session's queue and is cancelled there. Since the session (wire v2)
    # a message that got its credit is queued for good: it goes out whole, in order, and
    # the stream stays intact for later calls.
    got: list[bytes] = []

    async def handler(req: Request) -> bytes:
        got.append(req.body)
        return b"ok"

    net = FaultyNetwork(buffer_size=1024, max_segment=512)
    big = b"B" * 2000
    with trio.fail_after(TIMEOUT):
        async with network_connection_pair(profile, net, server_handler=handler) as (client, _):
            net.stall("client", "server")
            async with trio.open_nursery() as nursery:
                # uncompressed: it fills the link, the writer blocks
                nursery.start_soon(lambda: client.send(big, compress=False))
                await trio.testing.wait_all_tasks_blocked()
                assert client.statistics().queued_bytes == 0  # the writer took it
                queued = trio.CancelScope()

                async def queued_send() -> None:
                    with queued:
                        await client.send(b"cancelled while queued")

                nursery.start_soon(queued_send)
                await trio.testing.wait_all_tasks_blocked()
                assert client.statistics().queued_bytes > 0
                queued.cancel()
                await trio.testing.wait_all_tasks_blocked()
                net.heal()
            assert queued.cancelled_caught
            await client.send(b"after")
            assert await client.request(b"req") == b"ok"
            assert not client.closed
    assert got == [big, b"cancelled while queued", b"after", b"req"]


async def test_send_cancelled_after_the_writer_took_it_is_sent_whole(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    got: list[bytes] = []

    async def handler(req: Request) -> bytes:
        got.append(req.body)
        return b"ok"

    net = FaultyNetwork(buffer_size=1024, max_segment=512)
    big = bytes(range(256)) * 8
    with trio.fail_after(TIMEOUT):
        async with network_connection_pair(profile, net, server_handler=handler) as (client, _):
            net.stall("client", "server")
            with trio.move_on_after(1) as scope:
                # taken by the writer (whole: uncompressed), which blocks on the link
                await client.send(big, compress=False)
            assert scope.cancelled_caught
            net.heal()
            assert await client.request(b"req") == b"ok"
    assert got == [big, b"req"]


# ---- limits -------------------------------------------------------------------------------


async def test_max_pending_requests(profile: Handshake) -> None:
    release = trio.Event()

    async def handler(req: Request) -> bytes:
        await release.wait()
        return req.body

    config = ConnectionConfig(max_pending_requests=3)
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler, config=config) as (
            client,
            _,
        ):
            replies: list[bytes] = []

            async def call(body: bytes) -> None:
                replies.append(await client.request(body))

            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(call, b"%d" % i)
                await trio.testing.wait_all_tasks_blocked()
                # One more waits for room (as a send waits for the send queue), in order.
                nursery.start_soon(call, b"one too many")
                nursery.start_soon(call, b"and another")
                await trio.testing.wait_all_tasks_blocked()
                assert client.statistics().pending_requests == 3
                assert client.statistics().requests_sent == 3
                release.set()
            assert sorted(replies) == sorted([b"0", b"1", b"2", b"one too many", b"and another"])
            assert client.statistics().requests_sent == 5
            assert await client.request(b"room again") == b"room again"


async def test_message_too_large_is_refused_locally(profile: Handshake) -> None:
    config = ConnectionConfig(max_message_size=3000)
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=echo, config=config) as (
            client,
            _,
        ):
            limit = max_message(client)
            assert 0 < limit <= 3000
            too_big = b"x" * (limit + 1)
            with pytest.raises(LocalProtocolError):
                await client.request(too_big)
            with pytest.raises(LocalProtocolError):
                await client.send(too_big)
            with pytest.raises(LocalProtocolError):
                client.send_nowait(too_big)
            stats = client.statistics()
            assert (stats.pending_requests, stats.queued_bytes) == (0, 0)
            just_fits = bytes(range(256)) * (limit // 256) + b"y" * (limit % 256)
            assert len(just_fits) == limit
            assert await client.request(just_fits) == just_fits
            assert not client.closed


async def test_monte_v1_default_message_limit_is_one_record(monte_v1: Handshake) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(monte_v1, server_handler=echo) as (client, _):
            assert max_message(client) == 4096 - 16 - 4
            with pytest.raises(LocalProtocolError, match="4076"):
                await client.request(b"x" * 4077)
            assert await client.request(b"x" * 4076) == b"x" * 4076


async def test_reply_too_large(profile: Handshake) -> None:
    async def handler(req: Request) -> bytes:
        await trio.lowlevel.checkpoint()
        return b"r" * (max_message(req.connection) + 1)

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler) as (client, server):
            if is_native(profile):
                with pytest.raises(RemoteError, match="could not be sent"):
                    await client.request(b"x")
                assert not client.closed
            else:
                with pytest.raises(ConnectionClosed):
                    await client.request(b"x")
                assert server.closed
                assert "could not be sent" in str(server.close_reason)


async def test_send_nowait_raises_would_block_when_queue_full(profile: Handshake) -> None:
    count = 0

    async def handler(req: Request) -> bytes:
        nonlocal count
        count += req.oneway
        return b""

    config = ConnectionConfig(max_send_queue=1000)
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler, config=config) as (
            client,
            _,
        ):
            queued = 0
            with pytest.raises(trio.WouldBlock):  # noqa: PT012
                for _ in range(100):  # no checkpoint: the writer cannot drain meanwhile
                    client.send_nowait(b"m" * 100)
                    queued += 1
            assert queued == 10  # 10 records of 104+ bytes reach the 1000-byte limit
            assert client.statistics().queued_bytes >= 1000
            await client.send(b"m")  # waits for room, then for its own write
            await client.request(b"sync")
    assert count == queued + 1


async def test_send_waits_while_peer_is_not_reading(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    got: list[bytes] = []

    async def handler(req: Request) -> bytes:
        got.append(req.body)
        return b""

    net = FaultyNetwork(buffer_size=1024, max_segment=512)
    config = ConnectionConfig(max_send_queue=2000)
    messages = [bytes([i]) * 900 for i in range(8)]
    with trio.fail_after(TIMEOUT):
        async with network_connection_pair(
            profile, net, server_handler=handler, config=config
        ) as (client, _):
            net.stall("client", "server")
            done: list[int] = []
            async with trio.open_nursery() as nursery:

                async def send(i: int) -> None:
                    await client.send(messages[i])
                    done.append(i)

                for i in range(8):
                    nursery.start_soon(send, i)
                    await trio.testing.wait_all_tasks_blocked()
                # Peer not reading: the link holds 1 KiB, the queue 2,000 bytes; the
                # rest wait for room and nothing completes while the stall lasts.
                await trio.sleep(10)
                # only the first message is written: the writer is stuck on the second,
                # two more fill the queue, the other four wait for room
                assert done == [0]
                assert client.statistics().queued_bytes >= 2000
                with pytest.raises(trio.WouldBlock):
                    client.send_nowait(b"full")
                net.heal()
            assert sorted(done) == list(range(8))
            await client.request(b"sync")
    assert sorted(got[:-1]) == sorted(messages)
    assert got[-1] == b"sync"


async def test_max_concurrent_handlers_and_reader_back_pressure(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    release = trio.Event()
    running = 0
    peak = 0
    handled = 0

    async def handler(req: Request) -> bytes:
        nonlocal running, peak, handled
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
        finally:
            running -= 1
        handled += 1
        return b""

    # monte-v1 has no credit: its reader stops at the handler cap. Native (wire v2): the
    # reader never stops; the request window bounds what the client can make it hold
    # (10 messages of 500 bytes, each costing its body + 64, above the M + 64 reserve).
    window = 2 * (1024 + 64) + 10 * 564
    server_config = ConnectionConfig(
        max_concurrent_handlers=3, max_message_size=1024, request_window=window
    )
    net = FaultyNetwork(buffer_size=4096, max_segment=1024)
    with trio.fail_after(TIMEOUT):
        async with network_connection_pair(
            profile, net, server_handler=handler, server_config=server_config
        ) as (client, server):
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(client.send, bytes([i]) * 500)
                await trio.testing.wait_all_tasks_blocked()
                assert running == 3
                assert server.statistics().running_handlers == 3
                received_before = server.statistics().messages_received
                if is_native(profile):
                    # held by credit: what it did not accept is still queued at the client
                    assert received_before <= 11
                    assert client.statistics().messages_sent <= 11
                else:
                    # the reader stopped: what it did not read is still in the network
                    assert received_before < 3 + 5  # at most one more chunk's records
                    sent = net.statistics().bytes_sent
                    assert net.statistics().bytes_delivered < sent
                await trio.sleep(5)
                assert server.statistics().messages_received == received_before
                release.set()
            await client.request(b"sync")
    assert peak == 3
    assert handled == 41


# ---- handler errors -----------------------------------------------------------------------


async def test_handler_exception_monte_v1_closes_connection(monte_v1: Handshake) -> None:
    async def handler(req: Request) -> bytes:
        await trio.lowlevel.checkpoint()
        if req.body == b"boom":
            raise ValueError("boom")
        await trio.sleep_forever()
        raise AssertionError

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(monte_v1, server_handler=handler) as (client, server):
            async with trio.open_nursery() as nursery:
                errors: list[ConnectionClosed] = []

                async def other() -> None:
                    try:
                        await client.request(b"other")
                    except ConnectionClosed as exc:
                        errors.append(exc)

                nursery.start_soon(other)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(ConnectionClosed):
                    await client.request(b"boom")
            assert len(errors) == 1  # the bystander on the same connection learns too
            await client.wait_closed()
            assert client.closed
            assert server.closed
            assert "raised ValueError('boom')" in str(server.close_reason)
            with pytest.raises(ConnectionClosed):
                await client.request(b"after")


async def test_handler_exception_native_is_a_remote_error(native: Handshake) -> None:
    profile = native

    async def handler(req: Request) -> bytes:
        await trio.lowlevel.checkpoint()
        if req.body == b"boom":
            raise ValueError("boom")
        return b"fine"

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler) as (client, _):
            with pytest.raises(RemoteError, match="ValueError: boom"):
                await client.request(b"boom")
            assert await client.request(b"ok") == b"fine"


async def test_oneway_handler_exception_keeps_the_connection(profile: Handshake) -> None:
    async def handler(req: Request) -> bytes:
        await trio.lowlevel.checkpoint()
        if req.oneway:
            raise ValueError("one-way failure")
        return b"fine"

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler) as (client, _):
            await client.send(b"x")
            assert await client.request(b"y") == b"fine"
            assert not client.closed


# ---- a dying connection -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["drop", "close server at once", "cut mid-record"])
async def test_dying_connection_fails_every_waiter(
    profile: Handshake, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    entered = 0
    release = trio.Event()

    async def handler(req: Request) -> bytes:
        nonlocal entered
        entered += 1
        await release.wait()
        return req.body

    net = FaultyNetwork(buffer_size=1024, max_segment=512)
    n = 50
    outcomes: list[BaseException | bytes] = []

    async def call(conn: Connection, i: int) -> None:
        try:
            outcomes.append(await conn.request(b"%d" % i))
        except ConnectionClosed as exc:
            outcomes.append(exc)

    async def sender(conn: Connection) -> None:
        try:
            # waits for its write (3,000 bytes, uncompressed): fails with the link
            await conn.send(b"x" * 3000, compress=False)
        except ConnectionClosed as exc:
            outcomes.append(exc)

    with trio.fail_after(TIMEOUT):
        async with network_connection_pair(profile, net, server_handler=handler) as (
            client,
            server,
        ):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(call, client, i)
                await trio.testing.wait_all_tasks_blocked()
                assert entered == n
                assert client.statistics().pending_requests == n
                net.stall("client", "server")
                nursery.start_soon(sender, client)
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
                if how == "drop":
                    net.drop("client", "server")
                elif how == "close server at once":
                    await trio.aclose_forcefully(server)
                else:
                    net.cut("server", "client", after=3)
                    release.set()  # the replies start, and are cut short
            elapsed = trio.current_time() - start
            assert elapsed < 1.0  # promptly: no timer was involved
            assert len(outcomes) == n + 1
            assert all(isinstance(o, ConnectionClosed) for o in outcomes), outcomes
            assert client.closed
            assert client.statistics().pending_requests == 0
            with pytest.raises(ConnectionClosed):
                await client.request(b"after")
            with pytest.raises(ConnectionClosed):
                client.send_nowait(b"after")
            await client.wait_closed()
            await server.wait_closed()


async def test_peer_eof_closes_connection(profile: Handshake) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=echo) as (client, server):
            await client.aclose()
            await server.wait_closed()
            assert server.closed
            assert server.close_reason is not None
            assert "closed" in server.close_reason.reason
            with pytest.raises(ConnectionClosed):
                await server.request(b"x")


async def test_idle_timeout(profile: Handshake, autojump_clock: trio.testing.MockClock) -> None:
    config = ConnectionConfig(idle_timeout=10, keepalive_interval=None)
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=echo, config=config) as (
            client,
            server,
        ):
            start = trio.current_time()
            await trio.sleep(9)
            assert await client.request(b"x") == b"x"  # activity resets the timer
            await server.wait_closed()
            assert trio.current_time() - start == pytest.approx(19, abs=0.01)
            assert "idle_timeout" in str(server.close_reason)


# ---- graceful close -----------------------------------------------------------------------


async def test_graceful_close_waits_for_in_flight_handlers(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    finished: list[bytes] = []

    async def handler(req: Request) -> bytes:
        await trio.sleep(3)
        finished.append(req.body)
        return b"done " + req.body

    config = ConnectionConfig(grace_period=5)
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler, config=config) as (
            client,
            server,
        ):
            replies: list[bytes] = []
            async with trio.open_nursery() as nursery:

                async def call(i: int) -> None:
                    replies.append(await client.request(b"%d" % i))

                for i in range(5):
                    nursery.start_soon(call, i)
                await trio.testing.wait_all_tasks_blocked()
                assert server.statistics().running_handlers == 5
                start = trio.current_time()
                await server.aclose()
                assert trio.current_time() - start == pytest.approx(3, abs=0.01)
                assert server.closed
            assert sorted(replies) == sorted(b"done %d" % i for i in range(5))
            assert len(finished) == 5


async def test_graceful_close_cancels_handlers_beyond_the_grace_period(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    cancelled = 0

    async def handler(req: Request) -> bytes:
        nonlocal cancelled
        try:
            await trio.sleep(100)
        except trio.Cancelled:
            cancelled += 1
            raise
        return b"too late"

    config = ConnectionConfig(grace_period=2)
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler, config=config) as (
            client,
            server,
        ):
            errors: list[ConnectionClosed] = []
            async with trio.open_nursery() as nursery:

                async def call(i: int) -> None:
                    try:
                        await client.request(b"%d" % i)
                    except ConnectionClosed as exc:
                        errors.append(exc)

                for i in range(4):
                    nursery.start_soon(call, i)
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
                await server.aclose()
                assert trio.current_time() - start == pytest.approx(2, abs=0.01)
            assert cancelled == 4
            assert len(errors) == 4
            assert server.statistics().running_handlers == 0


async def test_close_gracefully_with_explicit_grace(
    monte_v1: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(req: Request) -> bytes:
        await trio.sleep(100)
        return b""

    with trio.fail_after(TIMEOUT):
        async with (
            open_connection_pair(monte_v1, server_handler=handler) as (client, server),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(client.send, b"x")
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            await server.close_gracefully(0.5)
            assert trio.current_time() - start == pytest.approx(0.5, abs=0.01)
            await server.aclose()  # idempotent, immediate
            assert trio.current_time() - start == pytest.approx(0.5, abs=0.01)


async def test_graceful_close_refuses_new_calls_at_once(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(req: Request) -> bytes:
        await trio.sleep(1)
        return b""

    with trio.fail_after(TIMEOUT):
        async with (
            open_connection_pair(profile, server_handler=handler) as (client, _),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(client.request, b"in flight")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(client.aclose)
            await trio.testing.wait_all_tasks_blocked()
            assert client.closed
            with pytest.raises(ConnectionClosed):
                await client.request(b"new")
            with pytest.raises(ConnectionClosed):
                await client.send(b"new")
            with pytest.raises(ConnectionClosed):
                client.send_nowait(b"new")
        # the in-flight request completed (the nursery did not raise)


async def test_graceful_close_flushes_queued_sends(profile: Handshake) -> None:
    got: list[bytes] = []

    async def handler(req: Request) -> bytes:
        got.append(req.body)
        return b""

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler) as (client, server):
            for i in range(200):
                client.send_nowait(b"%d" % i)
            assert client.statistics().queued_bytes > 0
            await client.aclose()
            await server.wait_closed()
    assert got == [b"%d" % i for i in range(200)]


async def test_peer_close_lets_running_oneway_handlers_finish(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    # The client queues one-way messages and closes gracefully: its side is done. The
    # server's handlers, which await before finishing, should still complete (within the
    # server's grace period) rather than be cancelled by the peer's EOF.
    done: list[bytes] = []

    async def handler(req: Request) -> bytes:
        await trio.sleep(1)
        done.append(req.body)
        return b""

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler) as (client, server):
            for i in range(10):
                client.send_nowait(b"%d" % i)
            await client.aclose()
            await server.wait_closed()
    assert sorted(done) == sorted(b"%d" % i for i in range(10))


async def test_connection_block_raising_closes_at_once(
    monte_v1: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(req: Request) -> bytes:
        await trio.sleep(100)
        return b""

    with trio.fail_after(TIMEOUT):
        start = trio.current_time()

        async def body() -> Connection:
            async with open_connection_pair(monte_v1, server_handler=handler) as (client, _):
                await client.send(b"x")  # a handler is now running on the server
                await trio.testing.wait_all_tasks_blocked()
                raise KeyError(client)

        with pytest.raises(KeyError) as info:
            await body()
        client = info.value.args[0]
        assert trio.current_time() == start  # no grace period was waited
        assert client.closed


async def test_connection_entered_twice_is_an_error(monte_v1: Handshake) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(monte_v1) as (client, _):
            with pytest.raises(RuntimeError, match="only once"):
                await client.__aenter__()
