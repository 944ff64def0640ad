"""The fault injector (`sdxl-serve bench nemesis`) in the suite: its schedule replays from the seed, its
checker finds what it claims to find, and a CI-sized run holds the cluster to the delivery promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from testkit.checker import Answer, ClusterState, History, check, result_digest
from testkit.nemesis import NemesisConfig, default_counts, render, run_nemesis
from testkit.schedule import REQUESTABLE, Targets, make_schedule

# The slots of the CI-sized run: two gateways, two stand-in workers and the real one.
TARGETS = Targets(
    workers=("worker-0", "worker-1", "worker-2"), gateways=("gateway-0", "gateway-1"), heartbeat_ttl_s=3.0
)
# The run in the suite: about a minute of faults, two of each kind. With this seed the last garbage
# message comes after the last gateway restart, so every gateway meets one after it started.
CI_SEED = 3
CI_DURATION_S = 60.0


def quiet_state(**changes: object) -> ClusterState:
    state = ClusterState(pending_entries=0, queue_depth=0, stuck_records=[], dead_processes=[], failed_probes=[])
    for name, value in changes.items():
        setattr(state, name, value)
    return state


def test_the_seed_replays_the_schedule() -> None:
    counts = default_counts(2)
    first = make_schedule(7, 60.0, counts, TARGETS)
    assert first == make_schedule(7, 60.0, counts, TARGETS)
    assert first != make_schedule(8, 60.0, counts, TARGETS)
    assert [f.at_s for f in first] == sorted(f.at_s for f in first)
    assert all(0.0 <= f.at_s < 60.0 for f in first)
    for kind in REQUESTABLE:
        assert sum(f.kind == kind for f in first) == 2, kind
    assert sum(f.kind == "snapshot_redis" for f in first) == 2  # one before each rollback


def test_each_rollback_restores_a_snapshot_taken_before_it() -> None:
    for seed in range(20):
        taken = False
        for fault in make_schedule(seed, 30.0, {"rollback_redis": 3}, TARGETS):
            taken = taken or fault.kind == "snapshot_redis"
            assert fault.kind != "rollback_redis" or taken, seed


def test_the_ci_seed_leaves_every_gateway_a_garbage_message_after_its_last_restart() -> None:
    schedule = make_schedule(CI_SEED, CI_DURATION_S, default_counts(2), TARGETS)
    last_garbage = max(f.at_s for f in schedule if f.kind == "garbage")
    assert all(f.at_s < last_garbage for f in schedule if f.kind == "restart_gateway")


def test_the_checker_passes_a_clean_history() -> None:
    history = History()
    digest = result_digest("succeeded", "w1", {"generate_ms": 1.0})
    history.record("k1", "generate", {}, Answer(0.1, 200, "job-1", "succeeded", digest))
    history.record("k2", "jobs", {}, Answer(0.2, 202, "job-2", "queued"))
    history.read("job-2", Answer(0.3, 200, "job-2", "failed", result_digest("failed", "w1", None, "boom")))
    verdict = check(history, quiet_state())
    assert verdict.passed and (verdict.accepted, verdict.answered) == (2, 2)


def test_the_checker_finds_lost_stuck_and_duplicated_answers() -> None:
    history = History()
    history.record("lost", "jobs", {}, Answer(0.1, 202, "job-1", "queued"))
    history.read("job-1", Answer(1.0, 404, "job-1", "unknown"))
    history.record("stuck", "generate", {}, Answer(0.2, 504, "job-2"))
    history.read("job-2", Answer(1.0, 200, "job-2", "running"))
    history.record("twice", "generate", {}, Answer(0.3, 200, "job-3", "succeeded", "a"))
    history.read("job-3", Answer(1.0, 200, "job-3", "succeeded", "b"))
    history.record("never", "generate", {}, Answer(0.4, 0, error="ClientConnectorError"))
    verdict = check(history, quiet_state(pending_entries=1, failed_probes=["gateway-0: 504 timeout"]))
    assert (verdict.lost, verdict.stuck) == (["lost"], ["stuck"])
    assert verdict.duplicate_results == {"job-3": ["a", "b"]}
    assert verdict.unacknowledged == 1 and not verdict.passed
    assert len(verdict.violations) == 5 and set(verdict.evidence) == {"lost", "stuck", "job-3"}


def test_a_request_answered_by_two_jobs_is_a_violation() -> None:
    history = History()
    history.record("k", "jobs", {}, Answer(0.1, 202, "job-1", "queued"))
    history.record("k", "jobs", {}, Answer(0.2, 202, "job-2", "queued"))
    for job_id in ("job-1", "job-2"):
        history.read(job_id, Answer(1.0, 200, job_id, "succeeded", job_id))
    verdict = check(history, quiet_state())
    assert verdict.answered_twice == {"k": ["job-1", "job-2"]} and not verdict.passed


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="the delivery layer does not yet survive the fault injector: garbage on the completions channel kills "
    "every gateway's listener, a worker back from a pause dies on its deleted stream, rollbacks leave jobs running",
)
async def test_a_seeded_fault_schedule_loses_and_duplicates_nothing(
    tiny_model: Path, compile_cache: Path, tmp_path: Path
) -> None:
    config = NemesisConfig(
        work_dir=tmp_path,
        seed=CI_SEED,
        duration_s=CI_DURATION_S,
        counts=default_counts(2),
        cluster={"standin_workers": 2, "tiny_model": tiny_model, "compile_cache": compile_cache},
        quiet_bound_s=60.0,
    )
    report = await run_nemesis(config)
    print(render(report))
    if not (report.verdict.accepted and report.injected):  # the harness itself failed: not the expected failure
        pytest.fail(f"the run must have served requests and injected faults:\n{render(report)}")
    assert report.verdict.passed, render(report)


@pytest.mark.parametrize(("snapshot_at", "rerun"), [(0.5, True), (1.5, False)])
def test_a_second_result_counts_as_a_rerun_only_if_a_rollback_erased_the_first(snapshot_at: float, rerun: bool) -> None:
    history = History()
    history.record("k", "jobs", {}, Answer(0.1, 202, "job-1", "queued"))
    history.read("job-1", Answer(1.0, 200, "job-1", "succeeded", "a"))
    history.read("job-1", Answer(3.0, 200, "job-1", "succeeded", "b"))
    verdict = check(history, quiet_state(), rollbacks=[(snapshot_at, 2.0)])
    assert bool(verdict.rerun_after_rollback) is rerun and bool(verdict.duplicate_results) is not rerun
    assert verdict.passed is rerun
