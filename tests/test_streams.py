"""Byte streams over a connection (monte_trio.Stream): trio's stream contract, echo over TCP,
half-close, reset, close with unread data, cancellation, back-pressure, the stream limit as
credit, refusals, handler failures and the memory bound of unread streams."""

from __future__ import annotations

import hashlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from helpers import LOCALHOST, echo, make_handshake, running_server
from test_docs import run_in_process

import monte_trio
from monte_trio import (
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    Handshake,
    LocalProtocolError,
    Request,
    RequestNotProcessed,
    Stream,
    StreamReset,
    open_client,
)
from monte_trio.testing import secure_stream_pair

TIMEOUT = 30

REFUSED, CANCELLED, INTERNAL = 4, 5, 6
"""The codes a StreamReset carries (docs/wire-native.rst, "Error codes")."""


# -- helpers -------------------------------------------------------------------------------


class Accepted:
    """A stream handler that hands each stream it is given to the test, and keeps it open
    (the handler's return would close it) until :meth:`finish` or :meth:`release`."""

    def __init__(self) -> None:
        self.send, self.streams = trio.open_memory_channel[Stream](math.inf)
        self.finished: dict[int, trio.Event] = {}
        self.released = False
        self.early: dict[int, Stream] = {}

    async def __call__(self, stream: Stream) -> None:
        finished = self.finished.setdefault(stream.stream_id, trio.Event())
        if not self.released:
            self.send.send_nowait(stream)
            await finished.wait()

    def finish(self, stream: Stream) -> None:
        """Let the handler of ``stream`` return."""
        self.finished.setdefault(stream.stream_id, trio.Event()).set()

    def release(self) -> None:
        """Let every handler return."""
        self.released = True
        for finished in self.finished.values():
            finished.set()

    async def next(self) -> Stream:
        """The next stream handed over (handlers start in no particular order)."""
        if self.early:
            return self.early.pop(min(self.early))
        with trio.fail_after(TIMEOUT):
            return await self.streams.receive()

    async def peer_of(self, stream: Stream) -> Stream:
        """The accepting side's end of ``stream``."""
        with trio.fail_after(TIMEOUT):
            while stream.stream_id not in self.early:
                theirs = await self.streams.receive()
                self.early[theirs.stream_id] = theirs
        return self.early.pop(stream.stream_id)


