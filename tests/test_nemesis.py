"""The fault injector (`sdxl-serve bench nemesis`) in the suite: its schedule replays from the seed, its
checker finds what it claims to find, and a CI-sized run holds the cluster to the delivery promise."""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bench import nemesis as bench_nemesis
from sdxl_serve.cli import build_parser
from testkit.checker import Answer, ClusterState, History, Rollback, check, result_digest
from testkit.clients import Clients, LoadConfig
from testkit.cluster import ClusterConfig, NemesisCluster, Slot
from testkit.nemesis import NemesisConfig, default_counts, render, run_nemesis
from testkit.proxy import FaultProxy
from testkit.schedule import REQUESTABLE, Targets, make_schedule
from testkit.standin import _parser as standin_parser
from testkit.standin import config_of

# The slots of the CI-sized run: two gateways, two stand-in workers and the real one.
TARGETS = Targets(
    workers=("worker-0", "worker-1", "worker-2"), gateways=("gateway-0", "gateway-1"), heartbeat_ttl_s=3.0
)
# The run in the suite: about a minute of faults, two of each kind, every job with a webhook (two more gateways
# lack the signing secret or the allow-list, and take messages too). With this seed
# the last garbage message comes after the last gateway restart, so every gateway meets one after it started.
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
@pytest.mark.nemesis
@pytest.mark.timeout(900)
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
        webhooks=True,  # every job's `completed` must reach the receiver too
        differing_webhook_gateways=2,  # also when gateways without the secret or the allow-list take them
    )
    report = await run_nemesis(config)
    print(render(report))
    if not (report.verdict.accepted and report.injected):  # the harness itself failed: not the expected failure
        pytest.fail(f"the run must have served requests and injected faults:\n{render(report)}")
    assert report.verdict.passed, render(report)


@pytest.mark.e2e
@pytest.mark.nemesis
@pytest.mark.timeout(900)
async def test_workers_holding_several_jobs_each_lose_and_duplicate_nothing_under_faults(tmp_path: Path) -> None:
    """Stand-in workers with four rows each, one-image requests from eight clients: each worker holds several
    jobs at once (its registry entry says so), and is killed, paused and cut off holding them."""
    config = NemesisConfig(
        work_dir=tmp_path,
        seed=CI_SEED,
        duration_s=CI_DURATION_S,
        counts=default_counts(2),
        cluster={"standin_workers": 3, "engine": "rows", "rows_per_device": 1},
        load=LoadConfig(clients=8, n=1),
        quiet_bound_s=60.0,
    )
    report = await run_nemesis(config)
    print(render(report))
    if not (report.verdict.accepted and report.injected):
        pytest.fail(f"the run must have served requests and injected faults:\n{render(report)}")
    assert report.verdict.passed, render(report)
    assert report.most_rows_held >= 2, render(report)


@pytest.mark.parametrize(("snapshot_at", "rerun"), [(0.5, True), (1.5, False)])
def test_a_second_result_counts_as_a_rerun_only_if_a_rollback_erased_the_first(snapshot_at: float, rerun: bool) -> None:
    history = History()
    history.record("k", "jobs", {}, Answer(0.1, 202, "job-1", "queued"))
    history.read("job-1", Answer(1.0, 200, "job-1", "succeeded", "a"))
    history.read("job-1", Answer(3.0, 200, "job-1", "succeeded", "b"))
    verdict = check(history, quiet_state(), rollbacks=[Rollback(snapshot_at, 1.9, 2.0)])
    assert bool(verdict.rerun_after_rollback) is rerun and bool(verdict.duplicate_results) is not rerun
    assert verdict.passed is rerun


# A run of `bench nemesis --seed 3 --webhooks` (stand-in workers): a snapshot at 11.79 s, Redis stopped at about
# 16.25 s and back at 16.32 s. Job J was stored at 15.08 s (result a); a GET sent at 15.49 s through a gateway
# whose Redis traffic was delayed 0.2 s a chunk read it before the stop and was answered at 18.63 s; the journal
# had queued J again at 17.02 s and another worker stored result b at 17.14 s.
SEED_3_ROLLBACK = Rollback(taken_s=11.79, stopped_s=16.25, restored_s=16.32)


@pytest.mark.parametrize(("sent_s", "rerun"), [(15.49, True), (16.28, False), (None, False)])
def test_a_result_read_before_the_stop_and_answered_after_the_restore_was_erased_by_it(
    sent_s: float | None, rerun: bool
) -> None:
    # Sent before the old server stopped, the read may have found the result that the rollback then erased;
    # sent while Redis was down (or when is unknown), it can only have read the restored Redis, so a result
    # it showed and that a later one replaced is a duplicate.
    history = History()
    history.record("k", "jobs", {}, Answer(14.97, 202, "job-1", "queued", sent_s=14.96))
    history.read("job-1", Answer(18.63, 200, "job-1", "succeeded", "a", sent_s=sent_s))
    history.read("job-1", Answer(67.9, 200, "job-1", "succeeded", "b", sent_s=67.89))
    verdict = check(history, quiet_state(), rollbacks=[SEED_3_ROLLBACK])
    assert verdict.rerun_after_rollback == ({"job-1": ["a", "b"]} if rerun else {})
    assert verdict.passed is rerun


