"""Smoke test of the benchmark suite: a seconds-long run on the trio-plain peer.

Runs ``python -m benchmarks --quick --peers trio-plain --workloads Request,SendNoWait -n 200``
in a subprocess (its own session, killed as a group in ``finally``) and checks the JSON.
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
    cmd = [
        sys.executable, "-m", "benchmarks", "--quick", "--peers", "trio-plain",
        "--workloads", "Request,SendNoWait", "-n", "200", "--timeout", "20",
        "--json", str(out), "--plot", str(plot), "--markdown", str(page),
    ]  # fmt: skip
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
        stdout, _ = proc.communicate(timeout=28)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the suite's own children, if any remain
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)
    text = stdout.decode(errors="replace")
    assert proc.returncode == 0, text

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