@asynccontextmanager
async def connection_pair(
    handshake: Handshake,
    *,
    server_stream_handler: monte_trio.StreamHandler | None = None,
    client_stream_handler: monte_trio.StreamHandler | None = None,
    server_handler: monte_trio.Handler | None = echo,
    config: ConnectionConfig | None = None,
    client_config: ConnectionConfig | None = None,
    server_config: ConnectionConfig | None = None,
    transports: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Two connections over memory streams (or ``transports``), with stream handlers."""
    client_config = client_config or config or ConnectionConfig()
    server_config = server_config or config or ConnectionConfig()
    client_stream, server_stream = await secure_stream_pair(
        handshake,
        client_config=client_config,
        server_config=server_config,
        transports=transports,
    )
    async with (
        Connection(
            client_stream,
            config=client_config,
            name="client",
            stream_handler=client_stream_handler,
        ) as client,
        Connection(
            server_stream,
            handler=server_handler,
            config=server_config,
            name="server",
            stream_handler=server_stream_handler,
        ) as server,
    ):
        yield client, server


async def stream_echo(stream: Stream) -> None:
    """Echo everything, then half-close."""
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


async def read_all(stream: Stream, max_bytes: int = 1 << 20) -> bytes:
    got = bytearray()
    while data := await stream.receive_some(max_bytes):
        got += data
    return bytes(got)


async def send_until_broken(stream: Stream) -> None:
    """Send until the stream raises (the peer stopped reading it)."""
    for _ in range(10_000):
        await stream.send_all(b"x" * 1000)
    raise AssertionError("the stream never broke")


SMALL = ConnectionConfig(
    stream_window=16 * 1024, data_window=256 * 1024, stream_window_max=16 * 1024
)
"""Small windows that never grow: credit runs out after a few records."""


# -- trio's stream contract ----------------------------------------------------------------


async def _conformance(
    open_stream: Callable[[], Awaitable[Stream]], accepted: Accepted, window: int
) -> None:
    async def stream_maker() -> tuple[Stream, Stream]:
        with trio.fail_after(TIMEOUT):
            opened = await open_stream()
            await opened.send_all(b"")  # nothing on the wire: the peer sees the opening only
            return opened, await accepted.next()

    async def clogged_stream_maker() -> tuple[Stream, Stream]:
        # Both directions clogged: the peer's whole window is spent, and not read.
        first, second = await stream_maker()
        with trio.fail_after(TIMEOUT):
            await first.send_all(b"x" * window)
            await second.send_all(b"y" * window)
        return first, second

    try:
        with trio.fail_after(TIMEOUT):
            await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)
    finally:
        accepted.release()


async def test_conformance_over_a_connection_pair(native: Handshake) -> None:
    accepted = Accepted()
    async with connection_pair(native, server_stream_handler=accepted, config=SMALL) as (
        client,
        server,
    ):
        await _conformance(client.open_stream, accepted, SMALL.stream_window)
        # Every stream was closed: nothing open, nothing buffered, on either side.
        for conn in (client, server):
            stats = conn.statistics()
            assert (stats.open_streams, stats.stream_bytes_buffered) == (0, 0)
        assert await client.request(b"still usable") == b"still usable"


async def test_conformance_over_tcp(native: Handshake) -> None:
    accepted = Accepted()
    async with (
        running_server(echo, native, stream_handler=accepted, config=SMALL) as (_, port),
        open_client(LOCALHOST, port, handshake=native, config=SMALL, max_conns=1) as client,
    ):
        await _conformance(client.open_stream, accepted, SMALL.stream_window)


# -- moving data ---------------------------------------------------------------------------


async def test_echo_8_mib_through_one_stream_over_tcp(native: Handshake) -> None:
    payload = hashlib.shake_256(b"payload").digest(8 * 1024 * 1024)
    async with (
        running_server(echo, native, stream_handler=stream_echo) as (_, port),
        open_client(LOCALHOST, port, handshake=native) as client,
    ):
        with trio.fail_after(TIMEOUT):
            stream = await client.open_stream()
            async with stream, trio.open_nursery() as nursery:

                async def send() -> None:
                    view = memoryview(payload)
                    for offset in range(0, len(payload), 300_000):  # uneven pieces
                        await stream.send_all(view[offset : offset + 300_000])
                    await stream.send_eof()

                nursery.start_soon(send)
                echoed = await read_all(stream)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


async def test_either_side_opens_and_half_closes_either_way(native: Handshake) -> None:
    """The server opens a stream to the client's handler; each half ends on its own, the
    other goes on; the stream knows its connection and the peer's key."""
    accepted = Accepted()
    client_hs, server_hs = make_handshake("native"), make_handshake("native")
    assert isinstance(client_hs, monte_trio.NativeHandshake)
    assert isinstance(server_hs, monte_trio.NativeHandshake)
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client_secure, server_secure = await secure_stream_pair(
        client_hs, server_handshake=server_hs, transports=(client_raw, server_raw)
    )
    async with (
        Connection(client_secure, stream_handler=accepted) as client,
        Connection(server_secure) as server,
    ):
        with trio.fail_after(TIMEOUT):
            opened = await server.open_stream()
            theirs = await accepted.next()
            assert opened.stream_id == theirs.stream_id
            assert opened.stream_id % 2 == 0  # opened by the accepting side
            assert opened.connection is server
            assert theirs.connection is client
            assert opened.peer_public_key == client_hs.public_key
            assert theirs.peer_public_key == server_hs.public_key
            # The server's half ends; the client keeps sending after reading the end.
            await opened.send_all(b"question")
            await opened.send_eof()
            assert await read_all(theirs) == b"question"
            await theirs.send_all(b"answer, ")
            await theirs.send_all(b"after the end of the question")
            await theirs.send_eof()
            assert await read_all(opened) == b"answer, after the end of the question"
            await opened.aclose()
            await theirs.aclose()
        accepted.release()


async def test_a_large_write_is_cut_and_bounded_by_the_readers_window(native: Handshake) -> None:
    """One send_all of 4 MiB through 16 KiB windows; the reader never holds more than its
    window however slowly it reads."""
    accepted = Accepted()
    payload = hashlib.shake_256(b"large").digest(4 * 1024 * 1024)
    async with connection_pair(native, server_stream_handler=accepted, config=SMALL) as (
        client,
        server,
    ):
        with trio.fail_after(TIMEOUT):
            stream = await client.open_stream()
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await stream.send_all(payload)
                    await stream.send_eof()

                nursery.start_soon(send)
                theirs = await accepted.next()
                got = bytearray()
                most = 0
                while data := await theirs.receive_some(5000):
                    got += data
                    most = max(most, server.statistics().stream_bytes_buffered)
            assert got == payload
            assert 0 < most <= SMALL.stream_window
        accepted.release()


# -- reset and close -----------------------------------------------------------------------


@pytest.mark.parametrize("side", ["opener", "acceptor"])
async def test_reset_reaches_the_peer_as_stream_reset_with_its_code(
    native: Handshake, side: str
) -> None:
    accepted = Accepted()
    async with connection_pair(native, server_stream_handler=accepted) as (client, _):
        with trio.fail_after(TIMEOUT):
            opened = await client.open_stream()
            await opened.send_all(b"partial")
            theirs = await accepted.next()
            resetting, other = (opened, theirs) if side == "opener" else (theirs, opened)
            if side == "acceptor":
                await theirs.send_all(b"partial")
            await trio.testing.wait_all_tasks_blocked()
            assert other.buffered == len(b"partial")
            await resetting.reset(1234)
            await trio.testing.wait_all_tasks_blocked()
            assert other.buffered == 0  # what it held is dropped: it may be truncated
            with pytest.raises(StreamReset) as info:
                await other.receive_some()  # never a clean end
            assert (info.value.code, info.value.stream_id) == (1234, opened.stream_id)
            assert isinstance(info.value, trio.BrokenResourceError)
            assert "reset stream" in str(info.value)
            with pytest.raises(StreamReset) as stopped:
                await send_until_broken(other)  # the resetting side stopped reading too
            assert stopped.value.code == 1234
            assert "stopped reading" in str(stopped.value)
            with pytest.raises(trio.ClosedResourceError):
                await resetting.send_all(b"x")
            await other.aclose()
            with pytest.raises(ValueError, match="0 to 65535"):
                await other.reset(70_000)
            assert await client.request(b"unaffected") == b"unaffected"
        accepted.release()


async def test_aclose_with_unread_data_stops_the_sender_and_frees_the_buffer(
    native: Handshake,
) -> None:
    done = trio.Event()
    seen: list[Stream] = []

    async def reads_a_little(stream: Stream) -> None:
        seen.append(stream)
        assert await stream.receive_some(3) == b"abc"
        # Returns with data unread and the client's half not ended: aclose() follows.
        await trio.testing.wait_all_tasks_blocked()
        done.set()

    async with connection_pair(native, server_stream_handler=reads_a_little, config=SMALL) as (
        client,
        server,
    ):
        with trio.fail_after(TIMEOUT):
            stream = await client.open_stream()
            await stream.send_all(b"abc" + b"z" * 10_000)
            await done.wait()
            with pytest.raises(StreamReset) as info:
                await send_until_broken(stream)
            assert info.value.code == CANCELLED
            # The server's end ended cleanly (END after what it sent: nothing).
            assert await stream.receive_some() == b""
            await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            for conn in (client, server):
                stats = conn.statistics()
                assert (stats.open_streams, stats.stream_bytes_buffered) == (0, 0)
            assert seen[0].closed
            assert await client.request(b"usable") == b"usable"


# -- cancellation --------------------------------------------------------------------------


async def test_cancelled_receive_loses_nothing(native: Handshake) -> None:
    accepted = Accepted()
    async with connection_pair(native, server_stream_handler=accepted) as (client, _):
        with trio.fail_after(TIMEOUT):
            stream = await client.open_stream()
            theirs = await accepted.next()
            with trio.move_on_after(0.01) as scope:
                await stream.receive_some()
            assert scope.cancelled_caught
            await theirs.send_all(b"after the cancel")
            await theirs.send_eof()
            assert await read_all(stream) == b"after the cancel"
            await stream.aclose()
        accepted.release()


async def test_cancelled_blocked_send_breaks_only_the_sending_half(native: Handshake) -> None:
    """A send_all cancelled part-way: further sends raise BrokenResourceError, the peer never
    sees a clean end (the truncated data looks truncated), the receiving half and the
    connection work on."""
    accepted = Accepted()
    async with connection_pair(native, server_stream_handler=accepted, config=SMALL) as (
        client,
        _,
    ):
        with trio.fail_after(TIMEOUT):
            stream = await client.open_stream()
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def send() -> None:
                        await stream.send_all(b"a" * (4 * SMALL.stream_window))

                    nursery.start_soon(send)
                    await trio.testing.wait_all_tasks_blocked()  # blocked on credit
                    scope.cancel()
            theirs = await accepted.next()
            with pytest.raises(trio.BrokenResourceError, match="cancelled part-way"):
                await stream.send_all(b"b")
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_eof()
            await theirs.send_all(b"the other half works")
            await theirs.send_eof()
            assert await read_all(stream) == b"the other half works"
            await stream.aclose()  # resets the broken half
            with pytest.raises(StreamReset) as info:
                await read_all(theirs)
            assert info.value.code == CANCELLED
            assert await client.request(b"usable") == b"usable"
        accepted.release()


async def test_cancelled_send_before_any_credit_leaves_the_stream_usable(
    native: Handshake,
) -> None:
    accepted = Accepted()
    window = SMALL.stream_window
    async with connection_pair(native, server_stream_handler=accepted, config=SMALL) as (
        client,
        _,
    ):
        with trio.fail_after(TIMEOUT):
            stream = await client.open_stream()
            await stream.send_all(b"1" * window)  # the whole window: no credit left
            with trio.move_on_after(0.01) as scope:
                await stream.send_all(b"2")
            assert scope.cancelled_caught
            theirs = await accepted.next()
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await stream.send_all(b"3")
                    await stream.send_eof()

                nursery.start_soon(send)
                assert await read_all(theirs) == b"1" * window + b"3"
            await stream.aclose()
        accepted.release()


# -- back-pressure and limits --------------------------------------------------------------


async def test_a_slow_reader_blocks_its_sender_only(native: Handshake) -> None:
    """Nobody reads the stream: its sender blocks, and on the same connection keepalive
    pings are answered (a tolerance of 0.5 s would otherwise close it) and small requests
    are answered within 100 ms each."""
    accepted = Accepted()
    config = ConnectionConfig(
        stream_window=64 * 1024, keepalive_interval=0.05, keepalive_tolerance=0.5
    )
    async with (
        running_server(echo, native, stream_handler=accepted, config=config) as (_, port),
        open_client(LOCALHOST, port, handshake=native, config=config, max_conns=1) as client,
    ):
        with trio.fail_after(TIMEOUT):
            conn = await client.connection()
            stream = await client.open_stream()
            sent = trio.Event()
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await stream.send_all(b"s" * (4 * 1024 * 1024))
                    sent.set()

                nursery.start_soon(send)
                theirs = await accepted.next()
                for i in range(20):
                    with trio.fail_after(0.1):
                        assert await client.request(b"%d" % i) == b"%d" % i
                # The window's worth was written before the last request: it has arrived.
                assert theirs.buffered == config.stream_window
                await trio.sleep(1.0)  # 20 keepalive intervals, two tolerances, blocked
                assert not conn.closed
                assert conn.statistics().rtt is not None
                assert (await client.connection()) is conn
                with trio.fail_after(0.1):
                    assert await client.request(b"after") == b"after"
                assert not sent.is_set()
                assert theirs.buffered == config.stream_window  # never more than the window
                assert theirs.connection.statistics().stream_bytes_buffered == (
                    config.stream_window
                )
                nursery.cancel_scope.cancel()
            await stream.aclose()
        accepted.release()


async def test_opening_beyond_max_streams_waits_for_a_slot(native: Handshake) -> None:
    """Two streams at most: a third open waits (credit, not a refusal) and proceeds once a
    stream has ended both ways, here when the opener's own END is written last."""
    accepted = Accepted()
    server_config = ConnectionConfig(max_streams=2)
    async with connection_pair(
        native, server_stream_handler=accepted, server_config=server_config
    ) as (client, _):
        with trio.fail_after(TIMEOUT):
            first = await client.open_stream()
            second = await client.open_stream()
            third: list[Stream] = []
            async with trio.open_nursery() as nursery:

                async def open_third() -> None:
                    third.append(await client.open_stream())

                nursery.start_soon(open_third)
                await trio.testing.wait_all_tasks_blocked()
                assert not third  # waiting, not refused
                theirs = await accepted.peer_of(first)
                await theirs.send_eof()  # the acceptor's half ends first ...
                assert await first.receive_some() == b""
                await trio.testing.wait_all_tasks_blocked()
                assert not third
                await first.aclose()  # ... then the opener's: its slot frees when written
            assert third[0].stream_id > second.stream_id
            # The server runs at most max_streams handlers: the third one starts when the
            # first returns (meanwhile its data waits, within its window).
            await third[0].send_all(b"waiting ")
            await trio.testing.wait_all_tasks_blocked()
            assert third[0].stream_id not in accepted.finished
            accepted.finish(theirs)
            opened = await accepted.peer_of(third[0])
            assert await opened.receive_some() == b"waiting "
            await third[0].send_all(b"through")
            assert await opened.receive_some() == b"through"
            for stream in (second, third[0]):
                await stream.aclose()
        accepted.release()


async def test_100_unread_streams_stay_within_the_memory_bound(native: Handshake) -> None:
    """A peer opens 100 streams and writes more than a window on each; nobody reads. The
    server holds at most max_streams x stream_window of stream data (docs/reliability.rst,
    "Memory budget"), every sender waits, and calls on the connection still work."""
    accepted = Accepted()
    config = ConnectionConfig(stream_window=16 * 1024, data_window=1024 * 1024)
    bound = config.max_streams * config.stream_window
    async with connection_pair(native, server_stream_handler=accepted, config=config) as (
        client,
        server,
    ):
        with trio.fail_after(TIMEOUT):
            streams = [await client.open_stream() for _ in range(100)]
            finished: list[int] = []
            async with trio.open_nursery() as nursery:
                for stream in streams:

                    async def send(stream: Stream = stream) -> None:
                        await stream.send_all(b"m" * (4 * config.stream_window))
                        finished.append(stream.stream_id)

                    nursery.start_soon(send)
                await trio.testing.wait_all_tasks_blocked()
                stats = server.statistics()
                assert stats.open_streams == 100
                assert stats.stream_bytes_buffered == bound  # every window full, no more
                assert not finished
                assert await client.request(b"still served") == b"still served"
                nursery.cancel_scope.cancel()
            for stream in streams:
                await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().stream_bytes_buffered == 0
        accepted.release()


# -- refusals and failures -----------------------------------------------------------------


async def test_a_peer_without_streams_is_a_clear_error(native: Handshake) -> None:
    off = ConnectionConfig(max_streams=0)
    async with connection_pair(native, server_config=off) as (client, _):
        with pytest.raises(LocalProtocolError, match="the peer does not accept streams"):
            await client.open_stream()
        assert await client.request(b"usable") == b"usable"
    async with connection_pair(native, client_config=off) as (client, _):
        with pytest.raises(LocalProtocolError, match="turned off on this side"):
            await client.open_stream()
    with pytest.raises(ValueError, match="max_streams above 0"):
        monte_trio.Server(None, stream_handler=stream_echo, handshake=native, config=off)


async def test_a_peer_without_a_stream_handler_refuses_streams(native: Handshake) -> None:
    async with connection_pair(native) as (client, _):
        with trio.fail_after(TIMEOUT):
            stream = await client.open_stream()
            with pytest.raises(StreamReset, match="stream_handler") as info:
                await stream.receive_some()
            assert info.value.code == REFUSED
            assert "safe to open the stream again" in str(info.value)
            with pytest.raises(StreamReset):
                await send_until_broken(stream)
            await stream.aclose()
            assert client.statistics().open_streams == 0


async def test_monte_v1_has_no_streams(monte_v1: Handshake) -> None:
    async with connection_pair(monte_v1) as (client, _):
        with pytest.raises(LocalProtocolError, match="native profile"):
            await client.open_stream()


async def test_a_handler_exception_resets_only_its_stream(
    native: Handshake, caplog: pytest.LogCaptureFixture
) -> None:
    async def picky(stream: Stream) -> None:
        if await stream.receive_some(4) == b"boom":
            raise ValueError("this stream displeases me")
        await stream_echo(stream)

    async with connection_pair(native, server_stream_handler=picky) as (client, _):
        with trio.fail_after(TIMEOUT):
            good = await client.open_stream()
            bad = await client.open_stream()
            await good.send_all(b"fine")
            await bad.send_all(b"boom")
            with pytest.raises(StreamReset) as info:
                await bad.receive_some()
            assert info.value.code == INTERNAL
            assert "stream handler raised" in str(info.value)
            await good.send_all(b", thanks")
            await good.send_eof()
            assert await read_all(good) == b", thanks"  # the first 4 bytes were the check
            assert await client.request(b"usable") == b"usable"
            await good.aclose()
            await bad.aclose()
    errors = [r for r in caplog.records if r.name == "monte_trio" and r.levelname == "ERROR"]
    assert len(errors) == 1
    assert f"stream handler raised on stream {bad.stream_id}" in errors[0].getMessage()
    assert errors[0].exc_info is not None


async def test_the_end_of_the_connection_breaks_its_streams(native: Handshake) -> None:
    accepted = Accepted()
    async with connection_pair(native, server_stream_handler=accepted) as (client, server):
        with trio.fail_after(TIMEOUT):
            stream = await client.open_stream()
            ended = await client.open_stream()
            theirs_ended = await accepted.peer_of(ended)
            await theirs_ended.send_all(b"complete")
            await theirs_ended.send_eof()
            assert await ended.receive_some(3) == b"com"
            await server.close_gracefully(0.01)
            with pytest.raises(trio.BrokenResourceError) as info:
                await stream.receive_some()
            assert isinstance(info.value.__cause__, ConnectionClosed)
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"x")
            # A stream that had ended cleanly still reads to its end.
            assert await read_all(ended) == b"plete"
            with pytest.raises(RequestNotProcessed):
                await client.open_stream()
        accepted.release()


