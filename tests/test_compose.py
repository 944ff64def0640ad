"""The container files against the code they start: docker-compose.yml, the Dockerfile, pyproject.toml.

Docker is not needed: the compose file is read as YAML, every command of a service built from our images
is parsed by the real `sdxl-serve` argument parser in the environment its image sets, and the Dockerfile's
stages are read as text. A renamed flag, a changed default port or a moved health route fails here, not at
`docker compose up`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import tomllib
from functools import cache
from typing import Any
from urllib.parse import parse_qsl, urlparse

import pytest
import yaml

from common.redis_conn import parse_sentinel_url
from sdxl_serve.cli import WORKER_EXTRA_MODULES, build_parser
from tests.deployfiles import (
    CLI_ENV,
    DOCKERFILE,
    ROOT,
    dockerfile_instructions,
    dockerfile_stages,
    parse,
    run_without_worker_extra,
    served_routes,
    stage_instructions,
    stage_values,
)
from worker.config import DEFAULT_MODEL

COMPOSE_FILE = ROOT / "docker-compose.yml"
REDIS_PORT = 6379
# The runtime images, by the subcommand each runs.
TARGETS = ("gateway", "worker")
_COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(:-([^}]*))?\}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Distributions of the worker extra whose import name differs from their name.
_IMPORT_NAMES = {"pillow": "PIL", "huggingface-hub": "huggingface_hub"}


@cache
def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _image_services() -> list[str]:
    """Services built from our Dockerfile, i.e. those whose command is an `sdxl-serve` command line."""
    return sorted(
        name
        for name, service in _services().items()
        if isinstance(service.get("build"), dict) and service["build"].get("dockerfile") == DOCKERFILE
    )


def interpolate(text: str, env: dict[str, str]) -> str:
    """`${VAR:-default}` and `${VAR}` as compose fills them from the shell's environment `env`."""

    def fill(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3) or ""
        return env.get(name) or default if match.group(2) else env.get(name, "")

    return _COMPOSE_VARIABLE.sub(fill, text)


def _command(service: str, shell: dict[str, str] | None = None) -> list[str]:
    """The service's command as compose runs it, with `shell` (default: empty) the environment of `docker compose`."""
    command = _services()[service]["command"]
    parts = shlex.split(command) if isinstance(command, str) else [str(part) for part in command]
    return [interpolate(part, shell or {}) for part in parts]


def _target(service: str) -> str:
    target: str = _services()[service]["build"]["target"]
    return target


def _args(service: str, shell: dict[str, str] | None = None) -> argparse.Namespace:
    """The service's command as the CLI reads it inside its image (whose ENV sets some defaults)."""
    environment = _services()[service].get("environment", {})
    assert isinstance(environment, dict), "write `environment:` as a mapping"
    return parse(_command(service, shell), {**stage_values(_target(service), "ENV"), **environment})


def _container_ports(service: str) -> list[int]:
    """The container side of each published port, short (`"HOST:CONTAINER/tcp"`) or long syntax."""
    ports = []
    for entry in _services()[service].get("ports", []):
        target = entry["target"] if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1].split("/")[0]
        ports.append(int(target))
    return ports


def _mounts(service: str) -> dict[str, str]:
    """Container path -> volume name (or host path) of each of the service's volumes."""
    return {target: source for source, target in (volume.split(":")[:2] for volume in _services()[service]["volumes"])}


def _duration_s(text: str) -> float:
    """A compose duration such as `2m15s` or `90s`, in seconds."""
    parts = _DURATION_PART.findall(str(text))
    assert parts and "".join(value + unit for value, unit in parts) == str(text), f"bad duration {text!r}"
    return sum(float(value) * _DURATION_UNITS[unit] for value, unit in parts)


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _probe_url(code: str) -> tuple[str | None, int | None, str]:
    compile(code, "<healthcheck>", "exec")
    urls = re.findall(r"https?://[^'\"\s]+", code)
    assert len(urls) == 1, f"expected one URL in the probe, got {urls}"
    url = urlparse(urls[0])
    return url.hostname, url.port, url.path


def _probe(service: str) -> tuple[str | None, int | None, str]:
    test = _services()[service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], "python:3.11-slim has no curl: probe with python"
    return _probe_url(test[3])


def _image_args(target: str) -> argparse.Namespace:
    """The image's default command (its CMD), as the CLI reads it in the image's environment."""
    [cmd] = [json.loads(rest) for instr, rest in stage_instructions(target) if instr == "CMD"]
    return parse(cmd, stage_values(target, "ENV"))


def _served_port(target: str, args: argparse.Namespace) -> int:
    port: int = args.port if target == "gateway" else args.metrics_port
    return port


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


@pytest.fixture(autouse=True)
def _cli_env_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CLI_ENV:
        monkeypatch.delenv(name, raising=False)


