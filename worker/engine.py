"""The engine: one batch of rows (images) from several requests, denoised together, rows joining and leaving at
step boundaries, with static shapes and no compile after warm-up.

Each image a request asks for is a row with its own state on the devices, in a slot of its size's pool: latents,
the denoised estimate (a multistep scheduler reads the previous step's), its request's text conditioning (prompt
and negative prompt), its schedule (a table of per-step coefficients padded to `max_steps` rows, any scheduler,
any step count), its step index and its guidance scale. A pool has `rows_per_device` slots per device, split over
the devices on the leading axis as the request-at-a-time pipeline splits a request's images.

One denoising step runs the UNet on the active samples of a pool: a guided row (guidance above 1) needs two,
unconditional and conditional, an unguided row one. The host lays the samples out per device in an index map (a
sample's slot, and whether it is the unconditional one), and each step runs the executable compiled for the
smallest bucket that holds the fullest device's samples: powers of two up to `2 * rows_per_device` samples per
device. After the UNet each slot combines its two samples (an unguided slot points both at the same sample, so
`uncond + g * (cond - uncond)` is its one prediction exactly) and only the active slots move. The index map is
rebuilt on the host only when a pool's membership changes; the per-slot table, guidance and conditioning are
written once, when a request's rows are admitted.

A request's prompt is encoded once (the replicated, batch-1 executable that encodes negative prompts), its
negative prompt's conditioning comes from the pipeline's cache, and the admit executable writes up to one row per
device per call, with the initial latents `noise * init_noise_sigma` from the row's PRNG key:
`jax.random.split(jax.random.PRNGKey(seed), n)[i]` for image i, as the request-at-a-time pipeline draws them. The
decode executable decodes up to one row per device per call, quantized on the device.

A request with an input image (`admit(..., image=ImageInput(...))`) starts part way down its schedule from its
encoded image (worker/row_start.py, worker/img2img.py): the admit executable writes the rows of the table it runs and
`image_weight * encoded + noise_scale * noise`, which for a text row is `noise * init_noise_sigma` exactly. Each slot
keeps its encoded image, noise and latent mask, and every step blends the inpainting region back (a mask of ones,
every row that does not inpaint, is the identity bit for bit); a 9-channel inpainting UNet reads the mask and the
masked image's latents instead.

Rows are placed on the device that holds the fewest samples (the bucket is set by the fullest device). Rows of
different sizes never share a step: the engine keeps a pool per compiled size and takes the sizes that hold rows
in turn.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np

from common.protocol import SCHEDULERS, ResolvedParams, Scheduler, Size
from worker.img2img import (
    INPAINTING_IN_CHANNELS,
    LATENT_CHANNELS,
    initial_latents,
    inpaint_blend,
    inpainting_unet_input,
)
from worker.inpainting_model import check_text_to_image
from worker.lora import LoadAdapter, LoraConfig, pad
from worker.lora_bank import LoraBank, applied, encode_with_loras
from worker.lora_pool import LoraPool
from worker.pipeline import (
    _ALL,
    _IMAGES,
    _PER_IMAGE,
    _REPLICATED,
    CompileTimings,
    PipelineError,
    SDXLPipeline,
    StepState,
    Text,
    UnsupportedShape,
    _Clock,
    _decode,
    _initial_latents,
    _Variant,
    guided,
    layout,
    time_ids_of,
    unet_noise,
)
from worker.pipeline_protocol import ImageInput, StepCallback, Tick
from worker.row_start import RowStart, RowStarts
from worker.schedulers import C_IN, ROW_WIDTH, TIMESTEP, Table, table, update

logger = logging.getLogger(__name__)

Policy = Literal["fifo", "shortest"]
_LOAD_WAIT_S = 0.05  # an engine with nothing to run waits this long at most for an adapter being read
POLICIES: tuple[Policy, ...] = ("fifo", "shortest")


class TooManyImages(PipelineError):
    """A request for more images than the engine takes from one request."""


class LorasRefused(PipelineError):
    """A request naming LoRA adapters that this engine cannot apply: none configured, or more than it takes."""


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SlotLoras:
    """The adapters of a row (`[slots, K]` in a pool) or of a request (`[K]`): bank slots and their scales; an
    unused place has scale 0."""

    slot: jax.Array
    scale: jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Slots:
    """A size's pool of rows on the devices, `rows_per_device` slots per device: each slot's state, conditioning,
    schedule (table, guidance) and step index."""

    latents: jax.Array = field(metadata=_PER_IMAGE)
    denoised: jax.Array = field(metadata=_PER_IMAGE)
    prompt: Text = field(metadata=_PER_IMAGE)
    negative: Text = field(metadata=_PER_IMAGE)  # an unguided row's holds its prompt's (never read)
    table: jax.Array = field(metadata=_PER_IMAGE)  # [slots, max_steps, ROW_WIDTH]
    guidance: jax.Array = field(metadata=_PER_IMAGE)
    step: jax.Array = field(metadata=_PER_IMAGE)  # the next step's index into the slot's table
    # [slots, 4, h, w]: the input image's latents (text: zeros), a 9-channel inpainting UNet's masked image's
    encoded: jax.Array = field(metadata=_PER_IMAGE)
    noise: jax.Array = field(metadata=_PER_IMAGE)  # [slots, 4, h, w]: the row's initial draw
    mask: jax.Array = field(metadata=_PER_IMAGE)  # [slots, 1, h, w]: 1 = repaint (all ones unless inpainting)
    lora: SlotLoras | None = field(default=None, metadata=_PER_IMAGE)  # None: the engine has no adapters


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Batch:
    """A step's index maps, per device: each UNet sample's slot and whether it is the unconditional one, each
    slot's two samples (the same one for an unguided slot) and whether the slot moves this step."""

    sample_slot: jax.Array = field(metadata=_PER_IMAGE)  # [bucket] per device
    sample_uncond: jax.Array = field(metadata=_PER_IMAGE)
    slot_uncond: jax.Array = field(metadata=_PER_IMAGE)  # [slots] per device: a sample index
    slot_cond: jax.Array = field(metadata=_PER_IMAGE)
    active: jax.Array = field(metadata=_PER_IMAGE)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Admission:
    """Up to one row per device joining a pool, all of one request: each device's key, slot and whether it
    writes at all, and its copy of the request's encoded image and latent mask; the request's conditioning,
    schedule and start (worker/row_start.py), replicated."""

    keys: jax.Array = field(metadata=_PER_IMAGE)  # [devices, 2]
    slot: jax.Array = field(metadata=_PER_IMAGE)  # [devices]
    valid: jax.Array = field(metadata=_PER_IMAGE)
    encoded: jax.Array = field(metadata=_PER_IMAGE)  # [devices, 4, h, w]: the initial latents' image
    kept: jax.Array = field(metadata=_PER_IMAGE)  # [devices, 4, h, w]: what the slot keeps (Slots.encoded)
    mask: jax.Array = field(metadata=_PER_IMAGE)  # [devices, 1, h, w]
    prompt: Text = field(metadata=_REPLICATED)  # batch 1, as encoded
    negative: Text = field(metadata=_REPLICATED)
    table: jax.Array = field(metadata=_REPLICATED)  # [max_steps, ROW_WIDTH]: the rows the request runs, padded
    image_weight: jax.Array = field(metadata=_REPLICATED)  # initial latents: image_weight * encoded
    noise_scale: jax.Array = field(metadata=_REPLICATED)  # ... + noise_scale * noise
    guidance: jax.Array = field(metadata=_REPLICATED)
    lora: SlotLoras | None = field(default=None, metadata=_REPLICATED)  # the request's [K]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Pick:
    """One slot per device to decode."""

    slot: jax.Array = field(metadata=_PER_IMAGE)  # [devices]