async def test_round_trips_are_measured_while_streams_are_read(native: Handshake) -> None:
    """Reading a stream probes the round trip (windows grow toward the bandwidth-delay
    product only once it is known), without keepalive."""
    config = ConnectionConfig(keepalive_interval=None)
    async with connection_pair(native, server_stream_handler=stream_echo, config=config) as (
        client,
        _,
    ):
        with trio.fail_after(TIMEOUT):
            assert client.statistics().rtt is None
            stream = await client.open_stream()
            await stream.send_all(b"ping me")
            assert await stream.receive_some() == b"ping me"
            # The probe went out before this request, so its answer came before the reply.
            assert await client.request(b"x") == b"x"
            rtt = client.statistics().rtt
            assert rtt is not None
            assert rtt >= 0
            await stream.aclose()


async def test_windows_grow_while_read_up_to_their_cap(native: Handshake) -> None:
    """A reader that keeps up makes its window grow toward the bandwidth-delay product, up
    to stream_window_max; a stream nobody reads never grows (see the 100 unread streams)."""
    accepted = Accepted()
    config = ConnectionConfig(
        stream_window=16 * 1024,
        data_window=4 * 1024 * 1024,
        stream_window_max=1024 * 1024,
        keepalive_interval=None,
    )
    async with connection_pair(native, server_stream_handler=accepted, config=config) as (
        client,
        _,
    ):
        with trio.fail_after(TIMEOUT):
            stream = await client.open_stream()
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    while True:
                        await stream.send_all(b"g" * 65536)

                nursery.start_soon(send)
                theirs = await accepted.peer_of(stream)
                read = 0
                while read < 8 * 1024 * 1024:
                    read += len(await theirs.receive_some(1 << 20))
                await trio.testing.wait_all_tasks_blocked()  # the reader stopped: it fills
                assert config.stream_window < theirs.buffered <= config.stream_window_max
                nursery.cancel_scope.cancel()
            await stream.aclose()
        accepted.release()


