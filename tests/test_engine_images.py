"""Image-to-image and inpainting rows on the engine (tiny model, four virtual CPU devices, two rows per device):
diffusers' arithmetic computed on the host, rows from images beside rows from text each as they are alone, the
inpainting blend, no compile when image rows arrive, and what is refused at admission."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.input_images import resize_to, to_model_input
from common.protocol import ResolvedParams, Shape
from testkit.standin import StandInEngine, StandInPipeline
from tests.test_engine import MAX_STEPS, ROWS_PER_DEVICE, SIZE, Run, ask, assert_as_generate, run
from tests.test_pipeline import counting_compiles
from worker.engine import RowEngine, image_keys
from worker.img2img import img2img_start, initial_latents
from worker.inpainting_model import InpaintingOnly
from worker.pipeline import (
    PipelineOptions,
    SDXLPipeline,
    StepState,
    Text,
    _decode,
    _initial_latents,
    time_ids_of,
    unet_noise,
)
from worker.pipeline_protocol import ImageInput
from worker.row_start import ImageRefused
from worker.schedulers import model_input, table, timestep, update
from worker.sequential import ImagesRefused, RequestAtATime
from worker.tiny_model import write_tiny_model

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def pipeline(tiny_model: Path) -> SDXLPipeline:
    return SDXLPipeline.load(str(tiny_model), None, PipelineOptions(images_per_request=4, max_steps=MAX_STEPS))


@pytest.fixture(scope="module")
def compiled(pipeline: SDXLPipeline) -> RowEngine:
    engine = RowEngine(pipeline, ROWS_PER_DEVICE)
    engine.compile(SIZE)
    return engine


@pytest.fixture
def engine(compiled: RowEngine) -> RowEngine:
    """The module's engine, empty, its counters reset."""
    assert not compiled.busy
    compiled.stats.__init__()  # type: ignore[misc]
    return compiled


