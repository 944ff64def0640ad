"""SDXL on JAX: load once, replicate over the local devices, compile per image size, generate.

This module is pure: params and inputs in, arrays out. It does no I/O after loading and knows nothing of
Redis or HTTP. Prompts are tokenized on the host; token ids, PRNG keys, guidance and the scheduler's per-step
coefficients are array inputs of executables compiled ahead of time per image size (width and height are
static), so no request ever triggers a compile, whatever its step count (1 to `max_steps`) or scheduler.

The executables are `jax.jit` of `jax.shard_map` over a one-axis `Mesh` of the local devices (axis `data`):
the parameters and the per-request constants are replicated (`P()`), the images and everything per image (PRNG
keys, latents, conditioning) are split over `data`. Each device runs the same program on its share of the
images as `pmap` did (since JAX 0.8 `pmap` is itself implemented this way and in maintenance mode), so the
images are the same bit for bit.

The executables' inputs and outputs are named: `Prompt` (what begin starts from), `Schedule`, `Conditioning` and
`StepState` are frozen dataclasses registered as pytrees, and each field declares its own layout over the mesh
(replicated or per image); `layout` makes shard_map's specs from them. An input is added as a field, in one place,
and the step functions read it by name. Everything per image has the images on its leading axis, so that rows of
different requests could later share a batch, each with its own state.

A request's schedule is a table of one row of coefficients per step (worker/schedulers.py), computed on the
host, padded to `max_steps` rows and put on the devices once per request, with the guidance scale and the
initial noise's scale. With progress (the default) a size has three executables, begin, one denoising step and
finish, and the host runs the step executable once per step, handing it the step's number (kept on the devices,
made once), so it knows when each step is done. Without, one executable runs a loop whose length is an input.
Neither uses a host callback: an executable with one cannot be stored in JAX's persistent compilation cache,
and a worker that restarts must not compile again.

A guidance scale above 1 runs classifier-free guidance: the UNet on the negative and the positive
conditioning, two samples per image per step. At 1 or below, as in diffusers' PyTorch SDXL pipeline, there is
no guidance: the prompt alone, one UNet sample per image per step, by executables of their own (`guided`
False), compiled beside the guided ones for every size.

Each image gets its own PRNG key split from the request seed, and each device denoises its share of the
images, so a seed gives the same images on any worker whatever its device count. Each device encodes the
prompt once for its images; the negative prompt's conditioning is kept on the devices per distinct
negative prompt (it is a constant). The stepwise path donates the latents to each step.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from types import MappingProxyType
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from common.protocol import (
    DEFAULT_MAX_STEPS,
    DEFAULT_SCHEDULER,
    MAX_STEPS,
    REQUEST_KINDS,
    SCHEDULERS,
    GenerationParams,
    RequestKind,
    ResolvedParams,
    Scheduler,
    Shape,
    Size,
)
from worker.attention import DEFAULT_ATTENTION, Attention, traced_with
from worker.checkpoints import load_checkpoint
from worker.flat_params import FlatParams
from worker.flops import FlopCount, abstract_array, count_flops
from worker.img2img import INPAINTING_IN_CHANNELS, LATENT_CHANNELS
from worker.quiet import silence_flax_deprecation
from worker.schedulers import SchedulerConfig, model_input, scheduler_config, table, timestep, update
from worker.sdxl_arch import RANDOM_MODEL, SDXL_BASE, Architecture, components, random_host_params

silence_flax_deprecation()

from diffusers import FlaxStableDiffusionXLPipeline  # noqa: E402  (after the warning filter)

logger = logging.getLogger(__name__)

AXIS = "data"
_ALL = PartitionSpec()  # type: ignore[no-untyped-call]  # replicated: the parameters, the prompt's ids, the schedule
_IMAGES = PartitionSpec(AXIS)  # type: ignore[no-untyped-call]  # split over the devices by image: keys, latents, conditioning, pixels
_SPEC = "spec"  # the metadata key of a named input's layout over the mesh
# A named input declares each field's layout over the mesh (`field(metadata=...)`); the spec covers the field's
# whole value, whatever pytree it is.
_REPLICATED = MappingProxyType({_SPEC: _ALL})
_PER_IMAGE = MappingProxyType({_SPEC: _IMAGES})
StepCallback = Callable[[int], None]
# Distinct negative prompts whose conditioning stays on the devices (about 0.3 MB each per device).
NEGATIVE_CACHE_SIZE = 64
WARM_UP_GUIDANCE = 7.5


class PipelineError(Exception):
    """Base class of the pipeline's own errors."""


