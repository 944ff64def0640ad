"""Fuzzing every route: no 5xx, no crash, and nothing queued for a request that was refused.

1. schemathesis, from the gateway's own `/openapi.json` (positive and negative cases, 30 examples per
   operation and phase, about 500 requests), against a live gateway process with API keys and the public
   demo on, beside a real Worker loop (stand-in pipeline) that completes every job at once.
2. Hypothesis and hand-made garbage (bytes, JSON of any shape, wrong media types, deep nesting, invalid
   UTF-8, NUL bytes, oversized and compressed bodies) against the job-creating routes in this process.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# Hypothesis imports its shrinker's optimiser lazily, mid-test, where pytest's assertion rewriting parses it while this
# module's in-process worker threads run: CPython 3.11.7 counts AST recursion depth per interpreter, not per thread, and
# raised "AST constructor recursion depth mismatch" there once in a full run. Imported here, it is parsed before any
# thread starts.
import hypothesis.internal.conjecture.optimiser  # noqa: F401
import pytest
import redis
import redis.asyncio as aioredis
import requests
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import checks

from common.apikeys import KeyRing, key_line, new_key
from gateway.config import GatewayConfig
from gateway.openapi import build_openapi
from gateway.routes import ROUTES
from testkit import free_port, gateway_args, wait_http
from tests.protection import Client, running_worker
from tests.support import ProcessGroup, RedisServer, queued_jobs, register_worker

KEY = new_key()
AUTH = {"Authorization": f"Bearer {KEY}"}
DB = 3  # this module's own database on the session's redis-server
POST_ROUTES = ("/v1/jobs", "/v1/generate", "/v1/images/generations")
IMAGE_ROUTES = ("/v1/jobs", "/v1/generate")  # those of POST_ROUTES that also take multipart (input images)
# The document a gateway with keys and the public demo serves; the live one is checked to be the same.
DOCUMENT = build_openapi(ROUTES, GatewayConfig(api_keys=KeyRing.from_keys([KEY]), public_demo=True))
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)


@dataclass(frozen=True)
class Live:
    url: str
    redis_url: str
    process: Any

    def jobs(self) -> int:
        """Job records ever created (they outlive their stream entries)."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            return sum(1 for _ in client.scan_iter("sdxl:job:*", count=1000))
        finally:
            client.close()


def _serve_worker(redis_url: str, ready: threading.Event, stop: threading.Event) -> None:
    async def main() -> None:
        async with running_worker(redis_url, worker_id="fuzz-worker"):
            ready.set()
            await asyncio.to_thread(stop.wait)

    asyncio.run(main())


@pytest.fixture(scope="module")
def live(
    redis_server: RedisServer, processes: ProcessGroup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    redis_url = redis_server.url(DB)
    redis.Redis.from_url(redis_url).flushdb()
    keys_file = tmp_path_factory.mktemp("fuzz") / "keys"
    keys_file.write_text(key_line(KEY, "fuzzer") + "\n")
    ready, stop = threading.Event(), threading.Event()
    worker = threading.Thread(target=_serve_worker, args=(redis_url, ready, stop), daemon=True)
    worker.start()
    assert ready.wait(30), "the fuzzing worker did not start"
    port = free_port()
    off = [
        arg
        for kind in ("key", "public")
        for bucket in ("submit", "read")
        for arg in (f"--rate-limit-{kind}-{bucket}", "off")
    ]
    flags = ["--request-timeout", "10", "--api-keys-file", str(keys_file), "--public-demo", *off]
    process = processes.start("fuzz-gateway", *gateway_args(redis_url, port, *flags))
    asyncio.run(wait_http(f"http://127.0.0.1:{port}/healthz", 60))
    yield Live(url=f"http://127.0.0.1:{port}", redis_url=redis_url, process=process)
    stop.set()
    worker.join(30)
    assert not worker.is_alive(), "the fuzzing worker did not stop"
    processes.stop("fuzz-gateway")


def test_the_fuzzed_document_is_the_served_one(live: Live) -> None:
    assert requests.get(f"{live.url}/openapi.json", timeout=10).json() == json.loads(json.dumps(DOCUMENT))


@SCHEMA.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_route_answers_5xx_or_queues_for_a_refusal(case: Any, live: Live) -> None:
    before = live.jobs()
    response = case.call(base_url=live.url, headers=AUTH, timeout=30)
    # schemathesis's own checks too: documented statuses, content types and bodies, negative data refused,
    # 405 with Allow. Not "schema-valid data accepted": a valid-looking size no worker serves is a 400.
    case.validate_response(response, excluded_checks=[checks.positive_data_acceptance])
    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert live.jobs() == before, (case.method, case.formatted_path, response.status_code, response.text[:300])
        if response.headers.get("Content-Type", "").startswith("application/json"):
            error = response.json()["error"]
            assert error["message"] and ("code" in error)
    assert live.process.poll() is None, "the gateway died"


def test_after_fuzzing_everything_still_serves(live: Live) -> None:
    response = requests.post(f"{live.url}/v1/generate", json={"prompt": "still here"}, headers=AUTH, timeout=30)
    assert response.status_code == 200 and len(response.json()["images"]) == 4
    assert requests.get(f"{live.url}/readyz", timeout=10).status_code == 200
    exposition = requests.get(f"{live.url}/metrics", timeout=10).text
    assert 'sdxl_gateway_requests_total{method="POST",route="/v1/jobs",status="500"}' not in exposition


# --- Garbage at the job-creating routes, in this process.


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=6),
        max_leaves=20,
    )


