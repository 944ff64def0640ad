"""`sdxl-serve worker`: the worker's flags, read into a WorkerConfig whose defaults they show.

Nothing heavy is imported here: JAX reads XLA_FLAGS once, at import, so `run` sets the process
environment first and imports the runner after.
"""

from __future__ import annotations

import time

# Taken before the heavy imports, so a worker's start-to-ready time includes loading JAX and diffusers.
PROCESS_STARTED = time.time()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common.config import (  # noqa: E402
    ConfigError,
    add_blob_store_argument,
    add_eviction_argument,
    add_redis_arguments,
)
from common.protocol import MAX_LORAS, MAX_STEPS, Size  # noqa: E402
from worker.config import ATTENTION, DEFAULT_MODEL, WorkerConfig, default_compile_cache_dir, parse_sizes  # noqa: E402

CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# What jax loads to reach a GPU or a TPU (the CUDA and ROCm plugins live under `jax_plugins`): looked up, not
# imported, before JAX reads XLA_FLAGS.
ACCELERATOR_MODULES = ("jax_plugins", "libtpu")
_GB = 1e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of `sdxl-serve worker`."""
    add_redis_arguments(parser)
    add_eviction_argument(parser)
    _add_blob_store(parser)
    add_model_arguments(parser, WorkerConfig.model)
    parser.add_argument("--worker-id", default=None, help="default: HOST-PID-RANDOM")
    parser.add_argument("--heartbeat-interval", type=float, default=WorkerConfig.heartbeat_interval_s)
    parser.add_argument(
        "--heartbeat-ttl",
        type=float,
        default=WorkerConfig.heartbeat_ttl_s,
        help="seconds without a heartbeat after which a worker is dead and its job taken over",
    )
    parser.add_argument("--png-compress-level", type=int, default=WorkerConfig.png_compress_level)
    _add_safety(parser)
    _add_delivery_limits(parser)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=WorkerConfig.drain_timeout_s,
        help="on SIGTERM, seconds to finish the job in hand before leaving it to other workers",
    )
    parser.add_argument(
        "--metrics-host", default=WorkerConfig.metrics_host, help="address of /metrics, /healthz and /readyz"
    )
    # The worker image fixes the port through the environment, so its HEALTHCHECK knows where to probe. A
    # string default goes through `type`, so a bad value is a usage error naming the flag.
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=os.environ.get("SDXL_SERVE_METRICS_PORT", str(WorkerConfig.metrics_port)),
        help="port of /metrics, /healthz and /readyz (default 0: any free port, published in "
        "the registry; set one for Prometheus and probes; env SDXL_SERVE_METRICS_PORT)",
    )
    add_compile_cache_arguments(parser)


def _add_delivery_limits(parser: argparse.ArgumentParser) -> None:
    """When a job is given up: delivered too often, or its input images unreachable too often."""
    parser.add_argument(
        "--max-deliveries",
        type=int,
        default=WorkerConfig.max_deliveries,
        help="a job handed out more often than this (its workers kept dying) is dead-lettered; deliveries given "
        "back because the job's input images could not be read do not count",
    )
    parser.add_argument(
        "--max-input-retries",
        type=int,
        default=WorkerConfig.max_input_retries,
        help="a job whose input images could not be read (their store unreachable) is delivered again at most "
        "this many times for it, then dead-lettered naming the store's error",
    )


def _add_blob_store(parser: argparse.ArgumentParser) -> None:
    """Where images are written, and how often a file store is swept of expired ones."""
    add_blob_store_argument(parser, WorkerConfig.blob_store)
    parser.add_argument(
        "--blob-sweep-interval",
        type=float,
        default=WorkerConfig.blob_sweep_interval_s,
        help="seconds between sweeps of a file --blob-store for objects whose result expired",
    )
    parser.add_argument(
        "--blob-store-timeout",
        type=float,
        default=WorkerConfig.blob_store_timeout_s,
        help="seconds a job's images may be refused by the --blob-store (a full disk) before the job fails and the "
        "worker stops claiming (unready) until the store takes writes again",
    )


def _add_safety(parser: argparse.ArgumentParser) -> None:
    """The invisible watermark and the image safety checker (docs/safety.md)."""
    add_watermark_argument(parser)
    add_safety_checker_arguments(parser)


def add_safety_checker_arguments(parser: argparse.ArgumentParser) -> None:
    """`--safety-checker` and `--safety-replace`, which `sdxl-serve up` passes on to its workers (docs/safety.md)."""
    parser.add_argument(
        "--safety-checker",
        type=Path,
        default=WorkerConfig.safety_checker,
        metavar="FOLDER",
        help="run the Stable Diffusion image safety checker in FOLDER (config.json, model.safetensors) over "
        "each batch; a flagged image is replaced and marked nsfw",
    )
    parser.add_argument(
        "--safety-replace",
        choices=["black", "blur"],
        default=WorkerConfig.safety_replace,
        help="what a flagged image is delivered as",
    )


def add_watermark_argument(parser: argparse.ArgumentParser) -> None:
    """`--watermark`, which `sdxl-serve up` passes on to its workers (docs/safety.md)."""
    parser.add_argument(
        "--watermark",
        choices=["on", "off"],
        default="on" if WorkerConfig.watermark else "off",
        help="put SDXL's reference invisible watermark (DWT-DCT, its 48-bit message) on every image of 256 "
        "pixels wide or more, before encoding",
    )


def add_model_arguments(parser: argparse.ArgumentParser, model_default: str | None) -> None:
    """What a worker loads and compiles; `sdxl-serve up` passes these on to its workers."""
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
    add_serving_arguments(parser)
    parser.add_argument("--images-per-request", type=int, default=WorkerConfig.images_per_request)
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=WorkerConfig.cpu_devices,
        help="virtual devices JAX makes of the CPU when there is no accelerator",
    )
    parser.add_argument(
        "--attention",
        default=WorkerConfig.attention,
        choices=ATTENTION,
        help="UNet attention: einsum (diffusers' own, default) or dot_product "
        "(jax.nn.dot_product_attention: cuDNN flash attention on NVIDIA GPUs)",
    )


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    """What a worker compiles (sizes) and serves at each (a step range); the stand-in worker takes them too."""
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="WIDTHxHEIGHT,... to compile; sdxl for SDXL's nine trained resolutions; each serves every step "
        "count from 1 to --max-steps (default: the model's native size)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=WorkerConfig.max_steps,
        help=f"the most denoising steps a request may ask for (1..{MAX_STEPS})",
    )
    parser.add_argument(
        "--default-steps",
        type=int,
        default=None,
        help=f"the steps of a request that names none (default {WorkerConfig.default_steps}, or --max-steps when less)",
    )
    parser.add_argument(
        "--engine",
        choices=["rows", "request"],
        default=WorkerConfig.engine,
        help="rows: fill the batch with the images of several requests, joining and leaving at step boundaries; "
        "request: one request at a time, each making the full --images-per-request batch",
    )
    parser.add_argument(
        "--rows-per-device",
        type=int,
        default=WorkerConfig.rows_per_device,
        help="--engine rows: the most rows (images) the batch holds per device",
    )
    parser.add_argument(
        "--batch-policy",
        choices=["fifo", "shortest"],
        default=WorkerConfig.batch_policy,
        help="--engine rows: which waiting request starts first when the batch is full: arrival order, or fewest "
        "remaining steps",
    )
    add_lora_arguments(parser)


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """The LoRA adapters a worker offers and how many it holds (docs/api.md: LoRA adapters)."""
    parser.add_argument(
        "--lora-dir",
        default=WorkerConfig.lora_dir,
        metavar="FOLDER|s3://BUCKET/PREFIX",
        help="offer the LoRA adapters in FOLDER, or under an S3 prefix every host can name (?endpoint=URL for an "
        "S3-compatible server, credentials from the environment): each NAME.safetensors is adapter NAME; listed "
        "again at every heartbeat, so adapters added later are offered without a restart (default: none; --engine "
        "rows only)",
    )
    parser.add_argument(
        "--lora-cache",
        type=int,
        default=WorkerConfig.lora_cache,
        help="adapters the devices hold at once (the pool's slots); others are loaded from --lora-dir when asked for",
    )
    parser.add_argument(
        "--max-loras",
        type=int,
        default=WorkerConfig.max_loras,
        help=f"the most adapters one request may name (1..{MAX_LORAS}, at most --lora-cache)",
    )
    parser.add_argument(
        "--lora-max-rank",
        type=int,
        default=WorkerConfig.lora_max_rank,
        help="the largest adapter rank the pool holds; an adapter of a larger rank is refused",
    )
    parser.add_argument(
        "--lora-max-mb",
        type=float,
        default=WorkerConfig.lora_max_mb,
        help="the largest adapter file read from --lora-dir, in MB; a larger one is refused",
    )


def _sizes(text: str) -> tuple[Size, ...]:
    try:
        return parse_sizes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_compile_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """JAX's persistent compilation cache (env SDXL_SERVE_COMPILE_CACHE) and its size bound."""
    default = os.environ.get("SDXL_SERVE_COMPILE_CACHE") or str(default_compile_cache_dir())
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
        default=WorkerConfig.compile_cache_max_bytes / _GB,
        help="size bound of the cache; least recently used executables go first",
    )


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The WorkerConfig the flags describe; ConfigError names a bad one."""
    extra = {"worker_id": args.worker_id} if args.worker_id else {}
    return WorkerConfig(
        redis_url=args.redis_url,
        allow_evicting_redis=args.allow_evicting_redis,
        model=args.model,
        revision=args.revision,
        model_config=args.model_config,
        sizes=args.sizes,
        max_steps=args.max_steps,
        default_steps=min(WorkerConfig.default_steps, args.max_steps)
        if args.default_steps is None
        else args.default_steps,
        images_per_request=args.images_per_request,
        engine=args.engine,
        rows_per_device=args.rows_per_device,
        batch_policy=args.batch_policy,
        key_prefix=args.key_prefix,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_ttl_s=args.heartbeat_ttl,
        png_compress_level=args.png_compress_level,
        watermark=args.watermark == "on",
        safety_checker=args.safety_checker,
        safety_replace=args.safety_replace,
        max_deliveries=args.max_deliveries,
        max_input_retries=args.max_input_retries,
        drain_timeout_s=args.drain_timeout,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        compile_cache_dir=args.compile_cache,
        compile_cache_max_bytes=int(args.compile_cache_max_gb * _GB),
        attention=args.attention,
        cpu_devices=args.cpu_devices,
        blob_store=args.blob_store,
        blob_sweep_interval_s=args.blob_sweep_interval,
        blob_store_timeout_s=args.blob_store_timeout,
        **lora_settings(args),
        **extra,
    )


def lora_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The WorkerConfig fields of `add_lora_arguments`' flags."""
    return {
        "lora_dir": args.lora_dir,
        "lora_cache": args.lora_cache,
        "max_loras": args.max_loras,
        "lora_max_rank": args.lora_max_rank,
        "lora_max_mb": args.lora_max_mb,
    }


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM; the process exits here, with the worker's status."""
    config = worker_config(args)
    use_cpu_devices(config.cpu_devices)
    from worker.checkpoints import CheckpointError
    from worker.runner import serve

    try:
        status = asyncio.run(serve(config, started_at=PROCESS_STARTED))
    except CheckpointError as exc:  # a wrong --model: one line naming it (sdxl_serve/cli.py prints it)
        raise ConfigError(str(exc)) from exc
    # Exit now: a compile still running on the device thread must not hold the process open.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(status)


