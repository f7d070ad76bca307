"""Smoke tests of the benchmark suite: seconds-long runs, each checking the JSON it writes.

``python -m benchmarks --quick --peers trio-plain --workloads Request,SendNoWait -n 200``, and
the stream workloads and ServerStreaming (monte-native against grpc) on tiny sizes, each in a
subprocess (its own session, killed as a group in ``finally``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_positive_figures(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is needed to draw the plot")
    out = tmp_path / "results.json"
    plot = tmp_path / "plot.png"
    page = tmp_path / "page.md"
    args = [
        "--quick", "--peers", "trio-plain",
        "--workloads", "Request,SendNoWait", "-n", "200", "--timeout", "20",
        "--json", str(out), "--plot", str(plot), "--markdown", str(page),
    ]  # fmt: skip
    text = run_suite(args, timeout=28)

    data = json.loads(out.read_text())
    for key in ("machine", "command", "peers", "results", "counts", "baseline"):
        assert key in data, key
    assert data["machine"]["cores"] >= 1
    assert "python" in data["machine"]
    by_workload = {r["workload"]: r for r in data["results"]}
    assert set(by_workload) == {"Request", "SendNoWait"}
    for r in by_workload.values():
        assert r["peer"] == "trio-plain"
        assert "error" not in r, r
        assert r["msgs"] == 200
        for key in ("elapsed_s", "msgs_per_s", "mb_per_s", "cpu_us_per_msg",
                    "client_peak_rss_kib", "server_peak_rss_kib"):  # fmt: skip
            assert r[key] > 0, (key, r)
    req = by_workload["Request"]
    assert 0 < req["lat_p50_us"] <= req["lat_p99_us"]
    assert by_workload["SendNoWait"]["lat_p50_us"] is None  # no per-call latency for it
    assert plot.stat().st_size > 0
    assert "| Request | trio-plain |" in page.read_text()
    assert "msgs/s" in text


def run_suite(args: list[str], timeout: float) -> str:
    """``python -m benchmarks ARGS`` in its own session (killed as a group in ``finally``);
    returns its output, having checked that it exited 0."""
    cmd = [sys.executable, "-m", "benchmarks", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)
    text = stdout.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def test_quick_stream_workloads(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    page = tmp_path / "page.md"
    args = [
        "--quick", "--peers", "monte-native,monte-v1,trio-plain,trio-ssl",
        "--workloads", "StreamEcho,ShortStreams,LatencyUnderBulk",
        "--stream-size", "1MiB", "--bulk-size", "2MiB", "--n-streams", "100",
        "--timeout", "20", "--json", str(out), "--markdown", str(page),
    ]  # fmt: skip
    text = run_suite(args, timeout=40)
    data = json.loads(out.read_text())
    assert data["stream_sizes"] == {"StreamEcho": 1 << 20, "LatencyUnderBulk": 2 << 20}
    rows = {(r["workload"], r["peer"]): r for r in data["results"]}
    # monte-v1 has no streams, the trio peers only a counterpart of StreamEcho: no rows.
    assert set(rows) == {
        ("StreamEcho", "monte-native"),
        ("StreamEcho", "trio-plain"),
        ("StreamEcho", "trio-ssl"),
        ("ShortStreams", "monte-native"),
        ("LatencyUnderBulk", "monte-native"),
    }
    for r in rows.values():
        assert "error" not in r, r
        for key in ("elapsed_s", "mb_per_s", "client_peak_rss_kib", "server_peak_rss_kib"):
            assert r[key] > 0, (key, r)
    for peer in ("monte-native", "trio-plain", "trio-ssl"):
        echo = rows[("StreamEcho", peer)]
        assert echo["bytes"] == 2 << 20  # 1 MiB each way
        assert echo["stream_size"] == 1 << 20
        assert echo["cpu_s_per_gb"] > 0
    short = rows[("ShortStreams", "monte-native")]
    assert short["msgs"] == 100
    assert short["msgs_per_s"] > 0
    assert 0 < short["lat_p50_us"] <= short["lat_p99_us"]
    bulk = rows[("LatencyUnderBulk", "monte-native")]
    assert bulk["bulk_size"] == 2 << 20
    assert bulk["requests"] >= 1
    assert 0 < bulk["lat_p50_us"] <= bulk["lat_p99_us"]
    assert 0 < bulk["idle_p50_us"] <= bulk["idle_p99_us"]
    markdown = page.read_text()
    assert "## Streams" in markdown
    assert "| StreamEcho | monte-native |" in markdown
    assert "| StreamEcho | trio-plain |" in markdown
    assert "| StreamEcho | trio-ssl |" in markdown
    assert "MB/s" in text
    assert "streams/s" in text


def test_stream_echo_in_one_process_profiled() -> None:
    cmd = [sys.executable, "-m", "benchmarks.streams", "--size", "2MiB", "--profile"]
    result = subprocess.run(
        [*cmd, "--limit", "5"], cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    text = result.stdout.decode(errors="replace")
    assert result.returncode == 0, (text, result.stderr.decode(errors="replace"))
    assert text.startswith("StreamEcho in one process: 2,097,152 bytes each way in ")
    assert "MB/s (both directions)" in text
    assert "CPU s/GB (both ends)" in text
    assert "Ordered by: internal time" in text  # the profile follows


def test_quick_server_streaming(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    page = tmp_path / "page.md"
    args = [
        "--quick", "--peers", "monte-native,monte-v1,trio-plain,grpc",
        "--workloads", "ServerStreaming", "--n-messages", "300",
        "--timeout", "20", "--json", str(out), "--markdown", str(page),
    ]  # fmt: skip
    text = run_suite(args, timeout=40)
    data = json.loads(out.read_text())
    assert data["counts"]["ServerStreaming"] == 300
    rows = {(r["workload"], r["peer"]): r for r in data["results"]}
    # monte-v1 has no streaming calls and trio-plain no counterpart: no rows.
    assert set(rows) == {("ServerStreaming", "monte-native"), ("ServerStreaming", "grpc")}
    for r in rows.values():
        assert "error" not in r, r
        assert r["msgs"] == 300
        assert r["message_size"] == 1024
        assert r["bytes"] == 300 * 1024
        for key in ("elapsed_s", "msgs_per_s", "mb_per_s", "cpu_us_per_msg",
                    "client_peak_rss_kib", "server_peak_rss_kib"):  # fmt: skip
            assert r[key] > 0, (key, r)
    markdown = page.read_text()
    assert "## Streaming calls" in markdown
    assert "| ServerStreaming | monte-native |" in markdown
    assert "| ServerStreaming | grpc |" in markdown
    assert "\u00d7 grpc" in markdown  # monte-native's ratio to grpc in the same run
    assert "msgs/s" in text


def test_server_streaming_in_one_process() -> None:
    cmd = [sys.executable, "-m", "benchmarks.streams", "--messages", "3000", "--profile"]
    result = subprocess.run(
        [*cmd, "--limit", "5"], cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    text = result.stdout.decode(errors="replace")
    assert result.returncode == 0, (text, result.stderr.decode(errors="replace"))
    assert text.startswith("ServerStreaming in one process: 3,000 messages of 1024 bytes in ")
    assert "messages/s" in text
    assert "CPU µs/message (both ends)" in text
    assert "Ordered by: internal time" in text
