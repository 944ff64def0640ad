"""Jobs and results as tests and benchmarks write them straight to Redis, where no HTTP request makes them.

One factory of each, so that a change to what a job carries is made here once, not in every test.
"""

from __future__ import annotations

from typing import Any

from common.protocol import DEFAULT_SCHEDULER, GenerationParams, Job, JobResult, Shape, Timings

# The smallest shape the tiny model serves; what a test means by "a job" unless it says otherwise.
SHAPE = Shape(width=64, height=64, steps=2)
# Timings of a result no worker measured: distinct, so a test can tell which went where.
TIMINGS = Timings(queued_ms=1.0, generate_ms=2.0, encode_ms=3.0)
# What a job's generation parameters are unless a test says otherwise.
PARAMS: dict[str, Any] = {"prompt": "a cat", "seed": 1, "guidance_scale": 7.5, "scheduler": DEFAULT_SCHEDULER}


def make_job(job_id: str = "job-1", shape: Shape = SHAPE, **fields: Any) -> Job:
    """A valid job: "a cat", seed 1, guidance 7.5, its result kept 60 s. `fields` override any of those: a
    generation parameter (`seed=3`, `negative_prompt="blurry"`, `scheduler="ddim"`) goes into the job's params,
    anything else (`result_ttl_s=600`, `output_format="webp"`) onto the job. The size and steps are `shape`'s."""
    params = PARAMS | {name: value for name, value in fields.items() if name in GenerationParams.model_fields}
    seed, scheduler = params.pop("seed"), params.pop("scheduler")
    resolved = GenerationParams(**params).resolved(shape, seed=seed, scheduler=scheduler)
    rest = {name: value for name, value in fields.items() if name not in GenerationParams.model_fields}
    return Job(id=job_id, params=resolved, **({"result_ttl_s": 60} | rest))


def succeeded(job: Job, worker: str = "test-worker", image_count: int = 1, **fields: Any) -> JobResult:
    """The result a worker stores for `job` when it succeeds with `image_count` images; `fields` override
    the rest (`media_type="image/webp"`, `timings=...`)."""
    defaults: dict[str, Any] = {"scheduler": job.params.scheduler, "media_type": "image/png", "timings": TIMINGS}
    return JobResult(
        id=job.id,
        status="succeeded",
        worker=worker,
        seed=job.params.seed,
        shape=job.params.shape,
        image_count=image_count,
        **(defaults | fields),
    )