class UnsupportedShape(PipelineError):
    """A request for a size this pipeline has not compiled, or a step count outside 1..max_steps."""


class InvalidShape(PipelineError):
    """A configured size the model cannot produce (not a multiple of its downsampling factor)."""


class DeviceMismatch(PipelineError):
    """Images per request that the local devices cannot share evenly."""


_T = TypeVar("_T")


def layout(tree_type: type[_T]) -> _T:
    """The layout of a named input over the mesh: an instance of `tree_type` holding each field's spec, which
    `jax.shard_map` takes as the prefix of an argument or result of that type."""
    specs: dict[str, Any] = {}
    for f in fields(cast(Any, tree_type)):
        if _SPEC not in f.metadata:
            raise TypeError(
                f"{tree_type.__name__}.{f.name} declares no layout: field(metadata=_REPLICATED or _PER_IMAGE)"
            )
        specs[f.name] = f.metadata[_SPEC]
    return tree_type(**specs)


def _layout_of(argument: Any) -> Any:
    """An executable argument's layout: a named input's own, declared per field; the parameters (a dict) and a
    scalar (a step's number) are replicated. A bare array is refused: whether it is split by image is a
    declaration, not a default."""
    if isinstance(argument, Mapping):  # the parameters (`FlatParams` is a dataclass too)
        return _ALL
    if is_dataclass(argument) and not isinstance(argument, type):
        return layout(type(argument))
    if np.ndim(argument) == 0:
        return _ALL
    raise TypeError(f"an executable argument of shape {np.shape(argument)} must be a named input (a field of one)")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Text:
    """A prompt's text conditioning: the encoders' hidden states (`context`) and the pooled embedding, one row per
    prompt as encoded, or per image once shared by them."""

    context: jax.Array
    pooled: jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Prompt:
    """What a request's conditioning and initial noise are made from, on the devices."""

    # Both tokenizers' ids, [1, 2, max_length]: each device encodes the prompt once for its images.
    ids: jax.Array = field(metadata=_REPLICATED)
    # With guidance, the negative prompt's conditioning (encoded once per distinct negative prompt); None without.
    negative: Text | None = field(metadata=_REPLICATED)
    keys: jax.Array = field(metadata=_PER_IMAGE)  # one PRNG key per image


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Schedule:
    """A request's schedule, put on the devices once per request."""

    table: jax.Array = field(metadata=_REPLICATED)  # one row of coefficients per step, padded to max_steps rows
    init_noise_sigma: jax.Array = field(metadata=_REPLICATED)  # the initial noise's scale
    guidance: jax.Array = field(metadata=_REPLICATED)  # the classifier-free guidance scale (unused without)
    steps: jax.Array = field(metadata=_REPLICATED)  # the fused loop's length (the host counts stepwise steps)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on, one row per image: the prompt's text, with guidance the negative
    prompt's, and SDXL's micro-conditioning (time ids)."""

    prompt: Text = field(metadata=_PER_IMAGE)
    negative: Text | None = field(metadata=_PER_IMAGE)
    time_ids: jax.Array = field(metadata=_PER_IMAGE)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepState:
    """What a denoising step carries to the next, one row per image: the latents and the denoised estimate (the
    previous step's, which a multistep scheduler reads)."""

    latents: jax.Array = field(metadata=_PER_IMAGE)
    denoised: jax.Array = field(metadata=_PER_IMAGE)


@dataclass(frozen=True)
class _Variant:
    """What an executable is specialized on, bound before tracing: the model's modules, the image size (static),
    and whether it runs classifier-free guidance."""

    pipe: FlaxStableDiffusionXLPipeline
    size: Size
    cfg: bool


@dataclass
class _Clock:
    """Lowering and compile time summed over a size's executables."""

    lower_s: float = 0.0
    compile_s: float = 0.0

    def compile(self, fn: Any, *args: Any) -> Any:
        started = time.perf_counter()
        lowered = fn.lower(*args)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        self.lower_s += lowered_at - started
        self.compile_s += time.perf_counter() - lowered_at
        return compiled


@dataclass(frozen=True)
class _StepParams:
    """The parameters each stepwise executable reads, and no others (the same device arrays, not copies).

    An executable's every input is flattened, checked and handed to each device at each call: SDXL has
    about 2,500 parameter arrays, most of them the UNet's, and a denoising step needs only those, as one flat
    tuple (`FlatParams`: no nested dicts to walk at each call).
    """

    begin: FlatParams
    step: FlatParams
    finish: FlatParams

    @classmethod
    def of(cls, params: dict[str, Any]) -> _StepParams:
        def pick(*names: str) -> FlatParams:
            return FlatParams.of({name: params[name] for name in names})

        return cls(begin=pick("text_encoder", "text_encoder_2"), step=pick("unet"), finish=pick("vae"))


@dataclass(frozen=True)
class _Stepwise:
    """A size's executables when progress is reported: begin, one step (run once per step), finish."""

    begin: Any
    step: Any
    finish: Any


class _NegativeConditioning:
    """The negative prompt's conditioning on the devices, encoded once per distinct negative prompt.

    Most requests share a few negative prompts (most often none), so their text encoding is a constant:
    it is computed by an executable of its own on a miss and kept, least recently used out first.
    """

    def __init__(self, encode: Any, capacity: int = NEGATIVE_CACHE_SIZE) -> None:
        self._encode_fn = encode
        self._encode: Any = None
        self._cache: OrderedDict[str, Text] = OrderedDict()
        self.capacity = capacity

    def compile(self, clock: _Clock, params: dict[str, Any], ids: jax.Array, scale: jax.Array) -> None:
        if self._encode is None:
            self._encode = clock.compile(self._encode_fn, params, ids, scale)

    def encode(self, params: dict[str, Any], ids: jax.Array, scale: jax.Array) -> Text:
        """Text conditioning of `ids` times `scale`, uncached (compiled first)."""
        assert self._encode is not None, "compile the encoder first"
        encoded: Text = self._encode(params, ids, scale)
        return encoded

    def get(self, negative_prompt: str, params: dict[str, Any], ids: Callable[[], jax.Array], scale: jax.Array) -> Text:
        """The conditioning of `negative_prompt`, replicated; `ids` tokenizes it, on a miss only."""
        cached = self._cache.get(negative_prompt)
        if cached is None:
            cached = self._encode(params, ids(), scale)
            self._cache[negative_prompt] = cached
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        self._cache.move_to_end(negative_prompt)
        return cached

    def __len__(self) -> int:
        return len(self._cache)


def _reached(marker: jax.Array, step: int, on_step: StepCallback | None) -> None:
    marker.block_until_ready()
    if on_step is not None:
        on_step(step)


def guided(guidance_scale: float) -> bool:
    """Whether a request runs classifier-free guidance (diffusers: `guidance_scale > 1`)."""
    return guidance_scale > 1.0


@dataclass(frozen=True)
class CompileTimings:
    """Seconds spent tracing and lowering, compiling, and running each executable once (warm-up)."""

    lower_s: float
    compile_s: float
    warmup_s: float


@dataclass(frozen=True)
class PipelineOptions:
    """How a loaded model is served: images per request (a multiple of the local device count), whether each
    denoising step is its own dispatch (progress), the UNet's attention (worker/attention.py), and the most
    steps a request may ask for."""

    images_per_request: int = 4
    report_progress: bool = True
    attention: Attention = DEFAULT_ATTENTION
    max_steps: int = DEFAULT_MAX_STEPS


class SDXLPipeline:
    """A loaded, replicated SDXL pipeline with its executables compiled per image size.

    Each compiled size serves any step count from 1 to `max_steps` and every scheduler of `SCHEDULERS`. With
    `report_progress`, each denoising step is its own dispatch and `generate` passes each finished step number
    to its `on_step`; without, the loop runs inside one executable. `attention` picks the computation of the
    UNet's attention layers (worker/attention.py).
    """

    def __init__(self, pipe: FlaxStableDiffusionXLPipeline, params: dict[str, Any], options: PipelineOptions) -> None:
        """`params` are already on the devices, replicated (see `_replicate`); the schedule is the scheduler
        config's of `pipe` (worker/schedulers.py)."""
        images_per_request, max_steps = options.images_per_request, options.max_steps
        self.devices = jax.local_device_count()
        if images_per_request % self.devices:
            raise DeviceMismatch(
                f"{images_per_request} images per request cannot be split evenly over "
                f"{self.devices} devices; use a multiple of {self.devices}"
            )
        if not 1 <= max_steps <= MAX_STEPS:
            raise PipelineError(f"max_steps must be 1..{MAX_STEPS} (got {max_steps})")
        self.images_per_request = images_per_request
        self.per_device = images_per_request // self.devices
        self.max_steps = max_steps
        self._pipe = pipe
        self._scheduler: SchedulerConfig = scheduler_config(pipe.scheduler.config)
        self._params = params
        self._step_params = _StepParams.of(self._params)
        self._flat_params = FlatParams.of(self._params)  # the fused executables' (the same arrays)
        self._compiled: dict[Size, dict[bool, Any]] = {}  # size -> guided or not -> executables
        self._mesh = Mesh(np.array(jax.local_devices()), (AXIS,))
        encode_negative = self._sharded(functools.partial(_encode_negative, pipe), _ALL, _ALL)
        self._negatives = _NegativeConditioning(encode_negative)  # shared by variants: it does not depend on them
        # The numbers 0 to max_steps on every device, made once: the host hands the step executable its step's
        # number (0 to max_steps - 1), and the fused loop its step count (1 to max_steps).
        self._numbers = [self._put(np.int32(i)) for i in range(max_steps + 1)]
        self.report_progress = options.report_progress
        self.attention = options.attention

    @classmethod
    def load(
        cls, model: str, revision: str | None, options: PipelineOptions, model_config: str | None = None
    ) -> SDXLPipeline:
        """Load from a hub id, a local folder or a single-file checkpoint (worker/checkpoints.py); params in
        bfloat16. `model_config` gives a single file its configs and tokenizers.

        `sdxl-random` is SDXL base's architecture with random weights made on the devices (no download).
        """
        if model == RANDOM_MODEL:
            return cls.random(SDXL_BASE, options)
        pipe, params = load_checkpoint(model, revision, model_config)
        params.pop("scheduler")  # the schedule is computed on the host from the scheduler's config
        return cls(pipe, _replicate(params), options)

    @classmethod
    def random(cls, arch: Architecture, options: PipelineOptions, seed: int = 0) -> SDXLPipeline:
        """The architecture `arch` with random bfloat16 weights drawn on the host (worker/sdxl_arch.py)."""
        parts = components(arch)
        pipe = FlaxStableDiffusionXLPipeline(**parts, dtype=jnp.bfloat16)
        # Each array goes to the devices as soon as it is drawn: the host never holds all the weights.
        params = random_host_params(parts, seed, place=_replicate)
        return cls(pipe, params, options)

    def variant(self, *, report_progress: bool | None = None, attention: Attention | None = None) -> SDXLPipeline:
        """The same loaded model and device params, with its own executables (for A/B benchmarks)."""
        other = copy.copy(self)
        other._compiled = {}
        if report_progress is not None:
            other.report_progress = report_progress
        if attention is not None:
            other.attention = attention
        return other

    def flop_count(self, shape: Shape, guidance: bool = True) -> FlopCount:
        """Floating-point operations of one image at `shape`, with or without classifier-free guidance, counted
        from this model (worker/flops.py)."""
        one_device = jax.tree_util.tree_map(lambda x: abstract_array(x.shape, x.dtype), self._params)
        return count_flops(self._pipe, one_device, shape, guidance)

    def unet_evaluations(self, shape: Shape, guidance_scale: float) -> int:
        """UNet evaluations per image of a request at `shape`, measured: XLA's FLOP count of the compiled
        denoising step over one UNet evaluation's (worker/flops.py), per image, times the steps.

        Stepwise executables only: XLA counts a loop's body once, so a fused executable's count cannot say.
        """
        compiled = self._compiled[shape.size][guided(guidance_scale)]
        if not isinstance(compiled, _Stepwise):
            raise PipelineError("UNet evaluations are counted on the stepwise executables (report_progress)")
        step_flops = _costs(compiled.step)["flops"]
        per_image = step_flops / self.per_device / self.flop_count(shape).unet_per_sample
        return round(per_image) * shape.steps

    def executable_costs(self, size: Size, guidance: bool = True) -> dict[str, dict[str, float]]:
        """XLA's cost analysis (`flops`, `bytes accessed`, `transcendentals`) of each executable of a compiled
        size, per device: `begin`, `step` and `finish` when stepwise, `fused` else (whose loop body XLA counts
        once, so that begin, one step and finish add up to it when the step does no more than the loop's body)."""
        compiled = self._compiled[size][guidance]
        named = vars(compiled) if isinstance(compiled, _Stepwise) else {"fused": compiled}
        return {name: _costs(executable) for name, executable in named.items()}

    @property
    def device_kind(self) -> str:
        return str(jax.local_devices()[0].device_kind)

    @property
    def native_size(self) -> tuple[int, int]:
        """The (width, height) the UNet was trained at: 1024x1024 for SDXL base."""
        side = int(self._pipe.unet.config.sample_size) * self._pipe.vae_scale_factor
        return side, side

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (VAE and UNet downsampling)."""
        unet_levels = len(self._pipe.unet.config.block_out_channels) - 1
        return int(self._pipe.vae_scale_factor * 2**unet_levels)

    @property
    def schedulers(self) -> tuple[str, ...]:
        """The schedulers a request may name (worker/schedulers.py): all of them, by the same executables."""
        return SCHEDULERS

    @property
    def request_kinds(self) -> tuple[RequestKind, ...]:
        """The kinds of request the model runs: inpainting only for an inpainting UNet (its 9 input channels take a
        mask and a masked image at every step: worker/inpainting_model.py), else all three."""
        if int(self._pipe.unet.config.in_channels) == INPAINTING_IN_CHANNELS:
            return ("inpainting",)
        return REQUEST_KINDS

    def default_sizes(self) -> tuple[Size, ...]:
        """The native size."""
        width, height = self.native_size
        return (Size(width=width, height=height),)

    @property
    def sizes(self) -> tuple[Size, ...]:
        """The sizes compiled so far, in compile order."""
        return tuple(self._compiled)

    def compile(self, size: Size) -> CompileTimings:
        """Compile the executables for a size ahead of time and run them once (at one step)."""
        self.check_size(size)
        clock = _Clock()
        self.compile_encoder(clock)
        variants: dict[bool, Any] = {}
        finish = None  # decoding is the same with or without guidance: one executable for both
        for cfg in (True, False):
            variant = _Variant(self._pipe, size, cfg)
            if self.report_progress:
                variants[cfg] = self._compile_stepwise(variant, clock, finish)
                finish = variants[cfg].finish
            else:
                inputs = self._warm_up_inputs(cfg)
                variants[cfg] = self._compile(
                    clock, self._traced(_generate, variant), _IMAGES, self._flat_params, *inputs
                )
        self._compiled[size] = variants
        warm_started = time.perf_counter()
        for cfg in (True, False):
            self._warm_up(size, cfg)
        timings = CompileTimings(clock.lower_s, clock.compile_s, time.perf_counter() - warm_started)
        logger.info(
            "compiled %s (1 to %d steps): lower %.2fs, compile %.2fs, warm-up %.2fs",
            *(size, self.max_steps, timings.lower_s, timings.compile_s, timings.warmup_s),
        )
        return timings

    def _compile_stepwise(self, variant: _Variant, clock: _Clock, finish: Any = None) -> _Stepwise:
        """Three executables: begin (text and noise), one denoising step (the step's number, its row of the
        table, is an input, so one executable serves every step of every schedule), finish (decode; `finish`
        when already compiled). Compiling the step needs the shapes of what begin makes, so begin runs once."""
        params = self._step_params
        prompt, schedule = self._warm_up_inputs(variant.cfg)
        begin_out = (layout(StepState), layout(Conditioning))
        begin = self._compile(clock, self._traced(_begin, variant), begin_out, params.begin, prompt, schedule)
        state, conditioning = begin(params.begin, prompt, schedule)
        # The state is donated: each step writes its latents and denoised estimate over those it was given.
        step = self._compile(
            clock,
            self._traced(_step, variant),
            (layout(StepState), _IMAGES),
            *(params.step, state, conditioning, schedule, self._numbers[0]),
            donate=(1,),
        )
        if finish is None:
            decode = functools.partial(_decode, self._pipe)
            finish = self._compile(clock, decode, _IMAGES, params.finish, state)
        return _Stepwise(begin=begin, step=step, finish=finish)

    def _warm_up_inputs(self, cfg: bool) -> tuple[Prompt, Schedule]:
        """A request's inputs to compile a variant with (the values do not matter, the shapes do)."""
        prompt = self._prompt("warm-up", "", 0, WARM_UP_GUIDANCE if cfg else 0.0)
        return prompt, self._schedule(DEFAULT_SCHEDULER, 1, WARM_UP_GUIDANCE)

    def _compile(
        self, clock: _Clock, fn: Callable[..., Any], out_specs: Any, *args: Any, donate: tuple[int, ...] = ()
    ) -> Any:
        """`fn` over the mesh (`_sharded`), compiled for `args`, each laid out as its type declares (`layout`)."""
        in_specs = tuple(_layout_of(argument) for argument in args)
        return clock.compile(self._sharded(fn, in_specs, out_specs, donate), *args)

    def _sharded(self, fn: Callable[..., Any], in_specs: Any, out_specs: Any, donate: tuple[int, ...] = ()) -> Any:
        """`fn`, written for one device's share, as one program over the mesh: each argument and result replicated
        (`_ALL`) or split over the images (`_IMAGES`), as the specs say (a spec covers a whole pytree argument)."""
        mapped = jax.shard_map(fn, mesh=self._mesh, in_specs=in_specs, out_specs=out_specs)
        return jax.jit(mapped, donate_argnums=donate)

    def _put(self, value: Any, spec: PartitionSpec = _ALL) -> jax.Array:
        """A host value on the devices: replicated, or split over the images with `_IMAGES`."""
        put: jax.Array = jax.device_put(value, NamedSharding(self._mesh, spec))
        return put

    def _traced(self, fn: Callable[..., Any], variant: _Variant) -> Callable[..., Any]:
        """`fn` bound to a variant of this model (size, guidance), its UNet attention computed as
        `self.attention` says."""
        return traced_with(self.attention, functools.partial(fn, variant))

    def generate(self, params: ResolvedParams, on_step: StepCallback | None = None) -> np.ndarray:
        """Generate `images_per_request` images for a job's parameters; returns uint8 [images, height, width, 3].

        With `report_progress`, `on_step(n)` is called on this thread as denoising step n (1-based) is done.
        UnsupportedShape: the size is not compiled, or the step count is outside 1..max_steps; PipelineError:
        an unknown scheduler.
        """
        shape = params.shape
        variants = self._compiled.get(shape.size)
        if variants is None:
            compiled = ", ".join(map(str, self._compiled)) or "none"
            raise UnsupportedShape(f"size {shape.size} is not compiled here; compiled: {compiled}")
        if not 1 <= shape.steps <= self.max_steps:
            raise UnsupportedShape(f"{shape.steps} steps: this worker runs 1 to {self.max_steps}")
        schedule = self._schedule(params.scheduler, shape.steps, params.guidance_scale)
        compiled = variants[guided(params.guidance_scale)]
        inputs = self._prompt(params.prompt, params.negative_prompt, params.seed, params.guidance_scale)
        if isinstance(compiled, _Stepwise):
            images = self._run_stepwise(compiled, inputs, schedule, shape.steps, on_step)
        else:
            images = np.asarray(compiled(self._flat_params, inputs, schedule))
        return images.reshape(self.images_per_request, shape.height, shape.width, 3)

    def _warm_up(self, size: Size, cfg: bool) -> None:
        """Run a variant's executables once (one step), so the first request pays no first-run costs
        (allocation, loading the executables onto the devices)."""
        request = GenerationParams(prompt="warm-up", guidance_scale=WARM_UP_GUIDANCE if cfg else 0.0)
        self.generate(request.resolved(Shape(width=size.width, height=size.height, steps=1), seed=0))

    def _schedule(self, scheduler: str, steps: int, guidance_scale: float) -> Schedule:
        """The request's schedule, put on the devices (one upload per array, once per request)."""
        if scheduler not in SCHEDULERS:
            raise PipelineError(f"unknown scheduler {scheduler!r}; this worker runs {', '.join(self.schedulers)}")
        coefficients = table(cast(Scheduler, scheduler), steps, self._scheduler)
        return Schedule(
            table=self._put(coefficients.padded(self.max_steps)),
            init_noise_sigma=self._put(np.float32(coefficients.init_noise_sigma)),
            guidance=self._put(np.float32(guidance_scale)),
            steps=self._numbers[steps],
        )

    def _run_stepwise(
        self, stepwise: _Stepwise, prompt: Prompt, schedule: Schedule, steps: int, on_step: StepCallback | None
    ) -> np.ndarray:
        """Dispatch the steps one after the other; report step n once its output exists.

        Dispatch is asynchronous: step n+1 is queued before waiting on step n, so the devices never wait
        for the host, and a report is at most one step late.
        """
        params = self._step_params
        state, conditioning = stepwise.begin(params.begin, prompt, schedule)
        done: jax.Array | None = None
        for number, index in enumerate(self._numbers[:steps]):
            state, marker = stepwise.step(params.step, state, conditioning, schedule, index)
            if done is not None:
                _reached(done, number, on_step)
            done = marker
        images = stepwise.finish(params.finish, state)
        assert done is not None, "a request has at least one step"
        _reached(done, steps, on_step)
        return np.asarray(images)

    def _prompt(self, prompt: str, negative_prompt: str, seed: int, guidance_scale: float) -> Prompt:
        """Prompt ids (each device encodes the prompt once for its images), the negative conditioning with
        guidance or none without, one PRNG key per image."""
        negative = self.negative_conditioning(negative_prompt) if guided(guidance_scale) else None
        keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), self.images_per_request))
        return Prompt(ids=self._put(self._tokenize(prompt)[None]), negative=negative, keys=self._put(keys, _IMAGES))

    def encode_prompt(self, prompt: str) -> Text:
        """A prompt's text conditioning, batch 1, replicated: encoded once by the executable that encodes
        negative prompts (scale 1), compiled with any size."""
        encoded: Text = self._negatives.encode(self._params, self._negative_ids(prompt), self._put(np.float32(1.0)))
        return encoded

    def negative_conditioning(self, negative_prompt: str) -> Text:
        """A negative prompt's text conditioning, batch 1, replicated, from the cache of distinct negative prompts."""
        return self._negatives.get(
            negative_prompt,
            self._params,
            functools.partial(self._negative_ids, negative_prompt),
            self._negative_scale(negative_prompt),
        )

    def check_size(self, size: Size) -> None:
        """InvalidShape unless the model can produce `size` (multiples of `size_multiple`)."""
        multiple = self.size_multiple
        if size.width % multiple or size.height % multiple:
            raise InvalidShape(f"size {size}: width and height must be multiples of {multiple}")

    def compile_encoder(self, clock: _Clock) -> None:
        """Compile the text encoder's executable (batch 1, replicated) unless it is."""
        self._negatives.compile(clock, self._params, self._negative_ids(""), self._negative_scale(""))

    def _negative_ids(self, negative_prompt: str) -> jax.Array:
        return self._put(self._tokenize(negative_prompt)[None])

    def _negative_scale(self, negative_prompt: str) -> jax.Array:
        # SDXL conditions on zeros, not on the encoding of "", when there is no negative prompt.
        return self._put(np.float32(1.0 if negative_prompt else 0.0))

    @property
    def _max_length(self) -> int:
        return int(self._pipe.tokenizer.model_max_length)

    def _tokenize(self, text: str) -> np.ndarray:
        """Token ids of both tokenizers, [2, max_length]; long prompts are truncated as diffusers does."""
        ids = [
            tok(
                text, padding="max_length", max_length=self._max_length, truncation=True, return_tensors="np"
            ).input_ids[0]
            for tok in (self._pipe.tokenizer, self._pipe.tokenizer_2)
        ]
        return np.stack(ids).astype(np.int32)


