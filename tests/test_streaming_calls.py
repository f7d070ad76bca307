"""Streaming calls (monte_trio.Call, UploadCall, DownloadCall, IncomingCall): each shape
both ways, async iteration, back-pressure, many messages, the size limit, cancellation
both ways, handler errors, refusals, connection loss, async generator handlers and the
limit on concurrent calls."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from helpers import make_handshake, running_server, socket_stream_pair
from test_docs import run_in_process

import monte_trio
from monte_trio import (
    CallShape,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    IncomingCall,
    LocalProtocolError,
    RemoteError,
    Request,
    RequestNotProcessed,
)
from monte_trio.testing import open_connection_pair

TIMEOUT = 30


async def echo(request: Request) -> bytes:
    await trio.lowlevel.checkpoint()
    return request.body


async def serve_all(call: IncomingCall) -> bytes | None:
    """Upload: the parts joined; download: the request cut into bytes; bidirectional:
    each message upper-cased back."""
    if call.shape == CallShape.UPLOAD:
        return b"".join([part async for part in call])
    if call.shape == CallShape.DOWNLOAD:
        request = await call.receive()
        for byte in request:
            await call.send(bytes([byte]))
        return None
    async for message in call:
        await call.send(message.upper())
    return None


@asynccontextmanager
async def pair(
    *,
    server: monte_trio.CallHandler | None = serve_all,
    client: monte_trio.CallHandler | None = None,
    config: ConnectionConfig | None = None,
    client_config: ConnectionConfig | None = None,
    server_config: ConnectionConfig | None = None,
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Two native connections over a socket pair."""
    async with open_connection_pair(
        make_handshake("native"),
        server_handler=echo,
        client_handler=echo,
        server_call_handler=server,
        client_call_handler=client,
        config=config,
        client_config=client_config,
        server_config=server_config,
        transports=socket_stream_pair(),
    ) as connections:
        yield connections


def caller_and_callee(direction: str, conns: tuple[Connection, Connection]) -> Connection:
    return conns[0] if direction == "client-calls" else conns[1]


DIRECTIONS = ["client-calls", "server-calls"]


# -- the three shapes, both directions -----------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
async def test_bidirectional_both_directions(direction: str) -> None:
    async with pair(server=serve_all, client=serve_all) as conns:
        caller = caller_and_callee(direction, conns)
        with trio.fail_after(TIMEOUT):
            async with caller.open_call(b"first") as call:
                assert isinstance(call, monte_trio.Call)
                await call.send(b"second")
                assert await call.receive() == b"FIRST"
                assert await call.receive() == b"SECOND"
                await call.send_eof()
                with pytest.raises(trio.EndOfChannel):
                    await call.receive()


@pytest.mark.parametrize("direction", DIRECTIONS)
async def test_upload_both_directions(direction: str) -> None:
    async with pair(server=serve_all, client=serve_all) as conns:
        caller = caller_and_callee(direction, conns)
        with trio.fail_after(TIMEOUT):
            async with caller.upload() as call:
                for i in range(5):
                    await call.send(b"part%d;" % i)
                reply = await call.finish()
    assert reply == b"part0;part1;part2;part3;part4;"


@pytest.mark.parametrize("direction", DIRECTIONS)
async def test_download_both_directions_async_for(direction: str) -> None:
    async with pair(server=serve_all, client=serve_all) as conns:
        caller = caller_and_callee(direction, conns)
        with trio.fail_after(TIMEOUT):
            async with caller.download(b"abc") as replies:
                got = [part async for part in replies]
    assert got == [b"a", b"b", b"c"]


async def test_async_generator_download_handler() -> None:
    async def numbers(call: IncomingCall) -> AsyncIterator[bytes]:
        count = int(await call.receive())
        for i in range(count):
            yield str(i).encode()

    async with pair(server=numbers) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.download(b"1000") as replies:
                got = [part async for part in replies]
    assert got == [str(i).encode() for i in range(1000)]


