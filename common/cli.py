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
import dataclasses  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from common.config import (  # noqa: E402
    ATTENTION,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE_DEPTH,
    DEFAULT_MODEL,
    DEFAULT_REDIS_URL,
    ConfigError,
    GatewayConfig,
    IPNetwork,
    RateLimits,
    WorkerConfig,
    default_cache_dir,
    parse_networks,
)
from common.keys import DEFAULT_PREFIX  # noqa: E402
from common.logs import setup_logging  # noqa: E402
from common.protocol import MAX_GUIDANCE, MAX_PROMPT_CHARS, MIN_GUIDANCE, RequestLimits, parse_shapes  # noqa: E402
from common.ratelimit import Rate  # noqa: E402

CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# Top-level modules of the `worker` extra (pyproject.toml): the gateway's install lacks them.
WORKER_EXTRA_MODULES = frozenset(
    {"jax", "jaxlib", "flax", "diffusers", "transformers", "huggingface_hub", "PIL", "numpy"}
)


def build_parser() -> argparse.ArgumentParser:
    """The full command line; tests check deployment files against it."""
    # No abbreviations: a renamed flag must fail loudly in deployment files, not match a prefix.
    parser = argparse.ArgumentParser(prog="sdxl-serve", description=__doc__.splitlines()[0], allow_abbrev=False)
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, allow_abbrev=False)  # type: ignore[method-assign]
    _add_gateway(sub.add_parser("gateway", help="run an HTTP gateway"))
    _add_worker(sub.add_parser("worker", help="run a worker on this host's devices"))
    _add_up(sub.add_parser("up", help="run a whole local cluster: redis, a gateway and N workers"))
    status = sub.add_parser("status", help="the cluster at a glance: workers, queue depth, pending, dead letters")
    _add_redis(status)
    status.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    _add_bench(sub.add_parser("bench", help="benchmarks: routing simulation, load generation, ..."))
    _add_keys(sub.add_parser("keys", help="API keys: make a new one, or hash an existing one for the keys file"))
    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight SDXL model (for tests and demos)")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _add_redis(parser: argparse.ArgumentParser, default: str | None = DEFAULT_REDIS_URL) -> None:
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SDXL_SERVE_REDIS_URL", default),
        help="redis://[[user]:password@]host:port/db, rediss:// for TLS (env SDXL_SERVE_REDIS_URL)",
    )
    parser.add_argument("--key-prefix", default=DEFAULT_PREFIX, help="namespace of this cluster's Redis keys")


def _add_gateway(parser: argparse.ArgumentParser) -> None:
    _add_redis(parser)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="seconds /v1/generate waits before answering 504 with the job id",
    )
    parser.add_argument("--result-ttl", type=int, default=3600, help="seconds results stay fetchable")
    _add_routing(parser)
    _add_protection(parser)


def _guidance_range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition("..")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN..MAX, e.g. 1..15")
    try:
        return float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN..MAX, e.g. 1..15") from None


def _rate_arg(text: str) -> Rate | None:
    try:
        return Rate.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _networks_arg(text: str) -> tuple[IPNetwork, ...]:
    try:
        return parse_networks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an address or CIDR network: {exc}") from None


def _add_protection(parser: argparse.ArgumentParser) -> None:
    """Validation bounds, API keys, client addresses, rate limits and backpressure (README: Protection)."""
    env = os.environ.get
    group = parser.add_argument_group("protection")
    group.add_argument(
        "--max-prompt-chars",
        type=int,
        default=MAX_PROMPT_CHARS,
        help=f"longest prompt or negative prompt accepted (at most {MAX_PROMPT_CHARS})",
    )
    group.add_argument(
        "--guidance-range",
        type=_guidance_range,
        default=(MIN_GUIDANCE, MAX_GUIDANCE),
        metavar="MIN..MAX",
        help=f"guidance_scale accepted (within {MIN_GUIDANCE:g}..{MAX_GUIDANCE:g})",
    )
    group.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies are refused (413) before they are read",
    )
    group.add_argument(
        "--api-keys-file",
        type=Path,
        default=env("SDXL_SERVE_API_KEYS_FILE"),
        help="file of SHA-256 digests of accepted keys, one per line, `revoked` after a digest to "
        "refuse it with 403; re-read when it changes (env SDXL_SERVE_API_KEYS_FILE). Keys can "
        "also come from env SDXL_SERVE_API_KEYS (comma-separated). With any, /v1 needs a key",
    )
    group.add_argument(
        "--public-demo",
        action=argparse.BooleanOptionalAction,
        default=env("SDXL_SERVE_PUBLIC_DEMO", "") in ("1", "true", "yes"),
        help="with keys configured, leave the demo page's routes (POST /v1/jobs, a job's status, "
        "events, images, cancel) open without a key, under the public rate limits",
    )
    group.add_argument(
        "--trusted-proxies",
        type=_networks_arg,
        default=env("SDXL_SERVE_TRUSTED_PROXIES", ""),
        metavar="CIDR,...",
        help="believe X-Forwarded-For only from these addresses or networks (env SDXL_SERVE_TRUSTED_PROXIES)",
    )
    group.add_argument(
        "--max-queue-depth",
        type=int,
        default=DEFAULT_MAX_QUEUE_DEPTH,
        help="jobs queued or in service per stream beyond which submits get 429 (0: unbounded)",
    )
    defaults = RateLimits()
    for field in dataclasses.fields(RateLimits):
        group.add_argument(
            f"--rate-limit-{field.name.replace('_', '-')}",
            dest=f"rate_limit_{field.name}",
            type=_rate_arg,
            default=getattr(defaults, field.name),
            metavar="N/UNIT[:BURST]",
            help=f"COUNT/s|m|h[:BURST] or off (default {getattr(defaults, field.name) or 'off'})",
        )