def _costs(executable: Any) -> dict[str, float]:
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {key: float(cost.get(key, 0.0)) for key in ("flops", "bytes accessed", "transcendentals")}


def _replicate(tree: Any) -> Any:
    """Put one copy of every leaf on every local device (`P()` over the mesh of them all).

    Each device receives its copy straight from the host; nothing is compiled (stacking on a device
    would compile one op per parameter shape, minutes for SDXL).
    """
    sharding = NamedSharding(Mesh(np.array(jax.local_devices()), (AXIS,)), _ALL)
    return jax.tree_util.tree_map(lambda leaf: jax.device_put(np.asarray(leaf), sharding), tree)


def _generate(variant: _Variant, params: Mapping[str, Any], prompt: Prompt, schedule: Schedule) -> jax.Array:
    """One device's share in one executable: encode, denoise `schedule.steps` times (a runtime value), decode."""
    state, conditioning = _begin(variant, params, prompt, schedule)

    def step(i: jax.Array, carry: StepState) -> StepState:
        return _denoise(variant, params, carry, conditioning, schedule, i)

    state = jax.lax.fori_loop(0, schedule.steps, step, state)
    return _decode(variant.pipe, params, state)


def _begin(
    variant: _Variant, params: Mapping[str, Any], prompt: Prompt, schedule: Schedule
) -> tuple[StepState, Conditioning]:
    """Text conditioning (with guidance, the negative prompt's too), the initial noise scaled for the schedule,
    and a zero denoised estimate (the previous step's, for the first step of a multistep scheduler)."""
    assert variant.cfg == (prompt.negative is not None), "the negative conditioning comes with guidance, and only then"
    conditioning = _conditioning(variant, params, prompt)
    latents = _initial_latents(variant.pipe, prompt.keys, variant.size)
    return StepState(latents * schedule.init_noise_sigma, jnp.zeros_like(latents)), conditioning


