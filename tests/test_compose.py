"""The deployment files against the code they start: docker-compose.yml, the Dockerfile, pyproject.toml.

Docker is not needed: the compose file is read as YAML, every command of a service built from our image
is parsed by the real `sdxl-serve` argument parser, and the Dockerfile's instructions are read as text.
A renamed flag, a changed default port or a moved health route fails here, not at `docker compose up`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from common.cli import build_parser
from common.config import DEFAULT_MODEL, GatewayConfig

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = "deploy/docker/Dockerfile"
REDIS_PORT = 6379
# Environment variables `build_parser()` reads its defaults from; cleared so only the files decide.
CLI_ENV = ("SDXL_SERVE_REDIS_URL", "SDXL_SERVE_LOG_LEVEL", "SDXL_SERVE_LOG_FORMAT", "SDXL_SERVE_COMPILE_CACHE", "PORT")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@cache
def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _image_services() -> list[str]:
    """Services built from our Dockerfile, i.e. those whose command is an `sdxl-serve` command line."""
    return sorted(name for name, service in _services().items()
                  if isinstance(service.get("build"), dict) and service["build"].get("dockerfile") == DOCKERFILE)


def _command(service: str) -> list[str]:
    command = _services()[service]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _exact(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser and its subcommands without prefix matching: `--redis` must not pass for `--redis-url`."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _exact(subparser)
    return parser


def _parse(command: list[str]) -> argparse.Namespace:
    try:
        return _exact(build_parser()).parse_args(command)
    except SystemExit as exc:  # argparse's way of refusing a command line
        pytest.fail(f"sdxl-serve refuses {command} (exit {exc.code}); see the usage error above")


def _args(service: str) -> argparse.Namespace:
    return _parse(_command(service))


def _container_ports(service: str) -> list[int]:
    """The container side of each published port, short (`"HOST:CONTAINER/tcp"`) or long syntax."""
    ports = []
    for entry in _services()[service].get("ports", []):
        target = entry["target"] if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1].split("/")[0]
        ports.append(int(target))
    return ports


def _duration_s(text: str) -> float:
    """A compose duration such as `2m15s` or `90s`, in seconds."""
    parts = _DURATION_PART.findall(str(text))
    assert parts and "".join(value + unit for value, unit in parts) == str(text), f"bad duration {text!r}"
    return sum(float(value) * _DURATION_UNITS[unit] for value, unit in parts)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in (ROOT / DOCKERFILE).read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending.strip())
        pending = ""
    return [(instr.upper(), rest.strip()) for instr, _, rest in (line.partition(" ") for line in logical)]


def _dockerfile_values(instruction: str) -> dict[str, str]:
    """Every KEY=VALUE set by the ENV or ARG lines of the Dockerfile, later lines winning."""
    values: dict[str, str] = {}
    for instr, rest in _dockerfile_instructions():
        if instr == instruction:
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                values[key] = value
    return values


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(autouse=True)
def _cli_env_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CLI_ENV:
        monkeypatch.delenv(name, raising=False)


def test_compose_file_is_compose_spec() -> None:
    assert "version" not in _compose(), "the compose spec has no `version:` key"
    assert {"redis", "gateway", "worker"} <= set(_services())


def test_gateway_and_worker_run_our_image() -> None:
    assert {"gateway", "worker"} <= set(_image_services())
    for name in _image_services():
        build = _services()[name]["build"]
        assert (ROOT / build["context"]).resolve() == ROOT, f"{name}: build context is not the repo root"
    assert (ROOT / DOCKERFILE).is_file()


@pytest.mark.parametrize("service", _image_services())
def test_command_is_accepted_by_the_cli(service: str) -> None:
    assert _args(service).command == service, f"service {service} runs `sdxl-serve {_command(service)[0]}`"


def test_gateway_listens_on_its_published_port() -> None:
    args = _args("gateway")
    assert _container_ports("gateway") == [args.port]
    assert args.host == "0.0.0.0", "a gateway bound to loopback is unreachable through the port mapping"


def test_gateway_port_matches_cli_default() -> None:
    assert _container_ports("gateway") == [build_parser().parse_args(["gateway"]).port]


def _probe(service: str) -> tuple[str | None, int | None, str]:
    test = _services()[service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], "python:3.11-slim has no curl: probe with python"
    compile(test[3], "<healthcheck>", "exec")
    urls = re.findall(r"https?://[^'\"\s]+", test[3])
    assert len(urls) == 1, f"expected one URL in the probe, got {urls}"
    url = urlparse(urls[0])
    return url.hostname, url.port, url.path


def test_gateway_healthcheck_probes_readyz_on_its_port() -> None:
    assert _probe("gateway") == ("127.0.0.1", _args("gateway").port, "/readyz")


def test_worker_healthcheck_probes_readyz_on_its_metrics_port() -> None:
    assert _probe("worker") == ("127.0.0.1", _args("worker").metrics_port, "/readyz")


def test_probed_routes_exist() -> None:
    from gateway.app import create_app
    from worker.metrics import WorkerMetrics, metrics_app

    for app in (create_app(GatewayConfig()), metrics_app(WorkerMetrics(), lambda: None)):
        paths = {route.resource.canonical for route in app.router.routes()
                 if route.method == "GET" and route.resource is not None}
        assert {"/healthz", "/readyz", "/metrics"} <= paths


@pytest.mark.parametrize("service", ["gateway", "worker"])
def test_redis_url_points_at_the_redis_service(service: str) -> None:
    url = urlparse(_args(service).redis_url)
    assert url.scheme == "redis"
    assert url.hostname in _services(), f"{service}: no compose service named {url.hostname!r}"
    assert _services()[url.hostname]["image"].startswith("redis:")
    assert (url.port or REDIS_PORT) == REDIS_PORT


@pytest.mark.parametrize("service", ["gateway", "worker"])
def test_starts_after_redis_is_healthy(service: str) -> None:
    assert _services()[service]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert _services()["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_redis_persists_to_a_named_volume() -> None:
    command = _command("redis")
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    volume, _, target = _services()["redis"]["volumes"][0].partition(":")
    assert target == "/data" and volume in _compose()["volumes"]


def test_worker_can_scale() -> None:
    worker = _services()["worker"]
    assert "ports" not in worker, "published host ports collide between replicas"
    assert "container_name" not in worker, "a fixed container name allows one replica"
    assert _args("worker").worker_id is None, "replicas would share one worker id"


def test_worker_runs_the_default_model() -> None:
    assert _args("worker").model == DEFAULT_MODEL


def test_worker_caches_weights_at_hf_home() -> None:
    hf_home = _dockerfile_values("ENV")["HF_HOME"]
    mounts = dict(reversed(volume.split(":")[:2]) for volume in _services()["worker"]["volumes"])
    assert hf_home in mounts, f"nothing is mounted at HF_HOME={hf_home}"
    assert mounts[hf_home] in _compose()["volumes"], "the HF cache should be a named volume"


def test_worker_drains_on_sigterm() -> None:
    """Docker must not SIGKILL a worker before its own drain timeout lets it finish the job in hand."""
    worker = _services()["worker"]
    assert worker["stop_signal"] == "SIGTERM"
    assert _duration_s(worker["stop_grace_period"]) > _args("worker").drain_timeout


def test_sdxl_serve_up_waits_out_the_worker_drain() -> None:
    from common.cluster import STOP_TIMEOUT_S

    assert build_parser().parse_args(["worker"]).drain_timeout < STOP_TIMEOUT_S


def test_gateway_grace_outlasts_request_timeout() -> None:
    grace = _duration_s(_services()["gateway"]["stop_grace_period"])
    assert grace > _args("gateway").request_timeout


def test_entrypoint_is_the_console_script() -> None:
    entrypoints = [rest for instr, rest in _dockerfile_instructions() if instr == "ENTRYPOINT"]
    assert [json.loads(rest) for rest in entrypoints] == [["sdxl-serve"]]
    assert _pyproject()["project"]["scripts"]["sdxl-serve"] == "common.cli:main"
    assert build_parser().prog == "sdxl-serve"


def test_jax_extra_defaults_to_cpu_and_names_real_extras() -> None:
    assert _dockerfile_values("ARG")["JAX_EXTRA"] == ""
    assert {"tpu", "cuda"} <= set(_pyproject()["project"]["optional-dependencies"])


def test_dockerfile_copies_what_pip_install_needs() -> None:
    sources = [part.rstrip("/") for instr, rest in _dockerfile_instructions()
               if instr == "COPY" and not rest.startswith("--from") for part in shlex.split(rest)[:-1]]
    project = _pyproject()
    needed = {"pyproject.toml", project["project"]["readme"],
              *project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {pattern.rstrip("*") for pattern in needed} <= set(sources)
    missing = [source for source in sources if not (ROOT / source).exists()]
    assert not missing, f"the Dockerfile copies files the repository lacks: {missing}"


def test_dockerignore_keeps_sources_and_drops_bulk() -> None:
    patterns = [line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "models", "artifacts"} <= set(patterns)
    for source in ("pyproject.toml", "README.md", "common", "gateway", "worker"):
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in patterns), f"{source} is ignored"