def test_compose_file_is_compose_spec() -> None:
    assert "version" not in _compose(), "the compose spec has no `version:` key"
    assert {"redis", "gateway", "worker"} <= set(_services())


def test_gateway_and_worker_run_their_images() -> None:
    assert {"gateway", "worker"} <= set(_image_services())
    for name in _image_services():
        build = _services()[name]["build"]
        assert (ROOT / build["context"]).resolve() == ROOT, f"{name}: build context is not the repo root"
        assert build["target"] in TARGETS, f"{name} builds {build['target']}, no runtime image"
        assert _services()[name]["image"].startswith(f"sdxl-serve-{build['target']}:")
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


def test_gateway_healthcheck_probes_readyz_on_its_port() -> None:
    assert _probe("gateway") == ("127.0.0.1", _args("gateway").port, "/readyz")


def test_worker_healthcheck_probes_readyz_on_its_metrics_port() -> None:
    assert _probe("worker") == ("127.0.0.1", _args("worker").metrics_port, "/readyz")


def test_probed_routes_exist() -> None:
    for command in TARGETS:
        assert {"/healthz", "/readyz", "/metrics"} <= served_routes()[command]


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


def test_worker_runs_the_tiny_model_the_tiny_model_service_makes() -> None:
    """Out of the box on a CPU machine: no 7 GB download, no SDXL in memory."""
    maker = _args("tiny-model")
    assert maker.if_missing, "a restart would make the model again"
    assert _args("worker").model == str(maker.directory)
    volume = {
        target: source for target, source in _mounts("tiny-model").items() if maker.directory.is_relative_to(target)
    }
    assert volume and set(volume.items()) <= set(_mounts("worker").items()), "the worker does not see the model"
    assert _services()["worker"]["depends_on"]["tiny-model"]["condition"] == "service_completed_successfully"
    assert _services()["tiny-model"]["restart"] == "no"
    assert _target("tiny-model") == "worker"


def test_sdxl_model_switches_the_worker_to_the_real_model() -> None:
    assert _args("worker", {"SDXL_MODEL": DEFAULT_MODEL}).model == DEFAULT_MODEL
    assert f"SDXL_MODEL={DEFAULT_MODEL} docker compose up" in COMPOSE_FILE.read_text(), "the switch is documented"


def test_interpolation_reads_the_shell_environment() -> None:
    assert interpolate("${A:-x}/${B}", {}) == "x/"
    assert interpolate("${A:-x}/${B}", {"A": "a", "B": "b"}) == "a/b"


def test_worker_caches_weights_at_hf_home() -> None:
    hf_home = stage_values("worker", "ENV")["HF_HOME"]
    mounts = _mounts("worker")
    assert hf_home in mounts, f"nothing is mounted at HF_HOME={hf_home}"
    assert mounts[hf_home] in _compose()["volumes"], "the HF cache should be a named volume"


def test_worker_compile_cache_is_a_shared_named_volume() -> None:
    """One named volume for every replica on the host: a worker started later loads, not compiles."""
    cache_dir = str(_args("worker").compile_cache)
    mounts = _mounts("worker")
    assert cache_dir in mounts, f"--compile-cache {cache_dir} is not a mounted volume"
    assert mounts[cache_dir] in _compose()["volumes"]


def test_worker_drains_on_sigterm() -> None:
    """Docker must not SIGKILL a worker before its own drain timeout lets it finish the job in hand."""
    worker = _services()["worker"]
    assert worker["stop_signal"] == "SIGTERM"
    assert _duration_s(worker["stop_grace_period"]) > _args("worker").drain_timeout


def test_sdxl_serve_up_waits_out_the_worker_drain() -> None:
    from sdxl_serve.up import STOP_TIMEOUT_S

    assert build_parser().parse_args(["worker"]).drain_timeout < STOP_TIMEOUT_S


def test_gateway_grace_outlasts_request_timeout() -> None:
    grace = _duration_s(_services()["gateway"]["stop_grace_period"])
    assert grace > _args("gateway").request_timeout


# --- The Dockerfile


def test_dockerfile_has_a_runtime_stage_per_role() -> None:
    stages = dockerfile_stages()
    assert set(TARGETS) <= set(stages)
    assert list(stages)[-1] == "worker", "without --target, docker builds the last stage: the full image"


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_is_the_console_script(target: str) -> None:
    entrypoints = [json.loads(rest) for instr, rest in stage_instructions(target) if instr == "ENTRYPOINT"]
    assert entrypoints == [["sdxl-serve"]]
    assert _pyproject()["project"]["scripts"]["sdxl-serve"] == "sdxl_serve.cli:main"
    assert build_parser().prog == "sdxl-serve"


