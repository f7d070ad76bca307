"""Each exception means what the exception tree says: a failed dial is a ConnectError, a
call refused before it was sent is retry-safe, a LocalProtocolError leaves the
connection usable, and every limit applies back-pressure the same way."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from helpers import echo

from monte_trio import (
    ConnectError,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    Handshake,
    LocalProtocolError,
    Request,
    RequestNotProcessed,
    Server,
    open_client,
)
from monte_trio.testing import FaultyNetwork, open_connection_pair, secure_stream_pair

TIMEOUT = 30  # seconds (virtual under the autojump clock)


# ---- a failed dial is a ConnectError --------------------------------------------------


def _raising(exc: BaseException) -> Callable[[], Awaitable[trio.abc.Stream]]:
    async def connect() -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        raise exc

    return connect


@pytest.mark.parametrize(
    "failure",
    [
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        ConnectionRefusedError(111, "Connection refused"),
        OSError(101, "Network is unreachable"),
    ],
    ids=["dns", "refused", "unreachable"],
)
async def test_a_failed_dial_is_a_connect_error(native: Handshake, failure: OSError) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(ConnectError) as info:
        async with open_client(
            "example.invalid", 4000, handshake=native, connect=_raising(failure)
        ):
            raise AssertionError("no connection can be made")
    error = info.value
    assert not isinstance(error, ConnectionClosed)
    assert error.__cause__ is failure
    assert error.peer == "example.invalid:4000"
    assert str(error).startswith("could not connect to example.invalid:4000")


async def test_a_dial_timeout_is_a_connect_error(
    native: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    async def never() -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with trio.fail_after(TIMEOUT), pytest.raises(ConnectError, match="timed out") as info:
        async with open_client(handshake=native, connect=never, dial_timeout=2, dial_attempts=3):
            raise AssertionError("no connection can be made")
    assert isinstance(info.value.__cause__, trio.TooSlowError)
    assert "3 attempt(s)" in str(info.value)


async def test_a_redial_that_fails_is_a_connect_error(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    net = FaultyNetwork()
    server = Server(echo, handshake=profile)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_listeners, [net.listen("server")])
            async with open_client(
                handshake=profile, connect=lambda: net.connect("server")
            ) as client:
                assert await client.request(b"a") == b"a"
                net.shutdown_host("server")  # its links drop; new connects are refused
                with pytest.raises((ConnectError, ConnectionClosed)):
                    await client.request(b"in flight when the host went down")
                with pytest.raises(ConnectError, match="refused"):
                    await client.request(b"needs a new connection")
                assert client.statistics().dial_failures >= 1
            nursery.cancel_scope.cancel()


# ---- a call refused before it was sent is retry-safe ----------------------------------


async def test_calls_on_a_closed_connection_are_not_processed(profile: Handshake) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=echo) as (client, server):
            assert await client.request(b"a") == b"a"
            await client.aclose()
            with pytest.raises(RequestNotProcessed, match="not sent"):
                await client.request(b"b")
            with pytest.raises(RequestNotProcessed, match="not sent"):
                await client.send(b"c")
            with pytest.raises(RequestNotProcessed, match="not sent"):
                client.send_nowait(b"d")
            assert server.statistics().requests_received == 1
            assert server.statistics().messages_received == 0


async def test_calls_after_goaway_are_not_processed(native: Handshake) -> None:
    release = trio.Event()

    async def handler(request: Request) -> bytes:
        await release.wait()
        return request.body

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native, server_handler=handler) as (client, server):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.request, b"in flight")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(server.aclose)  # GOAWAY; the call in flight finishes
                await trio.testing.wait_all_tasks_blocked()
                assert client.closed  # the client got the GOAWAY
                with pytest.raises(RequestNotProcessed, match="GOAWAY"):
                    await client.request(b"late")
                with pytest.raises(RequestNotProcessed, match="GOAWAY"):
                    await client.send(b"late")
                release.set()
            assert server.statistics().requests_received == 1


async def test_callers_waiting_for_credit_when_closing_starts_are_not_processed(
    native: Handshake,
) -> None:
    release = trio.Event()
    received: list[bytes] = []

    async def handler(request: Request) -> bytes:
        received.append(request.body)
        await release.wait()
        return request.body

    server_config = ConnectionConfig(max_calls=1)
    errors: list[BaseException] = []

    async def call(conn: Connection, body: bytes) -> None:
        try:
            await conn.request(body)
        except ConnectionClosed as exc:
            errors.append(exc)

    with trio.fail_after(TIMEOUT):
        async with (
            open_connection_pair(native, server_handler=handler, server_config=server_config) as (
                client,
                _,
            ),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(call, client, b"holds the one slot")
            await trio.testing.wait_all_tasks_blocked()
            for i in range(3):
                nursery.start_soon(call, client, b"waits %d" % i)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(client.aclose)
            await trio.testing.wait_all_tasks_blocked()
            assert len(errors) == 3
            assert all(type(e) is RequestNotProcessed for e in errors), errors
            release.set()
    assert received == [b"holds the one slot"]  # the waiting calls never reached the peer


# ---- LocalProtocolError: the connection is still usable --------------------------------


async def test_a_message_too_large_leaves_the_connection_usable(profile: Handshake) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=echo) as (client, server):
            too_big = b"x" * (client.facts.max_message_size + 1)
            with pytest.raises(LocalProtocolError, match="max_message_size"):
                await client.request(too_big)
            with pytest.raises(LocalProtocolError):
                await client.send(too_big)
            with pytest.raises(LocalProtocolError):
                client.send_nowait(too_big)
            assert not client.closed
            assert await client.request(b"still fine") == b"still fine"
            assert server.statistics().requests_received == 1


async def test_a_sealing_failure_ends_the_connection_as_connection_closed(
    profile: Handshake,
) -> None:
    client_stream, server_stream = await secure_stream_pair(profile)

    async def exhausted(plaintexts: list[bytes | None]) -> None:
        await trio.lowlevel.checkpoint()
        raise LocalProtocolError("nonce counter exhausted: open a new connection")

    client_stream.send_records = exhausted  # type: ignore[method-assign]
    with trio.fail_after(TIMEOUT):
        async with (
            Connection(server_stream, handler=echo) as _,
            Connection(client_stream) as client,
        ):
            with pytest.raises(ConnectionClosed, match="could not seal") as info:
                await client.request(b"a")
            assert not isinstance(info.value, LocalProtocolError)
            assert not isinstance(info.value, RequestNotProcessed)  # it may have left
            assert client.closed
            reason = client.close_reason
            assert reason is not None
            assert isinstance(reason.__cause__, LocalProtocolError)
            with pytest.raises(RequestNotProcessed):
                await client.request(b"b")


# ---- one back-pressure rule ------------------------------------------------------------


async def test_the_pending_request_limit_waits_like_the_send_queue(profile: Handshake) -> None:
    release = trio.Event()

    async def handler(request: Request) -> bytes:
        await release.wait()
        return request.body

    config = ConnectionConfig(max_pending_requests=2)
    replies: list[bytes] = []
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler, config=config) as (
            client,
            server,
        ):

            async def call(body: bytes) -> None:
                replies.append(await client.request(body))

            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(call, b"%d" % i)
                    await trio.testing.wait_all_tasks_blocked()
                stats = client.statistics()
                assert (stats.pending_requests, stats.requests_sent) == (2, 2)
                # nothing of the waiting calls was sent
                assert server.statistics().requests_received == 2
                # a cancelled waiter leaves no trace
                with trio.move_on_after(0.01) as scope:
                    await client.request(b"gives up")
                assert scope.cancelled_caught
                release.set()
            assert sorted(replies) == [b"0", b"1", b"2", b"3", b"4"]
            assert client.statistics().pending_requests == 0
            assert server.statistics().requests_received == 5


async def test_waiting_for_room_among_pending_requests_ends_when_closing(
    profile: Handshake,
) -> None:
    async def handler(request: Request) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    config = ConnectionConfig(max_pending_requests=1, grace_period=0.1)
    errors: list[BaseException] = []
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler, config=config) as (
            client,
            _,
        ):

            async def call(body: bytes) -> None:
                try:
                    await client.request(body)
                except ConnectionClosed as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, b"pending")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(call, b"waiting for room")
                await trio.testing.wait_all_tasks_blocked()
                await client.aclose()
    # the pending call may have been processed; the one waiting for room was not sent
    assert len(errors) == 2
    assert [type(e) for e in errors].count(RequestNotProcessed) == 1
