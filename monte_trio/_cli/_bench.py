"""``monte-trio bench HOST:PORT``: drive an echo server, measure throughput and latency.

``request`` mode checks every echoed reply; the send modes end with one request per
connection, whose reply proves that everything sent before it was read. Latencies are
sampled (at most ``_MAX_SAMPLES``, every ``stride``-th message) and summarised with the
nearest-rank percentile the benchmark harness uses too (``_stats``). ``stream`` mode moves
bytes over one stream instead (``_stream_bench``).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time

import trio

from .._client import Client, open_client
from .._config import ConnectionConfig
from ._errors import CommandFailed
from ._interrupt import interruptible
from ._options import (
    MONTE_V1,
    Job,
    add_command,
    add_security_options,
    address,
    byte_size,
    positive_int,
)
from ._output import format_address, say
from ._security import Security, resolve_security
from ._serve import echo
from ._stats import percentile
from ._stream_bench import bench_stream

__all__ = ["add_parser", "run"]

MESSAGE_MODES = ("request", "send", "send-nowait")
STREAM = "stream"
MODES = (*MESSAGE_MODES, STREAM)
_DEFAULT_SIZE = 1400
_DEFAULT_STREAM_SIZE = 256 * 1024 * 1024

# A monte-v1 record holds a 4-byte sequence number, the payload and a 16-byte tag.
_MONTE_V1_OVERHEAD = 4 + 16
_MONTE_V1_DEFAULT_RECORD = 4096
_MAX_BENCH_SIZE = ConnectionConfig().max_message_size  # what the peers accept by default
_MAX_SAMPLES = 1_000_000


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` command and its options to ``commands``."""
    bench = add_command(
        commands,
        "bench",
        summary="drive an echo server and measure throughput and latency",
        description="Sends N messages of S random bytes with C concurrent tasks over up to "
        "M connections. request mode checks every echoed reply; the send modes end with "
        "one request per connection to check delivery. stream mode (native profile) "
        "instead sends S bytes over one stream to the server's stream echo while reading "
        "the echo, checks its SHA-256 against what was sent, and reports MB/s counting both "
        "directions (2 x S / time), as the benchmark suite's 1 MiB requests do. Ctrl-C "
        "stops it (exit status 130).",
        run=run,
    )
    bench.add_argument("address", type=address, metavar="HOST:PORT", help="the server")
    add_security_options(bench, who="server")
    bench.add_argument(
        "--mode",
        choices=MODES,
        default="request",
        help="what to send: requests, one-way messages (send, send-nowait), or one byte "
        "stream echoed back (stream: its MB/s counts both directions)",
    )
    bench.add_argument(
        "-n", type=positive_int, default=10_000, help="messages in total (message modes)"
    )
    bench.add_argument(
        "--size",
        type=byte_size,
        default=None,
        metavar="BYTES",
        help=f"bytes per message (default: {_DEFAULT_SIZE}); in stream mode, bytes sent over "
        "the stream, and echoed back (default: 256MiB); a unit may follow: KiB, MiB, GiB",
    )
    bench.add_argument(
        "--concurrency",
        type=positive_int,
        default=16,
        help="concurrent sending tasks (message modes)",
    )
    bench.add_argument(
        "--conns", type=positive_int, default=4, help="most connections (message modes)"
    )


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Job:
    """Check the options; return the work: the benchmark, until done or interrupted."""
    if args.mode == STREAM:
        if args.profile == MONTE_V1:
            parser.error(
                "--mode stream needs the native profile: monte-v1 (Go monte's wire) has no streams"
            )
        if args.size is None:
            args.size = _DEFAULT_STREAM_SIZE
        security = resolve_security(parser, args, who="server")
        return functools.partial(interruptible, functools.partial(bench_stream, args, security))
    if args.size is None:
        args.size = _DEFAULT_SIZE
    if args.size > _MAX_BENCH_SIZE:
        parser.error(
            f"--size: at most {_MAX_BENCH_SIZE} bytes per message (--mode stream has no limit)"
        )
    security = resolve_security(parser, args, who="server")
    return functools.partial(interruptible, functools.partial(_bench, args, security))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


