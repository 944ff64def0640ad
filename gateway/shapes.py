"""Matching a request's size, step count, scheduler and LoRA adapters to what the live workers serve.

A worker serves a list of sizes (one compiled executable set each), any step count from 1 to its
`max_steps`, and a list of schedulers. A request is checked against the workers registered now: a size,
step count or scheduler that none of them serves is the client's mistake (400 naming the field), as are adapters
none of them offers (gateway/loras.py); one that only warming or draining workers serve is a 503 to retry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from common.protocol import (
    DEFAULT_SCHEDULER,
    IMAGE_KINDS,
    REQUEST_KINDS,
    GenerationParams,
    RequestKind,
    Scheduler,
    Shape,
    Size,
)
from common.registry import SERVING_STATES, WorkerInfo
from gateway.errors import ApiError
from gateway.loras import check_loras, offers
from gateway.schemas import ModelCard

RETRY_SOON = {"Retry-After": "5"}


@dataclass(frozen=True)
class Resolved:
    """What a request runs: its shape (size and step count) and scheduler."""

    shape: Shape
    scheduler: Scheduler


def runs(
    worker: WorkerInfo, shape: Shape, scheduler: str, loras: Collection[str] = (), kind: RequestKind = "text-to-image"
) -> bool:
    """Whether `worker` can run a job of `shape` with `scheduler` and the adapters named `loras`, of the request `kind`
    (text to image, or from an input image: image to image, inpainting), whatever its state."""
    return serves(worker, shape, scheduler, loras) and kind in worker.request_kinds


def serves(worker: WorkerInfo, shape: Shape, scheduler: str, loras: Collection[str] = ()) -> bool:
    """Whether `worker` serves `shape` with `scheduler` and the adapters named `loras`, of whichever kind."""
    return (
        shape.size in worker.sizes
        and shape.steps <= worker.max_steps
        and scheduler in worker.schedulers
        and offers(worker, loras)
    )


def resolve(request: GenerationParams, workers: list[WorkerInfo], kind: RequestKind = "text-to-image") -> Resolved:
    """The shape and scheduler to run: the request's fields, omitted ones taken from the cluster's defaults.

    Raises ApiError 503 when no worker is registered; 400 naming `width` or `height`, `num_inference_steps`
    or `scheduler` when no registered worker serves the value, naming `image` or `mask` when none of them runs the
    request's `kind` (`_check_kind`); 503 when the workers that serve it are all
    still warming up or draining (a job is only ever routed to a worker that is ready to take it, never left
    to wait for one that may not come).
    """
    if not any(w.sizes for w in workers):
        raise ApiError(503, "no_workers", "no worker is serving yet; retry shortly", headers=RETRY_SOON)
    size = _size(request, workers)
    known = [w for w in workers if size in w.sizes]
    steps = request.num_inference_steps or _default_steps(known)
    shape = Shape(width=size.width, height=size.height, steps=steps)
    _check_steps(shape, known)
    scheduler = request.scheduler or DEFAULT_SCHEDULER
    _check_scheduler(shape, scheduler, known)
    what = f"{size} at {steps} steps with {scheduler}"
    names = [lora.name for lora in request.loras]
    check_loras(names, [w for w in known if serves(w, shape, scheduler)], what)
    _check_kind(what, kind, [w for w in known if serves(w, shape, scheduler, names)])
    if not any(w.state in SERVING_STATES and runs(w, shape, scheduler, names, kind) for w in known):
        extra = (" and these adapters" if names else "") + ("" if kind == "text-to-image" else f" for {kind}")
        raise ApiError(
            503,
            "no_ready_worker",
            f"the workers serving {what}{extra} are warming up or draining; retry shortly",
            headers=RETRY_SOON,
        )
    return Resolved(shape=shape, scheduler=scheduler)


def _check_kind(what: str, kind: RequestKind, able: list[WorkerInfo]) -> None:
    """400 when none of the workers that run the rest of the request (`able`) runs its `kind`: naming `image` when
    none generates from an input image (`image_input_unsupported`) or a text-to-image request meets inpainting-only
    workers, `mask` when an image-to-image request does (`request_kind_unsupported`)."""
    offered = [k for k in REQUEST_KINDS if any(k in w.request_kinds for w in able)]
    if kind in offered:
        return
    if kind in IMAGE_KINDS and not IMAGE_KINDS & set(offered):
        raise ApiError(
            400,
            "image_input_unsupported",
            f"image: no worker serving {what} generates from an input image yet (none advertises image_input)",
            field="image",
        )
    field = "mask" if kind == "image-to-image" else "image"
    fix = "send a mask with the image" if field == "mask" else "send an image (and a mask)"
    raise ApiError(
        400,
        "request_kind_unsupported",
        f"{field}: the workers serving {what} run {' and '.join(offered) + ' only' if offered else 'nothing'}, not "
        f"{kind}: {fix}",
        field=field,
    )


def _size(request: GenerationParams, workers: list[WorkerInfo]) -> Size:
    """The requested size, omitted dimensions from the default size; 400 when no worker serves it."""
    default = default_size(workers)
    size = Size(width=request.width or default.width, height=request.height or default.height)
    served = list(dict.fromkeys(s for w in workers for s in w.sizes))
    if size not in served:
        field = "width" if all(s.width != size.width for s in served) else "height"
        raise ApiError(
            400,
            "unsupported_size",
            # No field prefix: the OpenAI route reports this as its `size` parameter.
            f"no worker serves {size}; served sizes (WIDTHxHEIGHT): {', '.join(map(str, served))}",
            field=field,
        )
    return size


def default_size(workers: list[WorkerInfo]) -> Size:
    """The first size most serving workers list (each worker lists its own default first); of all
    registered workers when none is serving yet. `workers` must list a size."""
    serving = [w for w in workers if w.state in SERVING_STATES and w.sizes]
    firsts = Counter(w.sizes[0] for w in serving or workers if w.sizes)
    return max(firsts, key=lambda s: (firsts[s], -s.width, -s.height))


def _default_steps(workers: list[WorkerInfo]) -> int:
    """The most common default step count of the workers serving a size (serving ones first)."""
    serving = [w for w in workers if w.state in SERVING_STATES]
    counts = Counter(w.default_steps for w in serving or workers)
    return max(counts, key=lambda steps: (counts[steps], -steps))


def _check_steps(shape: Shape, workers: list[WorkerInfo]) -> None:
    limit = max(w.max_steps for w in workers)
    if shape.steps > limit:
        raise ApiError(
            400,
            "unsupported_steps",
            f"num_inference_steps: the workers serving {shape.size} run 1..{limit} steps, not {shape.steps}",
            field="num_inference_steps",
        )


def _check_scheduler(shape: Shape, scheduler: str, workers: list[WorkerInfo]) -> None:
    able = [w for w in workers if shape.steps <= w.max_steps]
    offered = list(dict.fromkeys(s for w in able for s in w.schedulers))
    if scheduler not in offered:
        raise ApiError(
            400,
            "unsupported_scheduler",
            f"scheduler: no worker serving {shape.size} at {shape.steps} steps offers {scheduler}; "
            f"offered: {', '.join(offered)}",
            field="scheduler",
        )


def model_cards(workers: list[WorkerInfo]) -> list[ModelCard]:
    """What the serving workers serve, one card per model: sizes (the default first), the step range and
    the schedulers (the default first). Empty while no worker is serving."""
    serving = [w for w in workers if w.state in SERVING_STATES and w.sizes]
    by_model: dict[str, list[WorkerInfo]] = {}
    for worker in serving:
        by_model.setdefault(worker.model, []).append(worker)
    return [_card(model, group) for model, group in sorted(by_model.items())]


def _card(model: str, workers: list[WorkerInfo]) -> ModelCard:
    default = default_size(workers)
    sizes = dict.fromkeys([default, *(s for w in workers for s in w.sizes)])
    schedulers = dict.fromkeys(s for w in workers for s in w.schedulers)
    if DEFAULT_SCHEDULER in schedulers:
        schedulers = dict.fromkeys([DEFAULT_SCHEDULER, *schedulers])
    return ModelCard(
        id=model,
        created=int(min(w.ready_at or w.started_at for w in workers)),
        sizes=[str(s) for s in sizes],
        max_steps=max(w.max_steps for w in workers),
        default_steps=_default_steps([w for w in workers if default in w.sizes]),
        schedulers=list(schedulers),
        random_weights=any(w.random_weights for w in workers),
    )
