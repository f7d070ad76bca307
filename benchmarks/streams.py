"""The stream workloads' drivers (trio peers only): StreamEcho, ShortStreams, LatencyUnderBulk.

Each peer that runs them gives ``open_echo_stream(client, port, opts)``: a
:class:`trio.abc.Stream` whose every byte the server echoes back. monte_trio opens a
:class:`monte_trio.Stream` on the client's connection (its server has a stream echo); the
trio peers dial a connection of their own and say so with one byte first
(:data:`ECHO_MARKER`), after which their server echoes raw bytes over TCP or TLS. Control
requests (the server's CPU and RSS) still go through the framed client.

* **StreamEcho** writes ``size`` bytes in one task while another reads the echo; MB/s
  counts both directions (``2 x size / time``), as Request1MiB counts request and reply.
  Every byte that comes back is checked (length and CRC-32 against what was sent,
  computed before the clock starts; each 256 KiB piece starts with its index, so a piece
  lost, repeated or reordered is caught).
* **ShortStreams**: ``n`` streams, run by 1,000 concurrent tasks, each opening a stream,
  sending 1 KiB, half-closing, reading the echo to its end and closing; streams/s and the
  latency of one stream (open to closed).
* **LatencyUnderBulk**: 64-byte requests, one after another, on the connection that also
  carries a bulk stream echo of ``bulk`` bytes each way; p50/p99 of those requests (and,
  for reference, of the same requests on the idle connection just before).

``python -m benchmarks.streams [--size 256MiB] [--profile]`` runs StreamEcho with both ends
in this one process, over a socket pair (native profile): the CPU time of both sides per
GB, without the scheduling of two processes; ``--profile`` runs it under :mod:`cProfile`
and prints the functions that cost the most. ``--messages N`` runs ServerStreaming the same
way instead: N messages of 1 KiB over one download call whose handler is an async
generator.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from . import SHORT_STREAM_CALLERS, SHORT_STREAM_SIZE, SMALL_REQUEST_SIZE, STREAMED_MESSAGE_SIZE
from .common import (
    CTL_ECHO_OFF,
    CTL_ECHO_ON,
    STREAMED_DISTINCT,
    BenchClient,
    PeerOptions,
    cpu_seconds,
    parse_streaming_request,
    streamed_payloads,
    streaming_request,
)
from .workloads import BenchError, _finish, _lat_fields, _split, server_stats

PIECE = 256 * 1024
"""Bytes per ``send_all`` and most bytes per ``receive_some``."""
ECHO_MARKER = b"\xff"
"""What a trio peer's echo connection sends first (a framed record never starts with it:
its first byte is the high byte of a length below 16 MiB)."""
IDLE_REQUESTS = 1000
"""LatencyUnderBulk: requests timed on the idle connection first, for reference."""

OpenEchoStream = Callable[[BenchClient, int, PeerOptions], Awaitable[trio.abc.Stream]]


def pieces(total: int, block: bytes) -> Iterator[bytes]:
    """``total`` bytes as pieces of ``len(block)``: ``block`` with the piece's index in its
    first 8 bytes (the last piece cut short)."""
    size = len(block)
    for index, offset in enumerate(range(0, total, size)):
        length = min(size, total - offset)
        yield index.to_bytes(8, "big") + block[8:length] if length >= 8 else block[:length]


async def echo_through(stream: trio.abc.Stream, total: int, block: bytes) -> tuple[int, int]:
    """Send ``total`` bytes (:func:`pieces`) over ``stream`` while reading the echo in
    this task; return (bytes back, CRC-32 of them).

    A half-closeable stream is half-closed once everything is written and read to its end
    (the echo ends it too); another one (TLS) is read until ``total`` bytes are back.
    """
    half_close = isinstance(stream, trio.abc.HalfCloseableStream)
    received = 0
    crc = 0

    async def write() -> None:
        for piece in pieces(total, block):
            await stream.send_all(piece)
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        while half_close or received < total:
            data = await stream.receive_some(PIECE)
            if not data:
                break
            crc = zlib.crc32(data, crc)
            received += len(data)
    return received, crc


def expected_crc(total: int, block: bytes) -> int:
    crc = 0
    for piece in pieces(total, block):
        crc = zlib.crc32(piece, crc)
    return crc


async def run_stream_echo(
    client: BenchClient,
    open_echo: OpenEchoStream,
    port: int,
    opts: PeerOptions,
    size: int,
    warmup: int,
) -> dict[str, Any]:
    """StreamEcho: ``size`` bytes over one stream and back (after ``warmup`` bytes on a
    stream of their own)."""
    block = os.urandom(PIECE)
    want = expected_crc(size, block)
    if warmup:
        stream = await open_echo(client, port, opts)
        async with stream:
            back, crc = await echo_through(stream, warmup, block)
        if (back, crc) != (warmup, expected_crc(warmup, block)):
            raise BenchError("the warm-up echo differs from what was sent")
    stream = await open_echo(client, port, opts)
    async with stream:
        s0 = await server_stats(client)
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        back, crc = await echo_through(stream, size, block)
        elapsed = time.perf_counter() - t0
        s1 = await server_stats(client)
    if back != size or crc != want:
        raise BenchError(f"the echo differs from what was sent ({back} bytes back of {size})")
    result: dict[str, Any] = {
        "callers": 1,
        "stream_size": size,
        "mb_counts": "bytes sent + bytes echoed",
        "lat_p50_us": None,
        "lat_p99_us": None,
    }
    result = _finish(result, 1, 2 * size, elapsed, cpu0, s0, s1)
    return _per_gb(result, 2 * size)


def _per_gb(result: dict[str, Any], nbytes: int) -> dict[str, Any]:
    """CPU seconds (client + server) per GB moved, in place of a per-message figure."""
    cpu = result["client_cpu_s"] + result["server_cpu_s"]
    result["cpu_s_per_gb"] = cpu / (nbytes / 1e9)
    result["cpu_us_per_msg"] = None
    return result


async def _short_stream(client: Any, payload: bytes) -> None:
    async with await client.open_stream() as stream:
        await stream.send_all(payload)
        await stream.send_eof()
        back = b""
        while data := await stream.receive_some():
            back += data
    if back != payload:
        raise BenchError("a short stream's echo differs from what was sent")


async def run_short_streams(client: Any, n: int, warmup: int) -> dict[str, Any]:
    """ShortStreams: ``n`` streams by 1,000 concurrent tasks (monte_trio's client)."""
    payloads = [os.urandom(SHORT_STREAM_SIZE) for _ in range(64)]
    lat: list[int] = []

    async def drive(count: int, record: bool) -> None:
        async def caller(share: int, first: int) -> None:
            clock = time.perf_counter_ns
            for i in range(first, first + share):
                t = clock()
                await _short_stream(client, payloads[i & 63])
                if record:
                    lat.append(clock() - t)

        async with trio.open_nursery() as nursery:
            first = 0
            for share in _split(count, SHORT_STREAM_CALLERS):
                if share:
                    nursery.start_soon(caller, share, first)
                first += share

    if warmup:
        await drive(warmup, False)
    s0 = await server_stats(client)
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    await drive(n, True)
    elapsed = time.perf_counter() - t0
    s1 = await server_stats(client)
    result: dict[str, Any] = {
        "callers": SHORT_STREAM_CALLERS,
        "mb_counts": "bytes sent + bytes echoed",
        **_lat_fields(lat),
    }
    return _finish(result, n, 2 * n * SHORT_STREAM_SIZE, elapsed, cpu0, s0, s1)


async def run_latency_under_bulk(client: Any, bulk: int) -> dict[str, Any]:
    """LatencyUnderBulk: 64-byte requests while ``bulk`` bytes stream each way on the same
    connection (monte_trio's client, one connection)."""
    small = [os.urandom(SMALL_REQUEST_SIZE) for _ in range(64)]
    block = os.urandom(PIECE)
    want = expected_crc(bulk, block)
    clock = time.perf_counter_ns
    await client.request(CTL_ECHO_ON)

    async def timed(i: int) -> int:
        body = small[i & 63]
        t = clock()
        reply = await client.request(body)
        took = clock() - t
        if reply != body:
            raise BenchError("a small request's echo differs")
        return took

    idle = [await timed(i) for i in range(IDLE_REQUESTS)]
    lat: list[int] = []
    done = trio.Event()
    outcome: dict[str, Any] = {}

    async def bulk_echo() -> None:
        async with await client.open_stream() as stream:
            t0 = time.perf_counter()
            outcome["back"], outcome["crc"] = await echo_through(stream, bulk, block)
            outcome["elapsed"] = time.perf_counter() - t0
        done.set()

    s0 = await server_stats(client)
    cpu0 = cpu_seconds()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bulk_echo)
        i = 0
        while not done.is_set():
            lat.append(await timed(i))
            i += 1
    s1 = await server_stats(client)
    await client.request(CTL_ECHO_OFF)
    if outcome["back"] != bulk or outcome["crc"] != want:
        raise BenchError(f"the bulk echo differs ({outcome['back']} bytes back of {bulk})")
    elapsed = outcome["elapsed"]
    idle_fields = _lat_fields(idle)
    result: dict[str, Any] = {
        "callers": 1,
        "bulk_size": bulk,
        "requests": len(lat),
        "idle_p50_us": idle_fields["lat_p50_us"],
        "idle_p99_us": idle_fields["lat_p99_us"],
        "mb_counts": "bulk bytes sent + echoed",
        **_lat_fields(lat),
    }
    result = _finish(result, len(lat), 2 * bulk, elapsed, cpu0, s0, s1)
    return _per_gb(result, 2 * bulk)