async def test_bidirectional_async_for_on_both_sides_10000_messages() -> None:
    count = 10_000
    async with pair() as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.open_call() as call:
                got = 0

                async def sender() -> None:
                    for i in range(count):
                        await call.send(b"m%d" % i)
                    await call.send_eof()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender)
                    async for message in call:
                        assert message == b"M%d" % got
                        got += 1
    assert got == count


# -- back-pressure -------------------------------------------------------------------------


async def test_slow_receiver_blocks_sender_and_other_traffic_proceeds() -> None:
    config = ConnectionConfig(stream_window=64 * 1024)
    started = trio.Event()
    release = trio.Event()
    taken: list[bytes] = []

    async def slow(call: IncomingCall) -> bytes:
        started.set()
        await release.wait()
        async for part in call:
            taken.append(part)
        return b"done"

    async with pair(server=slow, config=config) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.upload() as call:
                sent = 0
                part = b"x" * 1000
                with trio.move_on_after(1.0) as scope:
                    while True:
                        await call.send(part)
                        sent += 1
                        assert sent < 1000, "the sender was never stopped"
                assert scope.cancelled_caught
                # Bounded by the call's window: 64 KiB / (1000 + 64) messages at most.
                assert 0 < sent <= (64 * 1024) // (len(part) + 64)
                await started.wait()
                # Pings and unary calls proceed meanwhile.
                assert await client.request(b"ping") == b"ping"
                release.set()
                for _ in range(100):
                    await call.send(part)
                    sent += 1
                assert await call.finish() == b"done"
    assert len(taken) == sent


# -- message size ----------------------------------------------------------------------------


async def test_message_at_the_limit_and_one_over() -> None:
    config = ConnectionConfig(stream_window=64 * 1024)
    async with pair(config=config) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.open_call() as call:
                limit = call.max_message_size
                assert limit == 64 * 1024 // 2 - 64
                await call.send(b"a" * limit)
                assert await call.receive() == b"A" * limit
                with pytest.raises(LocalProtocolError, match=str(limit)):
                    await call.send(b"a" * (limit + 1))
                # Nothing was sent: the call is still usable.
                await call.send(b"b")
                assert await call.receive() == b"B"


# -- cancellation both ways ------------------------------------------------------------------


async def test_caller_cancel_scope_cancels_handler_promptly() -> None:
    entered = trio.Event()
    handler_cancelled = trio.Event()
    cancelled_at: list[float] = []

    async def stuck(call: IncomingCall) -> None:
        try:
            entered.set()
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled_at.append(trio.current_time())
            handler_cancelled.set()
            raise

    async with pair(server=stuck) as (client, server):
        with trio.fail_after(TIMEOUT):
            with trio.CancelScope() as scope:
                async with client.open_call() as call:
                    await entered.wait()
                    receiving = trio.Event()

                    async def cancel_soon() -> None:
                        await receiving.wait()
                        scope.cancel()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(cancel_soon)
                        receiving.set()
                        await call.receive()
            cancelled = trio.current_time()
            await handler_cancelled.wait()
        assert cancelled_at[0] - cancelled < 0.1
        # The connection is still usable.
        with trio.fail_after(TIMEOUT):
            assert await client.request(b"after") == b"after"
            assert server.statistics().open_streams == 0


@pytest.mark.parametrize("shape", ["download", "upload", "bidirectional"])
async def test_leaving_the_block_early_cancels_the_handler(shape: str) -> None:
    cancelled = trio.Event()

    async def endless(call: IncomingCall) -> None:
        try:
            if call.shape == CallShape.DOWNLOAD:
                await call.receive()
                while True:
                    await call.send(b"more")
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    async with pair(server=endless) as (client, _):
        with trio.fail_after(TIMEOUT):
            if shape == "download":
                async with client.download(b"go") as replies:
                    assert await replies.receive() == b"more"
            elif shape == "upload":
                async with client.upload() as upload:
                    await upload.send(b"part")
            else:
                async with client.open_call(b"hello"):
                    pass
            await cancelled.wait()
            assert await client.request(b"still") == b"still"


