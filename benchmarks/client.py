"""``python -m benchmarks.client --peer NAME --port P --workload W -n N``: one measurement.

Prints one line ``RESULT <json>`` with the figures (see ``benchmarks.workloads``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from . import (
    ALL_WORKLOADS,
    BULK_SIZE,
    MAX_CONNS,
    PARALLEL_CALLERS,
    STREAM_SIZE,
    STREAM_WORKLOADS,
    peers,
    workloads,
)
from .common import PeerOptions, Runtime, raise_nofile_limit


async def run(args: argparse.Namespace, rt: Runtime, nofile: int) -> dict[str, Any]:
    peer = peers.load(args.peer)
    w = args.workload
    opts = PeerOptions(
        host=args.host,
        tls_dir=args.tls_dir,
        big=args.big,
        methods=args.methods,
        streams=w in STREAM_WORKLOADS,
    )
    open_client = peer.open_client(args.peer)
    max_conns = MAX_CONNS if w.startswith("Parallel") else 1
    async with open_client(args.port, opts, max_conns) as client:
        if w == "ServerStreaming":  # trio or asyncio
            return await workloads.run_server_streaming(
                client, peer.open_download, args.n, args.warmup
            )
        if w in STREAM_WORKLOADS:
            from . import streams  # trio only: the asyncio peers never load it

            if w == "StreamEcho":
                return await streams.run_stream_echo(
                    client, peer.open_echo_stream, args.port, opts, args.stream_size, args.warmup
                )
            if w == "ShortStreams":
                return await streams.run_short_streams(client, args.n, args.warmup)
            return await streams.run_latency_under_bulk(client, args.bulk_size)
        if w == "Request1MiB":
            return await workloads.run_big(client, rt, args.n, args.warmup, args.timeout)
        if w == "Connect":
            return await workloads.run_connect(
                client, open_client, args.port, opts, rt, args.n, args.warmup
            )
        if w == "IdleConns":
            levels = [int(x) for x in args.idle_levels.split(",") if x]
            return await workloads.run_idle(
                client, open_client, args.port, opts, rt, levels, args.timeout, nofile=nofile
            )
        return await workloads.run_main(w, client, rt, args.n, args.warmup, args.timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.client")
    ap.add_argument("--peer", required=True, choices=peers.known())
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "::1"])
    ap.add_argument("--workload", required=True, choices=ALL_WORKLOADS)
    ap.add_argument("-n", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--idle-levels", default="1000,10000")
    ap.add_argument("--tls-dir", default=None)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--methods", default="", help="call methods with this codec")
    ap.add_argument("--stream-size", type=int, default=STREAM_SIZE, help="StreamEcho bytes")
    ap.add_argument(
        "--bulk-size", type=int, default=BULK_SIZE, help="LatencyUnderBulk's stream bytes"
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="hard limit for this run, s")
    args = ap.parse_args(argv)

    # A hard bound: SIGALRM's default action ends the process if anything hangs.
    signal.alarm(int(args.timeout) + 30)
    nofile = raise_nofile_limit()
    peer = peers.load(args.peer)
    result: dict[str, Any]
    if peer.framework == "trio":
        import trio

        from .peers._trio_support import TrioRuntime

        async def trio_main() -> dict[str, Any]:
            with trio.fail_after(args.timeout):
                return await run(args, TrioRuntime(), nofile)

        result = trio.run(trio_main)
    else:
        import asyncio

        from .peers._asyncio_support import AsyncioRuntime

        async def asyncio_main() -> dict[str, Any]:
            return await asyncio.wait_for(run(args, AsyncioRuntime(), nofile), args.timeout)

        result = asyncio.run(asyncio_main())
    result.update(peer=args.peer, workload=args.workload, n=args.n)
    if args.workload.startswith("Parallel"):
        result["callers"] = PARALLEL_CALLERS
    note = peer.notes.get(args.workload)
    if note:
        result["note"] = note
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
