"""Render the suite's JSON output: plain-text table, Markdown page, matplotlib plot.

``python -m benchmarks.report results.json [--markdown PAGE.md] [--plot PLOT.png]`` re-renders
a saved run without measuring again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import MAIN_WORKLOADS, METHOD_WORKLOADS, STREAM_WORKLOADS
from .peers import DESCRIPTIONS

Result = dict[str, Any]
Row = dict[str, Any]

DASH = "\u2013"  # en dash: no figure
TIMES = "\u00d7"  # multiplication sign after a ratio
THROUGHPUT_WORKLOADS = (*MAIN_WORKLOADS, *METHOD_WORKLOADS, "Request1MiB")
CALL_WORKLOADS = ("ServerStreaming",)
"""Streaming calls: a table of their own (messages rather than bytes)."""
BYTE_STREAM_WORKLOADS = tuple(w for w in STREAM_WORKLOADS if w not in CALL_WORKLOADS)


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    a = abs(v)
    if a >= 100_000:
        return f"{v / 1000:,.0f}k"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _ratio(v: float | None, base: float | None) -> str:
    if v is None or base is None or not base or math.isnan(v) or math.isnan(base):
        return DASH
    return f"{v / base:.2f}" + TIMES


def _cell(v: float | None, base: float | None, with_ratio: bool) -> str:
    if v is None:
        return DASH
    return f"{_fmt(v)} ({_ratio(v, base)})" if with_ratio and base else _fmt(v)


def _by_key(results: Sequence[Result]) -> dict[tuple[str, str], Result]:
    return {(r["workload"], r["peer"]): r for r in results}


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024


def _against_requests(r: Result, raw: Result | None) -> str:
    """A method workload's figures against the same peer's ParallelRequest."""
    if raw is None or "error" in raw or not raw.get("msgs_per_s"):
        return ""
    text = f"{r['msgs_per_s'] / raw['msgs_per_s']:.2f}{TIMES} ParallelRequest's calls/s"
    if r.get("cpu_us_per_msg") and raw.get("cpu_us_per_msg"):
        text += f", {r['cpu_us_per_msg'] / raw['cpu_us_per_msg']:.2f}{TIMES} its CPU/call"
    return text


def throughput_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Six monte workloads + 1 MiB requests: one row per (workload, peer)."""
    baseline = data.get("baseline", "monte-native")
    index = _by_key(data["results"])
    peers = data["peers"]
    header = [
        "workload",
        "peer",
        "msgs/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "CPU µs/msg",
        "RSS MiB client",
        "RSS MiB server",
        "notes",
    ]
    rows: list[list[str]] = []
    for w in THROUGHPUT_WORKLOADS:
        base = index.get((w, baseline))
        if base is not None and "error" in base:
            base = None
        for p in peers:
            r = index.get((w, p))
            if r is None:
                continue
            if "error" in r:
                rows.append([w, p, "error", "", "", "", "", "", "", str(r["error"])[:120]])
                continue

            def c(
                key: str,
                scale: Callable[[Any], Any] = lambda x: x,
                r: Result = r,
                base: Result | None = base,
            ) -> str:
                v = r.get(key)
                b = base.get(key) if base is not None else None
                return _cell(scale(v) if v is not None else None, scale(b) if b else None, True)

            note = r.get("note", "")
            if w in METHOD_WORKLOADS:
                against = _against_requests(r, index.get(("ParallelRequest", p)))
                note = f"{note}; {against}" if note and against else note or against
            rows.append(
                [
                    w,
                    p,
                    c("msgs_per_s"),
                    c("mb_per_s"),
                    c("lat_p50_us"),
                    c("lat_p99_us"),
                    c("cpu_us_per_msg"),
                    c("client_peak_rss_kib", _mib),
                    c("server_peak_rss_kib", _mib),
                    note,
                ]
            )
    return header, rows


def _size(nbytes: int | None) -> str:
    if not nbytes:
        return "?"
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor} {unit}"
    return f"{nbytes:,} B"