@pytest.mark.parametrize("target", TARGETS)
def test_image_default_command_runs_its_role(target: str) -> None:
    assert _image_args(target).command == target


@pytest.mark.parametrize("target", TARGETS)
def test_image_healthcheck_probes_readyz_on_the_port_it_serves(target: str) -> None:
    [healthcheck] = [rest for instr, rest in stage_instructions(target) if instr == "HEALTHCHECK"]
    _, _, command = healthcheck.partition("CMD ")
    exec_form = json.loads(command)
    assert exec_form[:2] == ["python", "-c"], "python:3.11-slim has no curl: probe with python"
    port = _served_port(target, _image_args(target))
    assert _probe_url(exec_form[2]) == ("127.0.0.1", port, "/readyz")
    assert "/readyz" in served_routes()[target]
    exposed = [int(p) for instr, rest in stage_instructions(target) if instr == "EXPOSE" for p in rest.split()]
    assert exposed == [port]


@pytest.mark.parametrize("target", TARGETS)
def test_image_environment_names_variables_the_cli_reads(target: str) -> None:
    ours = {name for name in stage_values(target, "ENV") if name.startswith("SDXL_SERVE_")}
    assert ours <= set(CLI_ENV), f"the CLI reads none of {sorted(ours - set(CLI_ENV))}"


def test_worker_image_fixes_its_metrics_port() -> None:
    """Without it the worker picks any free port, and no HEALTHCHECK or probe could find it."""
    assert _image_args("worker").metrics_port != 0