async def _bench(args: argparse.Namespace, security: Security, interrupt: trio.CancelScope) -> int:
    host, port = args.address
    n, size, mode = args.n, args.size, args.mode
    max_record: int | None = None
    if security.profile == MONTE_V1 and size + _MONTE_V1_OVERHEAD > _MONTE_V1_DEFAULT_RECORD:
        max_record = size + _MONTE_V1_OVERHEAD  # the server needs --max-record-size too
    config = ConnectionConfig(max_record_size=max_record)
    # Distinct bodies: each starts with its index, so a reply delivered to the wrong caller
    # is caught; the rest is random bytes from a small pool.
    pool = [os.urandom(size) for _ in range(min(n, 64))]

    def body_of(i: int) -> bytes:
        base = pool[i % len(pool)]
        return i.to_bytes(8, "big") + base[8:] if size >= 8 else base

    # Keep at most _MAX_SAMPLES latencies (every stride-th message), whatever n is.
    stride = max(1, math.ceil(n / _MAX_SAMPLES))
    latencies = [0.0] * math.ceil(n / stride)
    next_index = 0
    fallbacks = 0

    async def request_worker(client: Client) -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            body = body_of(i)
            start = time.perf_counter()
            reply = await client.request(body)
            if i % stride == 0:
                latencies[i // stride] = time.perf_counter() - start
            if reply != body:
                raise CommandFailed(
                    f"the reply to message {i} differs from what was sent "
                    f"({len(reply)} bytes back for {len(body)} sent)"
                )

    async def send_worker(client: Client) -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            body = body_of(i)
            start = time.perf_counter()
            await client.send(body)
            if i % stride == 0:
                latencies[i // stride] = time.perf_counter() - start

    async def send_nowait_worker(client: Client) -> None:
        nonlocal next_index, fallbacks
        while next_index < n:
            i = next_index
            next_index += 1
            body = body_of(i)
            start = time.perf_counter()
            try:
                client.send_nowait(body)
            except trio.WouldBlock:
                fallbacks += 1
                await client.send(body)
            if i % stride == 0:
                latencies[i // stride] = time.perf_counter() - start
            if i % 64 == 63:
                await trio.lowlevel.checkpoint()  # let the writer run and honour cancellation

    worker = {"request": request_worker, "send": send_worker, "send-nowait": send_nowait_worker}[
        mode
    ]
    if max_record is not None:
        say(
            f"note: monte-v1 messages of {size} bytes need records of {max_record} bytes; "
            f"the server must accept them (serve --max-record-size {max_record})"
        )
    say(
        f"bench {mode}: {n} messages of {size} bytes to {format_address(host, port)}, "
        f"profile {security.profile}, {args.concurrency} tasks, up to {args.conns} connections"
    )
    async with open_client(
        host,
        port,
        handshake=security.handshake,
        identity=security.identity,
        trust=security.trust,
        psk=security.psk,
        handler=echo,
        config=config,
        max_conns=args.conns,
    ) as client:
        # Interrupted, the work stops here and the client still closes gracefully.
        with interrupt:
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(args.concurrency):
                    nursery.start_soon(worker, client)
            if mode != "request":
                # One request per connection: its reply comes after every message sent
                # before it on that connection has been read by the server.
                connections = client.connections
                if not connections:
                    raise CommandFailed("no connection left open to check delivery")
                for conn in connections:
                    probe = os.urandom(max(size, 1))
                    if await conn.request(probe) != probe:
                        raise CommandFailed("the final delivery check's reply differs")
            elapsed = time.perf_counter() - start
        conns_used = client.statistics().dials
    if interrupt.cancel_called:
        return 130
    rate = n / elapsed if elapsed > 0 else float("inf")
    ordered = sorted(latencies)
    if mode == "send-nowait":
        figures = (
            f"enqueue time p50 {_ms(percentile(ordered, 50))}, p99 {_ms(percentile(ordered, 99))} "
            f"(send_nowait call, {fallbacks} fell back to send; per-message latency n/a)"
        )
    else:
        kind = "round trip" if mode == "request" else "until written"
        figures = (
            f"latency p50 {_ms(percentile(ordered, 50))}, p99 {_ms(percentile(ordered, 99))} "
            f"({kind})"
        )
    say(
        f"{mode}: {n} msgs in {elapsed:.3f} s over {conns_used} connection(s): "
        f"{rate:,.0f} msgs/s, {rate * size / 1e6:,.2f} MB/s, {figures}"
    )
    checked = "every reply verified" if mode == "request" else "delivery verified"
    say(f"bench {mode} ok: {checked}")
    return 0