def _step(
    variant: _Variant,
    params: Mapping[str, Any],
    state: StepState,
    conditioning: Conditioning,
    schedule: Schedule,
    i: jax.Array,
) -> tuple[StepState, jax.Array]:
    """Denoising step `i` (row `i` of the schedule's table) as an executable of its own.

    Returns the new state, and one element of the latents per device: a marker that exists once the step is
    done, to wait on after the state itself has been donated to the next step.
    """
    state = _denoise(variant, params, state, conditioning, schedule, i)
    return state, state.latents[:1, 0, 0, 0]


def _denoise(
    variant: _Variant,
    params: Mapping[str, Any],
    state: StepState,
    conditioning: Conditioning,
    schedule: Schedule,
    i: jax.Array,
) -> StepState:
    """Step `i` of the schedule, with classifier-free guidance when the variant runs it: the UNet on the
    negative and the positive conditioning, the negative half first. Without, the UNet sees each latent once,
    conditioned on the prompt."""
    row, latents = schedule.table[i], state.latents
    scaled = model_input(jnp.concatenate([latents, latents]) if variant.cfg else latents, row)
    text, time_ids = _unet_conditioning(conditioning)
    noise = unet_noise(
        variant.pipe, params, scaled, jnp.broadcast_to(timestep(row), (scaled.shape[0],)), text, time_ids
    )
    if variant.cfg:
        uncond, cond = jnp.split(noise, 2)
        noise = uncond + schedule.guidance * (cond - uncond)
    return StepState(*update(latents, noise, state.denoised, row))