@pytest.mark.parametrize("target", TARGETS)
def test_image_runs_as_a_numeric_non_root_user(target: str) -> None:
    users = [rest for instr, rest in stage_instructions(target) if instr == "USER"]
    assert users, f"{target} runs as root"
    uid = users[-1].partition(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric uid lets Kubernetes' runAsNonRoot check it"


def test_worker_image_volumes_are_its_caches() -> None:
    env = stage_values("worker", "ENV")
    [volumes] = [json.loads(rest) for instr, rest in stage_instructions("worker") if instr == "VOLUME"]
    assert set(volumes) == {env["HF_HOME"], env["SDXL_SERVE_COMPILE_CACHE"]}


def test_gateway_image_installs_no_worker_extra() -> None:
    """The gateway's stages never install an extra; the worker's install the one JAX_EXTRA names."""
    gateway_installs = [
        rest for instr, rest in stage_instructions("gateway-build") if instr == "RUN" and "pip install" in rest
    ]
    assert gateway_installs and not any("[" in rest for rest in gateway_installs)
    worker_installs = [rest for instr, rest in stage_instructions("worker-build") if instr == "RUN"]
    assert any('pip install ".[${JAX_EXTRA:-worker}]"' in rest for rest in worker_installs)


def test_jax_extra_defaults_to_cpu_and_names_real_extras() -> None:
    assert stage_values("worker-deps", "ARG")["JAX_EXTRA"] == ""
    assert {"worker", "tpu", "cuda"} <= set(_pyproject()["project"]["optional-dependencies"])


def _copied_sources(stage: str | None = None) -> set[str]:
    """What COPY takes from the build context: in `stage` and the stages it is built from, or in the file."""
    instructions = dockerfile_instructions() if stage is None else stage_instructions(stage)
    return {
        part.rstrip("/")
        for instr, rest in instructions
        if instr == "COPY" and not rest.startswith("--from")
        for part in shlex.split(rest)[:-1]
    }


# Development packages: installed by `make install`, never shipped in an image.
NOT_SHIPPED = {"bench", "testkit"}  # the local-process kit of the tests and benchmarks too


def test_dockerfile_copies_what_pip_install_needs() -> None:
    sources = _copied_sources()
    project = _pyproject()
    needed = {
        "pyproject.toml",
        project["project"]["readme"],
        *project["tool"]["setuptools"]["packages"]["find"]["include"],
    }
    assert {pattern.rstrip("*") for pattern in needed} - NOT_SHIPPED <= sources
    missing = [source for source in sources if not (ROOT / source).exists()]
    assert not missing, f"the Dockerfile copies files the repository lacks: {missing}"


def test_gateway_image_holds_no_worker_or_benchmark_code() -> None:
    gateway = _copied_sources("gateway-build")
    assert {"common", "gateway", "sdxl_serve"} <= gateway
    assert not gateway & {"worker", "bench", "testkit", "tests", "."}, sorted(gateway)
    worker = _copied_sources("worker-build")
    assert {"common", "gateway", "worker", "sdxl_serve"} <= worker
    assert not worker & {"bench", "testkit", "tests", "."}, sorted(worker)


def test_dockerignore_keeps_sources_and_drops_bulk() -> None:
    patterns = [
        line.strip().strip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv", "models", "artifacts"} <= set(patterns)
    for source in ("pyproject.toml", "README.md", "common", "gateway", "worker", "bench"):
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in patterns), f"{source} is ignored"


# --- pyproject.toml: the gateway installs without JAX


def test_core_dependencies_leave_the_worker_extra_out() -> None:
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    worker = {_requirement_name(r) for r in extras["worker"]}
    imported = {_IMPORT_NAMES.get(name, name) for name in worker}
    assert imported <= WORKER_EXTRA_MODULES, "the CLI's hint for a missing worker extra must know every module"
    assert {"jax", "flax", "diffusers", "transformers"} <= worker
    assert not {_requirement_name(r) for r in project["dependencies"]} & worker
    for extra in ("tpu", "cuda", "dev"):
        assert "sdxl-serve[worker]" in extras[extra], f"[{extra}] must include the worker extra"


def test_gateway_and_cli_import_without_the_worker_extra() -> None:
    """The gateway image lacks JAX, Flax, diffusers, transformers and safetensors: nothing it runs may import them."""
    result = run_without_worker_extra(
        "try:\n    import jax\nexcept ModuleNotFoundError:\n    pass\nelse:\n    raise SystemExit('jax importable')\n"
        "from sdxl_serve.cli import build_parser\n"
        "build_parser().parse_args(['gateway'])\n"
        "from gateway.config import GatewayConfig\n"
        "from gateway.app import create_app\n"
        "create_app(GatewayConfig())\n"
        "import sdxl_serve.status, sdxl_serve.up, bench.load, bench.routing\n"
    )
    assert result.returncode == 0, result.stderr


# --- docker-compose.ha.yml: Sentinel and an S3 image store, over docker-compose.yml

HA_FILE = ROOT / "docker-compose.ha.yml"


@cache
def _ha_services() -> dict[str, dict[str, Any]]:
    """The services with the override applied as compose merges it (a service's keys replace the base's)."""
    override: dict[str, dict[str, Any]] = yaml.safe_load(HA_FILE.read_text())["services"]
    merged = {name: dict(service) for name, service in _services().items()}
    for name, service in override.items():
        merged.setdefault(name, {}).update(service)
    return merged


def _ha_args(service: str) -> argparse.Namespace:
    merged = _ha_services()[service]
    return parse(
        [interpolate(str(part), {}) for part in merged["command"]],
        {**stage_values(_target(service), "ENV"), **merged["environment"]},
    )


@pytest.mark.parametrize("service", ["gateway", "worker"])
def test_ha_services_reach_redis_through_the_sentinels_and_images_in_the_s3_service(service: str) -> None:
    args = _ha_args(service)
    target = parse_sentinel_url(args.redis_url)
    services = _ha_services()
    sentinels = [name for name, s in services.items() if "redis-sentinel" in " ".join(map(str, s.get("command", [])))]
    assert sorted(host for host, _ in target.sentinels) == sorted(sentinels) and len(sentinels) == 3
    monitor = re.search(r"sentinel monitor (\S+) (\S+) (\d+) (\d+)", " ".join(services[sentinels[0]]["command"]))
    assert monitor is not None and monitor.group(1) == target.service
    assert monitor.group(2) in services and int(monitor.group(3)) == REDIS_PORT and int(monitor.group(4)) == 2
    store = urlparse(args.blob_store)
    endpoint = urlparse(dict(parse_qsl(store.query))["endpoint"])
    assert store.scheme == "s3" and endpoint.hostname in services
    assert f"-s3.port={endpoint.port}" in services[endpoint.hostname]["command"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(services[service]["environment"])


def test_ha_replica_follows_the_primary_and_the_gateway_confirms_on_it() -> None:
    replica = _ha_services()["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", str(REDIS_PORT)]
    assert _ha_args("gateway").durable_accept == "replica"


def test_ha_s3_credentials_match_the_store_identity() -> None:
    identities = json.loads(yaml.safe_load(HA_FILE.read_text())["configs"]["s3-identities"]["content"])
    credential = identities["identities"][0]["credentials"][0]
    for service in ("gateway", "worker"):
        env = _ha_services()[service]["environment"]
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            credential["accessKey"],
            credential["secretKey"],
        )


def test_ha_worker_runs_the_model_the_base_file_runs() -> None:
    assert _ha_args("worker").model == _args("worker").model


def test_ha_file_says_it_is_one_host_only() -> None:
    """Its sentinels name the master by a compose-network name: a client on another host cannot resolve it."""
    sentinel = " ".join(yaml.safe_load(HA_FILE.read_text())["x-sentinel"]["command"])
    assert "sentinel announce-hostnames yes" in sentinel
    header = " ".join(line.lstrip("# ") for line in HA_FILE.read_text().splitlines() if line.startswith("#"))
    assert "One host only" in header and "announce-ip" in header
