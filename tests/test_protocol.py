"""Schemas: shape parsing, request validation rules, and the generation parameters a job carries."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from common.protocol import (
    MAX_LORAS,
    MAX_SEED,
    SDXL_RESOLUTIONS,
    GenerationParams,
    InputRefs,
    Job,
    ResolvedParams,
    Shape,
    nearest_sdxl_resolution,
)
from gateway.schemas import GenerateRequest


def test_shape_round_trips_through_text() -> None:
    shape = Shape.parse("1024x768x20")
    assert (shape.width, shape.height, shape.steps) == (1024, 768, 20)
    assert str(shape) == "1024x768x20"


@pytest.mark.parametrize("text", ["1024x1024", "axbxc", "1024x1024x0", "", "1024x1024x20x1"])
def test_shape_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError):
        Shape.parse(text)


def test_request_defaults_leave_shape_to_the_cluster() -> None:
    request = GenerateRequest.model_validate_json(b'{"prompt": "a cat"}')
    assert request.seed is None and request.width is None and request.num_inference_steps is None
    assert request.guidance_scale == 7.5 and request.negative_prompt == ""


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ("{}", "prompt", "missing"),
        ('{"prompt": ""}', "prompt", "string_too_short"),
        ('{"prompt": "   "}', "prompt", "value_error"),
        ('{"prompt": 5}', "prompt", "string_type"),
        ('{"prompt": "a", "seed": "5"}', "seed", "int_type"),
        ('{"prompt": "a", "seed": -1}', "seed", "greater_than_equal"),
        (f'{{"prompt": "a", "seed": {MAX_SEED + 1}}}', "seed", "less_than_equal"),
        ('{"prompt": "a", "width": 100}', "width", "multiple_of"),
        ('{"prompt": "a", "guidance_scale": 31}', "guidance_scale", "less_than_equal"),
        ('{"prompt": "a", "colour": "red"}', "colour", "extra_forbidden"),
        ('{"prompt": "' + "x" * 2001 + '"}', "prompt", "string_too_long"),
    ],
)
def test_request_rejects_with_field_and_rule(body: str, field: str, rule: str) -> None:
    with pytest.raises(ValidationError) as caught:
        GenerateRequest.model_validate_json(body)
    error = caught.value.errors()[0]
    assert (error["loc"][0], error["type"]) == (field, rule)


def test_a_request_resolves_into_the_parameters_its_job_carries_whole() -> None:
    """Every generation parameter of the body reaches the job, with the cluster's choices for the omitted ones;
    the body's delivery fields (output format, webhook) are not generation parameters."""
    assert set(GenerationParams.model_fields) <= set(GenerateRequest.model_fields)
    assert set(ResolvedParams.model_fields) == set(GenerationParams.model_fields)
    request = GenerateRequest.model_validate_json(
        b'{"prompt": "a cat", "negative_prompt": "blurry", "guidance_scale": 5, "output_format": "jpeg"}'
    )
    params = request.resolved(Shape(width=64, height=96, steps=3), seed=9, scheduler="euler_trailing")
    assert params.model_dump() == {
        "prompt": "a cat",
        "negative_prompt": "blurry",
        "seed": 9,
        "guidance_scale": 5.0,
        "num_inference_steps": 3,
        "width": 64,
        "height": 96,
        "scheduler": "euler_trailing",
        "n": 4,
        "loras": [],
    }
    assert params.shape == Shape(width=64, height=96, steps=3)
    job = Job(id="j", params=params, result_ttl_s=60)
    assert Job.model_validate_json(job.model_dump_json()) == job  # as a worker reads it back from the queue


def test_a_job_with_unresolved_parameters_is_refused() -> None:
    unresolved = {"id": "j", "params": {"prompt": "a cat"}, "result_ttl_s": 60}
    with pytest.raises(ValidationError) as caught:
        Job.model_validate(unresolved)
    missing = {error["loc"][-1] for error in caught.value.errors()}
    assert missing == {"seed", "num_inference_steps", "width", "height", "scheduler"}