def progress_figure(r: Result) -> str:
    """The one figure the harness prints as a run ends."""
    w = r.get("workload")
    if w == "StreamEcho":
        return f"{r['mb_per_s']:,.0f} MB/s"
    if w == "LatencyUnderBulk":
        return f"p99 {r['lat_p99_us']:,.0f} µs beside {r['mb_per_s']:,.0f} MB/s"
    if w == "ShortStreams":
        return f"{r['msgs_per_s']:,.0f} streams/s"
    if w == "ServerStreaming":
        return f"{r['msgs_per_s']:,.0f} msgs/s, {r['mb_per_s']:,.0f} MB/s"
    if "msgs_per_s" in r:
        return f"{r['msgs_per_s']:,.0f} msgs/s"
    return f"{len(r.get('levels', []))} levels"


def stream_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The stream workloads: one row per (workload, peer)."""
    baseline = data.get("baseline", "monte-native")
    index = _by_key(data["results"])
    header = [
        "workload",
        "peer",
        "MB/s",
        "streams/s",
        "p50 µs",
        "p99 µs",
        "CPU s/GB",
        "RSS MiB client",
        "RSS MiB server",
        "notes",
    ]
    rows: list[list[str]] = []
    for w in BYTE_STREAM_WORKLOADS:
        base = index.get((w, baseline))
        if base is not None and "error" in base:
            base = None
        b: Result = base or {}
        for p in data["peers"]:
            r = index.get((w, p))
            if r is None:
                continue
            if "error" in r:
                rows.append([w, p, "error", "", "", "", "", "", "", str(r["error"])[:120]])
                continue
            note = ""
            streams = DASH
            if w == "StreamEcho":
                note = f"{_size(r.get('stream_size'))} each way over one stream"
                if p != baseline and p.startswith("trio"):
                    note += "; the same bytes echoed raw over a connection of its own"
                ssl = index.get((w, "trio-ssl"))
                if p == baseline and ssl and "error" not in ssl and ssl.get("mb_per_s"):
                    note += f"; {r['mb_per_s'] / ssl['mb_per_s']:.2f}{TIMES} trio-ssl"
            elif w == "ShortStreams":
                streams = _cell(r.get("msgs_per_s"), b.get("msgs_per_s"), True)
                note = (
                    f"{r.get('callers', '?')} tasks, 1 KiB each way per stream; "
                    f"{_fmt(r.get('cpu_us_per_msg'))} CPU µs/stream"
                )
            elif w == "LatencyUnderBulk":
                bulk = _size(r.get("bulk_size"))
                note = (
                    f"{r.get('requests', 0):,} requests of 64 B beside {bulk} each way (MB/s: "
                    f"the bulk stream's); idle: p50 {_fmt(r.get('idle_p50_us'))}, "
                    f"p99 {_fmt(r.get('idle_p99_us'))} µs"
                )
            rows.append(
                [
                    w,
                    p,
                    _cell(r.get("mb_per_s"), b.get("mb_per_s"), True),
                    streams,
                    _fmt(r.get("lat_p50_us")),
                    _fmt(r.get("lat_p99_us")),
                    _fmt(r.get("cpu_s_per_gb")) if w != "ShortStreams" else DASH,
                    _fmt(_mib(r.get("client_peak_rss_kib"))),
                    _fmt(_mib(r.get("server_peak_rss_kib"))),
                    note,
                ]
            )
    return header, rows


def call_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The streaming-call workloads: one row per (workload, peer); the baseline's note
    gives its ratio to grpc's messages/s in the same run."""
    baseline = data.get("baseline", "monte-native")
    index = _by_key(data["results"])
    header = [
        "workload",
        "peer",
        "msgs/s",
        "MB/s",
        "CPU µs/msg",
        "RSS MiB client",
        "RSS MiB server",
        "notes",
    ]
    rows: list[list[str]] = []
    for w in CALL_WORKLOADS:
        base = index.get((w, baseline))
        if base is not None and "error" in base:
            base = None
        b: Result = base or {}
        for p in data["peers"]:
            r = index.get((w, p))
            if r is None:
                continue
            if "error" in r:
                rows.append([w, p, "error", "", "", "", "", str(r["error"])[:120]])
                continue
            note = f"{r.get('msgs', 0):,} messages of {_size(r.get('message_size'))} over one call"
            if r.get("note"):
                note += f"; {r['note']}"
            if p == baseline:
                for other in ("grpc", "grpc-insecure"):
                    g = index.get((w, other))
                    if g and "error" not in g and g.get("msgs_per_s"):
                        ratio = r["msgs_per_s"] / g["msgs_per_s"]
                        note += f"; {ratio:.2f}{TIMES} {other}"
            rows.append(
                [
                    w,
                    p,
                    _cell(r.get("msgs_per_s"), b.get("msgs_per_s"), True),
                    _cell(r.get("mb_per_s"), b.get("mb_per_s"), True),
                    _cell(r.get("cpu_us_per_msg"), b.get("cpu_us_per_msg"), True),
                    _fmt(_mib(r.get("client_peak_rss_kib"))),
                    _fmt(_mib(r.get("server_peak_rss_kib"))),
                    note,
                ]
            )
    return header, rows


