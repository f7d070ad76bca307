"""``python -m benchmarks``: run the suite, print the table, write JSON / Markdown / plot.

For every (peer, workload) a fresh server process and a fresh client process are started
(so peak RSS belongs to that workload alone); the server is stopped by closing its stdin and
its process group is always killed in ``finally``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from . import (
    ALL_WORKLOADS,
    BASELINE_PEER,
    BULK_SIZE,
    MAIN_WORKLOADS,
    METHOD_WORKLOADS,
    STREAM_SIZE,
    STREAM_WORKLOADS,
    peers,
    report,
)
from .common import make_self_signed

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_PEERS = ("monte-native", "monte-v1", "trio-plain", "trio-ssl", "grpc", "zmq")

# Default message counts, sized so the whole suite stays well under 10 minutes on 2 cores
# (grpc is the slow one: ~1-20k msgs/s).
DEFAULT_N = {
    "Send": 100_000,
    "SendNoWait": 200_000,
    "Request": 20_000,
    "ParallelSend": 100_000,
    "ParallelSendNoWait": 200_000,
    "ParallelRequest": 50_000,
    "ParallelMethod": 50_000,
    "ParallelMethodStruct": 50_000,
    "Request1MiB": 300,
    "Connect": 300,
    "ShortStreams": 10_000,
    "StreamEcho": 1,  # one stream of --stream-size bytes
    "LatencyUnderBulk": 1,  # one bulk stream of --bulk-size bytes
    "ServerStreaming": 200_000,  # 1 KiB messages over one server-streaming call
}
TIMED_WORKLOADS = MAIN_WORKLOADS + tuple(METHOD_WORKLOADS)
QUICK_N = dict.fromkeys(TIMED_WORKLOADS, 2000) | {
    "Request1MiB": 10,
    "Connect": 20,
    "ShortStreams": 200,
    "StreamEcho": 1,
    "LatencyUnderBulk": 1,
    "ServerStreaming": 2000,
}
DEFAULT_IDLE = "1000,10000"
QUICK_IDLE = "50,200"
QUICK_STREAM_SIZE = 4 << 20
QUICK_BULK_SIZE = 8 << 20
STREAM_WARMUP_MAX = 16 << 20  # StreamEcho's warm-up stream: a quarter of it, at most this
_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}
_UNITS |= {"g": 1 << 30, "gib": 1 << 30}


def byte_count(text: str) -> int:
    """``--stream-size`` and ``--bulk-size``: bytes, with an optional KiB, MiB or GiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 262144, 256MiB, 1GiB)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


