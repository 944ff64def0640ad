"""`sdxl-serve`: the one command-line entry point, with a subcommand per role.

Heavy imports (JAX, diffusers) happen inside the subcommands that need them, after the process
environment is final: JAX reads XLA_FLAGS once, at import.
"""

from __future__ import annotations

import time

# Taken before the heavy imports, so a worker's start-to-ready time includes loading JAX and diffusers.
PROCESS_STARTED = time.time()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from common.config import (  # noqa: E402
    ATTENTION,
    DEFAULT_MODEL,
    DEFAULT_REDIS_URL,
    ConfigError,
    GatewayConfig,
    WorkerConfig,
    default_cache_dir,
)
from common.keys import DEFAULT_PREFIX  # noqa: E402
from common.logs import setup_logging  # noqa: E402
from common.protocol import parse_shapes  # noqa: E402

CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def build_parser() -> argparse.ArgumentParser:
    """The full command line; tests check deployment files against it."""
    # No abbreviations: a renamed flag must fail loudly in deployment files, not match a prefix.
    parser = argparse.ArgumentParser(prog="sdxl-serve", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--log-level", default=os.environ.get("SDXL_SERVE_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, allow_abbrev=False)  # type: ignore[method-assign]
    _add_gateway(sub.add_parser("gateway", help="run an HTTP gateway"))
    _add_worker(sub.add_parser("worker", help="run a worker on this host's devices"))
    _add_up(sub.add_parser("up", help="run a whole local cluster: redis, a gateway and N workers"))
    status = sub.add_parser("status", help="the cluster at a glance: workers, queue depth, pending, dead letters")
    _add_redis(status)
    status.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    _add_bench(sub.add_parser("bench", help="benchmarks: routing simulation, load generation, ..."))
    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight SDXL model (for tests and demos)")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _add_redis(parser: argparse.ArgumentParser, default: str | None = DEFAULT_REDIS_URL) -> None:
    parser.add_argument("--redis-url", default=os.environ.get("SDXL_SERVE_REDIS_URL", default),
                        help="redis://[[user]:password@]host:port/db, rediss:// for TLS (env SDXL_SERVE_REDIS_URL)")
    parser.add_argument("--key-prefix", default=DEFAULT_PREFIX, help="namespace of this cluster's Redis keys")


def _add_gateway(parser: argparse.ArgumentParser) -> None:
    _add_redis(parser)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--request-timeout", type=float, default=120.0,
                        help="seconds /v1/generate waits before answering 504 with the job id")
    parser.add_argument("--result-ttl", type=int, default=3600, help="seconds results stay fetchable")
    _add_routing(parser)


def _add_routing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--routing", default="shared", choices=["shared", "random", "p2c"],
                        help="shared: idle workers pull from one queue per shape (default); random: a random "
                             "worker's own queue (the reference's policy); p2c: the shorter of two random ones")


def _add_worker_model(parser: argparse.ArgumentParser, model_default: str | None) -> None:
    parser.add_argument("--model", default=model_default,
                        help=f"hub id or local diffusers directory (default {DEFAULT_MODEL})")
    parser.add_argument("--revision", default=None,
                        help="hub revision (default: refs/pr/95, where SDXL base keeps its Flax weights)")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="WIDTHxHEIGHTxSTEPS,... to compile (default: native size at 20 and 25 steps; "
                             "20 on CPU)")
    parser.add_argument("--images-per-request", type=int, default=4)
    parser.add_argument("--cpu-devices", type=int, default=4,
                        help="virtual devices JAX makes of the CPU when there is no accelerator")
    parser.add_argument("--attention", default="einsum", choices=ATTENTION,
                        help="UNet attention: einsum (diffusers' own, default) or dot_product "
                             "(jax.nn.dot_product_attention: cuDNN flash attention on NVIDIA GPUs)")


