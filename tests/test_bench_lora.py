"""`sdxl-serve bench lora`: a run on the tiny model in-process, every case at one rank, and its flags. Assertions
are on what was measured and reported, never on the figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.lora import markdown
from sdxl_serve.cli import main as cli_main

pytestmark = pytest.mark.compile


def test_a_run_times_every_case_at_each_rank(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = [
        "--model",
        str(tiny_model),
        "--ranks",
        "2",
        "--steps",
        "1",
        "--rows-per-device",
        "1",
        "--size",
        "64x64",
        "--rounds",
        "1",
    ]
    assert cli_main(["bench", "lora", *flags, "--cpu-devices", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["devices"] == 4 and report["rows"] == 4 and report["no LoRA"] > 0
    assert set(report["ranks"]) == {"2"} and min(report["ranks"]["2"].values()) > 0
    assert set(report["ranks"]["2"]) == {"no adapter", "shared", "per row", "prepare_s", "write_s", "bytes_per_slot"}
    assert "--ranks 2 --steps 1 --rows-per-device 1 --rounds 1" in report["command"]
    assert "| 2 |" in markdown(report)


@pytest.mark.parametrize("flags", [["--ranks", "8,x"], ["--ranks", "0"], ["--size", "big"]])
def test_bad_flags_exit_naming_the_flag(flags: list[str]) -> None:
    with pytest.raises(SystemExit, match=flags[0]):
        cli_main(["bench", "lora", "--model", "unused", *flags])
