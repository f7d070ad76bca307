"""``python -m benchmarks.methods``: what a method call costs over a raw bytes request.

Both ends run in this one process, over a real socket pair (:func:`trio.socket.socketpair`,
native profile), so the figure is the CPU time of client and server together, per call,
taken with :func:`time.process_time` (less sensitive to a noisy, shared machine than
wall time). Each run measures, one after another and in alternating order:

``raw``
    ParallelRequest: 64 callers on one connection, 1400-byte random bodies, empty replies,
    served by an inline handler (as the suite's server does).
``raw-async``
    The same, served by an ``async def`` handler: a Router is one, so this separates
    what the handler worker costs from what the method layer costs.
``json``
    ParallelMethod: the same 64 callers calling a method with the default ``json`` codec,
    one string argument sized so the call's body is 1400 bytes; the method returns
    ``None``.
``struct``
    ParallelMethodStruct: the same through a proxy with the ``msgpack`` codec, the
    argument a msgspec Struct of 6 fields (about 1400 bytes), validated on decode.

All four connection pairs are open at once, and a run is a number of **rounds**: in each
round every workload makes a batch of calls, in alternating order from round to round,
so the figures set side by side were taken a fraction of a second apart, under the same
load from the machine's other users. It prints, per run, the median CPU microseconds
per call of each workload and the medians of the per-round ratios, then the medians of
those over the runs (each run in a process of its own). ``--profile json`` (or another
workload) runs one workload under :mod:`cProfile` instead and prints the functions that
cost the most.

``--tcp`` measures the same workloads as the suite runs them: each served by a server
process of its own on loopback TCP, called through a :class:`~monte_trio.Client` with up
to 4 connections, the rounds alternating as above. Per workload and round it takes the
wall time (so the ratios are also those of calls per second), the client's CPU time and
the server's (which the server reports in reply to a control request before and after
the round); the ratios are per round, then the median. ``--timeout SECONDS`` runs each
caller under :func:`trio.fail_after`, as the suite's client runs: every method call then
carries its remaining time, and the method runs under that deadline.

Run it::

    python -m benchmarks.methods --runs 5 --rounds 20 -n 4000
    python -m benchmarks.methods --tcp --runs 3 --rounds 10 -n 8000
    python -m benchmarks.methods --tcp --timeout 300 --runs 3 --rounds 10 -n 8000
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import math
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Protocol

import msgspec
import trio

import monte_trio
from monte_trio.testing import open_connection_pair

from . import MAX_CONNS, PARALLEL_CALLERS, PAYLOAD_SIZE

WORKLOADS = ("raw", "raw-async", "json", "struct")


class Item(msgspec.Struct):
    """The Struct of 6 fields the ``struct`` workload sends."""

    id: int
    name: str
    price: float
    tags: list[str]
    active: bool
    blob: bytes


class Store(Protocol):
    """The service both method workloads call."""

    async def store(self, item: Item) -> None: ...


def make_item(index: int) -> Item:
    """An Item whose msgpack encoding is about :data:`PAYLOAD_SIZE` bytes."""
    return Item(
        id=index,
        name=f"item-{index:06d}",
        price=index * 1.25,
        tags=["alpha", "beta", "gamma", "delta"],
        active=index % 2 == 0,
        blob=(bytes(range(256)) * 6)[:1305],
    )


def json_text(size: int = PAYLOAD_SIZE) -> str:
    """The string argument that makes a ``store`` call's body ``size`` bytes with json."""
    # F5 01 flags u16 + "store" + '[["' ... '"],{}]'
    return "x" * (size - 5 - len("store") - len('[[""],{}]'))


def raw_handler(request: monte_trio.Request) -> bytes:
    """The suite's server for ParallelRequest: inline, an empty reply."""
    return b""


async def async_raw_handler(request: monte_trio.Request) -> bytes:
    """The same as an async handler (run in a handler worker, as a Router is)."""
    return b""


