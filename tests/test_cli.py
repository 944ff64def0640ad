"""The `sdxl-serve` command line: defaults taken from the environment, and a gateway-only install."""

from __future__ import annotations

import pytest

from sdxl_serve.cli import build_parser
from sdxl_serve.up import UpConfig, worker_argv
from tests.deployfiles import run_without_worker_extra


def test_metrics_port_defaults_to_any_free_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDXL_SERVE_METRICS_PORT", raising=False)
    assert build_parser().parse_args(["worker"]).metrics_port == 0


def test_metrics_port_from_the_environment_and_the_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDXL_SERVE_METRICS_PORT", "9400")
    assert build_parser().parse_args(["worker"]).metrics_port == 9400
    assert build_parser().parse_args(["worker", "--metrics-port", "9500"]).metrics_port == 9500


def test_bad_metrics_port_in_the_environment_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SDXL_SERVE_METRICS_PORT", "ninety")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["worker"])
    assert exc.value.code == 2
    assert "--metrics-port" in capsys.readouterr().err


def test_up_gives_each_worker_a_free_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sdxl-serve up` inside the worker image (which sets the variable) must not bind one port twice."""
    monkeypatch.setenv("SDXL_SERVE_METRICS_PORT", "9400")
    worker_args = worker_argv(
        UpConfig.from_args(build_parser().parse_args(["up", "--workers", "2"])), "redis://h:1/0", "m"
    )
    assert build_parser().parse_args(["worker", *worker_args]).metrics_port == 0


def test_worker_without_the_worker_extra_says_what_to_install() -> None:
    result = run_without_worker_extra("import sys\nfrom sdxl_serve.cli import main\nsys.exit(main(['worker']))\n")
    assert result.returncode == 2, result.stderr
    assert "No module named" in result.stderr and "sdxl-serve[worker]" in result.stderr
