"""Matching a request's size and steps to what the live workers have compiled."""

from __future__ import annotations

from collections import Counter

from common.protocol import GenerateRequest, Shape
from common.registry import WorkerInfo
from gateway.errors import ApiError

ACCEPTING_STATES = frozenset({"warming", "ready", "busy"})


def resolve_shape(request: GenerateRequest, workers: list[WorkerInfo]) -> Shape:
    """The shape to run: the request's fields, omitted ones taken from the cluster's default shape.

    Raises ApiError 503 when no worker is there to serve, 400 when no worker compiled the shape.
    """
    supported = [s for w in workers if w.state in ACCEPTING_STATES for s in w.shapes]
    if not supported:
        raise ApiError(503, "no_workers", "no worker is serving yet; retry shortly",
                       headers={"Retry-After": "5"})
    default = _default_shape(workers)
    shape = Shape(width=request.width or default.width, height=request.height or default.height,
                  steps=request.num_inference_steps or default.steps)
    if shape not in supported:
        raise ApiError(400, "unsupported_shape",
                       f"no worker serves {shape.width}x{shape.height} at {shape.steps} steps; served "
                       f"(WIDTHxHEIGHTxSTEPS): {', '.join(map(str, dict.fromkeys(supported)))}",
                       field=_field_at_fault(shape, supported))
    return shape


def _default_shape(workers: list[WorkerInfo]) -> Shape:
    """The first shape most workers list (each worker lists its own default first)."""
    firsts = Counter(w.shapes[0] for w in workers if w.shapes and w.state in ACCEPTING_STATES)
    return max(firsts, key=lambda s: (firsts[s], -s.width, -s.height, -s.steps))


def _field_at_fault(shape: Shape, supported: list[Shape]) -> str:
    if all(s.width != shape.width for s in supported):
        return "width"
    if all((s.width, s.height) != (shape.width, shape.height) for s in supported):
        return "height"
    return "num_inference_steps"
