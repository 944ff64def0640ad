"""The load generator against a tiny real aiohttp server that plays the gateway.

Assertions are on counts, never on wall times: the fake gateway records what it saw, and the open-loop
test holds every answer until all the run's requests are in flight at once.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from bench.load import LoadConfig, Outcome, arrival_times, classify, run_load, summarize
from sdxl_serve.cli import main as cli_main
from sdxl_serve.processes import free_port

TIMINGS = {"queued_ms": 3.0, "generate_ms": 40.0, "encode_ms": 1.0, "total_ms": 45.0}


def expected_kind(seed: int) -> str:
    """What the fake gateway answers for a seed."""
    if seed % 5 == 0:
        return "503 no_workers"
    if seed % 7 == 1:
        return "504 timeout"
    return "ok"


def worker_of(seed: int) -> str:
    return f"worker-{seed % 3}"


@dataclass
class FakeGateway:
    """POST /v1/generate with canned answers; counts requests in flight. `hold_until` holds every answer
    until that many requests are in flight together (None: answer after a short, seed-dependent pause)."""

    hold_until: int | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    seeds: list[int] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        seed = body["seed"]
        self.seeds.append(seed)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold_until is not None and self.in_flight >= self.hold_until:
                self.release.set()
            if self.hold_until is not None:
                await self.release.wait()
            else:
                await asyncio.sleep((seed % 4) * 0.005)  # stands in for generation: answers come out of order
        finally:
            self.in_flight -= 1
        return self.answer(seed, body)

    @staticmethod
    def answer(seed: int, body: dict[str, Any]) -> web.Response:
        kind = expected_kind(seed)
        if kind != "ok":
            status, code = kind.split()
            return web.json_response({"error": {"code": code, "message": "fake", "field": None}}, status=int(status))
        return web.json_response(
            {
                "id": f"job-{seed}",
                "seed": seed,
                "width": 64,
                "height": 64,
                "num_inference_steps": body.get("num_inference_steps", 2),
                "images": ["aGk="],
                "worker": worker_of(seed),
                "timings": TIMINGS,
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/generate", self.generate)
        return app


async def start(aiohttp_server: AiohttpServer, gateway: FakeGateway) -> str:
    server = await aiohttp_server(gateway.app())
    return str(server.make_url("")).rstrip("/")


def test_arrivals_are_a_poisson_process_over_the_duration() -> None:
    times = arrival_times(50.0, 100.0, random.Random(0))
    assert times == sorted(times) and 0 < times[0] and times[-1] < 100.0
    assert len(times) == pytest.approx(5000, rel=0.05)
    assert times == arrival_times(50.0, 100.0, random.Random(0))


async def test_counts_add_up_and_errors_are_counted_by_status_and_code(aiohttp_server: AiohttpServer) -> None:
    gateway = FakeGateway()
    url = await start(aiohttp_server, gateway)
    config = LoadConfig(url=url, rate=50.0, duration_s=1.0, steps=2, timeout_s=30.0, seed=1)
    report = await run_load(config)

    expected_sent = len(arrival_times(config.rate, config.duration_s, random.Random(config.seed)))
    kinds = Counter(expected_kind(seed) for seed in range(expected_sent))
    assert sorted(gateway.seeds) == list(range(expected_sent))
    assert report.sent == expected_sent == report.succeeded + sum(report.errors.values())
    assert report.succeeded == kinds.pop("ok")
    assert report.errors == dict(kinds)
    assert report.workers == dict(Counter(worker_of(s) for s in range(expected_sent) if expected_kind(s) == "ok"))
    assert (report.queued_ms_p50, report.generate_ms_p50) == (3.0, 40.0)
    assert report.p50_s is not None and report.p50_s <= (report.p99_s or 0.0)


async def test_requests_go_out_on_schedule_not_after_answers(aiohttp_server: AiohttpServer) -> None:
    config = LoadConfig(url="http://placeholder", rate=20.0, duration_s=1.0, timeout_s=60.0, seed=4)
    expected = len(arrival_times(config.rate, config.duration_s, random.Random(config.seed)))
    # No answer leaves the server until every request of the run is in flight: a closed loop would stall
    # here (and end in client timeouts), an open loop gets them all out.
    gateway = FakeGateway(hold_until=expected)
    url = await start(aiohttp_server, gateway)
    try:
        report = await run_load(replace(config, url=url))
    finally:
        gateway.release.set()
    assert gateway.max_in_flight == expected == report.sent
    assert "timeout" not in report.errors and "connection_error" not in report.errors


async def test_client_timeouts_are_their_own_kind(aiohttp_server: AiohttpServer) -> None:
    gateway = FakeGateway(hold_until=10**6)  # never answers by itself
    url = await start(aiohttp_server, gateway)
    try:
        report = await run_load(LoadConfig(url=url, rate=20.0, duration_s=0.5, timeout_s=0.2, seed=2))
    finally:
        gateway.release.set()
    assert report.sent > 0 and report.errors == {"timeout": report.sent}
    assert report.succeeded == 0 and report.p50_s is None and report.workers == {}


async def test_refused_connections_are_counted_not_raised() -> None:
    config = LoadConfig(url=f"http://127.0.0.1:{free_port()}", rate=20.0, duration_s=0.5, seed=3)
    report = await run_load(config)
    assert report.sent == len(arrival_times(20.0, 0.5, random.Random(3)))
    assert report.errors == {"connection_error": report.sent}


@pytest.mark.parametrize(
    ("status", "raw", "kind"),
    [
        (200, b'{"images": ["aGk="], "worker": "w"}', "ok"),
        (503, b'{"error": {"code": "no_workers", "message": "m", "field": null}}', "503 no_workers"),
        (502, b"<html>bad gateway</html>", "502 non_json"),
        (200, b'{"id": "x"}', "200 unknown"),
        (500, b"[1]", "500 non_json"),
    ],
)
def test_answers_are_classified_by_status_and_error_code(status: int, raw: bytes, kind: str) -> None:
    assert classify(status, raw)[0] == kind


def test_summary_of_made_up_outcomes() -> None:
    outcomes = [
        Outcome("ok", 0.0, 1.0, worker="a", queued_ms=1.0, generate_ms=10.0),
        Outcome("ok", 0.5, 2.5, lag_s=0.002, worker="b", queued_ms=3.0, generate_ms=30.0),
        Outcome("timeout", 1.0, 4.0),
    ]
    report = summarize(LoadConfig(url="http://x", rate=3.0, duration_s=1.0), outcomes)
    assert (report.sent, report.succeeded, report.errors) == (3, 2, {"timeout": 1})
    assert report.elapsed_s == 4.0 and report.throughput_rps == 0.5 and report.offered_rps == 3.0
    assert (report.p50_s, report.mean_s) == (1.5, 1.5)
    assert (report.queued_ms_p50, report.generate_ms_p50) == (2.0, 20.0)
    assert report.workers == {"a": 1, "b": 1} and report.send_lag_max_ms == pytest.approx(2.0)


def test_cli_json_reports_a_run_that_met_only_errors(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    assert cli_main(["bench", "load", "--url", url, "--rate", "20", "--duration", "0.3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["url"] == url.rstrip("/") and report["succeeded"] == 0
    assert report["errors"] == {"connection_error": report["sent"]}


def test_cli_text_report(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert cli_main(["bench", "load", "--url", url, "--rate", "20", "--duration", "0.3", "--seed", "5"]) == 0
    assert "errors: connection_error x" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--url", "127.0.0.1:8000", "--rate", "1", "--duration", "1"],
        ["--url", "http://h", "--rate", "0", "--duration", "1"],
        ["--url", "http://h", "--duration", "1"],
    ],
)
def test_cli_bad_arguments_exit_2(argv: list[str]) -> None:
    try:
        status = cli_main(["bench", "load", *argv])
    except SystemExit as exc:  # argparse's own errors
        status = int(exc.code or 0)
    assert status == 2
