"""Jobs and results as tests and benchmarks write them straight to Redis, where no HTTP request makes them.

One factory of each, so that a change to what a job carries is made here once, not in every test.
"""

from __future__ import annotations

from typing import Any

from common.protocol import Job, JobResult, Shape, Timings

# The smallest shape the tiny model serves; what a test means by "a job" unless it says otherwise.
SHAPE = Shape(width=64, height=64, steps=2)
# Timings of a result no worker measured: distinct, so a test can tell which went where.
TIMINGS = Timings(queued_ms=1.0, generate_ms=2.0, encode_ms=3.0)


def make_job(job_id: str = "job-1", shape: Shape = SHAPE, **fields: Any) -> Job:
    """A valid job: "a cat", seed 1, guidance 7.5, its result kept 60 s; `fields` override any of those
    (`seed=3`, `result_ttl_s=600`, `negative_prompt="blurry"`)."""
    defaults: dict[str, Any] = {"prompt": "a cat", "seed": 1, "guidance_scale": 7.5, "result_ttl_s": 60}
    return Job(id=job_id, shape=shape, **(defaults | fields))


def succeeded(job: Job, worker: str = "test-worker", image_count: int = 1, **fields: Any) -> JobResult:
    """The result a worker stores for `job` when it succeeds with `image_count` images; `fields` override
    the rest (`media_type="image/webp"`, `timings=...`)."""
    defaults: dict[str, Any] = {"scheduler": job.scheduler, "media_type": "image/png", "timings": TIMINGS}
    return JobResult(
        id=job.id,
        status="succeeded",
        worker=worker,
        seed=job.seed,
        shape=job.shape,
        image_count=image_count,
        **(defaults | fields),
    )
