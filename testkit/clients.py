"""Clients as a careful user writes them, recording every answer in a `History`.

Each request carries its own Idempotency-Key and is retried with the same key on anything that is not an
answer about the job (no connection, a reset, 503, 429), against any gateway, as a client behind a load
balancer would. `POST /v1/generate` waits for the images; `POST /v1/jobs` answers 202 and the client then
polls `GET /v1/jobs/{id}`. A 504 carries the job id: the job goes on, and the poller collects it later.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from testkit.checker import TERMINAL, Answer, History, result_digest

logger = logging.getLogger(__name__)

RETRYABLE = frozenset({0, 429, 502, 503})
MAX_ATTEMPTS = 8
BACKOFF_S = (0.2, 2.0)
POLL_INTERVAL_S = 0.5


@dataclass(frozen=True)
class LoadConfig:
    """What the clients send, and how long they wait."""

    clients: int = 4
    width: int = 64
    height: int = 64
    steps: int = 2
    request_timeout_s: float = 15.0  # the gateways' --request-timeout
    jobs_share: float = 0.3  # of requests sent to POST /v1/jobs (the rest to /v1/generate)
    webhook_url: str | None = None  # every request asks for its job's `completed` webhook here
    n: int | None = None  # images per request (None: the API's default)


def answer_of(at_s: float, status: int, body: Any) -> Answer:
    """What an HTTP answer says about its job: id, state, and the digest of a terminal result."""
    if not isinstance(body, dict):
        return Answer(at_s, status, error="not a JSON object")
    error = body.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    job_id = body.get("id")
    if status == 200 and "images" in body:  # /v1/generate
        return Answer(at_s, status, job_id, "succeeded", result_digest("succeeded", body["worker"], body["timings"]))
    if status == 200 and body.get("status") in TERMINAL:  # GET /v1/jobs/{id}
        return Answer(at_s, status, job_id, body["status"], _state_digest(body))
    if status in (200, 202):
        return Answer(at_s, status, job_id, body.get("status"))
    state = {404: "unknown", 409: "cancelled" if code == "cancelled" else None, 500: "failed"}.get(status)
    if status == 500 and code != "generation_failed":
        state = None  # a gateway error, not the job's
    return Answer(at_s, status, job_id if isinstance(job_id, str) else None, state, error=code)


def _state_digest(body: dict[str, Any]) -> str:
    result = body.get("result") or {}
    error = body.get("error") or {}
    return result_digest(body["status"], body.get("worker"), result.get("timings"), error.get("message"))


class Clients:
    """`config.clients` concurrent clients against `urls`, each sending one request at a time."""

    def __init__(self, urls: list[str], config: LoadConfig, history: History, seed: int, t0: float) -> None:
        self.urls = urls
        self.config = config
        self.history = history
        self.seed = seed
        self.t0 = t0
        timeout = aiohttp.ClientTimeout(total=config.request_timeout_s + 15.0)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        await self._session.close()

    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    async def run(self, stop: asyncio.Event) -> None:
        """Send requests until `stop` is set; every request in flight then finishes (bounded by attempts)."""
        await asyncio.gather(*(self._client(k, stop) for k in range(self.config.clients)))

    async def _client(self, index: int, stop: asyncio.Event) -> None:
        rng = random.Random(f"client-{self.seed}-{index}")
        serial = 0
        while not stop.is_set():
            serial += 1
            route = "jobs" if rng.random() < self.config.jobs_share else "generate"
            key = f"nemesis-{self.seed}-{index}-{serial}"
            final = await self.submit(rng, route, key, {"prompt": f"nemesis {key}", "seed": serial})
            if route == "jobs" and final.job_id is not None and final.state not in TERMINAL:
                await self.follow(rng, final.job_id, self.config.request_timeout_s)

    async def submit(
        self,
        rng: random.Random,
        route: str,
        key: str,
        body: dict[str, Any],
        record: bool = True,
        urls: Sequence[str] | None = None,
    ) -> Answer:
        """One logical request: retried with its key until an answer about the job comes back, each attempt
        to one of `urls` (default: every gateway). `record`: write its answers to the history (a probe of the
        harness's own is not the clients' traffic)."""
        body = {**body, "width": self.config.width, "height": self.config.height}
        if self.config.webhook_url is not None:
            body["webhook"] = {"url": self.config.webhook_url}
        body["num_inference_steps"] = self.config.steps
        if self.config.n is not None:
            body["n"] = self.config.n
        answer = Answer(self.elapsed(), 0, error="never sent")
        for _ in range(MAX_ATTEMPTS):
            answer = await self._post(rng.choice(urls or self.urls), f"/v1/{route}", key, body)
            if record:
                self.history.record(key, route, body, answer)
            if answer.status not in RETRYABLE or answer.job_id is not None:
                return answer
            await asyncio.sleep(rng.uniform(*BACKOFF_S))
        return answer

    async def _post(self, url: str, path: str, key: str, body: dict[str, Any]) -> Answer:
        sent = self.elapsed()  # the gateway read what it answers some time between this and the answer
        try:
            async with self._session.post(f"{url}{path}", json=body, headers={"Idempotency-Key": key}) as response:
                answer = answer_of(self.elapsed(), response.status, await _json(response))
        except (aiohttp.ClientError, TimeoutError) as exc:
            answer = Answer(self.elapsed(), 0, error=type(exc).__name__)
        return dataclasses.replace(answer, sent_s=sent)

    async def read(self, url: str, job_id: str) -> Answer:
        """GET /v1/jobs/{id}, recorded."""
        sent = self.elapsed()
        try:
            async with self._session.get(f"{url}/v1/jobs/{job_id}") as response:
                answer = answer_of(self.elapsed(), response.status, await _json(response))
        except (aiohttp.ClientError, TimeoutError) as exc:
            answer = Answer(self.elapsed(), 0, error=type(exc).__name__)
        answer = dataclasses.replace(answer, job_id=job_id, sent_s=sent)
        self.history.read(job_id, answer)
        return answer

    async def follow(self, rng: random.Random, job_id: str, bound_s: float) -> None:
        """Poll a job until it is terminal, at most `bound_s`."""
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline:
            if (await self.read(rng.choice(self.urls), job_id)).state in TERMINAL:
                return
            await asyncio.sleep(POLL_INTERVAL_S)


async def _json(response: aiohttp.ClientResponse) -> Any:
    try:
        return await response.json(content_type=None)
    except ValueError:
        return None