def make_router(
    on_call: Callable[[], None] | None = None, fallback: monte_trio.Handler | None = None
) -> monte_trio.Router:
    """The ``store`` method both method workloads call (with ``msgpack``, the argument
    is converted to, and validated against, ``Item``; ``json`` ignores annotations), as
    this script and the suite's server serve it."""
    router = monte_trio.Router(fallback=fallback)

    @router.method
    async def store(item: Item) -> None:
        if on_call is not None:
            on_call()

    return router


CPU_QUERY = b"\x00cpu?"
"""A raw request every ``--serve`` server answers with its CPU seconds so far (ASCII)."""


def _cpu_reply() -> bytes:
    return b"%.6f" % time.process_time()


def _server_handler(workload: str) -> monte_trio.Handler:
    """What a ``--serve`` server runs: the workload's handler, answering CPU_QUERY."""

    def raw_or_cpu(request: monte_trio.Request) -> bytes:
        return _cpu_reply() if request.body == CPU_QUERY else b""

    async def async_raw_or_cpu(request: monte_trio.Request) -> bytes:
        return _cpu_reply() if request.body == CPU_QUERY else b""

    if workload == "raw":
        return monte_trio.inline(raw_or_cpu)
    if workload == "raw-async":
        return async_raw_or_cpu
    return make_router(fallback=monte_trio.inline(raw_or_cpu))


def _config(workload: str) -> monte_trio.ConnectionConfig:
    return monte_trio.ConnectionConfig(codec="msgpack" if workload == "struct" else "json")


def serve(workload: str) -> None:
    """``--serve WORKLOAD``: print ``READY <port>``, serve until stdin closes."""

    async def main() -> None:
        server = monte_trio.Server(
            _server_handler(workload), handshake=_handshake(), config=_config(workload)
        )
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, 0, "127.0.0.1")
            print(f"READY {listeners[0].socket.getsockname()[1]}", flush=True)
            await trio.to_thread.run_sync(sys.stdin.buffer.read)  # EOF: the parent is done
            nursery.cancel_scope.cancel()

    trio.run(main)


def _calls(workload: str, target: monte_trio.Client | monte_trio.Connection) -> Call:
    """The call ``workload`` makes over ``target``."""
    if workload in ("raw", "raw-async"):
        bodies = [bytes([i]) * PAYLOAD_SIZE for i in range(64)]

        async def raw(i: int) -> object:
            return await target.request(bodies[i & 63])

        return raw
    if workload == "json":
        text = json_text()

        async def method(i: int) -> object:
            return await target.call("store", text)

        return method
    store = target.proxy(Store)
    items = [make_item(i) for i in range(64)]

    async def struct(i: int) -> object:
        await store.store(items[i & 63])
        return None

    return struct


async def measure_tcp_rounds(
    ports: dict[str, int],
    rounds: int,
    n: int,
    warmup: int,
    callers: int,
    limit: float | None = None,
) -> dict[str, list[tuple[float, float, float]]]:
    """Per workload and round: (wall, client CPU, server CPU) seconds per call."""
    results: dict[str, list[tuple[float, float, float]]] = {w: [] for w in ports}
    workloads = list(ports)
    async with AsyncExitStack() as stack:
        clients = {
            w: await stack.enter_async_context(
                monte_trio.open_client(
                    "127.0.0.1",
                    port,
                    handshake=_handshake(),
                    config=_config(w),
                    max_conns=MAX_CONNS,
                )
            )
            for w, port in ports.items()
        }
        calls = {w: _calls(w, clients[w]) for w in workloads}
        for workload in workloads:
            await _drive(calls[workload], warmup, callers, limit)
        for index in range(rounds):
            for workload in workloads if index % 2 == 0 else workloads[::-1]:
                client = clients[workload]
                server_before = float(await client.request(CPU_QUERY))
                cpu, wall = time.process_time(), time.perf_counter()
                await _drive(calls[workload], n, callers, limit)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                server = float(await client.request(CPU_QUERY)) - server_before
                results[workload].append((wall / n, cpu / n, server / n))
    return results


