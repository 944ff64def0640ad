"""`sdxl-serve bench engine`: the harness end to end with stand-in workers (real redis-servers, gateways and worker
processes), and its parts. Assertions are on what was answered and reported, never on the figures."""

from __future__ import annotations

import json

import pytest

from bench.engine import MIX, MODES, compile_count, markdown, mix_workload
from sdxl_serve.cli import main as cli_main

# Until workers take --engine, both modes run the stand-in with no mode arguments.
QUICK = ["bench", "engine", "--quick", "--standin-step-s", "0.002", "--mode-args", "request=", "--mode-args", "rows="]


def test_a_quick_run_measures_both_modes_in_every_part(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([*QUICK, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["worker"] == "stand-in" and report["mode_args"] == {"request": "", "rows": ""}
    assert "--mode-args request= --mode-args rows=" in report["command"]
    for part in ("n1", "mix"):
        assert set(report[part]["capacity_rps"]) == set(MODES) and min(report[part]["capacity_rps"].values()) > 0
        runs = report[part]["runs"]
        assert sorted(run["mode"] for run in runs) == sorted(MODES)  # one load in a quick run, each mode once
        assert all(run["requests"] > 0 and run["errors"] == {} and run["p99_s"] is not None for run in runs)
    assert {tuple(run["classes"]) for run in report["mix"]["runs"]} <= {tuple(c.name for c in MIX)}
    assert set(report["lone_n4_s"]) == set(MODES) and None not in report["lone_n4_s"].values()
    assert set(report["compiles_after_warmup"]) == set(MODES)  # the stand-in compiles nothing: no counter
    table = markdown(report)
    assert "| lone n=4 request, latency (s) |" in table and "4-step euler_trailing unguided" in table


def test_the_modes_switch_the_workers_engine() -> None:
    assert MODES == {"request": ("--engine", "request"), "rows": ("--engine", "rows")}


def test_every_mode_gets_the_same_mix() -> None:
    first, again = mix_workload(3), mix_workload(3)
    assert [first(k) for k in range(30)] == [again(k) for k in range(30)]
    assert {first(k)[0] for k in range(30)} == {c.name for c in MIX}
    assert first(0)[1]["n"] == 1 and {c.name: c.body(0)["guidance_scale"] for c in MIX}[MIX[0].name] == 0.0


def test_compiles_are_read_from_the_workers_compile_counter_or_its_cache_lookups() -> None:
    lookups = 'sdxl_worker_compile_cache_total{result="hit"} 2.0\nsdxl_worker_compile_cache_total{result="miss"} 3.0\n'
    assert compile_count(lookups) == 5.0
    assert compile_count(lookups + "sdxl_worker_compiles_total 1.0\n") == 1.0
    assert compile_count("sdxl_worker_busy 0.0\n") is None


@pytest.mark.parametrize("flags", [["--mode-args", "fast=--x"], ["--mode-args", "rows"], ["--loads", "a,b"]])
def test_bad_flags_exit_2_naming_the_flag(capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli_main(["bench", "engine", *flags])
    assert caught.value.code == 2 and flags[0] in capsys.readouterr().err


def test_a_worker_that_refuses_its_mode_arguments_ends_the_run_with_its_last_log_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = ["--standin-step-s", "0.002", "--mode-args", "request=", "--mode-args", "rows=--no-such-flag"]
    assert cli_main(["bench", "engine", "--quick", *flags]) == 2
    error = capsys.readouterr().err
    assert "worker-rows exited with status 2 before it was ready" in error and "--no-such-flag" in error
