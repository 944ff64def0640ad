"""One request at a time (worker/sequential.py): an engine over any pipeline, the way a worker ran before the
engine. The stand-in pipeline stands in for the model: no JAX."""

from __future__ import annotations

import pytest

from common.protocol import Shape
from testkit.jobs import make_job
from testkit.standin import StandInPipeline
from worker.pipeline import PipelineError
from worker.progress import Cancelled
from worker.sequential import RequestAtATime, as_engine

SHAPE = Shape(width=64, height=64, steps=3)


def engine() -> RequestAtATime:
    return RequestAtATime(StandInPipeline((SHAPE,)), images=4)


def test_a_request_gets_the_first_n_images_of_the_full_batch_and_holds_every_row() -> None:
    running = engine()
    assert (running.rows, running.max_images, running.free_rows(), running.busy) == (4, 4, 4, False)
    steps: list[int] = []
    running.admit("one", make_job("one", SHAPE, n=1).params, steps.append)
    assert (running.free_rows(), running.busy) == (0, True)  # one request at a time, whatever its n
    tick = running.step()
    assert [(key, pixels.shape) for key, pixels in tick.finished] == [("one", (1, 64, 64, 3))]
    assert steps == [1, 2, 3] and not running.busy and running.free_rows() == 4
    # Its one guided image is 2 samples a step; the three images it did not ask for were run all the same.
    assert tick.samples == {"guided": 2 * 3, "padding": 3 * 2 * 3}
    running.admit("two", make_job("two", SHAPE, n=4, guidance_scale=0.0).params, steps.append)
    assert running.step().samples == {"unguided": 4 * 3}


def test_a_pipeline_that_makes_fewer_images_than_asked_counts_what_it_ran() -> None:
    """A request for 4 from a pipeline whose batch is 2 gets 2 images; its samples are those 2 rows', no less."""
    running = RequestAtATime(StandInPipeline((SHAPE,), images=2), images=4)
    running.admit("four", make_job("four", SHAPE, n=4).params, lambda step: None)
    tick = running.step()
    assert [pixels.shape[0] for _, pixels in tick.finished] == [2]
    assert tick.samples == {"guided": 2 * 2 * 3}


def test_what_on_step_raises_stops_the_request_and_a_pipeline_error_fails_it() -> None:
    running = engine()

    def cancelled_at_2(step: int) -> None:
        if step == 2:
            raise Cancelled(step)

    running.admit("stopped", make_job("stopped", SHAPE).params, cancelled_at_2)
    too_long = Shape(width=64, height=64, steps=SHAPE.steps + 1)
    running.admit("unserved", make_job("unserved", too_long).params, lambda step: None)
    stopped = running.step()
    assert [(key, type(error)) for key, error in stopped.stopped] == [("stopped", Cancelled)]
    failed = running.step()
    assert [key for key, _ in failed.failed] == ["unserved"] and not failed.finished


def test_a_cancelled_request_leaves_without_a_result_and_too_many_images_are_refused_at_once() -> None:
    running = engine()
    running.admit("dropped", make_job("dropped", SHAPE).params, lambda step: None)
    running.cancel("dropped")
    tick = running.step()
    assert (tick.finished, tick.stopped, tick.failed, running.busy) == ([], [], [], False)
    with pytest.raises(PipelineError, match="at most 4 images"):
        running.admit("many", make_job("many", SHAPE, n=5).params, lambda step: None)
    assert not running.busy


def test_a_pipeline_is_made_an_engine_and_an_engine_stays_itself() -> None:
    pipeline = StandInPipeline((SHAPE,))
    wrapped = as_engine(pipeline, 4)
    assert isinstance(wrapped, RequestAtATime) and wrapped.pipeline is pipeline
    assert as_engine(wrapped, 8) is wrapped