async def test_a_stream_crossing_the_peers_goaway_is_refused(native: Handshake) -> None:
    """Opened while the peer was closing: the peer never accepted it, so it fails with
    REFUSED (safe to open again elsewhere), and the next open is refused before sending."""
    async with connection_pair(native, server_stream_handler=stream_echo) as (client, server):
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                stream = await client.open_stream()  # queued before the server closes
                nursery.start_soon(server.close_gracefully, 1.0)
                with pytest.raises(StreamReset, match="did not accept stream") as info:
                    await stream.receive_some()
                assert info.value.code == REFUSED
                with pytest.raises(RequestNotProcessed):
                    await client.open_stream()
                await stream.aclose()


async def test_the_server_opens_a_stream_to_a_clients_stream_handler(native: Handshake) -> None:
    """open_client(stream_handler=...): a server's handler opens a stream back to its
    client over the same connection."""

    async def push(request: Request) -> bytes:
        async with await request.connection.open_stream() as stream:
            await stream.send_all(b"pushed: " + request.body)
            await stream.send_eof()
            return await read_all(stream)

    async with (
        running_server(push, native) as (_, port),
        open_client(LOCALHOST, port, handshake=native, stream_handler=stream_echo) as client,
    ):
        with trio.fail_after(TIMEOUT):
            assert await client.request(b"news") == b"pushed: news"


