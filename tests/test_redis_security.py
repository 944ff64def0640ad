"""Redis with credentials: a password, least-privilege ACL users (the README's lines), and TLS.

One redis-server for the module: the default user behind `requirepass`, the README's two ACL users, and a
TLS port with a CA made here by `openssl`. A gateway (in this process) and a real Worker (its loop with a
stand-in pipeline) run a job end to end on each kind of URL; with the ACL users, Redis's ACL log must show
no command refused, takeovers, dead letters and moved jobs included.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from common.apikeys import KeyRing, new_key
from common.config import log_config
from common.protocol import GenerationParams, Job
from common.rediskeys import RedisKeys
from gateway.app import create_app
from gateway.config import GatewayConfig
from testkit import ProcessError, RedisOptions, RedisProcess, free_port
from tests.conftest import TEST_SHAPES, ClientFactory
from tests.protection import running_worker
from tests.queues import Queue

README = Path(__file__).resolve().parent.parent / "README.md"
ADMIN_PASSWORD, GATEWAY_PASSWORD, WORKER_PASSWORD = "admin-pw-7c1d", "gateway-pw-2b9e", "worker-pw-5f30"
KEYS = RedisKeys()


def readme_acl_lines() -> list[str]:
    """The ACL lines the README documents, with this test's passwords."""
    block = re.search(r"```acl\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README.md has no ```acl block"
    lines = [line.strip() for line in block[1].splitlines() if line.strip()]
    assert [line.split()[1] for line in lines] == ["sdxl-gateway", "sdxl-worker"]
    return [
        line.replace("GATEWAY_PASSWORD", GATEWAY_PASSWORD).replace("WORKER_PASSWORD", WORKER_PASSWORD) for line in lines
    ]


def make_certificates(directory: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 and localhost, signed by it (EC P-256, 2 days)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make the test CA for TLS")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for command in (
        [
            "req",
            "-x509",
            *ec,
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=sdxl-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
        [
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    ):
        subprocess.run(["openssl", *command], cwd=directory, check=True, capture_output=True)


@dataclass(frozen=True)
class SecureRedis:
    port: int
    tls_port: int
    directory: Path

    def url(self, user: str = "", password: str = ADMIN_PASSWORD, tls: bool = False) -> str:
        if tls:
            return f"rediss://{user}:{password}@127.0.0.1:{self.tls_port}/0?ssl_ca_certs={self.directory}/ca.crt"
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/0"


def secure_options(directory: Path, tls_port: int) -> RedisOptions:
    """`requirepass`, the README's ACL users, and a TLS port serving the certificates made in `directory`."""
    extra = ["--requirepass", ADMIN_PASSWORD, "--tls-port", str(tls_port)]
    for option, name in (
        ("--tls-cert-file", "server.crt"),
        ("--tls-key-file", "server.key"),
        ("--tls-ca-cert-file", "ca.crt"),
    ):
        extra += [option, str(directory / name)]
    extra += ["--tls-auth-clients", "no"]
    for line in readme_acl_lines():
        extra += ["--user", *line.split()[1:]]
    return RedisOptions(extra=tuple(extra))


@pytest.fixture(scope="module")
def secure_redis() -> Iterator[SecureRedis]:
    directory = Path(tempfile.mkdtemp(prefix="sdxl-test-secure-redis-"))
    make_certificates(directory)
    tls_port = free_port()
    server = RedisProcess(directory, secure_options(directory, tls_port))
    try:
        server.start()
    except ProcessError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server build cannot serve TLS: {str(exc)[-300:]}")
        pytest.fail(f"redis-server did not start:\n{exc}")
    yield SecureRedis(port=server.port, tls_port=tls_port, directory=directory)
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def admin(secure_redis: SecureRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(secure_redis.url())
    await client.flushdb()
    await client.execute_command("ACL", "LOG", "RESET")
    yield client
    await client.aclose()


async def generate_through(aiohttp_client: ClientFactory, gateway_url: str, worker_url: str) -> dict[str, Any]:
    """POST /v1/generate and follow a second job's events, a gateway on one URL and a worker on the other."""
    client = await aiohttp_client(
        create_app(GatewayConfig(redis_url=gateway_url, request_timeout_s=20, result_ttl_s=60, max_queue_depth=10))
    )
    async with running_worker(worker_url):
        response = await client.post("/v1/generate", json={"prompt": "a locked door", "seed": 1})
        assert response.status == 200, await response.text()
        payload: dict[str, Any] = await response.json()
        job = await (await client.post("/v1/jobs", json={"prompt": "another"})).json()
        async with client.get(job["events_url"]) as events:
            assert events.status == 200
            text = (await events.read()).decode()
        assert "event: succeeded" in text
        status = await (await client.get(job["status_url"])).json()
        assert (await client.get(status["result"]["images"][0])).status == 200
        assert (await client.delete(job["status_url"])).status == 409  # already finished
        assert (await client.get("/v1/workers")).status == 200 and (await client.get("/readyz")).status == 200
        assert (await client.get("/metrics")).status == 200
    return payload


async def test_a_password_url_serves_jobs_and_is_never_logged(
    aiohttp_client: ClientFactory, secure_redis: SecureRedis, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = secure_redis.url()
    log_config(logging.getLogger("test"), GatewayConfig(redis_url=url))
    payload = await generate_through(aiohttp_client, url, url)
    assert len(payload["images"]) == 4
    assert ADMIN_PASSWORD not in caplog.text and f"redis://***@127.0.0.1:{secure_redis.port}/0" in caplog.text
    wrong = aioredis.Redis.from_url(secure_redis.url(password="wrong"))
    with pytest.raises(RedisConnectionError):  # AuthenticationError is one
        await wrong.ping()
    await wrong.aclose()


async def submit_with_a_key(aiohttp_client: ClientFactory, gateway_url: str) -> None:
    """With keys, the submit script also keeps the caller's in-flight set, and prunes it (reading its jobs'
    records) when it looks full: the second submit, whether its first job has finished or not."""
    key = new_key()
    config = GatewayConfig(redis_url=gateway_url, api_keys=KeyRing.from_keys([key]), max_jobs_in_flight_per_caller=1)
    keyed = await aiohttp_client(create_app(config))
    bearer = {"Authorization": f"Bearer {key}"}
    answers = [(await keyed.post("/v1/jobs", json={"prompt": "mine"}, headers=bearer)).status for _ in range(2)]
    assert answers[0] == 202 and answers[1] in (202, 429), answers


async def test_least_privilege_acl_users_serve_everything(
    aiohttp_client: ClientFactory, secure_redis: SecureRedis, admin: aioredis.Redis
) -> None:
    gateway_url = secure_redis.url("sdxl-gateway", GATEWAY_PASSWORD)
    worker_url = secure_redis.url("sdxl-worker", WORKER_PASSWORD)
    # Left behind by a worker that died: a job pending under its consumer (to be taken over, then dead-
    # lettered at max_deliveries=1) and a job on its own stream (to be moved to the shared stream).
    queue = Queue.of(admin, KEYS)
    shared = KEYS.size_stream(TEST_SHAPES[0].size)
    await queue.streams.ensure_group(shared)
    await queue.jobs.submit(
        Job(
            id="orphan-pending",
            params=GenerationParams(prompt="p", guidance_scale=7.5).resolved(TEST_SHAPES[0], seed=1),
            result_ttl_s=60,
        ),
        shared,
    )
    assert await queue.delivery.claim("ghost", [shared], block_ms=100) is not None
    ghost_stream = KEYS.worker_stream("ghost")
    await queue.streams.ensure_group(ghost_stream)
    await queue.jobs.submit(
        Job(
            id="orphan-queued",
            params=GenerationParams(prompt="q", guidance_scale=7.5).resolved(TEST_SHAPES[0], seed=2),
            result_ttl_s=60,
        ),
        ghost_stream,
    )
    client = await aiohttp_client(
        create_app(GatewayConfig(redis_url=gateway_url, request_timeout_s=20, result_ttl_s=60))
    )
    async with running_worker(worker_url, max_deliveries=1):
        for job_id, status in (("orphan-pending", "failed"), ("orphan-queued", "succeeded")):
            for _ in range(200):
                state = await (await client.get(f"/v1/jobs/{job_id}")).json()
                if state.get("status") == status:
                    break
                await asyncio.sleep(0.05)
            assert state["status"] == status, state
        accepted = await (await client.post("/v1/jobs", json={"prompt": "to cancel"})).json()
        await client.delete(accepted["status_url"])
        await submit_with_a_key(aiohttp_client, gateway_url)
    await generate_through(aiohttp_client, gateway_url, worker_url)
    assert await admin.xlen(KEYS.dead_letter_stream) == 1
    denied = await admin.execute_command("ACL", "LOG")
    assert denied == [], denied
    # And nothing beyond: no other prefix, no administration, no listing keys.
    gateway = aioredis.Redis.from_url(gateway_url)
    for command in (
        ("FLUSHALL",),
        ("CONFIG", "GET", "*"),
        ("KEYS", "*"),
        ("GET", "other:key"),
        ("XREADGROUP", "GROUP", "workers", "x", "STREAMS", shared, ">"),
    ):
        with pytest.raises(NoPermissionError):
            await gateway.execute_command(*command)
    await gateway.aclose()


async def test_tls_urls_serve_jobs(
    aiohttp_client: ClientFactory, secure_redis: SecureRedis, admin: aioredis.Redis
) -> None:
    gateway_url = secure_redis.url("sdxl-gateway", GATEWAY_PASSWORD, tls=True)
    worker_url = secure_redis.url("sdxl-worker", WORKER_PASSWORD, tls=True)
    payload = await generate_through(aiohttp_client, gateway_url, worker_url)
    assert payload["worker"] == "fake-worker"
    clients = await admin.client_list()
    assert any(c["name"].startswith("sdxl-gateway") for c in clients)
    # A client that does not trust the CA is refused by its own certificate check.
    untrusting = aioredis.Redis.from_url(gateway_url.partition("?")[0], socket_connect_timeout=5)
    with pytest.raises(RedisConnectionError):
        await untrusting.ping()
    await untrusting.aclose()
