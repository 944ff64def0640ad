"""Schemas: shape parsing and request validation rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.protocol import MAX_SEED, Shape, parse_shapes
from gateway.schemas import GenerateRequest


def test_shape_round_trips_through_text() -> None:
    shape = Shape.parse("1024x768x20")
    assert (shape.width, shape.height, shape.steps) == (1024, 768, 20)
    assert str(shape) == "1024x768x20"


@pytest.mark.parametrize("text", ["1024x1024", "axbxc", "1024x1024x0", "", "1024x1024x20x1"])
def test_shape_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError):
        Shape.parse(text)


def test_parse_shapes_keeps_order_and_drops_repeats() -> None:
    assert [str(s) for s in parse_shapes("64x64x3, 64x64x2,64x64x3")] == ["64x64x3", "64x64x2"]


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


def test_integer_guidance_is_accepted_as_float() -> None:
    assert GenerateRequest.model_validate_json(b'{"prompt": "a", "guidance_scale": 5}').guidance_scale == 5.0