def one_tcp_run(
    rounds: int, n: int, warmup: int, callers: int, limit: float | None = None
) -> dict[str, float]:
    """One ``--tcp`` run: a server process per workload; per workload the medians of
    wall, client and server CPU per call; per ``"a/b"`` the medians of the per-round
    ratios of wall time (``:wall``) and of both sides' CPU (``:cpu``)."""
    with contextlib.ExitStack() as stack:
        ports = {}
        for workload in WORKLOADS:
            server = stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.methods", "--serve", workload],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            assert server.stdin is not None
            assert server.stdout is not None
            stack.callback(server.stdin.close)
            ports[workload] = int(server.stdout.readline().split()[1])
        results = trio.run(measure_tcp_rounds, ports, rounds, n, warmup, callers, limit)
    figures: dict[str, float] = {}
    for workload, rows in results.items():
        for field, column in (("wall", 0), ("client", 1), ("server", 2)):
            figures[f"{workload}:{field}"] = statistics.median(row[column] for row in rows)
    for workload, base in RATIOS:
        pairs = list(zip(results[workload], results[base], strict=True))
        figures[f"{workload}/{base}:wall"] = statistics.median(a[0] / b[0] for a, b in pairs)
        figures[f"{workload}/{base}:cpu"] = statistics.median(
            (a[1] + a[2]) / (b[1] + b[2]) for a, b in pairs
        )
    return figures


def tcp_summary(runs: list[dict[str, float]]) -> str:
    """The medians over the ``--tcp`` runs."""
    lines = []
    for workload in WORKLOADS:
        wall, client, server = (
            statistics.median(run[f"{workload}:{f}"] for run in runs) * 1e6
            for f in ("wall", "client", "server")
        )
        lines.append(
            f"{workload}: {1e6 / wall:,.0f} calls/s, CPU per call {client:.2f} us client "
            f"+ {server:.2f} us server"
        )
    for workload, base in RATIOS:
        for kind, meaning in (("wall", "time per call"), ("cpu", "CPU per call")):
            values = [run[f"{workload}/{base}:{kind}"] for run in runs]
            lines.append(
                f"{workload}/{base} {meaning}: median {statistics.median(values):.3f} "
                f"(runs: {', '.join(f'{x:.3f}' for x in values)})"
            )
    return "\n".join(lines)


def _handshake() -> monte_trio.Handshake:
    return monte_trio.NativeHandshake(
        identity=monte_trio.Identity.generate(), trust=monte_trio.AcceptAnyKey()
    )


async def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


Call = Callable[[int], Awaitable[object]]


