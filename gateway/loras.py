"""Matching the LoRA adapters a request names to what the live workers offer, and listing them (`GET /v1/loras`).

A worker offers the adapters of its `--lora-dir` (`WorkerInfo.loras`) and applies up to its `max_loras` of them to
one request (0: none). A request's adapters are checked against the registered workers that could run its shape and
scheduler: a name none of them offers is a 400 naming `loras[i].name`; more adapters than any of them applies, or a
set no single one of them offers whole, a 400 naming `loras`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from common.registry import SERVING_STATES, WorkerInfo
from gateway.errors import ApiError
from gateway.schemas import LoraCard, LoraList

# The most names an error message lists of the adapters offered.
LISTED = 20


def offers(worker: WorkerInfo, names: Collection[str]) -> bool:
    """Whether `worker` can apply all of `names` to one request (no names: any worker can)."""
    return not names or (len(names) <= worker.max_loras and set(names) <= set(worker.loras))


def holds(worker: WorkerInfo, names: Collection[str]) -> bool:
    """Whether `worker`'s device pool holds all of `names` now: it runs them without loading any."""
    return set(names) <= set(worker.loras_loaded)


def check_loras(names: Sequence[str], able: list[WorkerInfo], what: str) -> None:
    """Raise a 400 unless one of `able` (the workers that run the request's shape and scheduler, described by
    `what`) offers every one of `names`."""
    if not names:
        return
    offered = list(dict.fromkeys(name for w in able if w.max_loras > 0 for name in w.loras))
    for index, name in enumerate(names):
        if name not in offered:
            raise _unknown(index, name, offered, what)
    most = max(w.max_loras for w in able)
    if len(names) > most:
        raise ApiError(
            400,
            "too_many_loras",
            f"loras: {len(names)} adapters named; the workers serving {what} apply at most {most} per request",
            field="loras",
        )
    if not any(offers(w, names) for w in able):
        raise ApiError(
            400,
            "loras_not_together",
            f"loras: no one worker serving {what} offers all of {', '.join(names)} (GET /v1/loras says which offers "
            "what)",
            field="loras",
        )


def _unknown(index: int, name: str, offered: list[str], what: str) -> ApiError:
    field = f"loras[{index}].name"
    return ApiError(
        400,
        "unknown_lora",
        f"{field}: no worker serving {what} offers adapter {name!r}; {_listing(offered)} (GET /v1/loras)",
        field=field,
    )


def _listing(offered: list[str]) -> str:
    if not offered:
        return "none offers LoRA adapters"
    more = f" and {len(offered) - LISTED} more" if len(offered) > LISTED else ""
    return f"offered: {', '.join(offered[:LISTED])}{more}"


def lora_list(workers: list[WorkerInfo]) -> LoraList:
    """`GET /v1/loras`: the adapters the serving workers offer, and the most one request may name."""
    serving = [w for w in workers if w.state in SERVING_STATES and w.max_loras > 0]
    return LoraList(data=lora_cards(serving), max_loras=max((w.max_loras for w in serving), default=0))


def lora_cards(serving: list[WorkerInfo]) -> list[LoraCard]:
    """The adapters `serving` workers (those that apply any) offer, by name: which offer each, how many hold it."""
    names = sorted({name for w in serving for name in w.loras})
    return [
        LoraCard(
            id=name,
            workers=sorted(w.id for w in serving if name in w.loras),
            loaded=sum(name in w.loras_loaded for w in serving),
        )
        for name in names
    ]