async def _refused_without_a_job(
    client: Client,
    redis_client: aioredis.Redis,
    path: str,
    data: bytes,
    content_type: str = "application/json",
    **headers: str,
) -> int:
    response = await client.post(path, data=data, headers={"Content-Type": content_type, **headers})
    assert response.status < 500, (path, data[:200], await response.text())
    if response.status >= 400:
        body = await response.json()  # every refusal is JSON
        assert body["error"]["message"]
        assert await queued_jobs(redis_client) == 0, (path, data[:200], response.status)
    else:
        await redis_client.flushdb()  # a valid body made a job; start clean for the next example
        await register_worker(redis_client)
    return response.status


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(path=st.sampled_from(POST_ROUTES), data=st.binary(max_size=2000))
async def test_random_bytes_are_refused(
    client: Client, redis_client: aioredis.Redis, fake_worker: None, path: str, data: bytes
) -> None:
    await _refused_without_a_job(client, redis_client, path, data)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(path=st.sampled_from(POST_ROUTES), value=_json_values())
async def test_json_of_any_shape_is_refused_or_valid(
    client: Client, redis_client: aioredis.Redis, fake_worker: None, path: str, value: Any
) -> None:
    await _refused_without_a_job(client, redis_client, path, json.dumps(value).encode())


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    path=st.sampled_from(POST_ROUTES),
    content_type=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
    | st.sampled_from(
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/xml",
            "application/json-patch+json",
            "",
        ]
    ),
)
async def test_other_media_types_are_415(
    client: Client, redis_client: aioredis.Redis, fake_worker: None, path: str, content_type: str
) -> None:
    status = await _refused_without_a_job(client, redis_client, path, b'{"prompt": "a cat"}', content_type)
    kind = content_type.strip().lower()
    # The routes that take input images read multipart too: a JSON document is no multipart body (400).
    multipart = kind.startswith("multipart/form-data") and path in IMAGE_ROUTES and status == 400
    assert status in (202, 200, 504, 415, 400) and (
        status == 415 or kind.startswith("application/json") or multipart
    ), (content_type, status)


MULTIPART_ROUTES = (*IMAGE_ROUTES, "/v1/images/edits")
_HEADER_LINES = st.sampled_from(
    [
        b'Content-Disposition: form-data; name="prompt"',
        b'Content-Disposition: form-data; name="image"; filename="a.png"',
        b'Content-Disposition: form-data; name="mask"',
        b'Content-Disposition: form-data; name="image[]"',
        b"Content-Disposition: form-data",
        b"Content-Disposition: attachment; filename*=utf-8''%ff",
        b"Content-Type: multipart/mixed; boundary=inner",
        b"Content-Type: image/png",
        b"Content-Transfer-Encoding: base64",
        b"Content-Transfer-Encoding: x-unknown",
        b"Content-Encoding: gzip",
        b"Content-Length: 99999999",
        b"True",
        b": no name",
        b"X-Header: " + b"x" * 9000,
    ]
) | st.binary(max_size=40)