def test_the_results_order_is_searched_when_a_slow_answer_arrives_after_the_next_result() -> None:
    # Result b is seen (17.5 s) before the slow answer showing a arrives (18.63 s): still a then b.
    history = History()
    history.read("job-1", Answer(18.63, 200, "job-1", "succeeded", "a", sent_s=15.49))
    history.read("job-1", Answer(17.5, 200, "job-1", "succeeded", "b", sent_s=17.4))
    history.record("k", "jobs", {}, Answer(14.97, 202, "job-1", "queued", sent_s=14.96))
    assert check(history, quiet_state(), rollbacks=[SEED_3_ROLLBACK]).passed


def test_one_rollback_excuses_one_change_of_result_not_two() -> None:
    # a read before the stop, b and c both seen after the restore only: b then c has no rollback of its own.
    history = History()
    history.record("k", "jobs", {}, Answer(14.97, 202, "job-1", "queued", sent_s=14.96))
    history.read("job-1", Answer(18.63, 200, "job-1", "succeeded", "a", sent_s=15.49))
    history.read("job-1", Answer(20.0, 200, "job-1", "succeeded", "b", sent_s=19.9))
    history.read("job-1", Answer(30.0, 200, "job-1", "succeeded", "c", sent_s=29.9))
    one = check(history, quiet_state(), rollbacks=[SEED_3_ROLLBACK])
    assert one.duplicate_results == {"job-1": ["a", "b", "c"]} and not one.passed
    two = check(history, quiet_state(), rollbacks=[SEED_3_ROLLBACK, Rollback(19.0, 25.0, 25.1)])
    assert two.rerun_after_rollback == {"job-1": ["a", "b", "c"]} and two.passed


async def test_an_answer_records_when_its_request_was_sent(aiohttp_server: Any, tmp_path: Path) -> None:
    # The checker takes a sighting as the interval from the request to its answer: the moment the gateway
    # read the job must lie inside what the client recorded.
    handled: list[float] = []
    clients: Clients

    async def job(request: web.Request) -> web.Response:
        handled.append(clients.elapsed())
        return web.json_response({"id": request.match_info["job_id"], "status": "running"})

    app = web.Application()
    app.router.add_get("/v1/jobs/{job_id}", job)
    server = await aiohttp_server(app)
    history = History()
    clients = Clients([str(server.make_url(""))], LoadConfig(), history, seed=0, t0=time.monotonic())
    try:
        answer = await clients.read(clients.urls[0], "job-1")
    finally:
        await clients.close()
    assert answer.sent_s is not None and answer.sent_s <= handled[0] <= answer.at_s
    assert history.reads["job-1"] == [answer]


def nemesis_config(*argv: str) -> NemesisConfig:
    """What `sdxl-serve bench nemesis ARGV...` would run."""
    parser = argparse.ArgumentParser()
    bench_nemesis.add_arguments(parser)
    return bench_nemesis._config(parser.parse_args(argv))


async def test_the_command_forwards_engine_and_rows_per_device_to_every_worker(tmp_path: Path) -> None:
    # Each worker's command line, read back by that worker's own parser: the flags reach the processes.
    model, work = str(tmp_path / "model"), str(tmp_path)
    config = nemesis_config("--engine", "request", "--rows-per-device", "2", "--tiny-model", model, "--work-dir", work)
    cluster = NemesisCluster(ClusterConfig(work_dir=tmp_path, **config.cluster))
    slot = Slot(name="worker-0", role="worker", proxy=FaultProxy("worker-0", 1))  # nothing connects through it
    await slot.proxy.start()
    try:
        standin = config_of(standin_parser().parse_args(cluster._standin_argv(slot)[3:]))
        real = build_parser(load=["worker"]).parse_args(cluster._real_worker_argv(slot)[3:])
    finally:
        await slot.proxy.close()
    assert (standin.engine, standin.rows_per_device) == ("request", 2)
    assert (real.engine, real.rows_per_device) == ("request", 2)


def test_the_command_leaves_the_engine_to_the_cluster_default_when_not_given(tmp_path: Path) -> None:
    config = nemesis_config("--no-real-worker", "--work-dir", str(tmp_path))
    cluster = ClusterConfig(work_dir=tmp_path, **config.cluster)
    assert (cluster.engine, cluster.rows_per_device, config.load.n) == ("rows", 4, None)


async def test_the_command_forwards_n_to_every_request(aiohttp_server: Any, tmp_path: Path) -> None:
    bodies: list[dict[str, Any]] = []

    async def generate(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response({"id": "job-1", "status": "queued"}, status=202)

    app = web.Application()
    app.router.add_post("/v1/generate", generate)
    server = await aiohttp_server(app)
    load = nemesis_config("--n", "3", "--no-real-worker", "--work-dir", str(tmp_path)).load
    clients = Clients([str(server.make_url(""))], load, History(), seed=0, t0=time.monotonic())
    try:
        await clients.submit(random.Random(0), "generate", "k-1", {"prompt": "a", "seed": 1})
    finally:
        await clients.close()
    assert [body["n"] for body in bodies] == [3]


@pytest.mark.parametrize("argv", [["--n", "5"], ["--n", "0"], ["--rows-per-device", "0"], ["--engine", "batch"]])
def test_the_command_refuses_an_out_of_range_workload_flag(argv: list[str], capsys: Any) -> None:
    parser = argparse.ArgumentParser(prog="nemesis")
    bench_nemesis.add_arguments(parser)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(argv)
    assert exit_.value.code == 2 and argv[0] in capsys.readouterr().err
