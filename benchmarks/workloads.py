"""Workload drivers, written once for every peer (trio or asyncio, through a ``Runtime``)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from . import BIG_SIZE, PARALLEL_CALLERS, PAYLOAD_SIZE, STREAMED_MESSAGE_SIZE
from .common import (
    CTL_ECHO_OFF,
    CTL_ECHO_ON,
    CTL_STATS,
    STREAMED_DISTINCT,
    BenchClient,
    OpenClient,
    PeerOptions,
    Runtime,
    cpu_seconds,
    current_rss_kib,
    peak_rss_kib,
    percentile,
    streamed_payloads,
    streaming_request,
)

ONE_WAY = {"Send", "SendNoWait", "ParallelSend", "ParallelSendNoWait"}
KIND = {
    "Send": "send",
    "SendNoWait": "nowait",
    "Request": "request",
    "ParallelSend": "send",
    "ParallelSendNoWait": "nowait",
    "ParallelRequest": "request",
    "ParallelMethod": "method",
    "ParallelMethodStruct": "struct",
}
N_PAYLOADS = 64  # distinct random payloads, cycled
OpenDownload = Callable[[Any, bytes], AbstractAsyncContextManager[AsyncIterator[bytes]]]
"""ServerStreaming: a peer's ``open_download(client, request)``, an async context manager
around the server-streaming call whose messages are iterated (``async for``)."""
CONNECT_TIMEOUT = 15.0  # seconds for one idle connection's connect + handshake + request


class BenchError(Exception):
    pass


def make_payloads(size: int = PAYLOAD_SIZE, count: int = N_PAYLOADS) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]


async def server_stats(client: BenchClient) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(await client.request(CTL_STATS))
    return stats


async def wait_for_count(
    client: BenchClient, rt: Runtime, target: int, timeout: float
) -> dict[str, Any]:
    """Poll the server until it has received ``target`` one-way messages (bounded in time)."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    for _ in range(1_000_000):
        stats = await server_stats(client)
        if stats["count"] >= target:
            return stats
        if time.monotonic() > deadline:
            break
        await rt.sleep(delay)
        delay = min(delay * 2, 0.02)
    raise BenchError(f"server received {stats['count']} of {target} one-way messages in time")


async def verify_replies(client: BenchClient, rt: Runtime, payloads: Sequence[bytes]) -> None:
    """With the server echoing, 64 concurrent distinct requests must each get their own body."""
    await client.request(CTL_ECHO_ON)
    try:

        def caller(i: int) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                for j in range(4):
                    body = payloads[(i + j) % len(payloads)][:-8] + i.to_bytes(8, "big")
                    if await client.request(body) != body:
                        raise BenchError("a reply did not match its request")

            return run

        await rt.gather([caller(i) for i in range(PARALLEL_CALLERS)])
    finally:
        await client.request(CTL_ECHO_OFF)