def picture(height: int = 48, width: int = 80) -> np.ndarray:
    """An input image of another size than the request's (it is resized): smooth colour ramps and a square."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([rows * 255 // height, cols * 255 // width, (rows + cols) * 127 // (height + width)], axis=-1)
    image[height // 4 : height // 2, width // 4 : width // 2] = (250, 30, 30)
    return image.astype(np.uint8)


def left_half(height: int = SIZE.height, width: int = SIZE.width) -> np.ndarray:
    """A mask that repaints the left half of an image of that size."""
    mask = np.zeros((height, width), bool)
    mask[:, : width // 2] = True
    return mask


def run_images(
    engine: RowEngine, requests: list[tuple[str, ResolvedParams, ImageInput | None]], record: Run | None = None
) -> Run:
    """Admit each request (with its image, if any), then step until the engine is empty."""
    seen = record or Run()
    for key, params, image in requests:
        engine.admit(key, params, seen.on_step(key), image=image)
    return run(engine, [], record=seen)


@functools.cache
def _host_step(pipe: Any) -> Any:
    """One guided step on one image, outside the engine: the UNet on [unconditional, conditional], the guided
    prediction, the sampler's update."""

    def step(
        params: dict[str, Any], x: jax.Array, denoised: jax.Array, row: jax.Array, text: Text, guidance: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        scaled = model_input(jnp.concatenate([x, x]), row)
        time_ids = jnp.array([time_ids_of(SIZE)] * 2, dtype=text.context.dtype)
        noise = unet_noise(pipe, params, scaled, jnp.broadcast_to(timestep(row), (2,)), text, time_ids)
        uncond, cond = jnp.split(noise, 2)
        return update(x, uncond + guidance * (cond - uncond), denoised, row)

    return jax.jit(step)


def reference_img2img(engine: RowEngine, pipeline: SDXLPipeline, params: ResolvedParams, image: ImageInput) -> Any:
    """diffusers' SDXL img2img, one image, on the host's arithmetic: the image resized and encoded (the engine's
    encoder), noised to the first step run, the steps strength leaves (the first one first order), decoded."""
    coefficients = table(params.scheduler, params.shape.steps, pipeline._scheduler)
    start = img2img_start(coefficients, image.strength)
    pixels = to_model_input(resize_to(image.image, SIZE.width, SIZE.height))
    encoded = engine._starts.encoder.encode([pixels])
    noise = np.asarray(_initial_latents(pipeline._pipe, jnp.asarray(image_keys(params.seed, 1)), SIZE))
    x: Any = initial_latents(encoded, noise, start.image_weight, start.noise_scale)
    denoised: Any = np.zeros_like(x)
    negative, prompt = pipeline.negative_conditioning(params.negative_prompt), pipeline.encode_prompt(params.prompt)
    text = jax.tree_util.tree_map(lambda n, p: jnp.concatenate([n, p]), negative, prompt)
    step = _host_step(pipeline._pipe)
    for row in start.rows:
        x, denoised = step(pipeline._step_params.step, x, denoised, row, text, np.float32(params.guidance_scale))
    decode = jax.jit(functools.partial(_decode, pipeline._pipe))
    return np.asarray(decode(pipeline._step_params.finish, StepState(x, x)))


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m_karras"])
def test_an_image_to_image_row_makes_the_image_of_diffusers_arithmetic(
    engine: RowEngine, pipeline: SDXLPipeline, scheduler: str
) -> None:
    """Strength 0.7 of 3 steps runs the last 2 (diffusers' `get_timesteps`): the engine's image is the host
    reference's within bfloat16's rounding of another program (the bound of test_engine's lone request), and its
    progress counts the 2 steps it runs."""
    params = ask("a lighthouse", n=1, seed=7, scheduler=scheduler, negative_prompt="fog")
    image = ImageInput(picture(), None, 0.7)
    seen = run_images(engine, [("img", params, image)])
    expected = reference_img2img(engine, pipeline, params, image)
    assert_as_generate(seen.images["img"], expected)
    assert seen.progress["img"] == [1, 2] and engine.stats.steps == {2: 2}
    # The image shows through: the same request from text alone is another image.
    text = run(engine, [("text", params)])
    assert np.abs(text.images["text"].astype(np.int16) - seen.images["img"].astype(np.int16)).mean() > 10


def test_image_rows_and_text_rows_share_steps_each_as_it_is_alone(engine: RowEngine) -> None:
    """A text row, an image-to-image row and an inpainting row, each on its own device at the same bucket: each
    image is its solo image bit for bit, the image rows joining the text row's steps mid-way through its
    schedule (they run 2 of 3 steps)."""
    requests: list[tuple[str, ResolvedParams, ImageInput | None]] = [
        ("text", ask("a boat", n=1, seed=3, scheduler="dpmpp_2m_karras"), None),
        ("img", ask("a tree", n=1, seed=4), ImageInput(picture(), None, 0.7)),
        (
            "inpaint",
            ask("a cat", n=1, seed=5, scheduler="dpmpp_2m_karras"),
            ImageInput(picture(), left_half(48, 80), 0.7),
        ),
    ]
    alone = {key: run_images(engine, [(key, params, image)]).images[key] for key, params, image in requests}
    engine.stats.__init__()  # type: ignore[misc]
    together = run_images(engine, requests)
    assert engine.stats.steps == {2: MAX_STEPS}
    assert together.progress == {"text": [1, 2, 3], "img": [1, 2], "inpaint": [1, 2]}
    for key, _, _ in requests:
        np.testing.assert_array_equal(together.images[key], alone[key])


def test_inpainting_at_strength_one_with_a_mask_of_ones_is_text_to_image(engine: RowEngine) -> None:
    """diffusers' inpainting at strength 1 starts from pure noise as text-to-image does, and a mask that repaints
    everything keeps nothing: the image is text-to-image's, bit for bit."""
    params = ask("a lighthouse", n=2, seed=11)
    everything = np.ones((SIZE.height, SIZE.width), bool)
    inpainted = run_images(engine, [("inpaint", params, ImageInput(picture(64, 64), everything, 1.0))])
    text = run(engine, [("text", params)])
    np.testing.assert_array_equal(inpainted.images["inpaint"], text.images["text"])
    assert inpainted.progress["inpaint"] == [1, 2, 3]


@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpainting_ends_on_the_encoded_image_outside_the_mask_exactly(engine: RowEngine, strength: float) -> None:
    """After the last step the kept half of the latents is the encoded image exactly (noised to the next level,
    0), and the repainted half is not."""
    image = ImageInput(picture(64, 64), left_half(), strength)
    run_images(engine, [("inpaint", ask("a cat", n=1, seed=2), image)])
    latents = np.asarray(engine._pools[SIZE].slots.latents)[0]  # the lone row: device 0, slot 0
    encoded = engine._starts.encoder.encode([to_model_input(resize_to(image.image, SIZE.width, SIZE.height))])
    half = latents.shape[-1] // 2
    np.testing.assert_array_equal(latents[..., half:], encoded[0, ..., half:])
    assert np.abs(latents[..., :half] - encoded[0, ..., :half]).mean() > 0.1


def test_the_shortest_policy_counts_the_steps_an_image_row_runs(engine: RowEngine) -> None:
    """Behind a full batch, a text request of 3 steps and then an image-to-image request of 3 steps at strength
    0.34 (it runs 1): `shortest` starts the image request first, as a 1-step request."""
    engine.policy = "shortest"
    try:
        seen = run_images(
            engine,
            [
                ("full", ask("f", n=8, steps=1), None),
                ("long", ask("l", n=8), None),
                ("img", ask("i", n=8), ImageInput(picture(), None, 0.34)),
            ],
        )
    finally:
        engine.policy = "fifo"
    assert seen.started == {"full": 1, "img": 2, "long": 3}
    assert seen.progress["img"] == [1]


def test_no_compile_when_image_rows_arrive(engine: RowEngine) -> None:
    """Image-to-image and inpainting rows of every strength, scheduler and step count, mixed with text rows and
    joining mid-way: not one compile (the encoder, the start's arrays and the blend are compiled and warm)."""
    images = [
        ImageInput(picture(), None, 0.7),
        ImageInput(picture(64, 64), left_half(), 1.0),
        ImageInput(picture(30, 90), None, 1.0),
        ImageInput(picture(), left_half(48, 80), 0.5),
    ]
    with counting_compiles() as compiles:
        seen = run_images(
            engine,
            [
                ("text", ask("t", n=3, guidance_scale=0.0), None),
                ("img", ask("i", n=2, steps=2, scheduler="dpmpp_2m_karras"), images[0]),
                ("inpaint", ask("p", n=1, scheduler="euler_trailing"), images[1]),
            ],
        )
        run_images(engine, [("img1", ask("i", n=4), images[2]), ("inpaint1", ask("p", n=2), images[3])], seen)
    assert compiles == []
    assert set(seen.images) == {"text", "img", "inpaint", "img1", "inpaint1"}


def test_what_images_cannot_do_is_refused_at_admission_with_nothing_held(engine: RowEngine) -> None:
    dot = np.zeros((SIZE.height, SIZE.width), bool)
    dot[1, 1] = True  # the latent mask reads every other pixel from the first: this one vanishes
    cases = [
        (ImageInput(picture(), None, 0.2), "^strength: 0.2 at 3 steps runs no step"),
        (ImageInput(picture(), None, 1.5), "^strength: must be between 0 and 1"),
        (ImageInput(picture(), left_half(48, 80), 0.0), "runs no step"),
        (ImageInput(picture(64, 64), dot, 0.7), "mask: nothing to repaint at 64x64"),
        (ImageInput(picture(), left_half(), 0.7), r"mask: bool \[48, 80\] \(the image's size\) expected"),
        (ImageInput(picture().astype(np.float32), None, 0.7), r"image: uint8 \[height, width, 3\] expected"),
    ]
    for image, message in cases:
        with pytest.raises(ImageRefused, match=message):
            engine.admit("refused", ask("a"), Run().on_step("refused"), image=image)
        assert not engine.busy and engine.free_rows() == engine.rows


def test_one_request_at_a_time_refuses_an_input_image_and_the_stand_in_answers_with_it() -> None:
    """The one-request-at-a-time engine says so in words, holding nothing; the stand-in (which the gateway's tests
    run) answers with the image it was given, at the request's size."""
    stand_in = StandInPipeline((Shape(width=64, height=64, steps=2),))
    image = ImageInput(picture(), None, 0.5)
    at_a_time = RequestAtATime(stand_in, 4)
    with pytest.raises(ImagesRefused, match="image: this worker runs one request at a time"):
        at_a_time.admit("a", ask("a", steps=2), lambda step: None, image=image)
    assert not at_a_time.busy
    standin_engine = StandInEngine(stand_in, rows_per_device=4, step_s=0.0)
    standin_engine.admit("a", ask("a", n=1, steps=2), lambda step: None, image=image)
    finished = []
    while standin_engine.busy:
        finished += standin_engine.step().finished
    ((key, images),) = finished
    assert key == "a" and images.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(images[0], resize_to(image.image, 64, 64))


@pytest.fixture(scope="module")
def inpainting_engine(tmp_path_factory: pytest.TempPathFactory) -> RowEngine:
    """An engine of the tiny model with a 9-channel inpainting UNet, one row per device."""
    model = write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl-inpainting", inpainting=True)
    loaded = SDXLPipeline.load(str(model), None, PipelineOptions(images_per_request=4, max_steps=MAX_STEPS))
    engine = RowEngine(loaded, rows_per_device=1)
    engine.compile(SIZE)
    return engine


def test_a_nine_channel_model_reads_the_masked_image_not_what_it_repaints(inpainting_engine: RowEngine) -> None:
    """At strength 1 the image reaches the 9-channel UNet only as the masked image: two images that differ only
    where the mask repaints make the same image bit for bit, two that differ where it keeps do not. Nothing
    compiles."""
    image, half = picture(64, 64), SIZE.width // 2
    inside, outside = image.copy(), image.copy()
    inside[:, :half] = 255 - inside[:, :half]
    outside[:, half:] = 255 - outside[:, half:]
    params = ask("a cat", n=1, seed=6)
    with counting_compiles() as compiles:
        seen = run_images(
            inpainting_engine,
            [
                (key, params, ImageInput(pixels, left_half(), 1.0))
                for key, pixels in [("image", image), ("inside", inside), ("outside", outside)]
            ],
        )
    assert compiles == []
    assert seen.progress["image"] == [1, 2, 3]
    np.testing.assert_array_equal(seen.images["inside"], seen.images["image"])
    assert np.abs(seen.images["outside"].astype(np.int16) - seen.images["image"].astype(np.int16)).mean() > 1


def test_a_nine_channel_model_refuses_text_and_image_to_image(inpainting_engine: RowEngine) -> None:
    for image in (None, ImageInput(picture(), None, 0.7)):
        with pytest.raises(InpaintingOnly, match="it runs inpainting requests only"):
            inpainting_engine.admit("refused", ask("a", n=1), Run().on_step("refused"), image=image)
        assert not inpainting_engine.busy
