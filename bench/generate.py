"""How fast the worker's own pipeline generates, and how close that is to what the device can do.

The pipeline is loaded and compiled in this process, exactly as a worker does, then called `--repeats`
times per variant; variants (attention paths) alternate call by call so each sees the same machine state:

    sdxl-serve bench generate --model sdxl-random --size 1024x1024 --steps 20 --images 1,4 \\
        --attention einsum,dot_product --repeats 10

With `--engine-rows R` it measures the engine (worker/engine.py) instead: R rows per device, each call one guided
request that fills them all (n = R x devices), the step executable of that bucket alone compiled (2R UNet samples
per device); `bench/gpu.sh` reports seconds per image at 1, 2, 4 and 8 rows per device this way.

A comma list of image counts measures each in turn, loading the model afresh for each (the batch is fixed
when a pipeline is made); each count's reports are printed as soon as it is measured, so a run cut short
keeps what it finished.

Reports compile seconds, latency per call (median, p90), images/s, seconds per image per device, and the
achieved TFLOP/s and fraction of the device's peak: the FLOPs are counted from the loaded model at the
shape measured (worker/flops.py), the peak is looked up by device kind (`--peak-tflops` overrides; an
unknown device gets no fraction rather than a guess). `--model sdxl-random` is SDXL base's architecture
with random weights made on the devices (worker/sdxl_arch.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from bench.host import describe
from common.config import ConfigError
from common.protocol import GenerationParams
from worker.config import ATTENTION, Attention

if TYPE_CHECKING:  # imported when measuring: the CLI builds its parser without loading JAX
    from common.protocol import Shape
    from worker.engine import RowEngine
    from worker.pipeline import SDXLPipeline

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5


@dataclass(frozen=True)
class GenerateConfig:
    """One run: the model, the shape and batch, the variants, how many calls."""

    model: str
    revision: str | None
    size: tuple[int, int] | None  # None: the model's native size
    steps: int
    images: int
    repeats: int
    attentions: tuple[Attention, ...]
    progress: bool
    peak_tflops: float | None
    negative_prompt: str = ""
    engine_rows: int | None = None  # measure the engine at this many rows per device

    def __post_init__(self) -> None:
        for name in ("steps", "images", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1 (got {getattr(self, name)})")
        if self.engine_rows is not None and self.engine_rows < 1:
            raise ConfigError(f"--engine-rows must be >= 1 (got {self.engine_rows})")
        unknown = [a for a in self.attentions if a not in ATTENTION]
        if unknown or not self.attentions or len(set(self.attentions)) != len(self.attentions):
            raise ConfigError(
                f"--attention must list distinct values of {', '.join(ATTENTION)} (got {','.join(self.attentions)})"
            )
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"--peak-tflops must be > 0 (got {self.peak_tflops})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="hub id, local diffusers directory, or sdxl-random (SDXL base, random weights)"
    )
    parser.add_argument("--revision", default=None)
    parser.add_argument("--size", type=parse_size, default=None, help="WIDTHxHEIGHT (default: the native size)")
    parser.add_argument("--steps", type=int, default=20)
    _add_batch_arguments(parser)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per variant, after the warm-up")
    parser.add_argument(
        "--attention",
        default="einsum",
        help="UNet attention: einsum (diffusers' own), dot_product (jax.nn.dot_product_attention: "
        "cuDNN flash attention on NVIDIA GPUs); a comma list measures each, alternating",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one dispatch per denoising step, as the worker with progress (default), or "
        "the whole loop in one executable",
    )
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's bf16 peak in TFLOP/s, per device (default: looked up by device kind)",
    )
    parser.add_argument(
        "--cpu-devices", type=int, default=4, help="virtual devices JAX makes of the CPU when there is no accelerator"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per variant")


def _add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """What one call makes: a request of `--images`, or the engine's full batch at `--engine-rows`."""
    parser.add_argument(
        "--images",
        type=parse_counts,
        default=(4,),
        help="images per call, split evenly over the devices; a comma list measures each in turn",
    )
    parser.add_argument(
        "--engine-rows",
        type=int,
        default=None,
        help="measure the engine instead: this many rows per device, each call one guided request filling them",
    )


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1024x1024 (got {text!r})")
    return int(width), int(height)