@dataclass
class EngineStats:
    """UNet samples spent, by class of row: guided rows (two samples per step), unguided rows (one), and the
    bucket padding (samples run for no row). `guided_images` and `unguided_images` count finished images."""

    guided_samples: int = 0
    unguided_samples: int = 0
    padding_samples: int = 0
    guided_images: int = 0
    unguided_images: int = 0
    steps: dict[int, int] = field(default_factory=dict)  # bucket -> steps run at it

    def samples(self) -> dict[str, int]:
        """The samples run so far, by class (worker.pipeline_protocol.SAMPLE_CLASSES)."""
        return {"guided": self.guided_samples, "unguided": self.unguided_samples, "padding": self.padding_samples}

    def per_image(self) -> dict[str, float]:
        """UNet samples per finished image of each class (padding not included), 0 where none finished."""
        return {
            "guided": self.guided_samples / self.guided_images if self.guided_images else 0.0,
            "unguided": self.unguided_samples / self.unguided_images if self.unguided_images else 0.0,
        }


@dataclass
class _Request:
    """A request's host-side state: where its rows are and how far they have gone."""

    key: str
    params: ResolvedParams
    on_step: StepCallback
    arrival: int
    prompt: Text | None  # None while its adapters are being read
    negative: Text | None
    start: RowStart  # its table, initial latents' weights, encoded image and mask
    guidance: jax.Array
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale) of each adapter it names
    mix: dict[str, jax.Array] | None = None  # its adapters' "slot" and "scale" [K], once all are resident
    rows: list[tuple[int, int]] = field(default_factory=list)  # (device, slot) of image i
    done: int = 0

    @property
    def n(self) -> int:
        return self.params.n

    def conditioning(self) -> tuple[Text, Text]:
        """Its prompt's and negative prompt's conditioning, once encoded."""
        assert self.prompt is not None and self.negative is not None, "a request starts once it is encoded"
        return self.prompt, self.negative

    @property
    def steps(self) -> int:
        """The denoising steps its rows run: all of its schedule's, or fewer when it starts from an image."""
        return self.start.steps

    @property
    def weight(self) -> int:
        """UNet samples per row per step."""
        return 2 if guided(self.params.guidance_scale) else 1


def buckets(rows_per_device: int) -> tuple[int, ...]:
    """UNet samples per device that a step may run: powers of two below `2 * rows_per_device`, and that."""
    top = 2 * rows_per_device
    return (*(2**i for i in range(top.bit_length()) if 2**i < top), top)


@dataclass(frozen=True)
class _Executables:
    """A size's compiled programs: one step per bucket, admit and decode."""

    steps: dict[int, Any]
    admit: Any
    decode: Any


class _Pool:
    """A size's slots: the device arrays, who holds each slot, and the step's index map while membership holds."""

    def __init__(self, size: Size, devices: int, per_device: int, slots: Slots, executables: _Executables) -> None:
        self.size = size
        self.slots = slots
        self.executables = executables
        self.holder: list[list[_Request | None]] = [[None] * per_device for _ in range(devices)]
        self.batch: tuple[int, Batch] | None = None  # (bucket, index map), None when membership changed

    def free(self) -> int:
        return sum(row is None for device in self.holder for row in device)

    def running(self) -> list[_Request]:
        seen: dict[str, _Request] = {}
        for device in self.holder:
            for request in device:
                if request is not None:
                    seen.setdefault(request.key, request)
        return list(seen.values())

    def samples(self, device: int) -> int:
        return sum(request.weight for request in self.holder[device] if request is not None)

    def place(self, request: _Request) -> None:
        """Each row on the device with the fewest samples that has a free slot (then the lowest)."""
        for _ in range(request.n):
            open_devices = [d for d, device in enumerate(self.holder) if None in device]
            device = min(open_devices, key=lambda d: (self.samples(d), d))
            slot = self.holder[device].index(None)
            self.holder[device][slot] = request
            request.rows.append((device, slot))
        self.batch = None

    def release(self, request: _Request) -> None:
        for device, slot in request.rows:
            if self.holder[device][slot] is request:
                self.holder[device][slot] = None
        self.batch = None

    def shadow(self, n: int) -> int:
        """Steps of this pool until `n` slots are free, if nothing else joins."""
        free = self.free()
        for request in sorted(self.running(), key=lambda r: r.steps - r.done):
            if free >= n:
                break
            free += request.n
            if free >= n:
                return request.steps - request.done
        return 0


