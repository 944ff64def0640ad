"""`sdxl-serve bench images`: a run on the tiny model in-process, every kind of request, and its flags. Assertions
are on what was measured and reported, never on the figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.images import KINDS, markdown
from sdxl_serve.cli import main as cli_main

pytestmark = pytest.mark.compile


def test_a_run_times_every_kind_and_the_encoder(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--model", str(tiny_model), "--steps", "4", "--rounds", "1", "--size", "64x64", "--cpu-devices", "4"]
    assert cli_main(["bench", "images", *flags, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["latency_s"]) == set(KINDS) and min(report["latency_s"].values()) > 0
    assert report["encode_s_per_image"] > 0 and report["devices"] == 4
    assert "--steps 4 --n 1 --rounds 1" in report["command"]
    assert "| image to image 0.3 |" in markdown(report)


def test_a_bad_size_exits_naming_the_flag() -> None:
    with pytest.raises(SystemExit, match="--size"):
        cli_main(["bench", "images", "--model", "unused", "--size", "big"])