def connection_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    baseline = data.get("baseline", "monte-native")
    index = _by_key(data["results"])
    header = [
        "measurement",
        "peer",
        "figure",
        "p50 µs",
        "p99 µs",
        "CPU µs/conn",
        "client KiB/conn",
        "notes",
    ]
    rows: list[list[str]] = []
    base = index.get(("Connect", baseline))
    if base is not None and "error" in base:
        base = None
    for p in data["peers"]:
        r = index.get(("Connect", p))
        if r is None:
            continue
        if "error" in r:
            rows.append(["new connections/s", p, "error", "", "", "", "", str(r["error"])[:120]])
            continue
        b: Result = base or {}
        rows.append(
            [
                "new connections/s",
                p,
                _cell(r["msgs_per_s"], b.get("msgs_per_s"), True),
                _cell(r.get("lat_p50_us"), b.get("lat_p50_us"), True),
                _cell(r.get("lat_p99_us"), b.get("lat_p99_us"), True),
                _cell(r.get("cpu_us_per_msg"), b.get("cpu_us_per_msg"), True),
                "",
                "connect + handshake + one 1400 B request + close, sequential",
            ]
        )
    base = index.get(("IdleConns", baseline))
    base_levels = {lv["target"]: lv for lv in (base or {}).get("levels", [])}
    targets = sorted(
        {
            lv["target"]
            for r in data["results"]
            if r["workload"] == "IdleConns"
            for lv in r.get("levels", [])
        }
    )
    for p in data["peers"]:
        r = index.get(("IdleConns", p))
        if r is None:
            continue
        if "error" in r:
            rows.append(["idle conns", p, "error", "", "", "", "", str(r["error"])[:120]])
            continue
        levels = {lv["target"]: lv for lv in r.get("levels", [])}
        for t in targets:
            lv = levels.get(t)
            if lv is None:
                note = "; ".join(r.get("errors", [])) or "not reached"
                rows.append([f"server KiB per idle conn @{t}", p, DASH, "", "", "", "", note])
                continue
            bl = base_levels.get(t, {})
            note = f"{lv['opened']} opened in {lv['open_s']:.1f} s"
            if lv["failed"]:
                note += f", {lv['failed']} failed: " + "; ".join(r.get("errors", []))[:100]
            rows.append(
                [
                    f"server KiB per idle conn @{t}",
                    p,
                    _cell(lv.get("server_kib_per_conn"), bl.get("server_kib_per_conn"), True),
                    "",
                    "",
                    "",
                    _cell(lv.get("client_kib_per_conn"), bl.get("client_kib_per_conn"), True),
                    note,
                ]
            )
    return header, rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    prev = None
    for r in rows:
        group = r[0].split(" @")[0]
        if prev is not None and group != prev:
            out.append("")
        prev = group
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(out)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def _ratio_legend(data: dict[str, Any]) -> str:
    baseline = data.get("baseline", "monte-native")
    have = any(r["peer"] == baseline and "error" not in r for r in data["results"])
    text = (
        f"Figures in parentheses are ratios to {baseline} on the same workload "
        "(higher is better for msgs/s, MB/s and connections/s; lower is better for latency, "
        "CPU and memory)."
    )
    if not have:
        text += f" {baseline} was not measured in this run, so no ratios are shown."
    return text


def render_text(data: dict[str, Any]) -> str:
    parts = [
        _text_table(*throughput_rows(data)),
        "",
        _text_table(*connection_rows(data)),
        "",
    ]
    streams = stream_rows(data)
    if streams[1]:
        parts += [_text_table(*streams), ""]
    calls = call_rows(data)
    if calls[1]:
        parts += [_text_table(*calls), ""]
    parts += [_ratio_legend(data)]
    for peer, reason in data.get("skipped", {}).items():
        parts.append(f"skipped {peer}: {reason}")
    return "\n".join(parts)