def _add_keys(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = sub.add_parser("new", help="print a new key (give it to the client) and its line for the keys file")
    new.add_argument("--label", default="", help="a comment for the keys-file line, e.g. who holds the key")
    sub.add_parser("hash", help="read keys on standard input, one per line; print each one's keys-file line")


def _add_routing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--routing",
        default="shared",
        choices=["shared", "random", "p2c"],
        help="shared: idle workers pull from one queue per shape (default); random: a random "
        "worker's own queue (the reference's policy); p2c: the shorter of two random ones",
    )


def _add_worker_model(parser: argparse.ArgumentParser, model_default: str | None) -> None:
    parser.add_argument(
        "--model",
        default=model_default,
        help=f"hub id, local diffusers folder or single-file .safetensors (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--revision", default=None, help="hub revision (default: refs/pr/95, where SDXL base keeps its Flax weights)"
    )
    parser.add_argument(
        "--model-config",
        default=None,
        help="for a single-file --model: diffusers-layout folder or hub id with its configs and tokenizers "
        "(default: stabilityai/stable-diffusion-xl-base-1.0, weights not fetched)",
    )
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=None,
        help="WIDTHxHEIGHTxSTEPS,... to compile; sdxl:STEPS for SDXL's nine trained resolutions "
        "(default: native size at 20 and 25 steps; 20 on CPU)",
    )
    parser.add_argument("--images-per-request", type=int, default=4)
    parser.add_argument(
        "--cpu-devices", type=int, default=4, help="virtual devices JAX makes of the CPU when there is no accelerator"
    )
    parser.add_argument(
        "--attention",
        default="einsum",
        choices=ATTENTION,
        help="UNet attention: einsum (diffusers' own, default) or dot_product "
        "(jax.nn.dot_product_attention: cuDNN flash attention on NVIDIA GPUs)",
    )


def _add_worker(parser: argparse.ArgumentParser) -> None:
    _add_redis(parser)
    _add_worker_model(parser, DEFAULT_MODEL)
    parser.add_argument("--worker-id", default=None, help="default: HOST-PID-RANDOM")
    parser.add_argument("--heartbeat-interval", type=float, default=2.0)
    parser.add_argument(
        "--heartbeat-ttl",
        type=float,
        default=10.0,
        help="seconds without a heartbeat after which a worker is dead and its job taken over",
    )
    parser.add_argument("--png-compress-level", type=int, default=1)
    parser.add_argument(
        "--max-deliveries",
        type=int,
        default=3,
        help="a job handed out more often than this (its workers kept dying) is dead-lettered",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="on SIGTERM, seconds to finish the job in hand before leaving it to other workers",
    )
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address of /metrics, /healthz and /readyz")
    # The worker image fixes the port through the environment, so its HEALTHCHECK knows where to probe. A
    # string default goes through `type`, so a bad value is a usage error naming the flag.
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=os.environ.get("SDXL_SERVE_METRICS_PORT", "0"),
        help="port of /metrics, /healthz and /readyz (default 0: any free port, published in "
        "the registry; set one for Prometheus and probes; env SDXL_SERVE_METRICS_PORT)",
    )
    _add_compile_cache(parser)


def _add_compile_cache(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get("SDXL_SERVE_COMPILE_CACHE") or str(default_cache_dir() / "jax")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--compile-cache",
        type=Path,
        default=Path(default),
        metavar="DIR",
        help="JAX's persistent compilation cache: a restart loads executables instead of compiling "
        "them; workers on one host can share it (env SDXL_SERVE_COMPILE_CACHE, "
        f"default {default})",
    )
    cache.add_argument(
        "--no-compile-cache",
        dest="compile_cache",
        action="store_const",
        const=None,
        help="compile everything at every start",
    )
    parser.add_argument(
        "--compile-cache-max-gb",
        type=float,
        default=20.0,
        help="size bound of the cache; least recently used executables go first",
    )


