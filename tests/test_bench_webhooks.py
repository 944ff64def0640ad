"""`sdxl-serve bench webhooks` end to end on a small scale: it runs, and every webhook arrives."""

from __future__ import annotations

import json
import subprocess
import sys


def test_a_small_run_reports_latency_and_throughput() -> None:
    argv = ["bench", "webhooks", "--jobs", "6", "--in-flight", "2", "--workers", "1", "--backlog", "40", "--json"]
    done = subprocess.run([sys.executable, "-m", "sdxl_serve", *argv], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["latency_jobs"] == 6 and 0 <= report["lag_p50_ms"] <= report["lag_p99_ms"] <= report["lag_max_ms"]
    assert report["backlog"] == 40 and report["deliveries_per_s"] > 0
    assert report["machine"] and report["command"].startswith("sdxl-serve bench webhooks")
