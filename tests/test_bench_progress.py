"""`sdxl-serve bench progress`'s in-process measurement on the tiny model: both variants timed, and XLA's count of
the stepwise step's work beside the fused loop's body. Assertions are on what was measured, never on timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdxl_serve.cli import main as cli_main

pytestmark = pytest.mark.compile


def test_the_step_does_the_work_of_the_fused_loops_body(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--model", str(tiny_model), "--shape", "64x64x2", "--repeats", "1", "--cpu-devices", "4", "--json"]
    assert cli_main(["bench", "progress", *flags]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["measurement"] == "progress_cost" and report["reports_per_generation"] == 2
    assert report["with_progress_median_s"] > 0 and report["without_progress_median_s"] > 0
    # docs/benchmarks.md: the separately compiled step computes what the fused loop's body does, no more.
    assert report["step_gflop"] > 0
    assert report["fused_body_gflop"] == pytest.approx(report["step_gflop"], rel=0.01)
    assert report["fused_body_gb_accessed"] == pytest.approx(report["step_gb_accessed"], rel=0.01)