def unet_noise(
    pipe: FlaxStableDiffusionXLPipeline,
    params: Mapping[str, Any],
    scaled: jax.Array,
    timesteps: jax.Array,
    text: Text,
    time_ids: jax.Array,
) -> jax.Array:
    """The UNet's noise prediction in float32, one per sample: the model inputs `scaled`, one timestep per sample,
    each sample's text conditioning and time ids (the request-at-a-time steps and the engine's share it)."""
    noise: jax.Array = pipe.unet.apply(
        {"params": params["unet"]},
        scaled,
        timesteps,
        encoder_hidden_states=text.context,
        added_cond_kwargs={"text_embeds": text.pooled, "time_ids": time_ids},
    ).sample.astype(jnp.float32)
    return noise


def _unet_conditioning(conditioning: Conditioning) -> tuple[Text, jax.Array]:
    """The UNet's batch of conditioning: with guidance, the negative rows, then the positive ones."""
    if conditioning.negative is None:
        return conditioning.prompt, conditioning.time_ids
    both = jax.tree_util.tree_map(lambda n, p: jnp.concatenate([n, p]), conditioning.negative, conditioning.prompt)
    return both, jnp.concatenate([conditioning.time_ids] * 2)


def _encode_negative(
    pipe: FlaxStableDiffusionXLPipeline, params: Mapping[str, Any], negative_ids: jax.Array, scale: jax.Array
) -> Text:
    """The negative prompt's text conditioning, times `scale` (0: no negative prompt)."""
    context, pooled = pipe.get_embeddings(negative_ids, params)
    return Text(context * scale.astype(context.dtype), pooled * scale.astype(pooled.dtype))


