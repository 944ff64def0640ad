"""Job webhooks end to end: a real gateway (in this process, or as processes that get killed), a real
redis-server, a test playing the worker through the queue, and real receivers on loopback.

Every target is on loopback and allow-listed, or refused: a stub resolver maps other names to private and
metadata addresses (nothing is ever sent beyond loopback).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import standardwebhooks
from aiohttp.test_utils import TestClient

from common.apikeys import key_line, new_key, new_webhook_secret
from common.rediskeys import RedisKeys
from gateway.app import create_app
from gateway.config import GatewayConfig, WebhookConfig
from gateway.metrics import GatewayMetrics
from gateway.state import JOURNAL, WEBHOOK_RESOLVE
from gateway.webhook_sender import WebhookSender
from gateway.webhooks import Resolve
from testkit import ProcessGroup, free_port, gateway_args, wait_http
from testkit.nemesis import NemesisConfig, render, run_nemesis
from testkit.receiver import ENDLESS, HANG, Receiver
from tests.support import ClientFactory, RedisServer, claim_next, finish, register_worker
from worker.delivery import Delivery

KEYS = RedisKeys()
SECRET = new_webhook_secret()
Client = TestClient[Any, Any]
# Small delays so a test sees several attempts within seconds; a jitter of a quarter keeps each backoff
# within [0.75 d, d], so the gaps grow (d doubles) whatever is drawn.
FAST = WebhookConfig(
    allow_http=True,
    allow_hosts=frozenset({"127.0.0.1"}),
    secret=SECRET,
    timeout_s=1.0,
    retry_window_s=30.0,
    backoff_s=0.3,
    jitter=0.25,
    poll_s=0.5,
)


def stub_resolver(names: dict[str, list[str]]) -> Resolve:
    """A resolver that knows `names` only: nothing resolves beyond them."""

    async def resolve(host: str, port: int) -> list[str]:
        if host not in names:
            raise OSError(f"{host}: unknown to the test's resolver")
        return names[host]

    return resolve


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = await Receiver().start()
    yield found
    await found.close()


@pytest.fixture
def gateway(
    redis_server: RedisServer, redis_client: aioredis.Redis, aiohttp_client: ClientFactory
) -> Callable[..., Any]:
    """A gateway on db 0 with a worker registered; `gateway(webhooks=..., resolve=...)` builds one."""

    async def build(webhooks: WebhookConfig = FAST, resolve: Resolve | None = None, **config: Any) -> Client:
        await register_worker(redis_client)
        app = create_app(GatewayConfig(redis_url=redis_server.url(0), result_ttl_s=60, webhooks=webhooks, **config))
        if resolve is not None:
            app[WEBHOOK_RESOLVE] = resolve
        return await aiohttp_client(app)

    return build


async def submit(client: Client, webhook: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    response = await client.post("/v1/jobs", json={"prompt": "a kite", "webhook": webhook}, headers=headers)
    assert response.status == 202, await response.text()
    job_id: str = (await response.json())["id"]
    return job_id


async def refusal(client: Client, webhook: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/jobs", json={"prompt": "a kite", "webhook": webhook})
    assert response.status == 400, await response.text()
    error: dict[str, Any] = (await response.json())["error"]
    return error


async def run_job(redis_client: aioredis.Redis) -> None:
    """Play the worker: take the next job and store its images."""
    claimed = await claim_next(redis_client)
    await finish(redis_client, claimed, [b"png-0"])


async def deliveries(client: Client, job_id: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert response.status == 200
    found: list[dict[str, Any]] = (await response.json())["webhook"]["deliveries"]
    return found


async def settled(redis_client: aioredis.Redis, client: Client, job_id: str) -> list[dict[str, Any]]:
    """A job's deliveries once none is due any more (the gateway records the last attempt after the receiver
    answers it): the due set tells, and Redis says when it changes (keyspace notifications for sorted sets)."""
    await redis_client.config_set("notify-keyspace-events", "Kz")
    async with redis_client.pubsub() as changes, asyncio.timeout(30):
        await changes.subscribe(f"__keyspace@0__:{KEYS.webhooks_due}")
        while await redis_client.zscore(KEYS.webhooks_due, job_id) is not None:
            await changes.get_message(timeout=None)
    return await deliveries(client, job_id)


def verified(secret: str, hit: Any) -> dict[str, Any]:
    """The payload, once the independent verifier accepts its signature."""
    payload: dict[str, Any] = standardwebhooks.Webhook(secret).verify(hit.body, hit.headers)
    return payload


async def test_a_completed_job_is_posted_once_with_a_signature_a_verifier_accepts(
    gateway: Callable[..., Any], redis_client: aioredis.Redis, receiver: Receiver
) -> None:
    client = await gateway()
    job_id = await submit(client, {"url": receiver.url})
    assert (await deliveries(client, job_id)) == []  # nothing due before the job ends
    await run_job(redis_client)
    (hit,) = await receiver.wait_for(1)
    payload = verified(SECRET, hit)
    assert payload["type"] == "job.completed" and payload["data"]["id"] == job_id
    assert payload["data"]["status"] == "succeeded"
    assert payload["data"]["result"]["images"] == [f"/v1/jobs/{job_id}/images/0"]  # URLs, never bytes
    (delivery,) = await settled(redis_client, client, job_id)
    assert delivery["id"] == hit.headers["webhook-id"] and delivery["attempts"] == 1
    assert delivery["last_status"] == 200 and delivery["delivered_at"] is not None
    assert len(receiver.hits) == 1  # and nothing is due: no other attempt will come
    metrics = await (await client.get("/metrics")).text()
    assert 'sdxl_webhook_attempts_total{event="completed",outcome="delivered"} 1.0' in metrics
    assert "sdxl_webhook_outbox_depth 0.0" in metrics and "sdxl_webhook_lag_seconds_count 1.0" in metrics
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verified(new_webhook_secret(), hit)


async def test_a_failing_receiver_gets_three_attempts_with_growing_gaps_and_one_webhook_id(
    gateway: Callable[..., Any], redis_client: aioredis.Redis
) -> None:
    receiver = await Receiver(answers=[500, 503, 200]).start()
    try:
        client = await gateway()
        job_id = await submit(client, {"url": receiver.url})
        await run_job(redis_client)
        hits = await receiver.wait_for(3)
        (delivery,) = await settled(redis_client, client, job_id)
    finally:
        await receiver.close()
    assert len(receiver.hits) == 3 and len({hit.headers["webhook-id"] for hit in hits}) == 1
    assert len({hit.body for hit in hits}) == 1  # the same message each time
    first_gap, second_gap = hits[1].at - hits[0].at, hits[2].at - hits[1].at
    assert FAST.backoff_s * 0.75 <= first_gap < second_gap, (first_gap, second_gap)
    assert delivery["attempts"] == 3 and delivery["last_status"] == 200 and delivery["delivered_at"]
    assert all(verified(SECRET, hit) for hit in hits)  # each attempt signed afresh


async def test_a_410_is_not_retried(gateway: Callable[..., Any], redis_client: aioredis.Redis) -> None:
    receiver = await Receiver(answers=[410]).start()
    try:
        client = await gateway()
        job_id = await submit(client, {"url": receiver.url})
        await run_job(redis_client)
        await receiver.wait_for(1)
        (delivery,) = await settled(redis_client, client, job_id)
    finally:
        await receiver.close()
    assert delivery["attempts"] == 1 and delivery["last_status"] == 410 and delivery["gave_up_at"]
    assert len(receiver.hits) == 1


async def test_a_429s_retry_after_is_honoured(gateway: Callable[..., Any], redis_client: aioredis.Redis) -> None:
    receiver = await Receiver(answers=[(429, {"Retry-After": "2"})]).start()
    try:
        client = await gateway()
        job_id = await submit(client, {"url": receiver.url})
        await run_job(redis_client)
        hits = await receiver.wait_for(2)
        (delivery,) = await settled(redis_client, client, job_id)
    finally:
        await receiver.close()
    assert hits[1].at - hits[0].at >= 1.9  # not the 0.3 s backoff
    assert delivery["attempts"] == 2 and delivery["delivered_at"]


async def test_an_endless_answer_is_read_only_in_part(
    gateway: Callable[..., Any], redis_client: aioredis.Redis
) -> None:
    # The body never ends: a sender that read it whole would fill its memory until the attempt timed out.
    receiver = await Receiver(answers=[ENDLESS]).start()
    try:
        client = await gateway()
        job_id = await submit(client, {"url": receiver.url})
        await run_job(redis_client)
        (delivery,) = await settled(redis_client, client, job_id)
        await asyncio.wait_for(receiver.hung_up.wait(), 30)
    finally:
        await receiver.close()
    assert delivery["attempts"] == 1 and delivery["last_status"] == 200 and delivery["delivered_at"]
    assert receiver.streamed < 64 * 2**20  # what the socket buffers took before the sender hung up


async def test_a_redirect_is_not_followed(gateway: Callable[..., Any], redis_client: aioredis.Redis) -> None:
    receiver = await Receiver(answers=[(307, {"Location": "/elsewhere"})]).start()
    try:
        client = await gateway()
        job_id = await submit(client, {"url": receiver.url})
        await run_job(redis_client)
        (delivery,) = await settled(redis_client, client, job_id)
    finally:
        await receiver.close()
    assert [hit.path for hit in receiver.hits] == ["/hook"]
    assert delivery["last_status"] == 307 and delivery["gave_up_at"] and "redirect" in delivery["last_error"]


REFUSED = {
    "private.test": ["10.1.2.3"],
    "home.test": ["192.168.0.10"],
    "metadata.test": ["169.254.169.254"],
    "metadata6.test": ["fd00:ec2::254"],
    "mixed.test": ["93.184.215.14", "127.0.0.1"],  # one inward address is enough to refuse it
    "mapped.test": ["::ffff:127.0.0.1"],
    "nowhere.test": ["0.0.0.0"],
}


async def test_loopback_private_and_metadata_targets_are_refused_without_the_allow_list(
    gateway: Callable[..., Any], redis_client: aioredis.Redis, receiver: Receiver
) -> None:
    strict = WebhookConfig(allow_http=True, secret=SECRET)
    client = await gateway(webhooks=strict, resolve=stub_resolver(REFUSED))
    for url in [receiver.url, "http://[::1]:9/hook", "http://localhost.test/x"] + [f"http://{h}/x" for h in REFUSED]:
        error = await refusal(client, {"url": url})
        assert error["field"] == "webhook.url" and error["code"] == "webhook_url_refused", (url, error)
    https_only = await gateway(webhooks=WebhookConfig(secret=SECRET), resolve=stub_resolver(REFUSED))
    error = await refusal(https_only, {"url": "http://93.184.215.14/x"})
    assert (error["field"], error["code"]) == ("webhook.url", "webhook_url_scheme")
    error = await refusal(client, {"url": receiver.url, "events": ["finished"]})
    assert error["field"].startswith("webhook.events")
    error = await refusal(client, {"url": "not a url"})
    assert error["field"] == "webhook.url"
    unsigned = await gateway(webhooks=WebhookConfig(allow_http=True, allow_hosts=frozenset({"127.0.0.1"})))
    assert (await refusal(unsigned, {"url": receiver.url}))["field"] == "webhook"
    assert receiver.hits == [] and await redis_client.zcard(KEYS.webhooks_due) == 0


async def test_a_name_that_turns_inward_after_submit_is_not_connected_to(
    gateway: Callable[..., Any], redis_client: aioredis.Redis
) -> None:
    # DNS rebinding: public at submit, loopback at delivery. The receiver listens on 127.0.0.2, which no rule
    # allows: a sender that trusted the first answer would reach it.
    receiver = await Receiver(host="127.0.0.2").start()
    answers = iter([["93.184.215.14"]])

    async def rebinding(host: str, port: int) -> list[str]:
        assert host == "rebind.test"
        return next(answers, ["127.0.0.2"])

    try:
        client = await gateway(resolve=rebinding)
        job_id = await submit(client, {"url": receiver.url.replace("127.0.0.2", "rebind.test")})
        await run_job(redis_client)
        (delivery,) = await settled(redis_client, client, job_id)
    finally:
        await receiver.close()
    assert receiver.hits == []
    assert delivery["gave_up_at"] and "loopback" in delivery["last_error"]


# IPv6 addresses that carry an inward IPv4 address, and the one they carry.
CARRIED = {
    "64:ff9b::7f00:1": "127.0.0.1",  # NAT64, the well-known prefix
    "64:ff9b:1::a00:1": "10.0.0.1",  # NAT64, a local-use prefix (/96 reading)
    "64:ff9b:1:7f00:0:100:808:808": "127.0.0.1",  # NAT64, a local-use prefix (/48 reading; /96 is public)
    "2002:7f00:1::1": "127.0.0.1",  # 6to4
    "::127.0.0.1": "127.0.0.1",  # IPv4-compatible
    "::ffff:10.0.0.1": "10.0.0.1",  # IPv4-mapped
    "2001:0:4136:e378:8000:63bf:80ff:fffe": "127.0.0.1",  # Teredo: the client, bits inverted
}


@pytest.mark.parametrize("address", list(CARRIED))
async def test_an_ipv6_address_is_judged_by_the_ipv4_address_it_carries(
    gateway: Callable[..., Any], address: str
) -> None:
    strict = WebhookConfig(allow_http=True, secret=SECRET)
    client = await gateway(webhooks=strict, resolve=stub_resolver({"inward.test": [address]}))
    for url in (f"http://[{address}]/x", "http://inward.test/x"):
        error = await refusal(client, {"url": url})
        assert error["code"] == "webhook_url_refused" and CARRIED[address] in error["message"], (url, error)


async def test_a_name_that_turns_to_an_ipv6_carried_inward_address_is_given_up(
    gateway: Callable[..., Any], redis_client: aioredis.Redis
) -> None:
    answers = iter([["2002:808:808::1"]])  # 6to4 of a public address at submit; NAT64 of loopback after

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers, ["64:ff9b::7f00:1"])

    client = await gateway(webhooks=WebhookConfig(allow_http=True, secret=SECRET, poll_s=0.5), resolve=rebinding)
    job_id = await submit(client, {"url": "http://rebind.test/x"})
    await run_job(redis_client)
    (delivery,) = await settled(redis_client, client, job_id)
    assert delivery["gave_up_at"] and "127.0.0.1, inside 64:ff9b::7f00:1" in delivery["last_error"]


async def test_a_full_outbox_refuses_new_webhook_jobs_and_keeps_its_messages(
    gateway: Callable[..., Any], redis_client: aioredis.Redis
) -> None:
    receiver = await Receiver(answers=[503] * 100).start()
    try:
        client = await gateway(webhooks=FAST.__class__(**{**FAST.__dict__, "max_outbox": 1}))
        job_id = await submit(client, {"url": receiver.url})
        await run_job(redis_client)
        await receiver.wait_for(1)
        response = await client.post("/v1/jobs", json={"prompt": "a kite", "webhook": {"url": receiver.url}})
        assert response.status == 429 and int(response.headers["Retry-After"]) > 0
        assert (await response.json())["error"]["code"] == "webhook_outbox_full"
        plain = await client.post("/v1/jobs", json={"prompt": "a kite"})
        assert plain.status == 202  # jobs without a webhook are not held back
        await receiver.wait_for(2)  # still being retried: the due message was not dropped
        assert await redis_client.zscore(KEYS.webhooks_due, job_id) is not None
    finally:
        await receiver.close()


async def test_started_and_progress_come_before_completed(
    gateway: Callable[..., Any], redis_client: aioredis.Redis, receiver: Receiver
) -> None:
    client = await gateway()
    job_id = await submit(client, {"url": receiver.url, "events": ["completed", "progress", "started"]})
    delivery = Delivery(redis_client, KEYS)
    claimed = await claim_next(redis_client)
    await delivery.start(claimed, "test-worker")
    for step in (1, 2, 3):
        await delivery.progress(job_id, "test-worker", step, 3)
    await finish(redis_client, claimed, [b"png-0"])
    await settled(redis_client, client, job_id)
    types = [json.loads(hit.body)["type"] for hit in receiver.hits]
    assert types[0] == "job.started" and types[-1] == "job.completed", types
    assert set(types[1:-1]) <= {"job.progress"} and len(types) <= 5  # progress is coalesced, never after the end
    assert [d["event"] for d in await deliveries(client, job_id)] == [
        json.loads(h.body)["type"][4:] for h in receiver.hits
    ]


async def test_each_keys_webhooks_are_signed_with_its_own_secret_and_seen_by_it_alone(
    gateway: Callable[..., Any], redis_client: aioredis.Redis, receiver: Receiver, tmp_path: Path
) -> None:
    alice, bob = new_key(), new_key()
    alice_secret, bob_secret = new_webhook_secret(), new_webhook_secret()
    keys_file = tmp_path / "keys"
    keys_file.write_text(key_line(alice, webhook_secret=alice_secret) + "\n" + key_line(bob, webhook_secret=bob_secret))
    client = await gateway(api_keys_file=keys_file)
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    job_id = await submit(client, {"url": receiver.url}, headers=as_alice)
    await run_job(redis_client)
    (hit,) = await receiver.wait_for(1)
    assert verified(alice_secret, hit)["data"]["id"] == job_id
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verified(bob_secret, hit)
    assert len(await deliveries(client, job_id, as_alice)) == 1
    assert (await client.get(f"/v1/jobs/{job_id}", headers=as_bob)).status == 404


@pytest.mark.parametrize("carried", [True, False], ids=["by-the-job", "by-the-journal"])
async def test_a_job_that_ends_after_redis_lost_its_record_still_gets_its_webhook(
    gateway: Callable[..., Any], redis_client: aioredis.Redis, receiver: Receiver, carried: bool
) -> None:
    client = await gateway()
    job_id = await submit(client, {"url": receiver.url})
    claimed = await claim_next(redis_client)
    assert claimed.job.webhook is not None  # the job carries its webhook to the worker
    if not carried:  # a worker that does not hand it back: the gateway that accepted the job knows it
        claimed = dataclasses.replace(claimed, job=claimed.job.model_copy(update={"webhook": None}))
    await redis_client.delete(KEYS.job(job_id))  # Redis came back from a snapshot older than the job
    await finish(redis_client, claimed, [b"png-0"])  # the worker's result makes the record again
    assert client.app is not None
    await client.app[JOURNAL].sweep()
    (hit,) = await receiver.wait_for(1)
    assert verified(SECRET, hit)["data"]["id"] == job_id
    assert client.app[JOURNAL].webhooks_restored == (0 if carried else 1)


async def test_the_openai_route_takes_a_webhook_as_an_extra_field(
    gateway: Callable[..., Any], redis_client: aioredis.Redis, receiver: Receiver
) -> None:
    client = await gateway()
    worker = asyncio.create_task(run_job(redis_client))
    body = {"prompt": "a kite", "n": 1, "webhook": {"url": receiver.url}}
    response = await client.post("/v1/images/generations", json=body)
    await worker
    assert response.status == 200, await response.text()
    (hit,) = await receiver.wait_for(1)
    assert verified(SECRET, hit)["type"] == "job.completed"


@pytest.mark.nemesis
async def test_no_due_webhook_is_lost_while_gateways_and_redis_fail(tmp_path: Path) -> None:
    # The fault injector with stand-in workers: gateways SIGKILLed and restarted, Redis restarted, replies
    # lost, connections killed, while every job asks for a webhook that a fifth of the time is answered 503;
    # two more gateways, one without the signing secret and one without the allow-list, take messages too.
    faults = {"restart_gateway": 2, "restart_redis": 1, "lost_reply": 2, "kill_pubsub": 1, "client_kill": 1}
    config = NemesisConfig(
        work_dir=tmp_path,
        seed=5,
        duration_s=12.0,
        counts=faults,  # type: ignore[arg-type]
        cluster={"standin_workers": 2},
        quiet_bound_s=30.0,
        webhooks=True,
        differing_webhook_gateways=2,
    )
    report = await run_nemesis(config)
    assert report.verdict.accepted and report.injected, render(report)
    assert report.verdict.state.webhooks_received >= report.verdict.accepted, render(report)
    assert report.verdict.passed, render(report)


# --- Gateways as processes: one is SIGKILLed holding a lease, another delivers.


def gateway_process(
    processes: ProcessGroup, name: str, redis_url: str, port: int, *, signs: bool = True, allows: bool = True
) -> None:
    """A gateway process sending webhooks quickly; without `signs` it has no signing secret, without `allows`
    no allow-list (so the loopback receiver is refused)."""
    processes.start(
        name, *gateway_args(redis_url, port),
        "--webhook-allow-http", *(["--webhook-allow-hosts", "127.0.0.1"] if allows else []),
        *(["--webhook-secret", SECRET] if signs else []),
        "--webhook-timeout", "1", "--webhook-backoff", "0.3", "--webhook-max-backoff", "2", "--webhook-poll", "0.5",
    )  # fmt: skip


async def test_a_gateway_killed_holding_or_owing_a_delivery_leaves_it_to_another(
    redis_server: RedisServer, redis_client: aioredis.Redis, processes: ProcessGroup
) -> None:
    await register_worker(redis_client)
    receiver = await Receiver(answers=[HANG]).start()
    first, second = free_port(), free_port()
    try:
        gateway_process(processes, "webhook-gateway-a", redis_server.url(0), first)
        await wait_http(f"http://127.0.0.1:{first}/healthz", 60)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{first}") as http:
            ids = []
            for _ in range(2):
                async with http.post("/v1/jobs", json={"prompt": "a kite", "webhook": {"url": receiver.url}}) as r:
                    ids.append((await r.json())["id"])
        await run_job(redis_client)  # the first job ends: gateway a takes its message, the receiver holds it
        (held,) = await receiver.wait_for(1)
        processes.processes["webhook-gateway-a"].kill()  # SIGKILL while it holds the lease
        processes.processes["webhook-gateway-a"].wait()
        await run_job(redis_client)  # the second job ends with no gateway alive: its message is due, not taken
        gateway_process(processes, "webhook-gateway-b", redis_server.url(0), second)
        hits = await receiver.wait_for(3, timeout_s=60)
    finally:
        await receiver.close()
        processes.stop("webhook-gateway-b") if "webhook-gateway-b" in processes.processes else None
    by_id: dict[str, int] = {}
    for hit in hits:
        by_id[hit.headers["webhook-id"]] = by_id.get(hit.headers["webhook-id"], 0) + 1
    assert by_id[held.headers["webhook-id"]] == 2  # the held attempt, then gateway b's: the same webhook-id
    assert {json.loads(hit.body)["data"]["id"] for hit in hits} == set(ids)


class _SwallowingOutbox:
    """An outbox whose read swallows the first cancellation it meets, as a client library under a 3.11
    timeout can: the sender must still stop once asked."""

    def __init__(self) -> None:
        self.reading = asyncio.Event()
        self.swallowed = False

    async def take(self, owner: str, count: int, lease_ms: int) -> list[Any]:
        self.reading.set()
        if not self.swallowed:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.swallowed = True
        return []

    async def wait_ms(self) -> int | None:
        return None


async def test_the_sender_stops_when_asked_even_if_a_cancellation_is_swallowed() -> None:
    outbox = _SwallowingOutbox()

    async def no_body(job_id: str, event: str) -> bytes:
        return b"{}"

    sender = WebhookSender(
        outbox,  # type: ignore[arg-type]
        dataclasses.replace(FAST, poll_s=0.05),
        "gw-test",
        stub_resolver({}),
        no_body,
        lambda key: None,
        GatewayMetrics(),
    )
    task = asyncio.create_task(sender.run())
    await outbox.reading.wait()
    sender.stop()
    task.cancel()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), timeout=30)
    assert outbox.swallowed and task.done()


# --- Gateways of differing webhook configuration share one outbox: none gives up what another can send.


async def skips(http: aiohttp.ClientSession, port: int, reason: str) -> float:
    """How many messages the gateway on `port` has left to others for `reason`, by its /metrics."""
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    found = re.search(rf'^sdxl_webhook_skips_total{{reason="{reason}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def until_each_skipped(redis_client: aioredis.Redis, reasons: dict[int, str]) -> None:
    """Return once each gateway (by port) has left a message to others for its reason, or no message is due
    any more (given up); looks again at each change of the due set (every take and skip changes it)."""
    await redis_client.config_set("notify-keyspace-events", "Kz")
    async with redis_client.pubsub() as changes, aiohttp.ClientSession() as http, asyncio.timeout(60):
        await changes.subscribe(f"__keyspace@0__:{KEYS.webhooks_due}")
        while await redis_client.zcard(KEYS.webhooks_due) and not all(
            [await skips(http, port, reason) > 0 for port, reason in reasons.items()]
        ):
            await changes.get_message(timeout=None)


async def test_a_message_no_gateway_can_send_is_given_up_once_its_retry_window_is_spent(
    gateway: Callable[..., Any], redis_client: aioredis.Redis, receiver: Receiver
) -> None:
    accepting = await gateway()
    job_id = await submit(accepting, {"url": receiver.url})
    await accepting.close()  # its sender stops: only a gateway without the secret is left
    unsigned = await gateway(webhooks=dataclasses.replace(FAST, secret=None, retry_window_s=2.0, poll_s=0.2))
    await run_job(redis_client)
    (delivery,) = await settled(redis_client, unsigned, job_id)
    assert delivery["attempts"] == 1 and delivery["gave_up_at"] and receiver.hits == []
    assert delivery["last_error"].startswith("no gateway sent it within 2 s: this gateway has no webhook signing")
    metrics = await (await unsigned.get("/metrics")).text()
    assert re.search(r'^sdxl_webhook_skips_total{reason="no_secret"} [1-9]', metrics, re.MULTILINE), metrics


async def test_a_gateway_whose_keys_file_lacks_a_keys_secret_leaves_its_webhooks_to_one_that_has_it(
    gateway: Callable[..., Any], redis_client: aioredis.Redis, receiver: Receiver, tmp_path: Path
) -> None:
    # A rolling change of the keys file: the key's own secret is in the new file, not yet in the old one. The
    # gateway on the old file has the cluster's secret, and must not sign the key's webhooks with it.
    key, own = new_key(), new_webhook_secret()
    (tmp_path / "new").write_text(key_line(key, webhook_secret=own) + "\n")
    (tmp_path / "old").write_text(key_line(key) + "\n")
    accepting = await gateway(api_keys_file=tmp_path / "new")
    job_id = await submit(accepting, {"url": receiver.url}, headers={"Authorization": f"Bearer {key}"})
    await accepting.close()
    old = await gateway(api_keys_file=tmp_path / "old")
    await run_job(redis_client)
    await until_skipped(redis_client, old, "no_secret")
    assert receiver.hits == []
    await gateway(api_keys_file=tmp_path / "new")
    (hit,) = await receiver.wait_for(1)
    assert verified(own, hit)["data"]["id"] == job_id


async def until_skipped(redis_client: aioredis.Redis, client: Client, reason: str) -> None:
    """Return once the in-process gateway `client` has left a message to others for `reason`, or none is due."""
    await redis_client.config_set("notify-keyspace-events", "Kz")
    pattern = re.compile(rf'^sdxl_webhook_skips_total{{reason="{reason}"}} [1-9]', re.MULTILINE)
    async with redis_client.pubsub() as changes, asyncio.timeout(30):
        await changes.subscribe(f"__keyspace@0__:{KEYS.webhooks_due}")
        while await redis_client.zcard(KEYS.webhooks_due):
            if pattern.search(await (await client.get("/metrics")).text()):
                return
            await changes.get_message(timeout=None)


async def until_none_due(redis_client: aioredis.Redis) -> None:
    """Return once no webhook message is due (each attempt recorded)."""
    await redis_client.config_set("notify-keyspace-events", "Kz")
    async with redis_client.pubsub() as changes, asyncio.timeout(30):
        await changes.subscribe(f"__keyspace@0__:{KEYS.webhooks_due}")
        while await redis_client.zcard(KEYS.webhooks_due):
            await changes.get_message(timeout=None)


async def test_a_gateway_that_cannot_send_a_webhook_leaves_it_to_one_that_can(
    redis_server: RedisServer, redis_client: aioredis.Redis, processes: ProcessGroup
) -> None:
    # A rolling change of configuration: one gateway lacks the signing secret, another the allow-list the
    # jobs were accepted under. Alone with the due messages they only skip them; the full one delivers all.
    await register_worker(redis_client)
    receiver = await Receiver().start()
    full, unsigned, strict, full_again = (free_port() for _ in range(4))
    url = redis_server.url(0)
    try:
        gateway_process(processes, "differing-full", url, full)
        await wait_http(f"http://127.0.0.1:{full}/healthz", 60)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{full}") as http:
            ids = []
            for _ in range(4):
                async with http.post("/v1/jobs", json={"prompt": "a kite", "webhook": {"url": receiver.url}}) as r:
                    ids.append((await r.json())["id"])
        processes.stop("differing-full")
        for _ in ids:
            await run_job(redis_client)  # each job's `completed` falls due with no capable gateway up
        gateway_process(processes, "differing-unsigned", url, unsigned, signs=False)
        gateway_process(processes, "differing-strict", url, strict, allows=False)
        for port in (unsigned, strict):
            await wait_http(f"http://127.0.0.1:{port}/healthz", 60)
        await until_each_skipped(redis_client, {unsigned: "no_secret", strict: "not_allow_listed"})
        assert receiver.hits == []
        gateway_process(processes, "differing-full-again", url, full_again)
        await wait_http(f"http://127.0.0.1:{full_again}/healthz", 60)
        await until_none_due(redis_client)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{full_again}") as http:
            for job_id in ids:
                async with http.get(f"/v1/jobs/{job_id}") as r:
                    (delivery,) = (await r.json())["webhook"]["deliveries"]
                assert delivery["attempts"] == 1 and delivery.get("delivered_at"), delivery  # skips are no attempts
        async with aiohttp.ClientSession() as http:
            assert await skips(http, unsigned, "no_secret") and await skips(http, strict, "not_allow_listed")
    finally:
        await receiver.close()
        for name in ("differing-unsigned", "differing-strict", "differing-full-again"):
            processes.stop(name) if name in processes.processes else None
    assert sorted(json.loads(hit.body)["data"]["id"] for hit in receiver.hits) == sorted(ids)
    assert all(verified(SECRET, hit) for hit in receiver.hits)
