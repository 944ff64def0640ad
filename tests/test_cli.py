"""The `sdxl-serve` command line: defaults taken from the environment, and a gateway-only install."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

from common.config import DEFAULT_REDIS_URL, ConfigError
from gateway.cli import gateway_config
from gateway.config import GatewayConfig
from sdxl_serve.cli import build_parser, main
from sdxl_serve.up import Resolved, UpConfig, worker_argv
from tests.deployfiles import ROOT, run_without_worker_extra
from worker.cli import CPU_DEVICES_FLAG, CPU_SCHEDULER_FLAG, use_cpu_devices, worker_config
from worker.config import WorkerConfig


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
        UpConfig.from_args(build_parser().parse_args(["up", "--workers", "2"])), Resolved("redis://h:1/0", "redis", "m")
    )
    assert build_parser().parse_args(["worker", *worker_args]).metrics_port == 0


def test_worker_without_the_worker_extra_says_what_to_install() -> None:
    result = run_without_worker_extra("import sys\nfrom sdxl_serve.cli import main\nsys.exit(main(['worker']))\n")
    assert result.returncode == 2, result.stderr
    assert "No module named" in result.stderr and "sdxl-serve[worker]" in result.stderr


# An interpreter where the given packages cannot be imported, as in an image that lacks them.
_MISSING = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {packages!r}:
            raise {error}(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Missing())
from sdxl_serve.cli import main
"""


def run_without(packages: set[str], code: str, error: str = "ModuleNotFoundError") -> subprocess.CompletedProcess[str]:
    program = _MISSING.format(packages=packages, error=error) + code
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_the_gateway_runs_where_worker_and_bench_are_not_installed() -> None:
    """The gateway image: `sdxl-serve gateway` builds its command line, `sdxl-serve worker` says what is missing."""
    result = run_without({"worker", "bench"}, "main(['gateway', '--help'])")
    assert result.returncode == 0, result.stderr
    assert "--request-timeout" in result.stdout
    result = run_without({"worker", "bench"}, "sys.exit(main(['worker']))")
    assert result.returncode == 2, result.stderr
    assert "sdxl-serve worker: error: this installation has no 'worker' package" in result.stderr


def test_a_broken_benchmark_stops_only_bench() -> None:
    result = run_without({"bench"}, "main(['gateway', '--help'])", error="ImportError")
    assert result.returncode == 0, result.stderr
    result = run_without({"bench"}, "main(['bench', 'routing', '--help'])", error="ImportError")
    assert result.returncode != 0 and "ImportError" in result.stderr


def test_help_lists_every_subcommand_without_importing_them(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_without({"gateway", "worker", "bench"}, "main(['--help'])")
    assert result.returncode == 0, result.stderr
    for command in ("gateway", "worker", "up", "status", "keys", "tiny-model", "tiny-lora", "bench"):
        assert f"    {command} " in result.stdout, command


def test_bench_is_built_when_it_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "routing", "--help"])
    assert exc.value.code == 0
    assert "--workers" in capsys.readouterr().out


def test_defaults_are_the_config_dataclasses(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SDXL_SERVE_METRICS_PORT", "SDXL_SERVE_COMPILE_CACHE", "SDXL_SERVE_REDIS_URL", "PORT"):
        monkeypatch.delenv(name, raising=False)
    parser = build_parser()
    assert gateway_config(parser.parse_args(["gateway"])) == GatewayConfig(redis_url=DEFAULT_REDIS_URL)
    worker = worker_config(parser.parse_args(["worker", "--worker-id", "w"]))
    assert worker == WorkerConfig(worker_id="w")
    assert UpConfig.from_args(parser.parse_args(["up"])) == UpConfig()


def test_the_delivery_limits_reach_the_worker_config_and_a_negative_retry_bound_is_refused() -> None:
    parse = build_parser().parse_args
    worker = worker_config(parse(["worker", "--worker-id", "w", "--max-deliveries", "2", "--max-input-retries", "0"]))
    assert (worker.max_deliveries, worker.max_input_retries) == (2, 0)
    with pytest.raises(ConfigError, match="--max-input-retries"):
        worker_config(parse(["worker", "--worker-id", "w", "--max-input-retries", "-1"]))


def test_version_is_the_installed_distribution() -> None:
    answer = subprocess.run(
        [sys.executable, "-m", "sdxl_serve", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == f"sdxl-serve {importlib.metadata.version('sdxl-serve')}"


@pytest.mark.parametrize(
    ("platforms", "cpu_flags"), [("cpu", True), ("cuda", False), ("tpu", False), ("cuda,cpu", False)]
)
def test_cpu_only_xla_flags_are_set_only_where_jax_runs_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, platforms: str, cpu_flags: bool
) -> None:
    """An accelerator plugin's own XLA parses XLA_FLAGS too, and may refuse XLA:CPU's flags."""
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    before = "--xla_dump_to=/tmp/x"
    monkeypatch.setenv("XLA_FLAGS", before)
    use_cpu_devices(2)
    assert os.environ["XLA_FLAGS"] == (f"{before} {CPU_DEVICES_FLAG}=2 {CPU_SCHEDULER_FLAG}" if cpu_flags else before)


def test_bench_builds_only_the_flags_of_the_benchmark_it_runs() -> None:
    """`sdxl-serve bench generate` must not import the load generators (aiohttp) a GPU image lacks."""
    program = (
        "import sys; from sdxl_serve.cli import build_parser; "
        "args = build_parser(load={'bench'}).parse_args(['bench', 'generate', '--model', 'm', '--images', '1,4']); "
        "print(args.images, sorted(m for m in sys.modules if m.startswith('bench.') or m in ('aiohttp', 'obstore')))"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.split() == ["(1,", "4)", "['bench.cli',", "'bench.generate',", "'bench.host']"]