# -- the API surface -----------------------------------------------------------------------


def test_streams_have_no_public_constructor() -> None:
    with pytest.raises(TypeError, match="open_stream"):
        Stream()  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stream_window": 1023}, "'stream_window' must be >= 1024"),
        ({"stream_window": 2**30 + 1}, "'stream_window' must be <= 1073741824"),
        ({"max_streams": -1}, "'max_streams' must be >= 0"),
        ({"max_streams": 2**31 + 1}, "'max_streams' must be <= 2147483648"),
        ({"data_window": 300 * 1024}, r"data_window \(307200\) must be at least 2 x"),
        ({"stream_window_max": 128 * 1024}, r"stream_window_max \(131072\) must be at least"),
    ],
)
def test_stream_settings_are_checked(fields: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectionConfig(**fields)  # type: ignore[arg-type]


async def test_client_open_stream_uses_the_pool(native: Handshake) -> None:
    async with (
        running_server(echo, native, stream_handler=stream_echo) as (_, port),
        open_client(LOCALHOST, port, handshake=native, max_conns=1) as client,
    ):
        with trio.fail_after(TIMEOUT):
            stream = await client.open_stream()
            assert stream.connection is client.connections[0]
            assert repr(stream).startswith(f"<monte_trio.Stream {stream.stream_id} on ")
            await stream.send_all(b"hello")
            await stream.send_eof()
            assert await read_all(stream) == b"hello"
            await stream.aclose()
            assert "closed" in repr(stream)


async def test_a_stream_handler_serves_server_requests_too(native: Handshake) -> None:
    """A server with both handlers: requests go to one, streams to the other."""

    async def handler(request: Request) -> bytes:
        return b"re:" + request.body

    async with (
        running_server(handler, native, stream_handler=stream_echo) as (_, port),
        open_client(LOCALHOST, port, handshake=native) as client,
    ):
        with trio.fail_after(TIMEOUT):
            stream = await client.open_stream()
            await stream.send_all(b"bytes")
            assert await stream.receive_some() == b"bytes"
            assert await client.request(b"call") == b"re:call"
            await stream.aclose()


async def test_the_streams_page_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    await run_in_process("streams.rst", "streams-shout")
    assert capsys.readouterr().out.splitlines() == [
        "BYTES IN, BYTES OUT",
        "b're: calls work alongside'",
    ]
