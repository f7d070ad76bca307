"""The method workloads of the benchmark suite, and the script that measures what a method
call costs over a raw request: seconds-long runs in subprocesses (each in its own session,
killed as a group in ``finally``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("msgspec", reason="the Struct workload needs msgspec")


def run(command: list[str], timeout: float) -> str:
    """Run ``python -m ...command`` from the repository; its output (it must succeed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", *command],
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
            os.killpg(proc.pid, signal.SIGKILL)  # the suite's own children, if any remain
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)
    text = stdout.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def test_the_suite_runs_the_method_workloads_on_monte_native_only(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    text = run(
        [
            "benchmarks", "--quick", "--peers", "monte-native,trio-plain",
            "--workloads", "ParallelRequest,ParallelMethod,ParallelMethodStruct",
            "-n", "300", "--timeout", "30", "--json", str(out),
        ],
        timeout=90,
    )  # fmt: skip
    data = json.loads(out.read_text())
    rows = {(r["workload"], r["peer"]): r for r in data["results"]}
    # trio-plain has no methods: it runs ParallelRequest and no method workload.
    assert set(rows) == {
        ("ParallelRequest", "monte-native"),
        ("ParallelMethod", "monte-native"),
        ("ParallelMethodStruct", "monte-native"),
        ("ParallelRequest", "trio-plain"),
    }
    for r in rows.values():
        assert "error" not in r, r
        assert r["msgs"] == 300
        assert r["msgs_per_s"] > 0
        assert r["cpu_us_per_msg"] > 0
    assert "ParallelRequest's calls/s" in text  # the method rows set against raw requests
    assert "ParallelMethodStruct  monte-native" in text


def test_the_cost_script_reports_ratios_against_raw_requests() -> None:
    text = run(
        [
            "benchmarks.methods", "--runs", "2", "--rounds", "2", "-n", "200",
            "--warmup", "50", "--callers", "8",
        ],
        timeout=60,
    )  # fmt: skip
    assert text.count("run ") == 2
    for workload in ("raw-async", "json", "struct"):
        assert f"{workload}/raw: median " in text
    assert "json/raw-async: median " in text


def test_the_cost_script_over_tcp_reports_time_and_cpu_ratios() -> None:
    # A server process per workload (children of the run's process, in the test's process
    # group): each answers the control request with its CPU time, then exits once its
    # stdin closes.
    text = run(
        [
            "benchmarks.methods", "--tcp", "--runs", "1", "--rounds", "2", "-n", "200",
            "--warmup", "50", "--callers", "8",
        ],
        timeout=90,
    )  # fmt: skip
    assert text.count("run ") == 1
    for workload in ("raw", "raw-async", "json", "struct"):
        found = re.search(
            rf"^{workload}: ([\d,]+) calls/s, CPU per call ([\d.]+) us client "
            rf"\+ ([\d.]+) us server$",
            text,
            re.MULTILINE,
        )
        assert found, text
        calls, client, server = found.groups()
        assert int(calls.replace(",", "")) > 0
        assert float(client) > 0
        assert float(server) > 0  # the server's own CPU time, from its reply
    for workload in ("raw-async", "json", "struct"):
        assert f"{workload}/raw time per call: median " in text
        assert f"{workload}/raw CPU per call: median " in text