async def _drive(call: Call, n: int, callers: int, limit: float | None = None) -> None:
    per = [n // callers + (1 if i < n % callers else 0) for i in range(callers)]

    async def caller(count: int, offset: int) -> None:
        with trio.fail_after(math.inf if limit is None else limit):
            for i in range(offset, offset + count):
                await call(i)

    async with trio.open_nursery() as nursery:
        for index, count in enumerate(per):
            nursery.start_soon(caller, count, index * 1000)


async def open_workload(workload: str, stack: contextlib.AsyncExitStack) -> Call:
    """Open ``workload``'s connection pair in ``stack``; return the call it makes."""
    codec = "msgpack" if workload == "struct" else "json"
    config = monte_trio.ConnectionConfig(codec=codec)
    handler: monte_trio.Handler = (
        monte_trio.inline(raw_handler)
        if workload == "raw"
        else async_raw_handler
        if workload == "raw-async"
        else make_router()
    )
    client, _ = await stack.enter_async_context(
        open_connection_pair(
            _handshake(), server_handler=handler, config=config, transports=await _socket_pair()
        )
    )
    return _calls(workload, client)


async def measure_rounds(
    rounds: int,
    n: int,
    warmup: int,
    callers: int,
    workloads: Sequence[str] = WORKLOADS,
    limit: float | None = None,
) -> dict[str, list[float]]:
    """CPU seconds per call (both ends) of each workload in each round of ``n`` calls."""
    results: dict[str, list[float]] = {w: [] for w in workloads}
    async with contextlib.AsyncExitStack() as stack:
        calls = {w: await open_workload(w, stack) for w in workloads}
        for workload in workloads:
            await _drive(calls[workload], warmup, callers, limit)
        for index in range(rounds):
            for workload in workloads if index % 2 == 0 else workloads[::-1]:
                start = time.process_time()
                await _drive(calls[workload], n, callers, limit)
                results[workload].append((time.process_time() - start) / n)
    return results


def one_run(
    rounds: int, n: int, warmup: int, callers: int, limit: float | None = None
) -> dict[str, float]:
    """One run: per workload, the median CPU seconds per call over its rounds; per
    ``"a/b"``, the median of the per-round ratios."""
    results = trio.run(measure_rounds, rounds, n, warmup, callers, WORKLOADS, limit)
    figures = {w: statistics.median(v) for w, v in results.items()}
    for workload, base in RATIOS:
        figures[f"{workload}/{base}"] = statistics.median(
            a / b for a, b in zip(results[workload], results[base], strict=True)
        )
    return figures


RATIOS = [
    ("raw-async", "raw"),
    ("json", "raw"),
    ("struct", "raw"),
    ("json", "raw-async"),
    ("struct", "raw-async"),
]


def summary(runs: list[dict[str, float]]) -> str:
    """The medians over the runs."""
    lines = [
        "median CPU per call (both ends): "
        + ", ".join(
            f"{w} {statistics.median(run[w] for run in runs) * 1e6:.2f} us" for w in WORKLOADS
        )
    ]
    for workload, base in RATIOS:
        key = f"{workload}/{base}"
        values = [run[key] for run in runs]
        lines.append(
            f"{key}: median {statistics.median(values):.3f} "
            f"(runs: {', '.join(f'{x:.3f}' for x in values)})"
        )
    return "\n".join(lines)


def profile(workload: str, n: int, warmup: int, callers: int, limit: int) -> None:
    """Run ``workload`` under cProfile and print the costliest functions."""
    profiler = cProfile.Profile()

    async def main() -> None:
        profiler.enable()
        await measure_rounds(1, n, warmup, callers, [workload])
        profiler.disable()

    trio.run(main)
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(limit)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.methods",
        description="What a method call costs over a raw bytes request (CPU per call).",
    )
    ap.add_argument("--runs", type=int, default=5, help="runs, each in a process of its own")
    ap.add_argument("--rounds", type=int, default=20, help="rounds of all workloads per run")
    ap.add_argument("-n", type=int, default=4000, help="calls per workload and round")
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--callers", type=int, default=PARALLEL_CALLERS)
    ap.add_argument("--profile", choices=WORKLOADS, help="profile one workload instead")
    ap.add_argument("--limit", type=int, default=40, help="functions --profile prints")
    ap.add_argument(
        "--tcp", action="store_true", help="servers in processes of their own, over TCP"
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="each caller runs under trio.fail_after(TIMEOUT), as the suite's client does: "
        "method calls then carry their remaining time (raw requests carry none)",
    )
    ap.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.profile:
        profile(args.profile, args.n, args.warmup, args.callers, args.limit)
        return 0
    if args.one_run:  # a run, in the process the parent started: its figures as JSON
        run_once = one_tcp_run if args.tcp else one_run
        print(json.dumps(run_once(args.rounds, args.n, args.warmup, args.callers, args.timeout)))
        return 0
    runs: list[dict[str, float]] = []
    for index in range(args.runs):
        command = [
            sys.executable, "-m", "benchmarks.methods", "--one-run",
            "--rounds", str(args.rounds), "-n", str(args.n),
            "--warmup", str(args.warmup), "--callers", str(args.callers),
        ]  # fmt: skip
        if args.tcp:
            command.append("--tcp")
        if args.timeout is not None:
            command += ["--timeout", str(args.timeout)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.splitlines()[-1]))
        run = runs[-1]
        if args.tcp:
            print(
                f"run {index + 1}: "
                + "  ".join(f"{w}/{b} {run[f'{w}/{b}:wall']:.3f}" for w, b in RATIOS)
                + " (time per call)",
                flush=True,
            )
            continue
        print(
            f"run {index + 1}: "
            + "  ".join(f"{w} {run[w] * 1e6:.2f} us" for w in WORKLOADS)
            + "".join(f"  {w}/{b} {run[f'{w}/{b}']:.3f}" for w, b in RATIOS),
            flush=True,
        )
    print(tcp_summary(runs) if args.tcp else summary(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
