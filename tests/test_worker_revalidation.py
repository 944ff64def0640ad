"""The worker never trusts the queue (worker/claiming.py, worker/delivery.py): whatever sits in a stream entry,
the job fails cleanly or the entry is dropped, and the worker carries on serving.

A real Worker loop runs with a stand-in pipeline; entries are written straight into the shared stream,
as a buggy or hostile writer with access to Redis could.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.protocol import JobResult
from common.rediskeys import RedisKeys
from tests.protection import running_worker
from tests.support import TEST_SHAPES, RedisServer

KEYS = RedisKeys()
STREAM = KEYS.size_stream(TEST_SHAPES[0].size)
SHAPE = TEST_SHAPES[0]
PARAMS = {
    "prompt": "a cat",
    "seed": 1,
    "guidance_scale": 7.5,
    "width": SHAPE.width,
    "height": SHAPE.height,
    "num_inference_steps": SHAPE.steps,
    "scheduler": "euler",
}
VALID = {"id": "good-1", "params": PARAMS, "result_ttl_s": 60}


def job(params: dict[str, Any] | None = None, **changes: Any) -> bytes:
    """A valid job's JSON with `changes`, and `params` changed in its generation parameters."""
    return json.dumps({**VALID, "params": {**PARAMS, **(params or {})}, **changes}).encode()


async def result_of(redis_client: aioredis.Redis, job_id: str) -> JobResult | None:
    meta = await redis_client.hget(KEYS.result(job_id), "meta")
    return None if meta is None else JobResult.model_validate_json(meta)


async def drained(redis_client: aioredis.Redis, timeout_s: float = 20.0) -> None:
    """Wait until the stream is empty and nothing is pending: every entry was settled."""
    for _ in range(int(timeout_s / 0.05)):
        pending = await redis_client.xpending(STREAM, KEYS.workers_group)
        if await redis_client.xlen(STREAM) == 0 and pending["pending"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"stream not drained: {await redis_client.xrange(STREAM)}")


# (fields of the entry, the id whose job must fail with a reason mentioning this, or None: dropped)
BAD_ENTRIES: list[tuple[dict[str, bytes], str | None, str]] = [
    ({"other": b"x"}, None, ""),
    ({"job": b"not json"}, None, ""),
    ({"job": b"\xff\xfe garbage"}, None, ""),
    ({"job": b"[1, 2]"}, None, ""),
    ({"job": job(id="bad\nid")}, None, ""),  # an id that would forge log lines is not used at all
    ({"job": job({"prompt": "x" * 2001}, id="long-prompt")}, "long-prompt", "prompt"),
    ({"job": job({"prompt": "a\u0000b"}, id="nul-prompt")}, "nul-prompt", "control characters"),
    ({"job": job({"prompt": "   "}, id="blank")}, "blank", "prompt"),
    ({"job": job({"seed": 2**32}, id="seed")}, "seed", "seed"),
    ({"job": job(id="nan").replace(b"7.5", b"NaN")}, "nan", "finite"),
    ({"job": job({"guidance_scale": 99}, id="guidance")}, "guidance", "guidance_scale"),
    ({"job": job(id="extra", priority=1)}, "extra", "priority"),
    ({"job": job({"loudness": 11}, id="extra-param")}, "extra-param", "loudness"),
    ({"job": job({"scheduler": "ddim"}, id="scheduler")}, "scheduler", "scheduler"),
    ({"job": job(id="ttl", result_ttl_s=10**12)}, "ttl", "result_ttl_s"),
    ({"job": job(id="format", output_format="gif")}, "format", "output_format"),
    ({"job": job(id="counters"), "deliveries": b"many"}, "counters", "integers"),
    ({"job": job({"num_inference_steps": 7}, id="shape")}, "shape", "not served here"),
    # A job as earlier releases queued it (the parameters at the top level, with a shape): failed, naming why.
    (
        {
            "job": json.dumps(
                {"id": "earlier", "prompt": "a cat", "seed": 1, "guidance_scale": 7.5, "shape": SHAPE.model_dump()}
                | {"scheduler": "euler", "result_ttl_s": 60}
            ).encode()
        },
        "earlier",
        "params",
    ),
]


async def test_invalid_entries_fail_or_drop_and_the_worker_carries_on(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with running_worker(redis_server.url(0)) as worker:
        for fields, _, _ in BAD_ENTRIES:
            await redis_client.xadd(STREAM, fields)  # type: ignore[arg-type]  # redis-py wants dict[FieldT, EncodableT]
        await redis_client.xadd(STREAM, {"job": job()})
        await drained(redis_client)
        assert worker.info.state in ("ready", "busy") and worker.not_ready() is None
    for _, job_id, reason in BAD_ENTRIES:
        if job_id is not None:
            result = await result_of(redis_client, job_id)
            assert result is not None and result.status == "failed", job_id
            assert reason in (result.error or ""), (job_id, result.error)
    good = await result_of(redis_client, "good-1")
    assert good is not None and good.status == "succeeded" and good.image_count == 4


async def test_a_job_naming_an_adapter_the_worker_does_not_offer_fails_naming_it(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """The gateway routes no such job here; one queued all the same (a race, an older gateway) fails alone."""
    (tmp_path / "ink.safetensors").write_bytes(b"adapter")
    async with running_worker(redis_server.url(0), lora_dir=str(tmp_path), max_loras=2) as worker:
        assert (worker.info.loras, worker.info.max_loras) == (["ink"], 2)
        three = [{"name": "ink"}, {"name": "oil"}, {"name": "wax"}]
        await redis_client.xadd(STREAM, {"job": job({"loras": [{"name": "ink"}, {"name": "oil"}]}, id="unknown")})
        await redis_client.xadd(STREAM, {"job": job({"loras": three}, id="too-many")})
        await redis_client.xadd(STREAM, {"job": job()})
        await drained(redis_client)
    unknown, too_many = await result_of(redis_client, "unknown"), await result_of(redis_client, "too-many")
    assert unknown is not None and unknown.status == "failed"
    assert unknown.error == "loras[1].name: adapter 'oil' is not offered by this worker"
    assert too_many is not None and too_many.status == "failed"
    assert too_many.error == "loras: 3 adapters named; this worker applies at most 2 per request"
    good = await result_of(redis_client, "good-1")
    assert good is not None and good.status == "succeeded"


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=300),
            st.dictionaries(
                st.text(max_size=12),
                st.recursive(
                    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8,
                ),
                max_size=10,
            ).map(lambda d: json.dumps({**VALID, **d}).encode()),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_fuzzed_entries_never_stop_the_worker(redis_server: RedisServer, entries: list[bytes]) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_server.url(0))
        await client.delete(STREAM)
        try:
            async with running_worker(redis_server.url(0)):
                for entry in entries:
                    await client.xadd(STREAM, {"job": entry})
                await drained(client)
        finally:
            await client.aclose()

    asyncio.run(run())


pytestmark = pytest.mark.timeout(600)