async def test_handler_exception_is_a_remote_error(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(call: IncomingCall) -> None:
        await call.send(b"before")
        await call.receive()
        raise ValueError("bad part")

    caplog.set_level(logging.INFO, "monte_trio")
    async with pair(server=broken) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.open_call() as call:
                assert await call.receive() == b"before"
                await call.send(b"x")
                with pytest.raises(RemoteError, match="ValueError: bad part"):
                    await call.receive()
                with pytest.raises(RemoteError):
                    await call.send(b"y")
            assert await client.request(b"ok") == b"ok"
    assert any("call handler raised on call" in r.getMessage() for r in caplog.records)


async def test_upload_handler_error_reaches_finish() -> None:
    async def refuses_parts(call: IncomingCall) -> bytes:
        async for _ in call:
            raise KeyError("nope")
        return b""

    async with pair(server=refuses_parts) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.upload() as call:
                await call.send(b"p")
                with pytest.raises(RemoteError, match="KeyError"):
                    await call.finish()


async def test_no_call_handler_is_request_not_processed() -> None:
    async with pair(server=None) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.download(b"x") as replies:
                with pytest.raises(RequestNotProcessed, match="safe"):
                    await replies.receive()
            async with client.upload() as upload:
                with pytest.raises(RequestNotProcessed):
                    await upload.finish()


async def test_connection_lost_mid_call_is_connection_closed() -> None:
    entered = trio.Event()

    async def hangs(call: IncomingCall) -> None:
        await call.send(b"one")
        entered.set()
        await trio.sleep_forever()

    async with pair(server=hangs) as (client, server):
        with trio.fail_after(TIMEOUT):
            async with client.open_call() as call:
                assert await call.receive() == b"one"
                await entered.wait()
                await server.aclose()
                with pytest.raises(ConnectionClosed) as info:
                    await call.receive()
                assert not isinstance(info.value, RequestNotProcessed)
                with pytest.raises(ConnectionClosed):
                    await call.send(b"more")


async def test_more_calls_than_max_streams_wait_then_proceed() -> None:
    config = ConnectionConfig(max_streams=2)
    running = 0
    most = 0
    gate = trio.Event()

    async def counted(call: IncomingCall) -> bytes:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await gate.wait()
            return await call.receive()
        finally:
            running -= 1

    results: list[bytes] = []
    async with pair(server=counted, config=config) as (client, _):
        with trio.fail_after(TIMEOUT):

            async def one(i: int) -> None:
                async with client.upload() as call:
                    await call.send(b"%d" % i)
                    results.append(await call.finish())

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(one, i)
                await trio.testing.wait_all_tasks_blocked()
                assert running == 2
                gate.set()
    assert most == 2
    assert sorted(results) == [b"%d" % i for i in range(6)]


async def test_call_handler_needs_streams() -> None:
    with pytest.raises(ValueError, match="max_streams"):
        monte_trio.Server(
            None,
            call_handler=serve_all,
            handshake=make_handshake("native"),
            config=ConnectionConfig(max_streams=0),
        )


async def test_calls_on_a_client() -> None:
    handshake = make_handshake("native")
    async with (
        running_server(echo, handshake, call_handler=serve_all) as (_, port),
        monte_trio.open_client("127.0.0.1", port, handshake=handshake) as client,
    ):
        with trio.fail_after(TIMEOUT):
            async with client.download(b"xy") as replies:
                assert [p async for p in replies] == [b"x", b"y"]
            async with client.open_call(b"q") as call:
                assert await call.receive() == b"Q"
            async with client.upload() as upload:
                await upload.send(b"u")
                assert await upload.finish() == b"u"


def test_call_objects_have_no_public_constructor() -> None:
    with pytest.raises(TypeError, match="no public constructor"):
        monte_trio.Call()  # type: ignore[call-arg]


async def test_the_streams_page_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    await run_in_process("streams.rst", "streaming-calls")
    assert capsys.readouterr().out.splitlines() == [
        "line 0",
        "line 1",
        "line 2",
        "4000 bytes",
        "refused: ValueError: no bidirectional calls here",
    ]
