"""The two fast paths: direct writes from callers, and plain-function handlers run inline.

Direct writes need a record-safe stream, so those tests run over a real socket pair
(``trio.SocketStream``); everything else runs over memory streams or the fault-injecting
network under the autojump clock.
"""

from __future__ import annotations

import socket
import warnings

import pytest
import trio
import trio.testing
from helpers import (
    assert_calls_written_by_callers,
    is_native,
    network_connection_pair,
    socket_connection_pair,
    socket_stream_pair,
)

from monte_trio import (
    ConnectionClosed,
    ConnectionConfig,
    Handshake,
    RemoteError,
    Request,
    SecureStream,
    inline,
)
from monte_trio.testing import FaultyNetwork, open_connection_pair, secure_stream_pair

TIMEOUT = 30  # seconds (virtual under the autojump clock)


async def cramped_socket_pair(handshake: Handshake) -> tuple[SecureStream, SecureStream]:
    """Secure streams over a socket pair with small buffers, so that a write soon blocks
    while the other end does not read."""
    client, server = await secure_stream_pair(handshake, transports=socket_stream_pair())
    for stream, option in ((client, socket.SO_SNDBUF), (server, socket.SO_RCVBUF)):
        transport = stream.transport
        assert isinstance(transport, trio.SocketStream)
        transport.socket.setsockopt(socket.SOL_SOCKET, option, 4096)
    return client, server


def has_unsent(stream: SecureStream) -> bool:
    return stream.has_unsent


# ---- record-safe streams ------------------------------------------------------------------


async def test_only_socket_streams_are_record_safe(profile: Handshake) -> None:
    memory_client, memory_server = await secure_stream_pair(profile)
    assert not memory_client.record_safe
    assert not memory_server.record_safe
    client, server = await secure_stream_pair(profile, transports=socket_stream_pair())
    assert client.record_safe
    assert server.record_safe
    for stream in (memory_client, memory_server, client, server):
        await stream.aclose()


async def test_cancelled_send_keeps_the_rest_for_the_next_send(profile: Handshake) -> None:
    client, server = await cramped_socket_pair(profile)
    size = min(client.max_plaintext, 16 * 1024)
    records = [bytes([i]) * size for i in range(64)]  # far more than both buffers hold
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def send() -> None:
                with scope:
                    await client.send_records(list(records))

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()  # the socket buffers are full
            assert not has_unsent(client)
            scope.cancel()
        assert scope.cancelled_caught
        assert has_unsent(client)  # the records are sealed; their tail waits for the next send

        received: list[bytes] = []

        async def receive() -> None:
            while len(received) < len(records) + 1:
                received.extend(await server.receive_records())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await client.send_records([b"after"])
        assert not client.has_unsent
    assert received == [*records, b"after"]  # every record whole, in order
    await client.aclose()
    await server.aclose()


async def test_a_flush_sends_the_unsent_rest(native: Handshake) -> None:
    client, server = await cramped_socket_pair(native)
    records = [bytes([i]) * 16000 for i in range(32)]
    with trio.fail_after(TIMEOUT):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_records, list[bytes | None](records))
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        assert client.has_unsent
        received: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                while len(received) < len(records):
                    received.extend(await server.receive_records())

            nursery.start_soon(receive)
            await client.send_records([])  # nothing new: only the rest
    assert received == records
    await client.aclose()
    await server.aclose()


# ---- direct writes ------------------------------------------------------------------------


async def test_calls_on_a_quiet_connection_skip_the_writer(profile: Handshake) -> None:
    async def handler(req: Request) -> bytes:
        await trio.lowlevel.checkpoint()
        return req.body[::-1]

    with trio.fail_after(TIMEOUT):
        async with socket_connection_pair(profile, server_handler=handler) as (client, server):
            await client.request(b"warm up")
            await assert_calls_written_by_callers(client, profile, 50)
            assert server.statistics().messages_received == 50


async def test_concurrent_callers_on_a_socket_all_arrive(profile: Handshake) -> None:
    # Direct writes and the writer interleave here (the first caller of a burst may
    # write directly, the others queue behind it): every message must arrive once.
    got: list[bytes] = []

    def handler(req: Request) -> bytes:
        got.append(req.body)
        return b"ok"

    with trio.fail_after(TIMEOUT):
        async with socket_connection_pair(profile, server_handler=inline(handler)) as (
            client,
            _,
        ):
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(client.send, b"%03d" % i)
                    nursery.start_soon(client.request, b"r%03d" % i)
            await client.request(b"sync")
    expected = [b"%03d" % i for i in range(100)] + [b"r%03d" % i for i in range(100)]
    assert sorted(got[:-1]) == sorted(expected)