def _add_worker(parser: argparse.ArgumentParser) -> None:
    _add_redis(parser)
    _add_worker_model(parser, DEFAULT_MODEL)
    parser.add_argument("--worker-id", default=None, help="default: HOST-PID-RANDOM")
    parser.add_argument("--heartbeat-interval", type=float, default=2.0)
    parser.add_argument("--heartbeat-ttl", type=float, default=10.0,
                        help="seconds without a heartbeat after which a worker is dead and its job taken over")
    parser.add_argument("--png-compress-level", type=int, default=1)
    parser.add_argument("--max-deliveries", type=int, default=3,
                        help="a job handed out more often than this (its workers kept dying) is dead-lettered")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="on SIGTERM, seconds to finish the job in hand before leaving it to other workers")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address of /metrics, /healthz and /readyz")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="port of /metrics, /healthz and /readyz (default 0: any free port, published in "
                             "the registry; set one for Prometheus and probes)")


def _add_up(parser: argparse.ArgumentParser) -> None:
    _add_redis(parser, default=None)
    _add_worker_model(parser, None)
    parser.add_argument("--workers", type=int, default=1)
    _add_routing(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="where the tiny model is made on first use")
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for every worker to be warm")


# Each benchmark is a module of the `bench` package with `add_arguments(parser)` and `main(args) -> int`.
BENCHMARKS = {
    "routing": "simulate the routing policies (shared, random, p2c) under Poisson load",
    "load": "open-loop Poisson load against a running gateway",
    "progress": "cost of per-step progress, and submit-to-first-progress latency",
    "generate": "the pipeline in-process: compile time, latency, images/s, TFLOP/s and fraction of peak",
}


def _add_bench(parser: argparse.ArgumentParser) -> None:
    import importlib

    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"bench.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, allow_abbrev=False))


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(redis_url=args.redis_url, host=args.host, port=args.port, key_prefix=args.key_prefix,
                         request_timeout_s=args.request_timeout, result_ttl_s=args.result_ttl, routing=args.routing)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    extra = {"worker_id": args.worker_id} if args.worker_id else {}
    return WorkerConfig(redis_url=args.redis_url, model=args.model, revision=args.revision, shapes=args.shapes,
                        images_per_request=args.images_per_request, key_prefix=args.key_prefix,
                        heartbeat_interval_s=args.heartbeat_interval, heartbeat_ttl_s=args.heartbeat_ttl,
                        png_compress_level=args.png_compress_level, max_deliveries=args.max_deliveries,
                        drain_timeout_s=args.drain_timeout, metrics_host=args.metrics_host,
                        metrics_port=args.metrics_port, attention=args.attention, **extra)


async def _status(args: argparse.Namespace) -> int:
    from common.config import mask_url
    from common.keys import Keys
    from common.redis_conn import UNAVAILABLE, connect
    from common.status import read_status, render

    redis = connect(args.redis_url, name="sdxl-status")
    try:
        status = await read_status(redis, Keys(args.key_prefix))
    except UNAVAILABLE as exc:
        print(f"sdxl-serve status: cannot reach Redis at {mask_url(args.redis_url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    print(status.model_dump_json(indent=2) if args.json else render(status))
    return 0


def use_cpu_devices(count: int) -> None:
    """Make JAX split the host CPU into `count` devices; JAX ignores this where an accelerator exists."""
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_DEVICES_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_DEVICES_FLAG}={count}".strip()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"sdxl-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "gateway":
        from gateway.app import serve as serve_gateway

        serve_gateway(gateway_config(args))
    elif args.command == "worker":
        config = worker_config(args)
        use_cpu_devices(args.cpu_devices)
        from worker.runner import serve as serve_worker

        status = asyncio.run(serve_worker(config, started_at=PROCESS_STARTED))
        # Exit now: a compile still running on the device thread must not hold the process open.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(status)
    elif args.command == "up":
        from common.cluster import run_cluster

        return run_cluster(args)
    elif args.command == "status":
        return asyncio.run(_status(args))
    elif args.command == "bench":
        import importlib

        return int(importlib.import_module(f"bench.{args.benchmark}").main(args))
    elif args.command == "tiny-model":
        use_cpu_devices(1)
        from worker.tiny_model import write_tiny_model

        print(write_tiny_model(args.directory, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