@st.composite
def _multipart_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A boundary and a body shaped like multipart/form-data: delimiters, header lines valid or not, any content,
    a closing delimiter or none, and bytes after it."""
    boundary = draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789'()+_,-./:=?", min_size=1, max_size=70)).encode()
    body = draw(st.sampled_from([b"", b"preamble\r\n"]))
    for _ in range(draw(st.integers(0, 4))):
        headers = draw(st.lists(_HEADER_LINES, max_size=3))
        content = draw(st.sampled_from([b"a cat", b"20", b"true", b"\x89PNG\r\n\x1a\n"]) | st.binary(max_size=200))
        body += b"--" + boundary + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + content + b"\r\n"
    body += draw(st.sampled_from([b"--" + boundary + b"--\r\n", b"--" + boundary + b"--", b"", b"--" + boundary]))
    return boundary, body + draw(st.binary(max_size=20))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(path=st.sampled_from(MULTIPART_ROUTES), shaped=_multipart_bodies())
@example(path="/v1/jobs", shaped=(b"b0", b"--b0\r\nTrue--b0--\r\n"))  # a part whose one line is no header
async def test_malformed_multipart_bodies_are_refused(
    client: Client, redis_client: aioredis.Redis, fake_worker: None, path: str, shaped: tuple[bytes, bytes]
) -> None:
    boundary, body = shaped
    content_type = 'multipart/form-data; boundary="' + boundary.decode() + '"'
    await _refused_without_a_job(client, redis_client, path, body, content_type)


GARBAGE: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("empty", b"", {}, 400, "invalid_json"),
    ("deep nesting", b"[" * 60_000, {}, 400, "invalid_json"),
    ("deep objects", b'{"a":' * 12_000, {}, 400, "invalid_json"),
    ("invalid UTF-8 in a prompt", b'{"prompt": "caf\xe9"}', {}, 400, "invalid_json"),
    ("lone surrogate", b'{"prompt": "a\\ud800"}', {}, 400, "invalid_json"),
    ("NUL in the prompt", b'{"prompt": "a\\u0000b"}', {}, 400, "control_character"),
    ("escape sequence", b'{"prompt": "\\u001b[31mred"}', {}, 400, "control_character"),
    ("NUL after the document", b'{"prompt": "a"}\x00', {}, 400, "invalid_json"),
    ("NaN guidance", b'{"prompt": "a", "guidance_scale": NaN}', {}, 400, "finite_number"),
    ("huge number", b'{"prompt": "a", "seed": 1' + b"0" * 5000 + b"}", {}, 400, "invalid_json"),
    # Over --max-body-bytes; the routes that take input images read up to --max-image-body-bytes, and refuse the prompt.
    ("over the limit", b'{"prompt": "' + b"x" * 70_000 + b'"}', {}, 413, "body_too_large"),
    ("corrupt gzip", b'{"prompt": "a cat"}', {"Content-Encoding": "gzip"}, 400, "unreadable_body"),
    ("corrupt deflate", b"\x78\x9c" + b"\xff" * 40, {"Content-Encoding": "deflate"}, 400, "unreadable_body"),
    (  # over both limits, decompressed
        "gzip bomb",
        gzip.compress(b'{"prompt": "' + b"x" * 70_000_000 + b'"}'),
        {"Content-Encoding": "gzip"},
        413,
        "body_too_large",
    ),
]


@pytest.mark.parametrize(("name", "data", "headers", "status", "code"), GARBAGE, ids=[g[0] for g in GARBAGE])
async def test_garbage_bodies_are_named_refusals(
    client: Client,
    redis_client: aioredis.Redis,
    fake_worker: None,
    name: str,
    data: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    for path in POST_ROUTES:
        response = await client.post(path, data=data, headers={"Content-Type": "application/json", **headers})
        read = path in IMAGE_ROUTES and name == "over the limit"  # within the image routes' limit
        assert response.status == (400 if read else status), (path, await response.text())
        assert (await response.json())["error"]["code"] == ("string_too_long" if read else code)
    assert await queued_jobs(redis_client) == 0
    assert (await client.get("/healthz")).status == 200