def test_integer_guidance_is_accepted_as_float() -> None:
    assert GenerateRequest.model_validate_json(b'{"prompt": "a", "guidance_scale": 5}').guidance_scale == 5.0


def test_sdxl_trained_resolutions_are_on_its_grid() -> None:
    # VAE factor 8 times UNet factor 4.
    assert all(width % 32 == 0 and height % 32 == 0 for width, height in SDXL_RESOLUTIONS)


@pytest.mark.parametrize(
    ("asked", "served"),
    [
        ((1024, 1024), (1024, 1024)),
        ((1536, 1024), (1216, 832)),
        ((1024, 1536), (832, 1216)),
        ((1792, 1024), (1344, 768)),
        ((1024, 1792), (768, 1344)),
        ((512, 512), (1024, 1024)),
        ((2400, 1000), (1536, 640)),
    ],
)
def test_nearest_sdxl_resolution_by_aspect_ratio(asked: tuple[int, int], served: tuple[int, int]) -> None:
    assert nearest_sdxl_resolution(*asked) == served


@pytest.mark.parametrize(
    ("loras", "location", "rule"),
    [
        ([{"name": "a", "scale": 9.0}], ("loras", 0, "scale"), "less_than_equal"),
        ([{"name": "a", "scale": float("nan")}], ("loras", 0, "scale"), "finite_number"),
        ([{"name": "../etc/passwd"}], ("loras", 0, "name"), "string_pattern_mismatch"),
        ([{"name": "a"}, {"name": "a"}], ("loras",), "lora_repeated"),
        ([{"name": f"a{i}"} for i in range(MAX_LORAS + 1)], ("loras",), "too_long"),
        ([{"name": "a", "weight": 1.0}], ("loras", 0, "weight"), "extra_forbidden"),
    ],
)
def test_a_bad_lora_is_refused_naming_its_field(
    loras: list[dict[str, Any]], location: tuple[Any, ...], rule: str
) -> None:
    """An adapter's name is a plain file stem, its scale finite and bounded, each named once, a bounded number."""
    with pytest.raises(ValidationError) as caught:
        GenerationParams.model_validate({"prompt": "a cat", "loras": loras})
    error = caught.value.errors()[0]
    assert (error["loc"], error["type"]) == (location, rule)


def test_loras_default_to_none_and_keep_their_order() -> None:
    assert GenerationParams(prompt="a cat").loras == []
    params = GenerationParams.model_validate({"prompt": "a cat", "loras": [{"name": "b", "scale": -1}, {"name": "a"}]})
    assert [(lora.name, lora.scale) for lora in params.loras] == [("b", -1.0), ("a", 1.0)]


def test_a_job_without_input_images_is_written_as_before_they_existed() -> None:
    """A worker of an earlier release refuses unknown fields: a text-to-image job names neither `strength` nor
    `inputs`, so it still takes such jobs while a cluster is upgraded. A job with them reads back whole."""
    params = ResolvedParams(prompt="a cat", seed=1, num_inference_steps=2, width=64, height=64, scheduler="euler")
    plain = json.loads(Job(id="j", params=params, result_ttl_s=60).model_dump_json())
    assert "inputs" not in plain and "strength" not in plain["params"]
    refs = InputRefs(store="redis", image="sdxl:input:j:image", mask="sdxl:input:j:mask", width=64, height=48)
    edit = Job(id="j", params=params.model_copy(update={"strength": 0.3}), result_ttl_s=60, inputs=refs)
    assert Job.model_validate_json(edit.model_dump_json()) == edit


@pytest.mark.parametrize("strength", [0, -0.1, 1.01, float("nan"), float("inf"), "0.5"])
def test_strength_is_a_number_in_zero_to_one(strength: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        GenerationParams.model_validate({"prompt": "a cat", "strength": strength})
    assert caught.value.errors()[0]["loc"] == ("strength",)