def _split(n: int, callers: int) -> list[int]:
    return [n // callers + (1 if i < n % callers else 0) for i in range(callers)]


async def drive(
    kind: str,
    client: BenchClient,
    rt: Runtime,
    n: int,
    callers: int,
    payloads: Sequence[bytes],
    latencies: list[int] | None,
) -> None:
    """``n`` calls of ``kind`` spread over ``callers`` concurrent tasks."""
    would_block = rt.would_block
    mask = len(payloads) - 1
    assert len(payloads) & mask == 0

    def make(count: int, offset: int) -> Callable[[], Awaitable[None]]:
        lat: list[int] = []
        if latencies is not None:
            latencies_per_caller.append(lat)

        async def request_loop() -> None:
            request = client.request
            clock = time.perf_counter_ns
            for i in range(offset, offset + count):
                t = clock()
                reply = await request(payloads[i & mask])
                lat.append(clock() - t)
                if reply:
                    raise BenchError("expected an empty reply")

        async def send_loop() -> None:
            send = client.send
            clock = time.perf_counter_ns
            for i in range(offset, offset + count):
                t = clock()
                await send(payloads[i & mask])
                lat.append(clock() - t)

        async def method_loop() -> None:
            # A Router method with the json codec: one str argument, a 1400-byte body.
            call: Any = client.call  # type: ignore[attr-defined]  # monte_trio's Client
            text = method_args[0]
            clock = time.perf_counter_ns
            for _ in range(count):
                t = clock()
                reply = await call("store", text)
                lat.append(clock() - t)
                if reply is not None:
                    raise BenchError("expected None from the method")

        async def struct_loop() -> None:
            # Through a proxy with the msgpack codec: a Struct of 6 fields, validated.
            store: Any = client.proxy(method_args[1])  # type: ignore[attr-defined]
            items = method_args[2]
            clock = time.perf_counter_ns
            for i in range(offset, offset + count):
                t = clock()
                reply = await store.store(items[i & mask])
                lat.append(clock() - t)
                if reply is not None:
                    raise BenchError("expected None from the method")

        async def nowait_loop() -> None:
            send_nowait = client.send_nowait
            for i in range(offset, offset + count):
                body = payloads[i & mask]
                try:
                    send_nowait(body)
                except would_block:
                    await client.send(body)  # back-pressure: wait for room

        return {
            "request": request_loop,
            "send": send_loop,
            "nowait": nowait_loop,
            "method": method_loop,
            "struct": struct_loop,
        }[kind]

    method_args: tuple[Any, ...] = ()
    if kind in ("method", "struct"):
        from .methods import Store, json_text, make_item

        method_args = (json_text(), Store, [make_item(i) for i in range(len(payloads))])
    latencies_per_caller: list[list[int]] = []
    fns = [make(k, i * 7) for i, k in enumerate(_split(n, callers)) if k]
    if len(fns) == 1:
        await fns[0]()
    else:
        await rt.gather(fns)
    if latencies is not None:
        for lat in latencies_per_caller:
            latencies.extend(lat)


def _lat_fields(lat: list[int]) -> dict[str, Any]:
    if not lat:
        return {"lat_p50_us": None, "lat_p99_us": None}
    lat.sort()
    return {
        "lat_p50_us": percentile(lat, 50) / 1000,
        "lat_p99_us": percentile(lat, 99) / 1000,
    }


def _finish(
    result: dict[str, Any],
    msgs: int,
    nbytes: int,
    elapsed: float,
    cpu0: float,
    s0: dict[str, Any],
    s1: dict[str, Any],
) -> dict[str, Any]:
    client_cpu = cpu_seconds() - cpu0
    server_cpu = s1["cpu_s"] - s0["cpu_s"]
    result.update(
        msgs=msgs,
        bytes=nbytes,
        elapsed_s=elapsed,
        msgs_per_s=msgs / elapsed,
        mb_per_s=nbytes / elapsed / 1e6,
        client_cpu_s=client_cpu,
        server_cpu_s=server_cpu,
        cpu_us_per_msg=(client_cpu + server_cpu) / msgs * 1e6,
        client_peak_rss_kib=peak_rss_kib(),
        server_peak_rss_kib=s1["peak_rss_kib"],
    )
    return result


async def run_main(
    workload: str,
    client: BenchClient,
    rt: Runtime,
    n: int,
    warmup: int,
    timeout: float,
) -> dict[str, Any]:
    """One of monte's six benchmarks."""
    kind = KIND[workload]
    callers = PARALLEL_CALLERS if workload.startswith("Parallel") else 1
    one_way = workload in ONE_WAY
    payloads = make_payloads()
    await verify_replies(client, rt, payloads)
    # warm-up, drained so that it does not spill into the measurement
    if warmup:
        base = (await server_stats(client))["count"]
        await drive(kind, client, rt, warmup, callers, payloads, None)
        if one_way:
            await wait_for_count(client, rt, base + warmup, timeout)
    s0 = await server_stats(client)
    lat: list[int] = []
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    await drive(kind, client, rt, n, callers, payloads, None if kind == "nowait" else lat)
    if one_way:
        s1 = await wait_for_count(client, rt, s0["count"] + n, timeout)
    elapsed = time.perf_counter() - t0
    if not one_way:
        s1 = await server_stats(client)
        if s1["requests"] - s0["requests"] < n:
            raise BenchError("server saw fewer requests than were answered")
    result: dict[str, Any] = {"callers": callers, **_lat_fields(lat)}
    return _finish(result, n, n * PAYLOAD_SIZE, elapsed, cpu0, s0, s1)


async def run_big(
    client: BenchClient, rt: Runtime, n: int, warmup: int, timeout: float
) -> dict[str, Any]:
    """1 MiB requests, server echoes; every reply is compared with its request."""
    payloads = make_payloads(BIG_SIZE, 4)
    await client.request(CTL_ECHO_ON)
    for i in range(warmup):
        if await client.request(payloads[i & 3]) != payloads[i & 3]:
            raise BenchError("echo mismatch")
    s0 = await server_stats(client)
    lat: list[int] = []
    clock = time.perf_counter_ns
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    for i in range(n):
        body = payloads[i & 3]
        t = clock()
        reply = await client.request(body)
        lat.append(clock() - t)
        if reply != body:
            raise BenchError("echo mismatch")
    elapsed = time.perf_counter() - t0
    s1 = await server_stats(client)
    await client.request(CTL_ECHO_OFF)
    result: dict[str, Any] = {
        "callers": 1,
        "mb_counts": "request + reply bytes",
        **_lat_fields(lat),
    }
    return _finish(result, n, 2 * n * BIG_SIZE, elapsed, cpu0, s0, s1)


async def run_connect(
    ctrl: BenchClient,
    open_client: OpenClient,
    port: int,
    opts: PeerOptions,
    rt: Runtime,
    n: int,
    warmup: int,
) -> dict[str, Any]:
    """Sequential: open a client, connect + handshake + one 1400-byte request, close."""
    payloads = make_payloads()

    async def once(i: int) -> None:
        async with open_client(port, opts, 1) as c:
            if await c.request(payloads[i & 63]) != b"":
                raise BenchError("expected an empty reply")

    for i in range(warmup):
        await once(i)
    s0 = await server_stats(ctrl)
    lat: list[int] = []
    clock = time.perf_counter_ns
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    for i in range(n):
        t = clock()
        await once(i)
        lat.append(clock() - t)
    elapsed = time.perf_counter() - t0
    s1 = await server_stats(ctrl)
    result: dict[str, Any] = {"callers": 1, **_lat_fields(lat)}
    return _finish(result, n, n * PAYLOAD_SIZE, elapsed, cpu0, s0, s1)


async def run_idle(
    ctrl: BenchClient,
    open_client: OpenClient,
    port: int,
    opts: PeerOptions,
    rt: Runtime,
    levels: Sequence[int],
    timeout: float,
    concurrency: int = 64,
    nofile: int = 0,
) -> dict[str, Any]:
    """Server RSS per idle connection (connected, handshaken, one request done)."""
    payload = make_payloads(count=1)[0]
    await rt.sleep(0.2)
    s0 = await server_stats(ctrl)
    client_rss0 = current_rss_kib()
    release = rt.event()
    opened = 0
    failed = 0
    errors: list[str] = []
    t_start = time.perf_counter()

    async def holder() -> None:
        nonlocal opened, failed
        done = False
        try:
            async with open_client(port, opts, 1) as c:
                # bounded: a connection that cannot be made (e.g. out of descriptors in a
                # library's I/O thread) fails here instead of hanging the run
                await rt.with_timeout(lambda: c.request(payload), CONNECT_TIMEOUT)
                opened += 1
                done = True
                await release.wait()
        except Exception as exc:
            if not done:
                failed += 1
                if len(errors) < 3:
                    errors.append(f"{type(exc).__name__}: {exc}")

    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        async with rt.task_group() as group:
            try:
                started = 0
                for level in sorted(levels):
                    while started < level and not failed:
                        batch = min(concurrency, level - started)
                        for _ in range(batch):
                            group.start_soon(holder)
                        started += batch
                        for _ in range(1_000_000):
                            if opened + failed >= started or time.monotonic() > deadline:
                                break
                            await rt.sleep(0.002)
                        if time.monotonic() > deadline:
                            errors.append(f"timed out after {timeout} s")
                            break
                    await rt.sleep(0.3)  # let both sides settle
                    s = await server_stats(ctrl)
                    entry: dict[str, Any] = {
                        "target": level,
                        "opened": opened,
                        "failed": failed,
                        "open_s": time.perf_counter() - t_start,
                        "server_rss_kib": s["rss_kib"],
                        "server_rss_delta_kib": s["rss_kib"] - s0["rss_kib"],
                        "client_rss_delta_kib": current_rss_kib() - client_rss0,
                    }
                    if opened:
                        entry["server_kib_per_conn"] = entry["server_rss_delta_kib"] / opened
                        entry["client_kib_per_conn"] = entry["client_rss_delta_kib"] / opened
                    out.append(entry)
                    if failed or errors:
                        break
            finally:
                release.set()
    finally:
        release.set()
    result: dict[str, Any] = {
        "levels": out,
        "server_baseline_rss_kib": s0["rss_kib"],
        "client_nofile_limit": nofile,
        "server_peak_rss_kib": (await server_stats(ctrl))["peak_rss_kib"],
        "client_peak_rss_kib": peak_rss_kib(),
    }
    if errors:
        result["errors"] = errors
    return result


async def run_server_streaming(
    client: BenchClient, open_download: OpenDownload, n: int, warmup: int
) -> dict[str, Any]:
    """ServerStreaming: the server streams ``n`` messages of 1 KiB over one server-streaming
    call (after ``warmup`` messages over a call of their own); messages/s and MB/s. Every
    message is compared with the one the server was to send (the request carries a seed)."""
    seed = int.from_bytes(os.urandom(8), "big")
    expected = streamed_payloads(seed, STREAMED_MESSAGE_SIZE)
    mask = STREAMED_DISTINCT - 1

    async def download(count: int) -> None:
        got = 0
        async with open_download(client, streaming_request(count, seed)) as messages:
            async for message in messages:
                if message != expected[got & mask]:
                    raise BenchError(f"streamed message {got} differs from what was sent")
                got += 1
        if got != count:
            raise BenchError(f"{got} streamed messages arrived of {count}")

    if warmup:
        await download(warmup)
    s0 = await server_stats(client)
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    await download(n)
    elapsed = time.perf_counter() - t0
    s1 = await server_stats(client)
    result: dict[str, Any] = {
        "callers": 1,
        "message_size": STREAMED_MESSAGE_SIZE,
        "lat_p50_us": None,
        "lat_p99_us": None,
    }
    return _finish(result, n, n * STREAMED_MESSAGE_SIZE, elapsed, cpu0, s0, s1)
