"""`sdxl-serve bench protect` end to end on a small scale: it runs, refuses as it should, loses nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_a_small_run_reports_refusals_and_complete_bursts() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdxl_serve",
            "bench",
            "protect",
            "--duration",
            "0.5",
            "--connections",
            "4",
            "--max-queue-depth",
            "5",
            "--burst-factor",
            "4",
            "--bursts",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    statuses = [set(run["statuses"]) for run in report["throughput"]]
    assert statuses == [{"429"}, {"400"}, {"400"}]
    assert all(run["requests_per_s"] > 0 and run["gateway_cpu_us_per_request"] > 0 for run in report["throughput"])
    (burst,) = report["bursts"]
    assert burst["clients"] == 20 and burst["accepted"] == burst["completed"] == burst["jobs_in_redis"] >= 5
    assert burst["statuses"]["200"] == burst["accepted"]
    assert set(burst["statuses"]) <= {"200", "429 queue_full"}
    assert burst["rss_peak_mib"] >= burst["rss_before_mib"] > 0
