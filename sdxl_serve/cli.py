"""`sdxl-serve`: the one command-line entry point, with a subcommand per role.

A thin dispatcher. Each subcommand lives in its own module with `add_arguments(parser)` and
`run(args) -> int`; only the module of the subcommand being run is imported, so `sdxl-serve gateway`
never loads the worker, JAX or the benchmarks, and an installation without one of them (the gateway
image has no worker or bench package) still runs the others.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType

from common.config import ConfigError
from common.logs import setup_logging

logger = logging.getLogger(__name__)

# Top-level modules of the `worker` extra (pyproject.toml): the gateway's install lacks them. (Pillow and numpy are
# the gateway's too: it decodes and checks input images.)
WORKER_EXTRA_MODULES = frozenset(
    {"jax", "jaxlib", "flax", "diffusers", "transformers", "huggingface_hub", "safetensors"}
)


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, the module that owns its flags and its `run`, and its one-line help."""

    name: str
    module: str
    help: str


COMMANDS = (
    Command("gateway", "gateway.cli", "run an HTTP gateway"),
    Command("worker", "worker.cli", "run a worker on this host's devices"),
    Command("up", "sdxl_serve.up", "run a whole local cluster: redis, a gateway and N workers, kept running"),
    Command("status", "sdxl_serve.status", "the cluster at a glance: workers, queue depth, pending, dead letters"),
    Command("keys", "sdxl_serve.api_keys", "API keys: make a new one, or hash an existing one for the keys file"),
    Command("tiny-model", "sdxl_serve.tiny_model", "write a tiny random-weight SDXL model (for tests and demos)"),
    Command("tiny-lora", "sdxl_serve.tiny_lora", "write a small random LoRA for a model, kohya or PEFT (tests, demos)"),
    Command("bench", "bench.cli", "benchmarks: routing simulation, load generation, ..."),
)
# Built only when run: the benchmark harness is no part of serving.
ON_DEMAND = frozenset({"bench"})


class NotInstalledError(RuntimeError):
    """The package of a subcommand is not installed here (the gateway image has no worker or bench)."""


def build_parser(load: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The command line. `load`: the subcommands whose flags are built (their modules imported); the others
    are listed with their help only. Default: every subcommand but the on-demand ones (tests check
    deployment files against this)."""
    loaded = {c.name for c in COMMANDS if c.name not in ON_DEMAND} if load is None else set(load)
    # No abbreviations: a renamed flag must fail loudly in deployment files, not match a prefix.
    parser = argparse.ArgumentParser(prog="sdxl-serve", description=__doc__.splitlines()[0], allow_abbrev=False)
    _add_global_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        subparser = sub.add_parser(command.name, help=command.help, allow_abbrev=False)
        if command.name in loaded:
            module = _import(command)
            module.add_arguments(subparser)
            subparser.set_defaults(run=module.run)
    return parser


def version() -> str:
    """The installed distribution's version (pyproject.toml), or a word saying the source is not installed."""
    try:
        return importlib.metadata.version("sdxl-serve")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run from a source tree)"


def _add_global_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("SDXL_SERVE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get("SDXL_SERVE_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="text: one line per event; json: one JSON object per line, for log pipelines (env SDXL_SERVE_LOG_FORMAT)",
    )


def _import(command: Command) -> ModuleType:
    try:
        return importlib.import_module(command.module)
    except ModuleNotFoundError as exc:
        package = command.module.partition(".")[0]
        if exc.name != package:
            raise
        raise NotInstalledError(
            f"this installation has no {package!r} package (the gateway image runs the gateway only)"
        ) from None


def command_in(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names, if any, read past the global options."""
    pre = argparse.ArgumentParser(prog="sdxl-serve", add_help=False, allow_abbrev=False)
    pre.add_argument("--log-level")
    pre.add_argument("--log-format")
    pre.add_argument("command", nargs="?")
    known, _ = pre.parse_known_args(argv)
    name: str | None = known.command
    return name


def main(argv: Sequence[str] | None = None) -> int:
    """Run `sdxl-serve ARGV...`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_in(argv)
    return _guarded(command or "", lambda: _parse_and_run(argv, command))


def _parse_and_run(argv: list[str], command: str | None) -> int:
    args = build_parser(load=[command] if command in {c.name for c in COMMANDS} else []).parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


def _guarded(command: str, body: Callable[[], int]) -> int:
    """`body()`, with the errors a user can act on turned into a message and an exit status."""
    try:
        return body()
    except (ConfigError, NotInstalledError) as exc:
        logger.debug("the error's traceback", exc_info=True)  # with --log-level debug only
        print(f"sdxl-serve {command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in WORKER_EXTRA_MODULES:
            raise
        print(
            f"sdxl-serve {command}: error: {exc}: this command needs the worker extra "
            "(pip install 'sdxl-serve[worker]', or [tpu] / [cuda])",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
