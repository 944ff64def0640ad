"""Request handlers. They validate, talk to the queue, and raise ApiError for the client's mistakes."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from common.protocol import GenerateRequest, GenerateResponse, Job, ResponseTimings
from common.queue import JobQueue, StoredResult
from common.redis_conn import UNAVAILABLE
from gateway.appkeys import CONFIG, LISTENER, QUEUE, REGISTRY
from gateway.errors import ApiError, from_validation_error
from gateway.shapes import resolve_shape

INDEX_HTML = Path(__file__).parent / "static" / "index.html"


async def index(request: web.Request) -> web.FileResponse:
    """The demo page."""
    return web.FileResponse(INDEX_HTML)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def generate(request: web.Request) -> web.Response:
    """Queue a generation and wait for its images (504 with the job id past the deadline)."""
    received = time.perf_counter()
    body = await _parse(request)
    job = await _make_job(request, body)
    stored = await _submit_and_wait(request, job)
    if stored.result.status != "succeeded":
        raise ApiError(500, "generation_failed", stored.result.error or "generation failed", id=job.id)
    return _json(_generate_response(stored, received))


async def job_status(request: web.Request) -> web.Response:
    """A job's state, with its result once it has one; how a client collects a job after a 504."""
    job_id = request.match_info["job_id"]
    stored = await request.app[QUEUE].fetch_result(job_id)
    if stored is not None:
        payload: dict[str, Any] = {"id": job_id, "status": stored.result.status}
        if stored.result.status == "succeeded":
            payload["result"] = _generate_response(stored, None).model_dump()
        else:
            payload["error"] = {"code": "generation_failed", "message": stored.result.error}
        return web.json_response(payload)
    status = await request.app[QUEUE].job_status(job_id)
    if status is None:
        raise ApiError(404, "unknown_job", f"no job {job_id!r} (never submitted, or its result expired)",
                       field="job_id")
    return web.json_response({"id": job_id, "status": status})


async def _parse(request: web.Request) -> GenerateRequest:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    try:
        return GenerateRequest.model_validate_json(await request.read())
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def _make_job(request: web.Request, body: GenerateRequest) -> Job:
    workers = await request.app[REGISTRY].workers()
    shape = resolve_shape(body, workers)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
    return Job(id=uuid.uuid4().hex, prompt=body.prompt, negative_prompt=body.negative_prompt, seed=seed,
               guidance_scale=body.guidance_scale, shape=shape, result_ttl_s=request.app[CONFIG].result_ttl_s)


async def _submit_and_wait(request: web.Request, job: Job) -> StoredResult:
    listener = request.app[LISTENER]
    queue = request.app[QUEUE]
    done = listener.expect(job.id)
    status_url = f"/v1/jobs/{job.id}"
    try:
        await queue.submit(job)  # a Redis error here means not accepted: the middleware answers 503
        async with asyncio.timeout(request.app[CONFIG].request_timeout_s):
            await done
            stored = await _read_result(queue, job.id)
    except TimeoutError:
        raise ApiError(504, "timeout", "the job did not finish in time; it is still queued or running "
                       "and its result can be fetched from status_url", id=job.id, status_url=status_url) from None
    except UNAVAILABLE:
        raise ApiError(503, "queue_unavailable", "the job was accepted but its result cannot be read right "
                       "now; fetch it from status_url", headers={"Retry-After": "2"}, id=job.id,
                       status_url=status_url) from None
    finally:
        listener.forget(job.id, done)
    return stored


async def _read_result(queue: JobQueue, job_id: str) -> StoredResult:
    stored = await queue.fetch_result(job_id)
    if stored is None:  # stored, announced, then expired within the instant: vanishingly rare
        raise ApiError(500, "result_expired", "the result expired before it could be read", id=job_id)
    return stored


def _generate_response(stored: StoredResult, received: float | None) -> GenerateResponse:
    """The response body; `received` (perf_counter at arrival) gives total_ms, None for a later fetch."""
    result = stored.result
    assert result.shape is not None and result.timings is not None and result.seed is not None
    images = [base64.b64encode(image).decode("ascii") for image in stored.images]
    total_ms = (time.perf_counter() - received) * 1000 if received is not None else None
    return GenerateResponse(
        id=result.id, seed=result.seed, width=result.shape.width, height=result.shape.height,
        num_inference_steps=result.shape.steps, worker=result.worker, images=images,
        timings=ResponseTimings(**result.timings.model_dump(), total_ms=total_ms),
    )


def _json(model: GenerateResponse) -> web.Response:
    return web.Response(body=model.model_dump_json(), content_type="application/json")
