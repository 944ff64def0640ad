"""One running job's progress reports and cancel.

The device thread tells a job's `JobProgress` each denoising step it finishes; a task on the event loop publishes
them (the latest, when several arrive during one round trip), and each report returns the job's status: once it
is `cancelled`, the job's next step stops its generation. Each job has its own, so jobs that share the device
report and stop on their own. Progress is best effort: a Redis error is logged and the job carries on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType

from common.protocol import Job
from common.strength import denoising_steps
from worker.delivery import REDIS_ERRORS, Delivery
from worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

# Publishing the last progress step must not hold up a finished job for long when Redis is slow.
PROGRESS_FLUSH_TIMEOUT_S = 2.0
_NO_MORE_STEPS = -1


class Cancelled(Exception):
    """Raised on the device thread at a step boundary: the running job was cancelled, dispatch no more steps."""

    def __init__(self, step: int) -> None:
        super().__init__(f"cancelled after step {step}")
        self.step = step


class JobProgress:
    """Publishes `job`'s steps while it runs, and learns from them whether it was cancelled. Use as an async
    context manager around the job's generation: the last step is published on the way out."""

    def __init__(self, job: Job, worker_id: str, delivery: Delivery, metrics: WorkerMetrics) -> None:
        self._job = job
        self._worker_id = worker_id
        self._delivery = delivery
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._steps: asyncio.Queue[int] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._reporter: asyncio.Task[None] | None = None

    @property
    def cancelled(self) -> bool:
        """Whether a progress report found the job cancelled (safe to read from any thread)."""
        return self._cancelled.is_set()

    def on_step(self, step: int) -> None:
        """The pipeline's step callback for a job that has the device to itself (called on the device thread):
        report `step`, or raise `Cancelled` so that no further step is dispatched."""
        if self.cancelled:
            raise Cancelled(step)  # unwinds the pipeline's step loop
        self._metrics.steps.inc()
        self.reached(step)

    def reached(self, step: int) -> None:
        """Queue `step` for publishing; safe to call from any thread."""
        self._loop.call_soon_threadsafe(self._steps.put_nowait, step)

    async def __aenter__(self) -> JobProgress:
        self._reporter = asyncio.create_task(self._report(), name=f"progress-{self._job.id}")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        """Let the reporter publish the last step (every step has been queued by now), within a bound."""
        assert self._reporter is not None, "entered first"
        self._steps.put_nowait(_NO_MORE_STEPS)
        try:
            await asyncio.wait_for(self._reporter, PROGRESS_FLUSH_TIMEOUT_S)
        except TimeoutError:
            logger.warning("progress reporting still stuck after %.0fs; dropped", PROGRESS_FLUSH_TIMEOUT_S)

    async def _report(self) -> None:
        """Publish each finished step until told there are no more; note when the job turns out cancelled."""
        finished = False
        while not finished:
            batch = [await self._steps.get()]
            while not self._steps.empty():
                batch.append(self._steps.get_nowait())
            finished = _NO_MORE_STEPS in batch
            reached = [step for step in batch if step != _NO_MORE_STEPS]
            if reached and not self.cancelled and await self._publish(max(reached)) == "cancelled":
                logger.info(
                    "job %s: cancelled while running (step %d); stopping at the next step", self._job.id, max(reached)
                )
                self._cancelled.set()

    async def _publish(self, step: int) -> str | None:
        """The job's status after reporting `step` (None when unknown or Redis is away)."""
        try:
            return await self._delivery.progress(self._job.id, self._worker_id, step, steps_run(self._job))
        except REDIS_ERRORS as exc:
            logger.warning("job %s: progress not published (%s)", self._job.id, exc)
            return None


def steps_run(job: Job) -> int:
    """The denoising steps `job` runs: its step count, less those its strength skips when it starts from an image
    (worker/img2img.py)."""
    params = job.params
    if job.inputs is None or params.strength is None:
        return params.num_inference_steps
    return denoising_steps(params.num_inference_steps, params.strength)
