"""The worker's settings: one frozen dataclass, every default stated here once and read by worker/cli.py."""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from common.blobstore import REDIS as BLOBS_IN_REDIS
from common.blobstore import BlobStoreError, s3_location
from common.config import (
    DEFAULT_REDIS_URL,
    ConfigError,
    default_cache_dir,
    require,
    require_blob_store_url,
    require_redis_url,
)
from common.protocol import DEFAULT_MAX_STEPS, DEFAULT_STEPS, MAX_LORAS, MAX_STEPS, SDXL_RESOLUTIONS, Size
from common.rediskeys import DEFAULT_PREFIX

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
# The hub repository keeps its Flax weights on this ref, not on main.
DEFAULT_MODEL_REVISION = "refs/pr/95"
# How the UNet's attention layers compute (worker/attention.py).
Attention = Literal["einsum", "dot_product"]
ATTENTION: tuple[str, ...] = get_args(Attention)


def default_compile_cache_dir() -> Path:
    """Where JAX's persistent compilation cache lives unless configured: under the per-user cache."""
    return default_cache_dir() / "jax"


def default_worker_id() -> str:
    """host-pid-random: unique per process, readable in `/v1/workers` and logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def parse_sizes(text: str) -> tuple[Size, ...]:
    """Parse `--sizes`: comma-separated `WIDTHxHEIGHT`s, `sdxl` standing for SDXL's nine trained resolutions;
    order kept, repeats dropped."""
    sizes: list[Size] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "sdxl":
            sizes += [Size(width=w, height=h) for w, h in SDXL_RESOLUTIONS]
        elif part:
            sizes.append(Size.parse(part))
    if not sizes:
        raise ValueError("at least one size is needed, e.g. 1024x1024")
    return tuple(dict.fromkeys(sizes))


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker process. `sizes=None` means: the model's native size."""

    redis_url: str = DEFAULT_REDIS_URL
    allow_evicting_redis: bool = False  # run on a Redis whose maxmemory-policy may evict keys
    model: str = DEFAULT_MODEL
    revision: str | None = None
    # Configs and tokenizers of a single-file checkpoint (None: SDXL base's, from the hub).
    model_config: str | None = None
    sizes: tuple[Size, ...] | None = None
    # Every compiled size serves any step count from 1 to max_steps; default_steps is what a request that
    # names none gets (published for the gateway).
    max_steps: int = DEFAULT_MAX_STEPS
    default_steps: int = DEFAULT_STEPS
    # The most images one request may ask for (advertised as `images_per_request`).
    images_per_request: int = 4
    # How the device is scheduled (worker/engine.py): "rows", the engine, fills its batch with the rows of several
    # requests that join and leave at step boundaries; "request" runs one request at a time, as before the engine.
    engine: Literal["rows", "request"] = "rows"
    # The engine's batch: at most this many rows per device; each step runs the smallest compiled bucket (powers of
    # two of UNet samples per device, a guided row counting two) that holds its rows.
    rows_per_device: int = 4
    # Which waiting request starts first when the batch is full: arrival order, or fewest remaining steps.
    batch_policy: Literal["fifo", "shortest"] = "fifo"
    key_prefix: str = DEFAULT_PREFIX
    worker_id: str = dataclasses.field(default_factory=default_worker_id)
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: float = 10.0
    png_compress_level: int = 1
    watermark: bool = True  # the reference pipeline's invisible watermark on every image (worker/watermark.py)
    # The image safety checker's folder (config.json, model.safetensors; worker/safety.py), and what a flagged
    # image is delivered as.
    safety_checker: Path | None = None
    safety_replace: Literal["black", "blur"] = "black"
    claim_block_ms: int = 1000
    max_deliveries: int = 3
    # A job whose input images cannot be read (their store unreachable) is given back to be delivered again at
    # most this many times, apart from `max_deliveries`; the next such delivery dead-letters it.
    max_input_retries: int = 10
    drain_timeout_s: float = 120.0
    reclaim_interval_s: float = 1.0
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 0  # 0: any free port, published in the registry
    # None: compile at every start. See worker/compile_cache.py.
    compile_cache_dir: Path | None = dataclasses.field(default_factory=default_compile_cache_dir)
    compile_cache_max_bytes: int = 20 * 10**9
    attention: Attention = "einsum"
    # Not a setting of the worker itself: how many virtual devices JAX makes of a CPU without an accelerator.
    cpu_devices: int = 4
    # Where images are written (common/blobstore.py); a file store is swept of expired objects this often.
    blob_store: str = BLOBS_IN_REDIS
    blob_sweep_interval_s: float = 300.0
    # Whether it takes jobs with input images (image to image, inpainting; worker/inputs.py): only the row engine
    # makes images from them (`takes_images`). The stand-in worker sets it from its `--image-input`.
    image_input: bool = True
    # A job whose images the store refuses this long fails, and the worker stops claiming until it takes writes.
    blob_store_timeout_s: float = 60.0
    # LoRA adapters (worker/lora_source.py): where the `NAME.safetensors` files offered are (None: none), the
    # adapter slots of the device pool, the most one request may name, the largest rank the pool holds, and the
    # largest file read.
    lora_dir: str | None = None  # a folder, or s3://bucket/prefix?endpoint=...
    lora_cache: int = 8
    max_loras: int = 4
    lora_max_rank: int = 64
    lora_max_mb: float = 1024.0

    def __post_init__(self) -> None:
        require(self.images_per_request >= 1, "--images-per-request", "must be >= 1")
        require(self.rows_per_device >= 1, "--rows-per-device", "must be >= 1")
        require(self.cpu_devices >= 1, "--cpu-devices", "must be >= 1")
        require(0 <= self.png_compress_level <= 9, "--png-compress-level", "must be 0..9")
        require(self.safety_replace in ("black", "blur"), "--safety-replace", "must be black or blur")
        require(
            self.safety_checker is None or self.safety_checker.is_dir(),
            "--safety-checker",
            "must be a folder with config.json and model.safetensors",
        )
        require(self.heartbeat_interval_s > 0, "--heartbeat-interval", "must be > 0")
        require(
            self.heartbeat_ttl_s > 2 * self.heartbeat_interval_s,
            "--heartbeat-ttl",
            "must exceed twice the heartbeat interval",
        )
        require(self.sizes is None or len(self.sizes) > 0, "--sizes", "must name at least one size")
        require(1 <= self.max_steps <= MAX_STEPS, "--max-steps", f"must be 1..{MAX_STEPS}")
        require(1 <= self.default_steps <= self.max_steps, "--default-steps", "must be 1..--max-steps")
        require(self.max_deliveries >= 1, "--max-deliveries", "must be >= 1")
        require(self.max_input_retries >= 0, "--max-input-retries", "must be >= 0")
        require(self.drain_timeout_s > 0, "--drain-timeout", "must be > 0")
        require(0 <= self.metrics_port <= 65535, "--metrics-port", "must be 0..65535")
        require(self.compile_cache_max_bytes > 0, "--compile-cache-max-gb", "must be > 0")
        require(self.attention in ATTENTION, "--attention", f"must be one of {', '.join(ATTENTION)}")
        require_redis_url(self.redis_url)
        require_blob_store_url(self.blob_store)
        require(self.blob_sweep_interval_s > 0, "--blob-sweep-interval", "must be > 0")
        require(self.blob_store_timeout_s > 0, "--blob-store-timeout", "must be > 0")
        self._check_loras()

    def _check_loras(self) -> None:
        require(self.lora_cache >= 1, "--lora-cache", "must be >= 1")
        require(1 <= self.max_loras <= MAX_LORAS, "--max-loras", f"must be 1..{MAX_LORAS}")
        require(self.max_loras <= self.lora_cache, "--max-loras", "must be <= --lora-cache (one request's adapters)")
        require(self.lora_max_rank >= 1, "--lora-max-rank", "must be >= 1")
        require(self.lora_max_mb > 0, "--lora-max-mb", "must be > 0")
        self._check_lora_dir()

    def _check_lora_dir(self) -> None:
        where = self.lora_dir
        if where is None:
            return
        if where.startswith("s3://"):
            try:
                s3_location(where)
            except BlobStoreError as exc:
                raise ConfigError(f"--lora-dir {where.split('?', 1)[0]}: {exc}") from None
            return
        require(
            Path(where).is_dir() and os.access(where, os.R_OK | os.X_OK),
            "--lora-dir",
            f"{where} is not a readable folder: create it, or name the folder (or s3://bucket/prefix) of the "
            "NAME.safetensors adapters",
        )

    @property
    def takes_images(self) -> bool:
        """Whether it generates from input images, as advertised (WorkerInfo.image_input): the row engine's workers,
        unless `image_input` is off."""
        return self.image_input and self.engine == "rows"

    @property
    def offered_max_loras(self) -> int:
        """The most adapters one request may name, as advertised: 0 without --lora-dir, and under `--engine request`
        (only the row engine applies adapters)."""
        return self.max_loras if self.lora_dir is not None and self.engine == "rows" else 0

    @property
    def model_revision(self) -> str | None:
        """The revision to load: the one given, else the default model's Flax ref."""
        if self.revision is not None:
            return self.revision
        return DEFAULT_MODEL_REVISION if self.model == DEFAULT_MODEL else None