# -- both ends in one process ----------------------------------------------------------------


async def _echo_handler(stream: Any) -> None:
    while data := await stream.receive_some(PIECE):
        await stream.send_all(data)
    await stream.send_eof()


async def echo_in_process(size: int) -> tuple[float, float]:
    """StreamEcho of ``size`` bytes with both ends here, over a socket pair; return
    (seconds, CPU seconds of this process)."""
    import monte_trio
    from monte_trio.testing import open_connection_pair

    a, b = trio.socket.socketpair()
    handshake = monte_trio.NativeHandshake(
        identity=monte_trio.Identity.generate(), trust=monte_trio.AcceptAnyKey()
    )
    async with open_connection_pair(
        handshake,
        server_stream_handler=_echo_handler,
        transports=(trio.SocketStream(a), trio.SocketStream(b)),
    ) as (client, _):
        block = os.urandom(PIECE)
        want = expected_crc(size, block)
        async with await client.open_stream() as stream:  # warm-up: the windows grow
            await echo_through(stream, min(size // 4, 16 << 20), block)
        async with await client.open_stream() as stream:
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            back, crc = await echo_through(stream, size, block)
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
    if (back, crc) != (size, want):
        raise BenchError("the echo differs from what was sent")
    return elapsed, cpu


async def _stream_messages(call: Any) -> Any:
    count, seed = parse_streaming_request(await call.receive())
    payloads = streamed_payloads(seed, STREAMED_MESSAGE_SIZE)
    mask = STREAMED_DISTINCT - 1
    for i in range(count):
        yield payloads[i & mask]


async def messages_in_process(n: int) -> tuple[float, float]:
    """ServerStreaming of ``n`` messages with both ends here, over a socket pair; return
    (seconds, CPU seconds of this process)."""
    import monte_trio
    from monte_trio.testing import open_connection_pair

    a, b = trio.socket.socketpair()
    handshake = monte_trio.NativeHandshake(
        identity=monte_trio.Identity.generate(), trust=monte_trio.AcceptAnyKey()
    )
    seed = 1
    expected = streamed_payloads(seed, STREAMED_MESSAGE_SIZE)
    mask = STREAMED_DISTINCT - 1

    async def download(client: Any, count: int) -> None:
        got = 0
        async with client.download(streaming_request(count, seed)) as messages:
            async for message in messages:
                if message != expected[got & mask]:
                    raise BenchError(f"streamed message {got} differs from what was sent")
                got += 1
        if got != count:
            raise BenchError(f"{got} streamed messages arrived of {count}")

    async with open_connection_pair(
        handshake,
        server_call_handler=_stream_messages,
        transports=(trio.SocketStream(a), trio.SocketStream(b)),
    ) as (client, _):
        await download(client, min(n // 10, 10_000))  # warm-up
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        await download(client, n)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    return elapsed, cpu


def main(argv: list[str] | None = None) -> int:
    from .__main__ import byte_count

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.streams",
        description="StreamEcho with both ends in one process over a socket pair.",
    )
    ap.add_argument("--size", type=byte_count, default=256 << 20, help="bytes each way")
    ap.add_argument(
        "--messages", type=int, default=0,
        help="run ServerStreaming instead: this many 1 KiB messages over one download call",
    )  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="under cProfile: the top functions")
    ap.add_argument("--limit", type=int, default=30, help="functions listed with --profile")
    args = ap.parse_args(argv)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    if args.messages:
        elapsed, cpu = trio.run(messages_in_process, args.messages)
    else:
        elapsed, cpu = trio.run(echo_in_process, args.size)
    if profiler is not None:
        profiler.disable()
    if args.messages:
        n = args.messages
        print(
            f"ServerStreaming in one process: {n:,} messages of {STREAMED_MESSAGE_SIZE} bytes "
            f"in {elapsed:.3f} s: {n / elapsed:,.0f} messages/s, "
            f"{n * STREAMED_MESSAGE_SIZE / elapsed / 1e6:,.1f} MB/s, {cpu / n * 1e6:.2f} "
            "CPU µs/message (both ends)"
        )
    else:
        moved = 2 * args.size
        print(
            f"StreamEcho in one process: {args.size:,} bytes each way in {elapsed:.3f} s: "
            f"{moved / elapsed / 1e6:,.0f} MB/s (both directions), {cpu / (moved / 1e9):.2f} "
            "CPU s/GB (both ends)"
        )
    if profiler is not None:
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