def parse_counts(text: str) -> tuple[int, ...]:
    """'1,4' -> (1, 4): distinct whole numbers, each at least 1."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) >= 1 for part in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"must be distinct whole numbers >= 1, comma separated (got {text!r})")
    return tuple(int(part) for part in parts)


def configs_from_args(args: argparse.Namespace) -> list[GenerateConfig]:
    """One run per image count, in the order given."""
    return [_config(args, images) for images in args.images]


def _config(args: argparse.Namespace, images: int) -> GenerateConfig:
    return GenerateConfig(
        model=args.model,
        revision=args.revision,
        size=args.size,
        steps=args.steps,
        images=images,
        repeats=args.repeats,
        attentions=cast("tuple[Attention, ...]", tuple(a.strip() for a in args.attention.split(","))),
        progress=args.progress,
        peak_tflops=args.peak_tflops,
        negative_prompt=args.negative_prompt,
        engine_rows=args.engine_rows,
    )


def main(args: argparse.Namespace) -> int:
    configs = configs_from_args(args)
    from worker.cli import use_cpu_devices

    use_cpu_devices(args.cpu_devices)
    for config in configs:
        reports = measure(config)
        print("\n".join(map(json.dumps, reports)) if args.json else table(reports) + "\n", flush=True)
    return 0


def measure(config: GenerateConfig) -> list[dict[str, Any]]:
    """Load, compile each variant, count FLOPs, time `repeats` calls per variant; one report per variant."""
    from common.protocol import DEFAULT_MAX_STEPS, Shape
    from worker.pipeline import PipelineOptions, SDXLPipeline

    if config.engine_rows is not None:
        return measure_engine(config)
    started = time.perf_counter()
    # As a worker: executables that serve any step count up to its default maximum (or the steps asked, if more).
    options = PipelineOptions(
        config.images, config.progress, config.attentions[0], max_steps=max(config.steps, DEFAULT_MAX_STEPS)
    )
    first = SDXLPipeline.load(config.model, config.revision, options)
    load_s = time.perf_counter() - started
    width, height = config.size or first.native_size
    shape = Shape(width=width, height=height, steps=config.steps)
    variants = {a: first.variant(attention=a) for a in config.attentions}
    compiled = {a: pipeline.compile(shape.size) for a, pipeline in variants.items()}
    counted_at = time.perf_counter()
    flops = first.flop_count(shape)
    count_s = time.perf_counter() - counted_at
    calls = _time_calls(variants, shape, config)
    common = _context(config, first, shape, load_s, count_s)
    peak = config.peak_tflops or _peak(first.device_kind)
    return [
        common
        | {
            "attention": a,
            "attention_impl": _impl(a),
            "lower_s": compiled[a].lower_s,
            "compile_s": compiled[a].compile_s,
            "warmup_s": compiled[a].warmup_s,
        }
        | summarize(calls[a].wall_s, flops.per_image, config.images, first.devices, peak)
        | {"host_cpu_s_p50": statistics.median(calls[a].cpu_s)}
        | {f"tflop_{k}": v for k, v in flops.as_tflop().items()}
        for a in variants
    ]


def measure_engine(config: GenerateConfig) -> list[dict[str, Any]]:
    """The engine at `engine_rows` rows per device: load, compile the full bucket, time `repeats` requests that
    fill the batch (attention variants alternating); one report per variant."""
    import jax

    from common.protocol import DEFAULT_MAX_STEPS, Shape
    from worker.engine import RowEngine
    from worker.pipeline import PipelineOptions, SDXLPipeline

    rows = cast(int, config.engine_rows)
    started = time.perf_counter()
    options = PipelineOptions(
        jax.local_device_count(), True, config.attentions[0], max_steps=max(config.steps, DEFAULT_MAX_STEPS)
    )
    first = SDXLPipeline.load(config.model, config.revision, options)
    load_s = time.perf_counter() - started
    width, height = config.size or first.native_size
    shape = Shape(width=width, height=height, steps=config.steps)
    engines = {a: RowEngine(first.variant(attention=a), rows, only_buckets=(2 * rows,)) for a in config.attentions}
    compiled = {a: engine.compile(shape.size) for a, engine in engines.items()}
    flops = first.flop_count(shape)
    calls = _time_requests(engines, shape, config)
    images = rows * first.devices
    context = _context(config, first, shape, load_s, 0.0) | {
        "measurement": "engine",
        "images": images,
        "images_per_device": rows,
        "engine_rows": rows,
    }
    peak = config.peak_tflops or _peak(first.device_kind)
    return [
        context
        | {"attention": a, "attention_impl": _impl(a), "compile_s": compiled[a].compile_s}
        | summarize(calls[a].wall_s, flops.per_image, images, first.devices, peak)
        | {"host_cpu_s_p50": statistics.median(calls[a].cpu_s)}
        for a in engines
    ]


def _time_requests(
    engines: dict[Attention, RowEngine], shape: Shape, config: GenerateConfig
) -> dict[Attention, _Calls]:
    """Time each request through the engine (admitted, stepped until its images are on the host), variants
    alternating, a new seed each round."""
    calls = {name: _Calls() for name in engines}
    for seed in range(config.repeats):
        for name, engine in engines.items():
            n = engine.rows_per_device * engine.pipeline.devices
            request = GenerationParams(
                prompt=PROMPT, negative_prompt=config.negative_prompt, guidance_scale=GUIDANCE, n=n
            )
            wall, cpu = time.perf_counter(), time.process_time()
            engine.admit(f"bench-{seed}", request.resolved(shape, seed), lambda step: None)
            while engine.busy:
                engine.step()
            calls[name].wall_s.append(time.perf_counter() - wall)
            calls[name].cpu_s.append(time.process_time() - cpu)
    return calls


@dataclass
class _Calls:
    """Per call: wall seconds, and CPU seconds of this process (all its threads). On a CPU backend the
    latter is the work done, whatever else the machine runs; on an accelerator, the host's share."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)


