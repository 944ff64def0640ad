"""What the tests of deployment files (test_compose.py, test_deploy.py) check them against: the real
command line, the Dockerfile's stages, the routes and metric names the code serves, and a Python that
lacks the worker extra.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.config import GatewayConfig
from sdxl_serve.cli import WORKER_EXTRA_MODULES, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = "deploy/docker/Dockerfile"


# The modules that build the command line.
CLI_SOURCES = ("sdxl_serve/cli.py", "sdxl_serve/up.py", "common/config.py", "gateway/cli.py", "worker/cli.py")


def _cli_env() -> tuple[str, ...]:
    """The environment variables `build_parser()` reads its defaults from, as its modules name them."""
    source = "\n".join((ROOT / path).read_text() for path in CLI_SOURCES)
    return tuple(
        sorted(
            name
            for name in set(re.findall(r'os\.environ\.get\("(\w+)"', source))
            if name.startswith("SDXL_SERVE_") or name == "PORT"
        )
    )


# The deployment files decide these: the tests clear them from their own environment.
CLI_ENV = _cli_env()


def exact(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser and its subcommands without prefix matching: `--redis` must not pass for `--redis-url`."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                exact(subparser)
    return parser


@contextmanager
def cli_environment(env: Mapping[str, str]) -> Iterator[None]:
    """Exactly `env` for the variables the CLI reads (the others unset), restored afterwards."""
    saved = {name: os.environ.get(name) for name in CLI_ENV}
    try:
        for name in CLI_ENV:
            os.environ.pop(name, None)
        os.environ.update({name: value for name, value in env.items() if name in CLI_ENV})
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def parse(command: list[str], env: Mapping[str, str] | None = None) -> argparse.Namespace:
    """`sdxl-serve COMMAND...` as the real parser reads it in the environment `env`; a refusal fails the test."""
    with cli_environment(env or {}):
        try:
            return exact(build_parser()).parse_args(command)
        except SystemExit as exc:  # argparse's way of refusing a command line
            pytest.fail(f"sdxl-serve refuses {command} (exit {exc.code}); see the usage error above")


# --- The Dockerfile


@dataclass
class Stage:
    """One `FROM ... AS name` stage: its parent stage (None for an external image) and its instructions."""

    name: str
    parent: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_instructions(path: Path = ROOT / DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending.strip())
        pending = ""
    return [(instr.upper(), rest.strip()) for instr, _, rest in (line.partition(" ") for line in logical)]


@cache
def dockerfile_stages() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for instr, rest in dockerfile_instructions():
        if instr == "FROM":
            words = rest.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"unnamed stage: FROM {rest}"
            current = stages[words[2]] = Stage(words[2], words[0] if words[0] in stages else None)
        elif current is not None:
            current.instructions.append((instr, rest))
    return stages


def stage_instructions(target: str) -> list[tuple[str, str]]:
    """The instructions that make `target`, those of the stages it is built FROM first."""
    stage = dockerfile_stages()[target]
    inherited = stage_instructions(stage.parent) if stage.parent else []
    return inherited + stage.instructions


def stage_values(target: str, instruction: str) -> dict[str, str]:
    """Every KEY=VALUE an ENV (or ARG) line sets in `target`, later lines winning."""
    values: dict[str, str] = {}
    for instr, rest in stage_instructions(target):
        if instr == instruction:
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                values[key] = value
    return values


# --- What the code serves


@cache
def served_routes() -> dict[str, frozenset[str]]:
    """GET paths of the gateway app and of a worker's metrics app, by subcommand."""
    from gateway.app import create_app
    from worker.metrics import WorkerMetrics, metrics_app

    apps = {"gateway": create_app(GatewayConfig()), "worker": metrics_app(WorkerMetrics(), lambda: None)}
    return {
        command: frozenset(
            route.resource.canonical
            for route in app.router.routes()
            if route.method == "GET" and route.resource is not None
        )
        for command, app in apps.items()
    }


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """The sample names Prometheus sees from a registry, labelled families without children included."""
    return {family.name + suffix for family in registry.collect() for suffix in _SUFFIXES.get(family.type, ("",))}


@cache
def metric_names() -> frozenset[str]:
    """Every metric name a gateway or a worker exports."""
    from gateway.metrics import GatewayMetrics
    from worker.metrics import WorkerMetrics

    return frozenset(exposed_names(GatewayMetrics().registry) | exposed_names(WorkerMetrics().registry))


# --- A Python without the worker extra, as in the gateway image

_BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {sorted(WORKER_EXTRA_MODULES)!r}
class WorkerExtraMissing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, WorkerExtraMissing())
"""


def run_without_worker_extra(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter where importing any package of the worker extra fails."""
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER + code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