def machine_lines(m: dict[str, Any]) -> list[str]:
    return [
        f"- CPU: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores; "
        f"memory {m.get('mem_total_gib', '?')} GiB; Linux {m.get('kernel', '?')}",
        f"- Python {m.get('python', '?')}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items())),
        f"- date {m.get('date', '?')}; load average at start {m.get('loadavg', '?')}",
    ]


INTRO = (
    "Client and server run in separate processes on loopback (127.0.0.1), as deployed. "
    "Payloads are 1400 random bytes; Request replies are empty, as in Go monte's "
    "benchmarks; Parallel* runs 64 concurrent callers over one client with up to 4 "
    "connections. One-way workloads are timed until the server has counted every "
    "message. CPU is user+system time of both processes per message; RSS is peak RSS. "
    "The machine is shared and noisy: trust ratios more than absolute figures."
)
MIB_NOTE = " Request1MiB: the server echoes 1 MiB; MB/s counts request + reply bytes."
STREAM_NOTE = (
    "Byte streams (monte_trio's native profile): StreamEcho writes its bytes over one stream "
    "while another task reads the echo (MB/s counts both directions, as Request1MiB does; "
    "every byte is checked); trio-plain and trio-ssl move the same bytes over a TCP or TLS "
    "connection that their server echoes raw. ShortStreams: 1,000 tasks open streams one "
    "after another (1 KiB each way, then closed); with the default max_streams (100) the "
    "other openers wait for a slot. LatencyUnderBulk: 64-byte requests, one after another, "
    "on the connection of a bulk stream echo."
)
CALL_NOTE = (
    "Streaming calls: ServerStreaming has the server stream 1 KiB messages to the client "
    "over one server-streaming call (monte_trio: a download call whose handler is an async "
    "generator; grpc: a unary-stream method with raw bytes, its handler an async "
    "generator); the client checks every message. MB/s counts the messages' bytes."
)
IDLE_NOTE = (
    "Idle connections: connected, handshaken, one request done, then held open; "
    "server RSS growth divided by the number opened."
)


def _peer_lines(data: dict[str, Any], bold: str) -> list[str]:
    lines = [f"- {bold}{p}{bold}: {DESCRIPTIONS.get(p, p)}" for p in data["peers"]]
    lines += [
        f"- {bold}{p}{bold}: not measured: {reason}"
        for p, reason in data.get("skipped", {}).items()
    ]
    return lines


def _relative(plot_path: str, page_path: str | None) -> str:
    if not page_path:
        return plot_path
    return os.path.relpath(plot_path, os.path.dirname(os.path.abspath(page_path)))


def render_markdown(data: dict[str, Any], plot_path: str | None, page_path: str | None) -> str:
    lines = [
        "# monte_trio benchmarks", "", INTRO, "", "## Machine", "",
        *machine_lines(data.get("machine", {})), "",
        "## Reproduce", "", "```", data.get("command", "python -m benchmarks"), "```", "",
        "## Peers", "", *_peer_lines(data, "**"), "",
        "## Throughput and latency", "", _ratio_legend(data) + MIB_NOTE, "",
        _md_table(*throughput_rows(data)), "",
        "## Connections", "", IDLE_NOTE, "", _md_table(*connection_rows(data)), "",
    ]  # fmt: skip
    streams = stream_rows(data)
    if streams[1]:
        lines += ["## Streams", "", STREAM_NOTE, "", _md_table(*streams), ""]
    calls = call_rows(data)
    if calls[1]:
        lines += ["## Streaming calls", "", CALL_NOTE, "", _md_table(*calls), ""]
    if plot_path:
        lines += ["## Plot", "", f"![benchmark plot]({_relative(plot_path, page_path)})", ""]
    return "\n".join(lines)


def _rst_table(header: list[str], rows: list[list[str]]) -> str:
    out = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        cells = [c.replace("*", "\\*") or "\\" for c in row]
        out.append("   * - " + cells[0])
        out += [f"     - {c}" for c in cells[1:]]
    return "\n".join(out)


def _rst_heading(text: str, mark: str) -> list[str]:
    return [text, mark * len(text), ""]