class RowEngine:
    """The batch of one worker (worker.pipeline_protocol.Engine): rows of several requests of `pipeline`'s model
    denoised together.

    `rows_per_device` slots per device and size; `max_images` (at most, and by default, the row capacity) the most
    images one request may ask for; `only_buckets` (benchmarks) compiles those steps alone, the full one among them.

    Which waiting request starts: each waiting request, in arrival order (`"fifo"`) or fewest steps first
    (`"shortest"`), starts as soon as its `n` rows fit in its size's pool. The first that does not fit holds a
    reservation: later requests may still start ahead of it (backfilling) only if they end no later than the
    running rows it waits for free its room. So it is never starved, and a short request is not held back by a
    long one while the batch has room, unless starting it would delay the request that has waited longest. With
    `"shortest"`, a long request can wait as long as shorter ones keep arriving.

    `on_step(k)` of a request is called on the device thread once its rows have done step k (at most one step
    late: the next step is queued first, so the devices do not wait for the host); if it raises, the request's
    rows leave at once and the request is in `Tick.stopped` with that exception. A cancelled request
    (`cancel`, any thread) leaves at the next step boundary and is reported nowhere: it is neither finished nor
    stopped. A request whose step fails on the device is in `Tick.failed` with its pool's other requests.

    With `lora` (and `load_lora`, which reads an adapter by name), each request may name up to `lora.max_loras`
    adapters, applied to its rows unmerged (worker/lora_bank.py): a request whose adapters are not all in the
    devices' bank waits, without holding back others, while a background thread reads them; one that cannot be
    read stops the requests naming it (`Tick.stopped`, a LoraError). Without `lora` the executables are those of
    an engine that knows nothing of adapters, and a request naming one is refused at admission.
    """

    def __init__(
        self,
        pipeline: SDXLPipeline,
        rows_per_device: int,
        policy: Policy = "fifo",
        max_images: int | None = None,
        *,
        only_buckets: tuple[int, ...] | None = None,
        lora: LoraConfig | None = None,
        load_lora: LoadAdapter | None = None,
    ) -> None:
        if rows_per_device < 1:
            raise PipelineError(f"rows_per_device must be at least 1 (got {rows_per_device})")
        if policy not in POLICIES:
            raise PipelineError(f"unknown batch policy {policy!r}; one of {', '.join(POLICIES)}")
        self._pipeline = pipeline
        self.rows_per_device = rows_per_device
        self.policy: Policy = policy
        self._rows = rows_per_device * pipeline.devices
        self._max_images = self._rows if max_images is None else max_images
        if not 1 <= self._max_images <= self._rows:
            raise PipelineError(f"max_images must be 1..{self._rows}, the engine's rows (got {max_images})")
        self.buckets = buckets(rows_per_device) if only_buckets is None else only_buckets
        if max(self.buckets) != 2 * rows_per_device:
            raise PipelineError(f"the largest bucket must be {2 * rows_per_device} samples (got {self.buckets})")
        self.stats = EngineStats()
        self._pools: dict[Size, _Pool] = {}
        self._waiting: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        # The rows of every held request, kept as a number: the event loop reads `free_rows` and `busy` while a
        # step on the device thread adds and removes requests, and a number is read whole.
        self._held_rows = 0
        self._arrivals = 0
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._pending: tuple[jax.Array, list[tuple[_Request, int]]] | None = None
        self._last: Size | None = None  # the size that ran last
        self._starts = RowStarts(pipeline)
        self._lora = lora
        self._bank: LoraBank | None = None
        self._loras: LoraPool | None = None
        self._encode_lora: Any = None
        if lora is not None:
            if load_lora is None:
                raise PipelineError("an engine with LoRA adapters needs load_lora, the reader of an adapter by name")
            self._bank = LoraBank(pipeline, lora)
            bank = self._bank
            self._loras = LoraPool(lora.slots, lambda name: pad(load_lora(name), bank.targets, lora.max_rank))

    @property
    def lora(self) -> LoraConfig | None:
        """Its adapter pool's shape, None without adapters."""
        return self._lora

    def loaded(self) -> tuple[str, ...]:
        """The adapters in the devices' bank now (what the worker may advertise), none without adapters."""
        return () if self._loras is None else self._loras.loaded()

    def close(self) -> None:
        """Stop the thread that reads adapters (reads under way are abandoned)."""
        if self._loras is not None:
            self._loras.close()

    @property
    def pipeline(self) -> SDXLPipeline:
        """The model it runs."""
        return self._pipeline

    @property
    def rows(self) -> int:
        """The most rows it holds at once per size: `rows_per_device` times the devices."""
        return self._rows

    @property
    def max_images(self) -> int:
        """The most images one request may ask for."""
        return self._max_images

    @property
    def sizes(self) -> tuple[Size, ...]:
        """The sizes compiled so far."""
        return tuple(self._pools)

    def free_rows(self) -> int:
        """Rows no admitted request holds: the capacity less the rows of every running and waiting request."""
        return max(0, self._rows - self._held_rows)

    @property
    def running(self) -> frozenset[str]:
        """The keys of the requests whose rows are in the batch (not those waiting)."""
        return frozenset(key for key, request in self._requests.items() if request.rows)

    @property
    def waiting(self) -> tuple[str, ...]:
        """The keys of the requests waiting for room, in arrival order."""
        return tuple(request.key for request in self._waiting)

    @property
    def busy(self) -> bool:
        """Whether it holds any request, running or waiting."""
        return self._held_rows > 0

    def compile(self, size: Size, /) -> CompileTimings:
        """Compile the prompt encoder, admit, decode and a step for every bucket at `size`, and run each once (the
        key split for every `n` too), so that no request waits for a compile."""
        pipeline = self._pipeline
        pipeline.check_size(size)
        clock = _Clock()
        pipeline.compile_encoder(clock)
        text = pipeline.encode_prompt("warm-up")
        self._compile_lora(clock, text)
        encoder_warm_up_s = self._starts.compile(size, clock)
        slots = self._empty_slots(size, text)
        executables = self._compile_executables(_Variant(pipeline._pipe, size, cfg=True), clock, slots, text)
        pool = _Pool(size, pipeline.devices, self.rows_per_device, slots, executables)
        warm_started = time.perf_counter()
        self._warm_up(pool, text)
        self._pools[size] = pool
        warm_up_s = time.perf_counter() - warm_started + encoder_warm_up_s
        timings = CompileTimings(clock.lower_s, clock.compile_s, warm_up_s)
        logger.info(
            "engine compiled %s (buckets %s samples per device): lower %.2fs, compile %.2fs, warm-up %.2fs",
            *(size, self.buckets, timings.lower_s, timings.compile_s, timings.warmup_s),
        )
        return timings

    def _compile_lora(self, clock: _Clock, text: Text) -> None:
        """The bank's writer and the prompt encoder with adapters, once (they serve every size), each run once."""
        if self._bank is None or self._encode_lora is not None:
            return
        pipeline = self._pipeline
        self._bank.compile(clock)
        ids, scale, mix = pipeline._negative_ids(""), pipeline._negative_scale(""), self._mix_inputs(())
        encoder = functools.partial(encode_with_loras, pipeline._pipe)
        args = (pipeline._step_params.begin, ids, scale, self._bank_text(), mix)
        self._encode_lora = clock.compile(pipeline._sharded(encoder, (_ALL,) * len(args), _ALL), *args)
        self._encode_lora(*args).context.block_until_ready()

    def _bank_unet(self) -> tuple[dict[str, Any], ...]:
        """The step's bank argument: the UNet's factors, or nothing without adapters."""
        return () if self._bank is None else (self._bank.arrays["unet"],)

    def _bank_text(self) -> dict[str, Any]:
        assert self._bank is not None
        return {component: self._bank.arrays[component] for component in ("text_encoder", "text_encoder_2")}

    def _mix_inputs(self, loras: tuple[tuple[int, float], ...]) -> dict[str, jax.Array]:
        """A request's adapters as the executables take them: "slot" and "scale" [K], replicated."""
        assert self._lora is not None
        slot, scale = np.zeros(self._lora.max_loras, np.int32), np.zeros(self._lora.max_loras, np.float32)
        for k, (index, weight) in enumerate(loras):
            slot[k], scale[k] = index, weight
        return {"slot": self._pipeline._put(slot), "scale": self._pipeline._put(scale)}

    def _empty_slots(self, size: Size, text: Text) -> Slots:
        """A pool's arrays, zero, split over the devices by slot."""
        pipeline, slots = self._pipeline, self._rows
        pipe = pipeline._pipe
        factor = pipe.vae_scale_factor
        latent = (slots, LATENT_CHANNELS, size.height // factor, size.width // factor)

        def zeros(shape: tuple[int, ...], dtype: Any) -> jax.Array:
            return pipeline._put(np.zeros(shape, dtype), _IMAGES)

        def rows_of(conditioning: Text) -> Text:
            empty: Text = jax.tree_util.tree_map(lambda x: zeros((slots, *x.shape[1:]), x.dtype), conditioning)
            return empty

        return Slots(
            latents=zeros(latent, np.float32),
            denoised=zeros(latent, np.float32),
            prompt=rows_of(text),
            negative=rows_of(text),
            table=zeros((slots, pipeline.max_steps, ROW_WIDTH), np.float32),
            guidance=zeros((slots,), np.float32),
            step=zeros((slots,), np.int32),
            encoded=zeros(latent, np.float32),
            noise=zeros(latent, np.float32),
            mask=pipeline._put(np.ones((slots, 1, *latent[2:]), np.float32), _IMAGES),
            lora=None
            if self._lora is None
            else SlotLoras(
                zeros((slots, self._lora.max_loras), np.int32), zeros((slots, self._lora.max_loras), np.float32)
            ),
        )

    def _compile_executables(self, variant: _Variant, clock: _Clock, slots: Slots, text: Text) -> _Executables:
        """Admit (the pool donated), decode, and a step per bucket (the pool donated)."""
        pipeline = self._pipeline
        params = pipeline._step_params
        admission = self._admission(text, self._blank_start(variant.size))
        admit = pipeline._compile(
            clock, functools.partial(_admit, variant), layout(Slots), slots, admission, donate=(0,)
        )
        decode = pipeline._compile(
            clock, functools.partial(_decode_slots, variant.pipe), _IMAGES, params.finish, slots, self._pick([])
        )
        run, bank = (_run, ()) if self._bank is None else (_run_with_loras, (self._bank.arrays["unet"],))
        steps = {
            bucket: pipeline._compile(
                clock,
                pipeline._traced(run, variant),
                (layout(Slots), _IMAGES),
                *(params.step, slots, self._idle_batch(bucket), *bank),
                donate=(1,),
            )
            for bucket in self.buckets
        }
        return _Executables(steps=steps, admit=admit, decode=decode)

    def _warm_up(self, pool: _Pool, text: Text) -> None:
        """Run every executable once, writing nothing (no valid row, no active slot), and split keys for every
        `n`, so that the first request pays no first-run cost and no key split compiles."""
        pool.slots = pool.executables.admit(pool.slots, self._admission(text, self._blank_start(pool.size)))
        for bucket, step in pool.executables.steps.items():
            pool.slots, marker = step(
                self._pipeline._step_params.step, pool.slots, self._idle_batch(bucket), *self._bank_unet()
            )
        np.asarray(pool.executables.decode(self._pipeline._step_params.finish, pool.slots, self._pick([])))
        marker.block_until_ready()
        for n in range(1, self._max_images + 1):
            image_keys(0, n)

    def _blank_start(self, size: Size) -> RowStart:
        """A start to compile and warm up with (the values do not matter, the shapes do)."""
        return self._starts.text(size, self._table("euler", 1))

    def _table(self, scheduler: str, steps: int) -> Table:
        """The scheduler's table at `steps` steps; PipelineError for a scheduler this worker does not run."""
        if scheduler not in SCHEDULERS:
            runs = ", ".join(self._pipeline.schedulers)
            raise PipelineError(f"unknown scheduler {scheduler!r}; this worker runs {runs}")
        return table(cast(Scheduler, scheduler), steps, self._pipeline._scheduler)

    def _admission(self, text: Text, start: RowStart, request: _Request | None = None, wave: int = 0) -> Admission:
        """The admit executable's input: the `wave`-th row of `request` on each device (none without one)."""
        devices, pipeline = self._pipeline.devices, self._pipeline
        keys, slot, valid = np.zeros((devices, 2), np.uint32), np.zeros(devices, np.int32), np.zeros(devices, bool)
        if request is not None:
            all_keys = image_keys(request.params.seed, request.n)
            for image, (device, index) in _wave(request.rows, wave):
                keys[device], slot[device], valid[device] = all_keys[image], index, True
        return Admission(
            keys=pipeline._put(keys, _IMAGES),
            slot=pipeline._put(slot, _IMAGES),
            valid=pipeline._put(valid, _IMAGES),
            encoded=start.encoded,
            kept=start.kept,
            mask=start.mask,
            prompt=text if request is None else request.conditioning()[0],
            negative=text if request is None else request.conditioning()[1],
            table=start.table,
            image_weight=start.image_weight,
            noise_scale=start.noise_scale,
            guidance=pipeline._put(np.float32(0.0)) if request is None else request.guidance,
            lora=self._admission_loras(request),
        )

    def _admission_loras(self, request: _Request | None) -> SlotLoras | None:
        if self._lora is None:
            return None
        mix = self._mix_inputs(()) if request is None or request.mix is None else request.mix
        return SlotLoras(mix["slot"], mix["scale"])

    def _pick(self, slots: list[tuple[int, int]]) -> Pick:
        """The decode executable's input: on each device the slot given for it (`(device, slot)` pairs), else 0."""
        chosen = np.zeros(self._pipeline.devices, np.int32)
        for device, slot in slots:
            chosen[device] = slot
        return Pick(slot=self._pipeline._put(chosen, _IMAGES))

    def _idle_batch(self, bucket: int) -> Batch:
        """An index map of `bucket` samples per device with no active slot."""
        return self._batch_arrays(
            np.zeros((self._pipeline.devices, bucket), np.int32),
            np.zeros((self._pipeline.devices, bucket), bool),
            np.zeros((3, self._pipeline.devices, self.rows_per_device), np.int32),
        )

    def _batch_arrays(self, sample_slot: np.ndarray, sample_uncond: np.ndarray, per_slot: np.ndarray) -> Batch:
        """A Batch on the devices from per-device host arrays; `per_slot` stacks uncond, cond and active."""

        def put(array: np.ndarray) -> jax.Array:
            return self._pipeline._put(array.reshape(-1), _IMAGES)

        return Batch(
            sample_slot=put(sample_slot),
            sample_uncond=put(sample_uncond),
            slot_uncond=put(per_slot[0]),
            slot_cond=put(per_slot[1]),
            active=put(per_slot[2].astype(bool)),
        )

    def _index_map(self, pool: _Pool) -> tuple[int, Batch]:
        """The bucket (the smallest that holds the fullest device's samples) and the samples' layout per device:
        a guided slot's unconditional sample, then its conditional one; an unguided slot's one sample serves both."""
        devices, per_device = self._pipeline.devices, self.rows_per_device
        bucket = min(b for b in self.buckets if b >= max(1, *(pool.samples(d) for d in range(devices))))
        sample_slot = np.zeros((devices, bucket), np.int32)
        sample_uncond = np.zeros((devices, bucket), bool)
        per_slot = np.zeros((3, devices, per_device), np.int32)  # uncond sample, cond sample, active
        for device, holders in enumerate(pool.holder):
            position = 0
            for slot, request in enumerate(holders):
                if request is None:
                    continue
                if request.weight == 2:
                    sample_slot[device, position], sample_uncond[device, position] = slot, True
                    position += 1
                sample_slot[device, position] = slot
                per_slot[:, device, slot] = (position - request.weight + 1, position, 1)
                position += 1
        return bucket, self._batch_arrays(sample_slot, sample_uncond, per_slot)

    def admit(
        self, key: str, params: ResolvedParams, on_step: StepCallback, *, image: ImageInput | None = None
    ) -> None:
        """Take a request, from text or (with `image`) from an input image; its rows join at a step boundary once
        they fit. UnsupportedShape (size not compiled, steps outside 1..max_steps), TooManyImages (`n` over
        `max_images`), ImageRefused (a strength that runs no step, a mask that repaints nothing), PipelineError
        (unknown scheduler, a key already held), all raised at once with nothing held. The image is resized to the
        request's size and encoded here, on the devices."""
        self._check(key, params)
        if image is None or image.mask is None:
            check_text_to_image(self._pipeline)  # an inpainting model runs inpainting requests only
        size, coefficients = params.shape.size, self._table(params.scheduler, params.shape.steps)
        start = (
            self._starts.text(size, coefficients) if image is None else self._starts.image(size, coefficients, image)
        )
        guidance = self._pipeline._put(np.float32(params.guidance_scale))
        loras = tuple((lora.name, lora.scale) for lora in params.loras)
        request = _Request(key, params, on_step, self._arrivals, None, None, start, guidance, loras)
        if self._loras is None or not loras:
            self._encode(request)
        else:
            self._loras.pin(name for name, _ in loras)
        self._arrivals += 1
        with self._lock:
            self._cancelled.discard(key)
        self._requests[key] = request
        self._held_rows += request.n
        self._waiting.append(request)

    def _check(self, key: str, params: ResolvedParams) -> None:
        shape = params.shape
        if key in self._requests:
            raise PipelineError(f"request {key!r} is already in the engine")
        if params.loras and self._lora is None:
            raise LorasRefused("loras: this worker applies no LoRA adapters")
        if self._lora is not None and len(params.loras) > self._lora.max_loras:
            raise LorasRefused(
                f"loras: {len(params.loras)} adapters; this worker applies at most {self._lora.max_loras}"
            )
        if shape.size not in self._pools:
            compiled = ", ".join(map(str, self._pools)) or "none"
            raise UnsupportedShape(f"size {shape.size} is not compiled here; compiled: {compiled}")
        if not 1 <= shape.steps <= self._pipeline.max_steps:
            raise UnsupportedShape(f"{shape.steps} steps: this worker runs 1 to {self._pipeline.max_steps}")
        if params.n > self._max_images:
            raise TooManyImages(f"{params.n} images: this worker makes at most {self._max_images} per request")

    def _encode(self, request: _Request) -> None:
        """The request's prompt and (with guidance) negative prompt conditioning: with its adapters when one of
        them changes a text encoder (uncached), else the pipeline's (the negative prompt's from its cache)."""
        pipeline, params = self._pipeline, request.params
        mix = request.mix if request.mix is not None and self._touches_text(request) else None
        if mix is not None:
            request.prompt = self._encode_with(mix, params.prompt)
        else:
            request.prompt = pipeline.encode_prompt(params.prompt)
        if not guided(params.guidance_scale):
            request.negative = request.prompt
        elif mix is not None:
            request.negative = self._encode_with(mix, params.negative_prompt, negative=True)
        else:
            request.negative = pipeline.negative_conditioning(params.negative_prompt)

    def _touches_text(self, request: _Request) -> bool:
        assert self._loras is not None
        return any(scale and self._loras.components(name) - {"unet"} for name, scale in request.loras)

    def _encode_with(self, mix: dict[str, jax.Array], prompt: str, *, negative: bool = False) -> Text:
        pipeline = self._pipeline
        scale = pipeline._negative_scale(prompt) if negative else pipeline._put(np.float32(1.0))
        ids = pipeline._negative_ids(prompt)
        encoded: Text = self._encode_lora(pipeline._step_params.begin, ids, scale, self._bank_text(), mix)
        return encoded

    def cancel(self, key: str) -> None:
        """Drop a request, waiting or running, at the next step boundary; it is reported nowhere (thread-safe)."""
        with self._lock:
            self._cancelled.add(key)

    def step(self) -> Tick:
        """At the boundary: drop cancelled requests, start the waiting ones that fit; then run one step of the
        next size that holds rows, report the step before (and the last step of those that finish), decode the
        requests that finished."""
        tick = Tick()
        self._drop_cancelled()
        self._collect_loras(tick)
        self._start_waiting()
        pool = self._next_pool()
        if pool is None and self._loras is not None:
            self._loras.wait(_LOAD_WAIT_S)  # nothing runs: wait for a read adapter rather than spin
        before = self.stats.samples()
        try:
            marker = None if pool is None else self._dispatch(pool)
            self._report_pending(tick)
            if pool is not None and marker is not None:
                self._advance(pool, marker, tick)
        except jax.errors.JaxRuntimeError as error:
            self._fail(pool, error, tick)
        tick.samples = {
            name: count - before[name] for name, count in self.stats.samples().items() if count > before[name]
        }
        return tick

    def _collect_loras(self, tick: Tick) -> None:
        """Write the adapters read since the last boundary to the bank; a waiting request whose adapters are all
        resident gets its slots and its conditioning, one whose adapter could not be read is stopped."""
        if self._loras is None or self._bank is None:
            return
        failed = self._loras.collect(self._bank.write)
        for request in [r for r in self._waiting if r.prompt is None]:
            error = next((failed[name] for name, _ in request.loras if name in failed), None)
            if error is not None:
                tick.stopped.append((request.key, error))
                self._remove(request)
                continue
            slots = [self._loras.slot(name) for name, _ in request.loras]
            if all(slot is not None for slot in slots):
                placed = tuple((int(slot or 0), scale) for slot, (_, scale) in zip(slots, request.loras, strict=True))
                request.mix = self._mix_inputs(placed)
                self._encode(request)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        for key in cancelled:
            request = self._requests.get(key)
            if request is not None:
                self._remove(request)

    def _remove(self, request: _Request) -> None:
        del self._requests[request.key]
        if self._loras is not None:
            self._loras.unpin(name for name, _ in request.loras)
        self._held_rows -= request.n
        if request in self._waiting:
            self._waiting.remove(request)
        else:
            self._pools[request.params.shape.size].release(request)

    def _start_waiting(self) -> None:
        """Start each waiting request that fits, in the policy's order; the first that does not fit reserves its
        pool: later ones start ahead of it only if they end by the time its room is free (backfilling)."""
        order = self._waiting if self.policy == "fifo" else sorted(self._waiting, key=lambda r: (r.steps, r.arrival))
        reserved: dict[Size, float] = {}
        for request in list(order):
            if request.prompt is None:
                continue  # its adapters are being read
            pool = self._pools[request.params.shape.size]
            if request.n <= pool.free() and request.steps <= reserved.get(pool.size, math.inf):
                self._start(pool, request)
            elif pool.size not in reserved:
                reserved[pool.size] = pool.shadow(request.n)

    def _start(self, pool: _Pool, request: _Request) -> None:
        """Place the request's rows and write them to their slots, one row per device per admit call."""
        self._waiting.remove(request)
        pool.place(request)
        waves = max(sum(1 for device, _ in request.rows if device == d) for d in range(self._pipeline.devices))
        for wave in range(waves):
            admission = self._admission(request.conditioning()[0], request.start, request, wave)
            pool.slots = pool.executables.admit(pool.slots, admission)

    def _next_pool(self) -> _Pool | None:
        """The next size after the last one run that holds rows (sizes in compile order, in turn)."""
        order = list(self._pools)
        start = (order.index(self._last) + 1) if self._last in order else 0
        for size in order[start:] + order[:start]:
            if self._pools[size].running():
                self._last = size
                return self._pools[size]
        return None

    def _dispatch(self, pool: _Pool) -> jax.Array:
        """Queue one step of the pool's rows (the index map rebuilt if membership changed); count its samples."""
        if pool.batch is None:
            pool.batch = self._index_map(pool)
        bucket, batch = pool.batch
        marker: jax.Array
        pool.slots, marker = pool.executables.steps[bucket](
            self._pipeline._step_params.step, pool.slots, batch, *self._bank_unet()
        )
        self._count(pool, bucket)
        return marker

    def _count(self, pool: _Pool, bucket: int) -> None:
        stats, active = self.stats, 0
        for request in pool.running():
            samples = request.n * request.weight
            active += samples
            if request.weight == 2:
                stats.guided_samples += samples
            else:
                stats.unguided_samples += samples
        stats.padding_samples += bucket * self._pipeline.devices - active
        stats.steps[bucket] = stats.steps.get(bucket, 0) + 1

    def _report_pending(self, tick: Tick) -> None:
        """Report the step dispatched before this one, once it is done, to the requests still running."""
        if self._pending is None:
            return
        marker, reports = self._pending
        self._pending = None
        marker.block_until_ready()
        for request, step in reports:
            if self._requests.get(request.key) is request:
                self._call(request, step, tick)

    def _call(self, request: _Request, step: int, tick: Tick) -> bool:
        """`on_step(step)`; if it raises, the request leaves and is stopped with the exception."""
        try:
            request.on_step(step)
        except Exception as error:  # whatever the callback raises stops its own request only
            tick.stopped.append((request.key, error))
            self._remove(request)
            return False
        return True

    def _advance(self, pool: _Pool, marker: jax.Array, tick: Tick) -> None:
        """Count the step for each request of the pool; decode those that are done, report the others later."""
        reports: list[tuple[_Request, int]] = []
        for request in pool.running():
            request.done += 1
            if request.done < request.steps:
                reports.append((request, request.done))
                continue
            marker.block_until_ready()
            if self._call(request, request.done, tick):
                tick.finished.append((request.key, self._decode(pool, request)))
                self._finished(request)
        self._pending = (marker, reports) if reports else None

    def _finished(self, request: _Request) -> None:
        if request.weight == 2:
            self.stats.guided_images += request.n
        else:
            self.stats.unguided_images += request.n
        self._remove(request)

    def _decode(self, pool: _Pool, request: _Request) -> np.ndarray:
        """The request's images, uint8 [n, height, width, 3]: one row per device per decode call."""
        size = pool.size
        waves = [list(_wave(request.rows, wave)) for wave in range(request.n)]
        outputs = [
            (
                wave,
                pool.executables.decode(
                    self._pipeline._step_params.finish, pool.slots, self._pick([r for _, r in wave])
                ),
            )
            for wave in waves
            if wave
        ]
        images = np.empty((request.n, size.height, size.width, 3), np.uint8)
        for wave, output in outputs:
            decoded = np.asarray(output).reshape(self._pipeline.devices, size.height, size.width, 3)
            for image, (device, _) in wave:
                images[image] = decoded[device]
        return images

    def _fail(self, pool: _Pool | None, error: Exception, tick: Tick) -> None:
        """A step failed on the device: every request of the pool (and those waiting on a report) fails, and the
        pool starts again from empty slots."""
        logger.exception("engine step failed on the device")
        failing = {request.key: request for request in (pool.running() if pool is not None else [])}
        if self._pending is not None:
            failing |= {request.key: request for request, _ in self._pending[1]}
            self._pending = None
        for request in failing.values():
            if self._requests.get(request.key) is request:
                tick.failed.append((request.key, f"the device failed: {error}"))
                self._remove(request)
        if pool is not None:
            pool.slots = self._empty_slots(pool.size, pool.slots.prompt)


def image_keys(seed: int, n: int) -> np.ndarray:
    """The PRNG keys of a request's `n` images: image i's is `split(PRNGKey(seed), n)[i]`."""
    return np.asarray(jax.random.split(jax.random.PRNGKey(seed), n))


def _wave(rows: list[tuple[int, int]], wave: int) -> list[tuple[int, tuple[int, int]]]:
    """The `wave`-th row of each device among a request's rows: (image, (device, slot)) pairs."""
    per_device: dict[int, list[tuple[int, tuple[int, int]]]] = {}
    for image, (device, slot) in enumerate(rows):
        per_device.setdefault(device, []).append((image, (device, slot)))
    return [placed[wave] for placed in per_device.values() if len(placed) > wave]


# --- What runs on the devices, one device's share each (the executables are shard_map over the mesh).


def _admit(variant: _Variant, slots: Slots, new: Admission) -> Slots:
    """Write this device's joining row (if `valid`) to its slot: initial latents `image_weight * encoded +
    noise_scale * noise` (noise from its key; text-to-image: `noise * init_noise_sigma`), a zero denoised
    estimate, the request's conditioning and schedule, its encoded image, noise and mask, step 0."""
    slot, valid = new.slot[0], new.valid[0]
    noise = _initial_latents(variant.pipe, new.keys, variant.size)[0]
    # The weights are traced scalars where img2img's arithmetic names floats: the same expression either way.
    latents = initial_latents(new.encoded[0], noise, cast(float, new.image_weight), cast(float, new.noise_scale))

    def put(pool: jax.Array, value: jax.Array) -> jax.Array:
        return pool.at[slot].set(jnp.where(valid, value.astype(pool.dtype), pool[slot]))

    def text(pool: Text, value: Text) -> Text:
        written: Text = jax.tree_util.tree_map(lambda p, v: put(p, v[0]), pool, value)
        return written

    return Slots(
        latents=put(slots.latents, latents),
        denoised=put(slots.denoised, jnp.zeros_like(latents)),
        prompt=text(slots.prompt, new.prompt),
        negative=text(slots.negative, new.negative),
        table=put(slots.table, new.table),
        guidance=put(slots.guidance, new.guidance),
        step=put(slots.step, jnp.int32(0)),
        encoded=put(slots.encoded, new.kept[0]),
        noise=put(slots.noise, noise),
        mask=put(slots.mask, new.mask[0]),
        lora=None if slots.lora is None or new.lora is None else _put_loras(put, slots.lora, new.lora),
    )


def _put_loras(put: Any, pool: SlotLoras, new: SlotLoras) -> SlotLoras:
    return SlotLoras(slot=put(pool.slot, new.slot), scale=put(pool.scale, new.scale))


def _run(variant: _Variant, params: Mapping[str, Any], slots: Slots, batch: Batch) -> tuple[Slots, jax.Array]:
    """One denoising step of the active slots: the UNet on the bucket's samples (each gathered from its slot, at
    its slot's step), each slot's guided prediction from its two samples, the update; inactive slots keep their
    state. Returns a marker, as the request-at-a-time step does."""
    last = slots.table.shape[1] - 1
    rows = jax.vmap(lambda table, i: table[i])(slots.table, jnp.minimum(slots.step, last))
    index = batch.sample_slot
    sample_rows = rows[index]
    scaled = _unet_input(variant, slots, index, sample_rows)
    text = _sample_text(slots, index, batch.sample_uncond)
    time_ids = jnp.array([time_ids_of(variant.size)] * index.shape[0], dtype=text.context.dtype)
    noise = unet_noise(variant.pipe, params, scaled, sample_rows[:, TIMESTEP].astype(jnp.float32), text, time_ids)
    uncond, cond = noise[batch.slot_uncond], noise[batch.slot_cond]
    prediction = uncond + slots.guidance[:, None, None, None] * (cond - uncond)
    stepped, denoised = jax.vmap(update)(slots.latents, prediction, slots.denoised, rows)
    if not _nine_channels(variant):
        # Inpainting's kept region back to the image at the next noise level; a mask of ones (every other row)
        # leaves the step's latents exactly as they are, so all rows take the blend and the step has no branch.
        stepped = jax.vmap(inpaint_blend)(stepped, slots.encoded, slots.noise, slots.mask, rows)
    active = batch.active[:, None, None, None]
    moved = Slots(
        latents=jnp.where(active, stepped, slots.latents),
        denoised=jnp.where(active, denoised, slots.denoised),
        prompt=slots.prompt,
        negative=slots.negative,
        table=slots.table,
        guidance=slots.guidance,
        step=slots.step + batch.active.astype(slots.step.dtype),
        encoded=slots.encoded,
        noise=slots.noise,
        mask=slots.mask,
        lora=slots.lora,
    )
    return moved, moved.latents[:1, 0, 0, 0]


def _nine_channels(variant: _Variant) -> bool:
    """Whether the model's UNet is an inpainting one, which takes the mask and the masked image at every step."""
    return int(variant.pipe.unet.config.in_channels) == INPAINTING_IN_CHANNELS


def _unet_input(variant: _Variant, slots: Slots, index: jax.Array, sample_rows: jax.Array) -> jax.Array:
    """Each sample's UNet input: its slot's latents times C_IN, and for a 9-channel inpainting UNet its slot's
    mask and masked-image latents after them on the channel axis."""
    latents = slots.latents[index]
    scaled = latents * sample_rows[:, C_IN].astype(latents.dtype)[:, None, None, None]
    if not _nine_channels(variant):
        return scaled
    return inpainting_unet_input(scaled, slots.mask[index], slots.encoded[index])


def _run_with_loras(
    variant: _Variant, params: Mapping[str, Any], slots: Slots, batch: Batch, bank: dict[str, Any]
) -> tuple[Slots, jax.Array]:
    """`_run` with each sample's adapters (its slot's, the unconditional sample's too) added to the UNet's
    target layers from the bank (`bank`: the UNet's factors)."""
    assert slots.lora is not None, "an engine with adapters has their slots in its pool"
    index = batch.sample_slot
    with applied(bank, slots.lora.slot[index], slots.lora.scale[index]):
        return _run(variant, params, slots, batch)


def _sample_text(slots: Slots, index: jax.Array, uncond: jax.Array) -> Text:
    """Each sample's text conditioning: its slot's negative prompt's for an unconditional sample, else its
    prompt's."""

    def pick(negative: jax.Array, prompt: jax.Array) -> jax.Array:
        chosen = uncond.reshape(-1, *([1] * (prompt.ndim - 1)))
        return jnp.where(chosen, negative[index], prompt[index])

    text: Text = jax.tree_util.tree_map(pick, slots.negative, slots.prompt)
    return text


def _decode_slots(pipe: Any, params: Mapping[str, Any], slots: Slots, pick: Pick) -> jax.Array:
    """The picked slot's latents through the VAE, quantized on the device (as the request-at-a-time finish)."""
    latents = slots.latents[pick.slot]
    images: jax.Array = _decode(pipe, params, StepState(latents, latents))
    return images
