"""Chaos in the suite: 100 requests while workers are SIGKILLed at random and replaced (bench/chaos.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import run_chaos

pytestmark = [pytest.mark.e2e, pytest.mark.nemesis]


async def test_hundred_requests_under_random_kills_lose_nothing(tiny_model: Path, tmp_path: Path) -> None:
    report = await run_chaos(tiny_model, requests=100, workers=3, log_dir=tmp_path)
    print(f"chaos: {report}")
    assert report.not_ok == [] and report.lost == 0
    assert report.inconsistent == []
    assert report.kills >= 1  # the run did break things