def _time_calls(
    variants: dict[Attention, SDXLPipeline], shape: Shape, config: GenerateConfig
) -> dict[Attention, _Calls]:
    """Time each `generate` call (images on the host), variants alternating, a new seed each round."""
    calls = {name: _Calls() for name in variants}
    request = GenerationParams(prompt=PROMPT, negative_prompt=config.negative_prompt, guidance_scale=GUIDANCE)
    for seed in range(config.repeats):
        for name, pipeline in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            pipeline.generate(request.resolved(shape, seed))
            calls[name].wall_s.append(time.perf_counter() - wall)
            calls[name].cpu_s.append(time.process_time() - cpu)
    return calls


def summarize(
    latencies: list[float], flop_per_image: float, images: int, devices: int, peak_tflops: float | None
) -> dict[str, Any]:
    """Throughput and efficiency from call latencies. `peak_tflops` is per device; None leaves out what
    depends on it."""
    from bench.quantiles import percentile  # nearest rank, as the other benchmarks report

    median = statistics.median(latencies)
    per_image_device = median * devices / images
    achieved = flop_per_image * images / median / 1e12
    report: dict[str, Any] = {
        "repeats": len(latencies),
        "latency_p50_s": median,
        "latency_p90_s": percentile(latencies, 0.9),
        "latency_min_s": min(latencies),
        "images_per_s": images / median,
        "s_per_image_per_device": per_image_device,
        "achieved_tflops": achieved,
        "achieved_tflops_per_device": achieved / devices,
    }
    if peak_tflops is not None:
        floor = flop_per_image / (peak_tflops * 1e12)
        report |= {
            "peak_tflops_per_device": peak_tflops,
            "peak_fraction": achieved / devices / peak_tflops,
            "floor_s_per_image": floor,
            "x_floor": per_image_device / floor,
        }
    return report


def _context(
    config: GenerateConfig, pipeline: SDXLPipeline, shape: Shape, load_s: float, count_s: float
) -> dict[str, Any]:
    return {
        "measurement": "generate",
        "machine": describe(),
        "device_kind": pipeline.device_kind,
        "devices": pipeline.devices,
        "model": config.model,
        "shape": str(shape),
        "images": config.images,
        "images_per_device": pipeline.per_device,
        "progress": config.progress,
        "negative_prompt": config.negative_prompt,
        "load_s": load_s,
        "flop_count_s": count_s,
    }


def _peak(device_kind: str) -> float | None:
    from worker.flops import peak_tflops

    return peak_tflops(device_kind)


def _impl(attention: str) -> str:
    from worker.attention import implementation

    return "einsum" if attention == "einsum" else f"dot_product:{implementation()}"


def table(reports: list[dict[str, Any]]) -> str:
    """What all variants share, then one column per variant for what differs."""
    keys = list(reports[0])
    shared = [k for k in keys if len(reports) > 1 and all(r.get(k) == reports[0][k] for r in reports)]
    varying = [k for k in keys if k not in shared]
    cells = [[_text(r.get(k)) for r in reports] for k in varying]
    widths = [max(len(row[i]) for row in cells) for i in range(len(reports))]
    width = max(map(len, keys))
    lines = [f"{k:<{width}}  {_text(reports[0][k])}" for k in shared] + ([""] if shared else [])
    lines += [
        f"{k:<{width}}  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
        for k, row in zip(varying, cells, strict=True)
    ]
    return "\n".join(lines)


def _text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