def _add_up(parser: argparse.ArgumentParser) -> None:
    _add_redis(parser, default=None)
    _add_worker_model(parser, None)
    parser.add_argument("--workers", type=int, default=1)
    _add_routing(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--cache-dir", type=Path, default=default_cache_dir(), help="where the tiny model is made on first use"
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for every worker to be warm"
    )
    _add_compile_cache(parser)


# Each benchmark is a module of the `bench` package with `add_arguments(parser)` and `main(args) -> int`.
BENCHMARKS = {
    "routing": "simulate the routing policies (shared, random, p2c) under Poisson load",
    "load": "open-loop Poisson load against a running gateway",
    "progress": "cost of per-step progress, and submit-to-first-progress latency",
    "start": "worker start-to-ready with a cold and a warm compilation cache",
    "protect": "refusals per second on one core (429, 400) and gateway memory under a 10x burst",
    "generate": "the pipeline in-process: compile time, latency, images/s, TFLOP/s and fraction of peak",
}


def _add_bench(parser: argparse.ArgumentParser) -> None:
    import importlib

    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"bench.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, allow_abbrev=False))


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    from common.apikeys import KeyRing, KeysFileError, load_keys_file, split_keys

    low, high = args.guidance_range
    rates = RateLimits(**{f.name: getattr(args, f"rate_limit_{f.name}") for f in dataclasses.fields(RateLimits)})
    # Keys from the environment are hashed here and never kept: the config holds digests only.
    keys = KeyRing.from_keys(split_keys(os.environ.get("SDXL_SERVE_API_KEYS", "")))
    if args.api_keys_file:
        try:  # fail at start, naming the flag, rather than when the app is built
            load_keys_file(Path(args.api_keys_file))
        except KeysFileError as exc:
            raise ConfigError(f"--api-keys-file: {exc}") from None
    return GatewayConfig(
        redis_url=args.redis_url,
        host=args.host,
        port=args.port,
        key_prefix=args.key_prefix,
        request_timeout_s=args.request_timeout,
        result_ttl_s=args.result_ttl,
        routing=args.routing,
        limits=RequestLimits(max_prompt_chars=args.max_prompt_chars, min_guidance=low, max_guidance=high),
        max_body_bytes=args.max_body_bytes,
        api_keys=keys,
        api_keys_file=Path(args.api_keys_file) if args.api_keys_file else None,
        public_demo=args.public_demo,
        trusted_proxies=args.trusted_proxies,
        rate_limits=rates,
        max_queue_depth=args.max_queue_depth,
    )


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    extra = {"worker_id": args.worker_id} if args.worker_id else {}
    return WorkerConfig(
        redis_url=args.redis_url,
        model=args.model,
        revision=args.revision,
        model_config=args.model_config,
        shapes=args.shapes,
        images_per_request=args.images_per_request,
        key_prefix=args.key_prefix,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_ttl_s=args.heartbeat_ttl,
        png_compress_level=args.png_compress_level,
        max_deliveries=args.max_deliveries,
        drain_timeout_s=args.drain_timeout,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        compile_cache_dir=args.compile_cache,
        compile_cache_max_bytes=int(args.compile_cache_max_gb * 1e9),
        attention=args.attention,
        **extra,
    )


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


def _keys(args: argparse.Namespace) -> int:
    from common.apikeys import key_line, new_key

    if args.keys_command == "new":
        key = new_key()
        print(
            "line 1: the key, for the client (it is stored nowhere); line 2: its line for the keys file",
            file=sys.stderr,
        )
        print(key)
        print(key_line(key, args.label))
        return 0
    for line in sys.stdin:
        if line.strip():
            print(key_line(line.strip()))
    return 0


def use_cpu_devices(count: int) -> None:
    """Make JAX split the host CPU into `count` devices, scheduled for memory; JAX ignores this where an
    accelerator exists.

    XLA:CPU's concurrency-optimised scheduler keeps every bfloat16 weight's float32 copy alive at once: 10.3 GB
    of temporaries for one SDXL UNet step, 137 MB with it off.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_DEVICES_FLAG not in flags:
        flags = f"{flags} {CPU_DEVICES_FLAG}={count}"
    if CPU_SCHEDULER_FLAG.split("=")[0] not in flags:
        flags = f"{flags} {CPU_SCHEDULER_FLAG}"
    os.environ["XLA_FLAGS"] = flags.strip()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"sdxl-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in WORKER_EXTRA_MODULES:
            raise
        print(
            f"sdxl-serve {args.command}: error: {exc}: this command needs the worker extra "
            "(pip install 'sdxl-serve[worker]', or [tpu] / [cuda])",
            file=sys.stderr,
        )
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
    elif args.command == "keys":
        return _keys(args)
    elif args.command == "tiny-model":
        use_cpu_devices(1)
        from worker.tiny_model import write_tiny_model

        print(write_tiny_model(args.directory, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