class RunError(Exception):
    pass


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        info["loadavg"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        pass
    versions: dict[str, str] = {}
    from importlib import metadata

    for dist in ("trio", "cryptography", "grpcio", "pyzmq", "monte-trio", "matplotlib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        import zmq

        versions["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    try:
        import ssl

        versions["openssl"] = ssl.OPENSSL_VERSION
    except ImportError:
        pass
    info["versions"] = versions
    return info


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process group we created (start_new_session=True => pgid == pid)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _tail(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode(errors="replace").strip()[-1500:]


def _read_ready(proc: subprocess.Popen[bytes], timeout: float) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith("READY "):
                return int(line.split()[1])
            if line.startswith("UNAVAILABLE"):
                raise RunError(line)
    raise RunError(f"server did not become ready within {timeout} s: {buf[-500:]!r}")


def run_one(
    peer: str,
    workload: str,
    n: int,
    warmup: int,
    tls_dir: str,
    timeout: float,
    idle_levels: str,
    host: str,
    sizes: tuple[int, int] = (STREAM_SIZE, BULK_SIZE),
) -> dict[str, Any]:
    options = ["--big"] if workload == "Request1MiB" else []
    if workload in METHOD_WORKLOADS:
        options += ["--methods", METHOD_WORKLOADS[workload]]
    common = ["--peer", peer, "--tls-dir", tls_dir, "--host", host, *options]
    server_options: list[str] = []
    client_options: list[str] = []
    if workload in STREAM_WORKLOADS:
        server_options = ["--streams"]
        client_options = ["--stream-size", str(sizes[0]), "--bulk-size", str(sizes[1])]
    with tempfile.TemporaryFile() as server_err, tempfile.TemporaryFile() as client_err:
        server = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.server", "--port", "0", *common, *server_options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=server_err,
            cwd=ROOT,
            env=_env(),
            start_new_session=True,
        )
        try:
            try:
                port = _read_ready(server, 60)
            except RunError as exc:
                raise RunError(f"{exc}\n{_tail(server_err)}") from None
            cmd = [
                sys.executable, "-m", "benchmarks.client", "--port", str(port),
                "--workload", workload, "-n", str(n), "--warmup", str(warmup),
                "--timeout", str(timeout), "--idle-levels", idle_levels, *common,
                *client_options,
            ]  # fmt: skip
            client = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=client_err,
                cwd=ROOT,
                env=_env(),
                start_new_session=True,
            )
            try:
                out, _ = client.communicate(timeout=timeout + 60)
            except subprocess.TimeoutExpired:
                raise RunError(f"client did not finish within {timeout + 60} s") from None
            finally:
                _kill_group(client)
            result: dict[str, Any] | None = None
            for line in out.decode(errors="replace").splitlines():
                if line.startswith("RESULT "):
                    result = json.loads(line[7:])
            if result is None:
                raise RunError(
                    f"client exited {client.returncode} without a result:\n{_tail(client_err)}"
                )
            # stop the server: close stdin, collect its FINAL line
            assert server.stdin is not None
            assert server.stdout is not None
            server.stdin.close()
            rest = b""
            try:
                server.wait(timeout=15)
                rest = server.stdout.read()
            except subprocess.TimeoutExpired:
                pass
            for line in rest.decode(errors="replace").splitlines():
                if line.startswith("FINAL "):
                    final = json.loads(line[6:])
                    result["server_peak_rss_kib"] = max(
                        result.get("server_peak_rss_kib", 0), final["peak_rss_kib"]
                    )
                    result["server_nofile_limit"] = final.get("nofile_limit")
            return result
        finally:
            _kill_group(server)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="monte's benchmarks on monte_trio and alternatives, client and server "
        "in separate processes on loopback.",
    )
    ap.add_argument(
        "--peers", default=",".join(DEFAULT_PEERS),
        help=f"comma-separated, from: {', '.join(peers.known())} (default: %(default)s)",
    )  # fmt: skip
    ap.add_argument(
        "--workloads", default=",".join(ALL_WORKLOADS),
        help="comma-separated (default: all): %(default)s",
    )  # fmt: skip
    ap.add_argument("-n", type=int, default=None, help="message count for the six workloads")
    ap.add_argument("--n-big", type=int, default=None, help="count of 1 MiB requests")
    ap.add_argument("--n-connect", type=int, default=None, help="count of new connections")
    ap.add_argument("--idle-levels", default=None, help=f"default {DEFAULT_IDLE}")
    ap.add_argument(
        "--stream-size", type=byte_count, default=None,
        help="StreamEcho: bytes over the stream, each way (default 256MiB; --quick 4MiB)",
    )  # fmt: skip
    ap.add_argument(
        "--bulk-size", type=byte_count, default=None,
        help="LatencyUnderBulk: bytes of the bulk stream, each way (default 1GiB; --quick 8MiB)",
    )  # fmt: skip
    ap.add_argument("--n-streams", type=int, default=None, help="count of ShortStreams")
    ap.add_argument(
        "--n-messages", type=int, default=None,
        help="ServerStreaming: 1 KiB messages streamed over the call (default 200000)",
    )  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="smoke run: small counts, seconds")
    ap.add_argument("--baseline", default=BASELINE_PEER, help="peer the ratios refer to")
    ap.add_argument("--timeout", type=float, default=240.0, help="per-run limit, seconds")
    ap.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "::1"])
    ap.add_argument("--json", default=str(RESULTS_DIR / "results.json"))
    ap.add_argument("--plot", default=None, help="PNG path (default: none; see --markdown)")
    ap.add_argument("--markdown", default=None, help="write a Markdown results page here")
    ap.add_argument("--rst", default=None, help="write the Sphinx results page here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    peer_names = [p.strip() for p in args.peers.split(",") if p.strip()]
    workload_names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for p in peer_names:
        if p not in peers.known():
            sys.exit(f"unknown peer {p!r}; known: {', '.join(peers.known())}")
    for w in workload_names:
        if w not in ALL_WORKLOADS:
            sys.exit(f"unknown workload {w!r}; known: {', '.join(ALL_WORKLOADS)}")
    counts = dict(QUICK_N if args.quick else DEFAULT_N)
    if args.n is not None:
        counts.update(dict.fromkeys(TIMED_WORKLOADS, args.n))
    if args.n_big is not None:
        counts["Request1MiB"] = args.n_big
    if args.n_connect is not None:
        counts["Connect"] = args.n_connect
    if args.n_streams is not None:
        counts["ShortStreams"] = args.n_streams
    if args.n_messages is not None:
        counts["ServerStreaming"] = args.n_messages
    stream_size = args.stream_size or (QUICK_STREAM_SIZE if args.quick else STREAM_SIZE)
    bulk_size = args.bulk_size or (QUICK_BULK_SIZE if args.quick else BULK_SIZE)
    idle_levels = args.idle_levels or (QUICK_IDLE if args.quick else DEFAULT_IDLE)

    skipped: dict[str, str] = {}
    runnable: list[str] = []
    for p in peer_names:
        reason = peers.unavailable_reason(p)
        if reason:
            skipped[p] = reason
            print(f"skipping {p}: {reason}", file=sys.stderr)
        else:
            runnable.append(p)

    data: dict[str, Any] = {
        "command": "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "baseline": args.baseline,
        "peers": runnable,
        "skipped": skipped,
        "counts": counts,
        "stream_sizes": {"StreamEcho": stream_size, "LatencyUnderBulk": bulk_size},
        "idle_levels": [int(x) for x in idle_levels.split(",") if x],
        "workload_semantics": {
            "Send": "one-way; the call returns once the message is written",
            "SendNoWait": "one-way; the call enqueues and returns",
            "Request": "request / empty reply, one caller",
            "Parallel*": "64 concurrent callers sharing one client, up to 4 connections",
            "ParallelMethod*": "as ParallelRequest, each a method call (json; msgpack Struct)",
            "Request1MiB": "1 MiB request, server echoes it; MB/s counts both directions",
            "Connect": "sequential connect + handshake + one request + close",
            "IdleConns": "server RSS growth per open idle connection",
            "StreamEcho": "bytes over one stream, echoed back; MB/s counts both directions",
            "ShortStreams": "1,000 concurrent tasks: open a stream, 1 KiB each way, close",
            "LatencyUnderBulk": "64-byte requests beside a bulk stream on the same connection",
            "ServerStreaming": "1 KiB messages streamed by the server over one call",
        },
        "results": [],
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="monte-bench-") as tmp:
        tls_dir = str(Path(tmp) / "tls")
        make_self_signed(Path(tls_dir))
        for p in runnable:
            for w in workload_names:
                if not peers.supports(p, w):
                    continue  # a workload this peer has no counterpart of: no row
                n = counts.get(w, 0)
                if w in TIMED_WORKLOADS:
                    warmup = max(1, min(n // 10, 5000))
                elif w == "ShortStreams":
                    warmup = min(n // 10, 1000)
                elif w == "ServerStreaming":
                    warmup = min(n // 10, 10_000)  # messages, over a call of their own
                elif w == "StreamEcho":
                    warmup = min(stream_size // 4, STREAM_WARMUP_MAX)  # bytes
                elif w == "Request1MiB":
                    warmup = 3
                elif w == "Connect":
                    warmup = 10
                else:
                    warmup = 0
                t0 = time.monotonic()
                print(f"{p:>13} {w:<19}", end=" ", file=sys.stderr, flush=True)
                try:
                    r = run_one(
                        p, w, n, warmup, tls_dir, args.timeout, idle_levels, args.host,
                        (stream_size, bulk_size),
                    )  # fmt: skip
                except (RunError, OSError, ValueError) as exc:
                    r = {"peer": p, "workload": w, "n": n, "error": str(exc)}
                    print(f"ERROR {str(exc)[:300]}", file=sys.stderr)
                else:
                    fig = report.progress_figure(r)
                    print(f"{fig}  ({time.monotonic() - t0:.1f} s)", file=sys.stderr)
                data["results"].append(r)
    data["total_s"] = time.monotonic() - started

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1))
    print(report.render_text(data))
    if args.plot:
        report.plot(data, args.plot)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(report.render_markdown(data, args.plot, args.markdown))
    if args.rst:
        Path(args.rst).parent.mkdir(parents=True, exist_ok=True)
        Path(args.rst).write_text(report.render_rst(data, args.plot, args.rst))
    print(f"\ntotal {data['total_s']:.0f} s; JSON: {args.json}", file=sys.stderr)
    return 1 if any("error" in r for r in data["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
