"""LoRA adapters through the HTTP API (gateway/loras.py): a request's adapters checked against the live workers on
every route that generates, and `GET /v1/loras`; a real gateway on a real Redis, workers registered as they publish
themselves."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from common.protocol import LoraRef
from tests.support import (
    ProcessGroup,
    RedisServer,
    claim_next,
    finish,
    queued_jobs,
    register_worker,
    wait_ready,
)

Client = TestClient[Any, Any]
ROUTES = ("/v1/jobs", "/v1/generate", "/v1/images/generations")
OPENAI = "/v1/images/generations"


async def refused(client: Client, route: str, loras: Any) -> tuple[int, str | None, str]:
    """Post a request naming `loras` on `route`: the status, the field the error names and its code (the OpenAI
    route names it as `param`)."""
    response = await client.post(route, json={"prompt": "a cat", "loras": loras})
    error = (await response.json())["error"]
    return response.status, error["param" if route == OPENAI else "field"], error["code"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("loras", "field", "code"),
    [
        ([{"name": "ink"}, {"name": "oil"}], "loras[1].name", "unknown_lora"),
        ([{"name": "ink", "scale": 9.0}], "loras[0].scale", "less_than_equal"),
        ([{"name": "ink", "scale": "1"}], "loras[0].scale", "float_type"),
        ([{"name": "../ink"}], "loras[0].name", "string_pattern_mismatch"),
        ([{"name": "ink", "weight": 1.0}], "loras[0].weight", "extra_forbidden"),
        ([{"name": "ink"}, {"name": "ink"}], "loras", "lora_repeated"),
        ([{"name": f"a{k}"} for k in range(9)], "loras", "too_long"),
        ("ink", "loras", "list_type"),
    ],
)
async def test_a_bad_adapter_is_400_naming_it_on_every_route_and_queues_nothing(
    client: Client, redis_client: aioredis.Redis, route: str, loras: Any, field: str, code: str
) -> None:
    await register_worker(redis_client, loras=["ink"], max_loras=4)
    assert await refused(client, route, loras) == (400, field, code)
    assert await queued_jobs(redis_client) == 0


@pytest.mark.parametrize("route", ROUTES)
async def test_more_adapters_than_the_workers_apply_is_400_naming_loras(
    client: Client, redis_client: aioredis.Redis, route: str
) -> None:
    await register_worker(redis_client, "one", loras=["ink", "oil", "wax"], max_loras=1)
    await register_worker(redis_client, "two", loras=["ink", "oil", "wax"], max_loras=2)
    three = [{"name": "ink"}, {"name": "oil"}, {"name": "wax"}]
    assert await refused(client, route, three) == (400, "loras", "too_many_loras")
    message = (await (await client.post("/v1/jobs", json={"prompt": "a", "loras": three})).json())["error"]["message"]
    assert message.startswith("loras: 3 adapters named; the workers serving 64x64") and "at most 2" in message
    assert await queued_jobs(redis_client) == 0


async def test_adapters_no_single_worker_offers_together_are_400_naming_loras(
    client: Client, redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, "inky", loras=["ink"], max_loras=4)
    await register_worker(redis_client, "oily", loras=["oil"], max_loras=4)
    assert await refused(client, "/v1/jobs", [{"name": "ink"}, {"name": "oil"}]) == (400, "loras", "loras_not_together")


async def test_a_cluster_that_offers_no_adapters_says_so(client: Client, redis_client: aioredis.Redis) -> None:
    await register_worker(redis_client)
    response = await client.post("/v1/jobs", json={"prompt": "a", "loras": [{"name": "ink"}]})
    error = (await response.json())["error"]
    assert (response.status, error["field"]) == (400, "loras[0].name")
    assert (
        "no worker serving 64x64 at 2 steps with euler offers adapter 'ink'; none offers LoRA adapters"
        in (error["message"])
    )


async def test_adapters_only_a_warming_worker_offers_are_503_to_retry(
    client: Client, redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, "ready")
    await register_worker(redis_client, "warming", state="warming", loras=["ink"], max_loras=4)
    response = await client.post("/v1/jobs", json={"prompt": "a", "loras": [{"name": "ink"}]})
    assert response.status == 503 and (await response.json())["error"]["code"] == "no_ready_worker"
    assert response.headers["Retry-After"] == "5"


async def test_adapters_a_worker_offers_are_queued_with_the_job(client: Client, redis_client: aioredis.Redis) -> None:
    await register_worker(redis_client, loras=["ink", "oil"], max_loras=2)
    loras = [{"name": "oil", "scale": -0.5}, {"name": "ink"}]
    response = await client.post("/v1/jobs", json={"prompt": "a", "loras": loras})
    assert response.status == 202
    claimed = await claim_next(redis_client)
    assert claimed.job.params.loras == [LoraRef(name="oil", scale=-0.5), LoraRef(name="ink", scale=1.0)]


async def test_the_openai_route_takes_loras_as_an_extra_field(client: Client, redis_client: aioredis.Redis) -> None:
    await register_worker(redis_client, loras=["ink"], max_loras=1)

    async def serve_one() -> list[LoraRef]:
        claimed = await claim_next(redis_client)
        await finish(redis_client, claimed, [b"png"])
        return claimed.job.params.loras

    worker = asyncio.create_task(serve_one())
    body = {"prompt": "a", "loras": [{"name": "ink", "scale": 0.75}], "response_format": "b64_json"}
    response = await client.post(OPENAI, json=body)
    assert response.status == 200 and await worker == [LoraRef(name="ink", scale=0.75)]


async def test_loras_lists_what_serving_workers_offer_and_hold(client: Client, redis_client: aioredis.Redis) -> None:
    empty = await client.get("/v1/loras")
    assert empty.status == 200 and await empty.json() == {"object": "list", "data": [], "max_loras": 0}
    await register_worker(redis_client, "a", loras=["ink", "oil"], loras_loaded=["ink"], max_loras=2)
    await register_worker(redis_client, "b", state="busy", loras=["ink"], max_loras=1)
    await register_worker(redis_client, "c", state="warming", loras=["wax"], max_loras=1)  # not serving yet
    await register_worker(redis_client, "d", loras=["gum"], max_loras=0)  # offers, applies none (--engine request)
    listed = await (await client.get("/v1/loras")).json()
    assert listed == {
        "object": "list",
        "data": [
            {"id": "ink", "object": "lora", "owned_by": "sdxl-serve", "workers": ["a", "b"], "loaded": 1},
            {"id": "oil", "object": "lora", "owned_by": "sdxl-serve", "workers": ["a"], "loaded": 0},
        ],
        "max_loras": 2,  # the most one request may name: a's; b is serving too but applies one
    }


async def test_the_openapi_document_describes_loras(client: Client) -> None:
    document = await (await client.get("/openapi.json")).json()
    reply = document["paths"]["/v1/loras"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert reply == {"$ref": "#/components/schemas/LoraList"}
    schemas = document["components"]["schemas"]
    assert set(schemas["LoraCard"]["properties"]) == {"id", "object", "owned_by", "workers", "loaded"}
    for body in ("GenerateRequest", "ImageGenerationRequest"):
        assert schemas[body]["properties"]["loras"]["items"] == {"$ref": "#/components/schemas/LoraRef"}


def standin_argv(redis_url: str, folder: Path) -> list[str]:
    return [
        sys.executable, "-m", "testkit.standin", "--redis-url", redis_url, "--worker-id", "lora-standin",
        "--sizes", "64x64", "--max-steps", "2", "--step-s", "0", "--heartbeat-interval", "0.3",
        "--heartbeat-ttl", "2", "--lora-dir", str(folder), "--max-loras", "2",
    ]  # fmt: skip


async def offered(client: Client, name: str, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """`GET /v1/loras` once it lists `name` (or as it is at the deadline): a heartbeat carries a new adapter."""
    data: list[dict[str, Any]] = []
    for _ in range(int(timeout_s / 0.05)):
        data = (await (await client.get("/v1/loras")).json())["data"]
        if any(card["id"] == name for card in data):
            break
        await asyncio.sleep(0.05)  # polled: the registry announces no change
    return data


async def test_a_worker_process_offers_its_folder_and_an_adapter_added_later(
    client: Client, redis_server: RedisServer, processes: ProcessGroup, tmp_path: Path
) -> None:
    (tmp_path / "ink.safetensors").write_bytes(b"adapter")
    processes.start_argv("lora-standin", standin_argv(redis_server.url(0), tmp_path))
    try:
        (info,) = await wait_ready(redis_server.url(0), 1)
        assert (info.loras, info.max_loras) == (["ink"], 2)
        inked = await client.post("/v1/generate", json={"prompt": "a", "n": 1, "loras": [{"name": "ink"}]})
        assert inked.status == 200, await inked.text()
        oily = await client.post("/v1/generate", json={"prompt": "a", "n": 1, "loras": [{"name": "oil"}]})
        assert oily.status == 400 and (await oily.json())["error"]["field"] == "loras[0].name"
        (tmp_path / "oil.safetensors").write_bytes(b"adapter")
        assert [card["id"] for card in await offered(client, "oil")] == ["ink", "oil"]
        both = [{"name": "oil"}, {"name": "ink", "scale": 0.5}]
        assert (await client.post("/v1/generate", json={"prompt": "a", "n": 1, "loras": both})).status == 200
    finally:
        processes.stop("lora-standin")