def accelerator_expected() -> bool:
    """Whether JAX will run on something other than the CPU: JAX_PLATFORMS names another platform, or, unset,
    a GPU or TPU runtime for jax is installed."""
    platforms = {name.strip() for name in os.environ.get("JAX_PLATFORMS", "").split(",") if name.strip()}
    if platforms:
        return platforms != {"cpu"}
    return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_MODULES)


def use_cpu_devices(count: int) -> None:
    """Make JAX split the host CPU into `count` devices, scheduled for memory; JAX ignores this where an
    accelerator exists.

    XLA:CPU's concurrency-optimised scheduler keeps every bfloat16 weight's float32 copy alive at once: 10.3 GB
    of temporaries for one SDXL UNet step, 137 MB with it off.

    Where an accelerator may be used (`accelerator_expected`), XLA_FLAGS is left as it is: these flags are
    XLA:CPU's, and an accelerator plugin's own XLA parses the same variable and may refuse a flag it lacks.
    """
    if accelerator_expected():
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_DEVICES_FLAG not in flags:
        flags = f"{flags} {CPU_DEVICES_FLAG}={count}"
    if CPU_SCHEDULER_FLAG.split("=")[0] not in flags:
        flags = f"{flags} {CPU_SCHEDULER_FLAG}"
    os.environ["XLA_FLAGS"] = flags.strip()