def render_rst(data: dict[str, Any], plot_path: str | None, page_path: str | None) -> str:
    """The results page for the Sphinx docs (the same content as the Markdown page)."""
    lines = [
        *_rst_heading("Benchmarks", "="), INTRO, "",
        *_rst_heading("Machine", "-"), *machine_lines(data.get("machine", {})), "",
        *_rst_heading("Reproduce", "-"), ".. code-block:: console", "",
        "   " + data.get("command", "python -m benchmarks"), "",
        *_rst_heading("Peers", "-"), *_peer_lines(data, "**"), "",
        *_rst_heading("Throughput and latency", "-"), _ratio_legend(data) + MIB_NOTE, "",
        _rst_table(*throughput_rows(data)), "",
        *_rst_heading("Connections", "-"), IDLE_NOTE, "",
        _rst_table(*connection_rows(data)), "",
    ]  # fmt: skip
    streams = stream_rows(data)
    if streams[1]:
        lines += [*_rst_heading("Streams", "-"), STREAM_NOTE, "", _rst_table(*streams), ""]
    calls = call_rows(data)
    if calls[1]:
        lines += [
            *_rst_heading("Streaming calls", "-"), CALL_NOTE, "", _rst_table(*calls), "",
        ]  # fmt: skip
    if plot_path:
        lines += [
            *_rst_heading("Plot", "-"),
            f".. image:: {_relative(plot_path, page_path)}",
            "   :alt: messages per second per workload and peer",
            "",
        ]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = _by_key(data["results"])
    peers = [p for p in data["peers"] if any(k[1] == p for k in index)]
    fig = plt.figure(figsize=(13, 8.5))
    grid = fig.add_gridspec(2, 3, height_ratios=[1.6, 1])
    ax = fig.add_subplot(grid[0, :])
    workloads = [w for w in MAIN_WORKLOADS if any((w, p) in index for p in peers)]
    width = 0.8 / max(1, len(peers))
    for j, p in enumerate(peers):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            r = index.get((w, p))
            if r is not None and "error" not in r:
                xs.append(i + (j - (len(peers) - 1) / 2) * width)
                ys.append(r["msgs_per_s"])
        ax.bar(xs, ys, width, label=p)
    ax.set_xticks(range(len(workloads)), workloads)
    if any(index.get((w, p), {}).get("msgs_per_s") for w in workloads for p in peers):
        ax.set_yscale("log")
    ax.set_ylabel("messages / s (log)")
    ax.set_title("monte's six workloads, 1400-byte payloads")
    ax.legend(ncol=min(6, len(peers)), fontsize="small")
    ax.grid(axis="y", which="both", alpha=0.3)

    def small(
        col: int, title: str, ylabel: str, get: Callable[[Result], float | None], workload: str
    ) -> None:
        sub = fig.add_subplot(grid[1, col])
        names, vals = [], []
        for p in peers:
            r = index.get((workload, p))
            v = get(r) if r is not None and "error" not in r else None
            if v is not None:
                names.append(p)
                vals.append(v)
        sub.bar(range(len(vals)), vals, color=[f"C{peers.index(n)}" for n in names])
        sub.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize="small")
        sub.set_title(title, fontsize="medium")
        sub.set_ylabel(ylabel)
        sub.grid(axis="y", alpha=0.3)

    def idle(r: Result) -> float | None:
        levels = r.get("levels") or []
        return levels[-1].get("server_kib_per_conn") if levels else None

    small(
        0,
        "1 MiB requests (echo)",
        "MB/s (both directions)",
        lambda r: r.get("mb_per_s"),
        "Request1MiB",
    )
    small(1, "new connections / s", "connections / s", lambda r: r.get("msgs_per_s"), "Connect")
    small(
        2,
        "server memory per idle connection",
        "KiB / connection (largest level)",
        idle,
        "IdleConns",
    )
    m = data.get("machine", {})
    fig.suptitle(
        f"monte_trio benchmarks — {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, "
        f"{m.get('date', '')[:10]}",
        fontsize="medium",
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report")
    ap.add_argument("json_path")
    ap.add_argument("--markdown")
    ap.add_argument("--rst")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    data = json.loads(Path(args.json_path).read_text())
    print(render_text(data))
    if args.plot:
        plot(data, args.plot)
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(data, args.plot, args.markdown))
    if args.rst:
        Path(args.rst).write_text(render_rst(data, args.plot, args.rst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