async def test_cancelled_direct_write_is_sent_whole(profile: Handshake) -> None:
    # monte-v1: the server takes one request at a time and its handler waits, so it soon
    # stops reading; a large send on the quiet client connection is written directly and
    # blocks on the full socket. Cancelling it must not cut a record: once the server
    # reads again, everything arrives intact and the connection goes on. Native (wire
    # v2): the server never stops reading (credit bounds it instead), so the big send
    # completes while the handler is still busy; everything arrives intact all the same.
    release = trio.Event()
    got: list[bytes] = []

    async def handler(req: Request) -> bytes:
        got.append(req.body)
        await release.wait()
        return b"ok"

    big = bytes(range(256)) * 8192  # 2 MiB: more than the socket buffers hold
    # (monte-v1 sends a message as one record, which must be allowed to be that large)
    record = None if is_native(profile) else 4 * 1024 * 1024
    config = ConnectionConfig(
        max_concurrent_handlers=1, max_message_size=4 * 1024 * 1024, max_record_size=record
    )
    with trio.fail_after(TIMEOUT):
        async with socket_connection_pair(profile, config=config, server_handler=handler) as (
            client,
            _,
        ):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send, b"first")  # holds the only handler
                await trio.testing.wait_all_tasks_blocked()
                with trio.CancelScope() as scope:
                    nursery.start_soon(client.send, b"second")  # fills the inbox
                    await trio.testing.wait_all_tasks_blocked()
                    async with trio.open_nursery() as inner:
                        inner.start_soon(client.send, big)
                        await trio.testing.wait_all_tasks_blocked()
                        scope.cancel()
                assert scope.cancelled_caught == (not is_native(profile))
                release.set()
            assert await client.request(b"after") == b"ok"
            assert not client.closed
    assert got[:2] == [b"first", b"second"]
    assert got[2:] == [big, b"after"]


async def test_direct_write_to_a_dead_peer_fails_the_connection(profile: Handshake) -> None:
    with trio.fail_after(TIMEOUT):
        async with socket_connection_pair(profile) as (client, server):
            await trio.aclose_forcefully(server)  # closed at once, its socket too

            async def send_until_it_fails() -> None:
                for _ in range(100):  # the first writes may still fit the socket buffer
                    await client.send(b"x" * 1000)

            # (the reader may see the EOF before the writer sees the broken pipe)
            with pytest.raises(ConnectionClosed):
                await send_until_it_fails()
            assert client.closed


# ---- inline handlers ----------------------------------------------------------------------


async def _async_echo(req: Request) -> bytes:
    return req.body


async def test_inline_handler_runs_in_the_reader(profile: Handshake) -> None:
    tasks: list[str] = []
    notes: list[bytes] = []

    def handler(req: Request) -> bytes | None:
        tasks.append(trio.lowlevel.current_task().name)
        if req.oneway:
            notes.append(req.body)
            return None
        return b"re:" + req.body

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=inline(handler)) as (
            client,
            server,
        ):
            await client.send(b"n1")
            client.send_nowait(b"n2")
            assert await client.request(b"q") == b"re:q"
            assert await client.request(b"") == b"re:"
            stats = server.statistics()
            assert (stats.messages_received, stats.requests_received) == (2, 2)
            assert stats.running_handlers == 0
    assert notes == [b"n1", b"n2"]
    assert len(tasks) == 4
    assert all(name.endswith(" reader") for name in tasks)


async def test_inline_handler_errors(profile: Handshake) -> None:
    def handler(req: Request) -> bytes:
        if req.body == b"boom":
            raise ValueError("boom")
        if req.oneway:
            raise ValueError("one-way failure")
        return b"fine"

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=inline(handler)) as (
            client,
            server,
        ):
            await client.send(b"x")  # logged, and the connection goes on
            assert await client.request(b"y") == b"fine"
            if is_native(profile):
                with pytest.raises(RemoteError, match="ValueError: boom"):
                    await client.request(b"boom")
                assert await client.request(b"ok") == b"fine"
            else:  # monte-v1 cannot report errors: it closes the connection
                with pytest.raises(ConnectionClosed):
                    await client.request(b"boom")
                assert "raised ValueError('boom')" in str(server.close_reason)


async def test_handler_returning_the_wrong_type(native: Handshake) -> None:
    async def async_handler(req: Request) -> bytes:
        return "text"  # type: ignore[return-value]

    def looks_async(req: Request) -> object:  # wrapped as a plain function by mistake
        return _async_echo(req)

    with trio.fail_after(TIMEOUT), warnings.catch_warnings():
        warnings.simplefilter("error")  # the coroutine is closed, never "never awaited"
        async with open_connection_pair(native, server_handler=async_handler) as (client, _):
            with pytest.raises(RemoteError, match="returned a str; it must return bytes"):
                await client.request(b"a")
            assert not client.closed
        handler = inline(looks_async)  # type: ignore[arg-type]
        async with open_connection_pair(native, server_handler=handler) as (client, _):
            with pytest.raises(RemoteError, match="pass the async handler unwrapped"):
                await client.request(b"a")


async def test_inline_replies_are_held_back_by_the_send_queue(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    # The client stops reading; the server's inline replies fill its send queue, and then
    # its reader stops taking requests rather than queue replies without bound.
    def handler(req: Request) -> bytes:
        return b"R" * 1000

    net = FaultyNetwork(buffer_size=1024, max_segment=512)
    # monte-v1: the server's reader stops once the send queue is full. Native (wire v2):
    # the reader never stops; the server's 4 call slots hold the other requests at the
    # client, so at most 4 replies are ever owed.
    server_config = ConnectionConfig(max_send_queue=4000, max_calls=4)
    n = 40
    with trio.fail_after(TIMEOUT):
        async with network_connection_pair(
            profile, net, server_handler=inline(handler), server_config=server_config
        ) as (client, server):
            net.stall("server", "client")
            replies: list[bytes] = []
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    replies.append(await client.request(b"q"))

                for _ in range(n):
                    nursery.start_soon(call)
                await trio.sleep(10)
                stats = server.statistics()
                assert stats.requests_received < n
                assert stats.queued_bytes < server_config.max_send_queue + 1100
                net.heal()
            assert replies == [b"R" * 1000] * n
            assert server.statistics().requests_received == n
