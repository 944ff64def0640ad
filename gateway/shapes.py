"""Matching a request's size and steps to what the live workers have compiled."""

from __future__ import annotations

from collections import Counter

from common.protocol import Shape
from common.registry import SERVING_STATES, WorkerInfo
from gateway.errors import ApiError
from gateway.schemas import GenerateRequest


def resolve_shape(request: GenerateRequest, workers: list[WorkerInfo]) -> Shape:
    """The shape to run: the request's fields, omitted ones taken from the cluster's default shape.

    Raises ApiError 503 when no worker is registered, 400 when no worker compiled the shape, and 503 when
    the workers that compiled it are all still warming up or draining (a job is only ever routed to a
    worker that is ready to take it, never left to wait for one that may not come).
    """
    known = [s for w in workers for s in w.shapes]
    if not known:
        raise ApiError(503, "no_workers", "no worker is serving yet; retry shortly", headers={"Retry-After": "5"})
    serving = [s for w in workers if w.state in SERVING_STATES for s in w.shapes]
    default = _default_shape([w for w in workers if w.state in SERVING_STATES] or workers)
    shape = Shape(
        width=request.width or default.width,
        height=request.height or default.height,
        steps=request.num_inference_steps or default.steps,
    )
    if shape not in known:
        raise ApiError(
            400,
            "unsupported_shape",
            f"no worker serves {shape.width}x{shape.height} at {shape.steps} steps; served "
            f"(WIDTHxHEIGHTxSTEPS): {', '.join(map(str, dict.fromkeys(known)))}",
            field=_field_at_fault(shape, known),
        )
    if shape not in serving:
        raise ApiError(
            503,
            "no_ready_worker",
            f"the workers serving {shape} are warming up or draining; retry shortly",
            headers={"Retry-After": "5"},
        )
    return shape


def _default_shape(workers: list[WorkerInfo]) -> Shape:
    """The first shape most workers list (each worker lists its own default first)."""
    firsts = Counter(w.shapes[0] for w in workers if w.shapes)
    return max(firsts, key=lambda s: (firsts[s], -s.width, -s.height, -s.steps))


def _field_at_fault(shape: Shape, supported: list[Shape]) -> str:
    if all(s.width != shape.width for s in supported):
        return "width"
    if all((s.width, s.height) != (shape.width, shape.height) for s in supported):
        return "height"
    return "num_inference_steps"
