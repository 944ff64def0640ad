"""Logs: one line per event, text or JSON, carrying the request id from the HTTP call to the worker."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from common.logs import LogFormat, bound, make_handler
from testkit import free_port, gateway_args, wait_http
from tests.support import READY_TIMEOUT_S, ProcessGroup, RedisServer, tiny_worker_args, wait_ready


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, dict[LogFormat, io.StringIO]]]:
    """A logger writing both formats into buffers."""
    logger = logging.getLogger("tests.logs")
    streams: dict[LogFormat, io.StringIO] = {"text": io.StringIO(), "json": io.StringIO()}
    handlers = [make_handler(fmt, stream) for fmt, stream in streams.items()]
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, streams
    for handler in handlers:
        logger.removeHandler(handler)


def test_bound_ids_appear_in_both_formats_and_only_while_bound(
    capture: tuple[logging.Logger, dict[LogFormat, io.StringIO]],
) -> None:
    logger, streams = capture
    with bound(request="req-1", job="job-1"):
        logger.info("claimed %s", "job-1")
        with bound(job="job-2"):
            logger.info("inner")
    logger.info("after")
    text = streams["text"].getvalue().splitlines()
    assert text[0].endswith(" request_id=req-1 job_id=job-1 claimed job-1")
    assert "request_id=req-1 job_id=job-2 inner" in text[1]
    assert "request_id" not in text[2] and text[2].endswith(" after")
    lines = [json.loads(line) for line in streams["json"].getvalue().splitlines()]
    assert lines[0]["message"] == "claimed job-1"
    assert (lines[0]["request_id"], lines[0]["job_id"], lines[0]["level"]) == ("req-1", "job-1", "INFO")
    assert lines[0]["logger"] == "tests.logs" and {"time", "process"} <= set(lines[0])
    assert lines[1]["job_id"] == "job-2" and "request_id" not in lines[2] and "ids" not in lines[2]


def test_a_traceback_stays_inside_its_one_json_line(
    capture: tuple[logging.Logger, dict[LogFormat, io.StringIO]],
) -> None:
    logger, streams = capture
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logger.exception("job failed")
    [line] = streams["json"].getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and "ValueError: boom" in record["exception"]


def json_lines(log: str) -> list[dict[str, Any]]:
    """Every line of a process's log as JSON: a line that is not JSON fails the test."""
    return [json.loads(line) for line in log.splitlines() if line.strip()]


@pytest.mark.e2e
async def test_one_request_id_from_the_access_log_to_the_worker(
    redis_server: RedisServer, tiny_model: Path, processes: ProcessGroup
) -> None:
    redis_url = redis_server.url(3)
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    processes.start("json-gateway", "--log-format", "json", *gateway_args(redis_url, port, "--key-prefix", "logs"))
    args = tiny_worker_args(redis_url, tiny_model, "json-worker", "--key-prefix", "logs")
    processes.start("json-worker", "--log-format", "json", *args)
    await wait_ready(redis_url, 1, prefix="logs")
    url = f"http://127.0.0.1:{port}"
    await wait_http(f"{url}/healthz", READY_TIMEOUT_S)
    async with aiohttp.ClientSession(base_url=url) as session:
        async with session.post(
            "/v1/generate", json={"prompt": "a red fox"}, headers={"X-Request-ID": "trace-42"}
        ) as response:
            assert response.status == 200
            assert response.headers["X-Request-ID"] == "trace-42"
            job_id = (await response.json())["id"]
        # An id that is not a safe token (it could forge log lines) is replaced, and the new one returned.
        async with session.get("/healthz", headers={"X-Request-ID": "x\tinjected=1"}) as response:
            replaced = response.headers["X-Request-ID"]
            assert replaced != "x\tinjected=1" and len(replaced) == 32
    processes.stop("json-gateway")  # flushes its access log
    processes.stop("json-worker")

    gateway = json_lines(processes.log("json-gateway"))
    [access] = [line for line in gateway if line.get("path") == "/v1/generate"]
    assert (access["request_id"], access["method"], access["status"]) == ("trace-42", "POST", 200)
    assert any(line.get("job_id") == job_id and line["request_id"] == "trace-42" for line in gateway)
    assert any(line.get("path") == "/healthz" and line["request_id"] == replaced for line in gateway)

    worker = [line for line in json_lines(processes.log("json-worker")) if line.get("job_id") == job_id]
    assert {line["request_id"] for line in worker} == {"trace-42"}
    messages = " | ".join(line["message"] for line in worker)
    assert "claimed" in messages and "succeeded" in messages