def _conditioning(variant: _Variant, params: Mapping[str, Any], prompt: Prompt) -> Conditioning:
    """Text conditioning and SDXL's time ids for each image; the prompt is encoded once and shared by the
    images, as the negative prompt's encoding is."""
    context, pooled = variant.pipe.get_embeddings(prompt.ids, params)
    images = prompt.keys.shape[0]

    def per_image(text: Text) -> Text:
        shared: Text = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (images, *x.shape[1:])), text)
        return shared

    negative = None if prompt.negative is None else per_image(prompt.negative)
    time_ids = jnp.array([time_ids_of(variant.size)] * images, dtype=context.dtype)
    return Conditioning(prompt=per_image(Text(context, pooled)), negative=negative, time_ids=time_ids)


def time_ids_of(size: Size) -> list[int]:
    """SDXL's micro-conditioning: original size, crop top-left, target size, each (height, width)."""
    return [size.height, size.width, 0, 0, size.height, size.width]


def _initial_latents(pipe: FlaxStableDiffusionXLPipeline, keys: jax.Array, size: Size) -> jax.Array:
    """Gaussian latents, one draw per image key."""
    factor = pipe.vae_scale_factor
    # The VAE's channels, not the UNet's input channels: an inpainting UNet takes 9 (latents, mask, masked image).
    latent_shape = (LATENT_CHANNELS, size.height // factor, size.width // factor)
    return jax.vmap(lambda key: jax.random.normal(key, latent_shape, dtype=jnp.float32))(keys)


def _decode(pipe: FlaxStableDiffusionXLPipeline, params: Mapping[str, Any], state: StepState) -> jax.Array:
    """The last step's latents through the VAE, quantized on the device: a quarter of the bytes cross to the
    host."""
    latents = state.latents / pipe.vae.config.scaling_factor
    images = pipe.vae.apply({"params": params["vae"]}, latents, method=pipe.vae.decode).sample
    images = (images.astype(jnp.float32) / 2 + 0.5).clip(0.0, 1.0)
    return jnp.round(images * 255).astype(jnp.uint8).transpose(0, 2, 3, 1)
