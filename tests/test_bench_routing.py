"""The routing simulator: queueing theory where it has an answer, the policies' order where it does not.

Every number here is deterministic given the seed, so the bounds are on values, never on wall time.
"""

from __future__ import annotations

import json
import random
import statistics
from typing import Any

import pytest

from bench.routing import (
    POLICIES,
    Distribution,
    Policy,
    SimConfig,
    compare,
    make_workload,
    percentile,
    simulate,
    sweep,
    sweep_table,
    unit_sizes,
)
from common.config import ConfigError
from sdxl_serve.cli import main as cli_main


def by_policy(config: SimConfig) -> dict[str, float]:
    return {result.policy: result.p99_s for result in compare(config)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_worker_exponential_matches_mm1_mean(seed: int) -> None:
    # M/M/1: mean time in system 1 / (mu - lambda) = S / (1 - rho).
    config = SimConfig(workers=1, load=0.5, service_time_s=1.0, distribution="exp", requests=50_000, seed=seed)
    result = simulate("shared", config)
    assert result.mean_s == pytest.approx(1.0 / (1.0 - 0.5), rel=0.10)


def test_every_policy_is_the_same_with_one_worker() -> None:
    results = compare(SimConfig(workers=1, load=0.7, requests=5_000))
    stats = {(r.p50_s, r.p95_s, r.p99_s, r.mean_s, r.throughput_rps) for r in results}
    assert len(stats) == 1


def test_shared_queue_halves_random_p99_and_p2c_lies_between() -> None:
    p99 = by_policy(SimConfig(workers=16, load=0.8, jitter=0.05))
    assert p99["shared"] <= 0.5 * p99["random"]
    assert p99["shared"] <= p99["p2c"] <= p99["random"]


@pytest.mark.parametrize("policy", POLICIES)
def test_throughput_is_the_arrival_rate_below_saturation(policy: Policy) -> None:
    config = SimConfig(workers=16, load=0.8)
    result = simulate(policy, config)
    assert result.throughput_rps == pytest.approx(config.arrival_rate, rel=0.03)
    assert result.utilisation == pytest.approx(0.8, abs=0.03)


def test_same_seed_same_results_other_seed_other_results() -> None:
    config = SimConfig(workers=8, load=0.9, requests=5_000, seed=7)
    assert compare(config) == compare(config)
    assert compare(config)[2].p99_s != compare(SimConfig(workers=8, load=0.9, requests=5_000, seed=8))[2].p99_s


def test_policies_share_one_workload() -> None:
    config = SimConfig(workers=4, requests=2_000, seed=3)
    assert make_workload(config) == make_workload(config)
    # simulate() makes the workload from the seed; compare() makes it once: the same numbers either way.
    assert [simulate(policy, config) for policy in POLICIES] == compare(config)


def test_without_queueing_latency_is_service_plus_overhead() -> None:
    config = SimConfig(workers=64, load=0.01, jitter=0.0, service_time_s=2.0, overhead_s=0.25, requests=1_000)
    results = {result.policy: result for result in compare(config)}
    assert all(result.p50_s == pytest.approx(2.25) for result in results.values())
    # With an idle worker always at hand, only the shared queue never makes a request wait.
    assert results["shared"].p99_s == pytest.approx(2.25)


def test_heterogeneous_workers_set_capacity_from_their_speeds() -> None:
    config = SimConfig(workers=3, service_times_s=(1.0, 1.0, 4.0), load=0.8, requests=20_000)
    assert config.arrival_rate == pytest.approx(0.8 * 2.25)
    results = {r.policy: r for r in compare(config)}
    assert results["shared"].throughput_rps == pytest.approx(config.arrival_rate, rel=0.03)
    assert results["shared"].p99_s < results["random"].p99_s


@pytest.mark.parametrize("distribution", ["lognormal", "gamma"])
def test_service_sizes_have_unit_mean_and_the_requested_cv(distribution: Distribution) -> None:
    sizes = unit_sizes(random.Random(0), 100_000, distribution, 0.5)
    mean = statistics.fmean(sizes)
    assert mean == pytest.approx(1.0, rel=0.02)
    assert statistics.pstdev(sizes) / mean == pytest.approx(0.5, rel=0.05)


def test_zero_jitter_is_deterministic() -> None:
    assert set(unit_sizes(random.Random(0), 100, "lognormal", 0.0)) == {1.0}


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert percentile([0.0, 10.0], 0.99) == pytest.approx(9.9)
    assert percentile([7.0], 0.99) == 7.0


@pytest.mark.parametrize(
    "changes",
    [{"workers": 0}, {"load": 0.0}, {"jitter": -0.1}, {"warmup": 1.0}, {"workers": 2, "service_times_s": (1.0,)}],
)
def test_invalid_configurations_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SimConfig(**changes)


def test_sweep_table_has_a_row_per_configuration() -> None:
    rows = sweep(SimConfig(requests=500), workers=(2, 4), loads=(0.5, 0.9), per_worker=400)
    assert [results[0].config.requests for results in rows] == [800, 800, 1600, 1600]
    table = sweep_table(rows).splitlines()
    assert len(table) == 2 + 4 and table[2].startswith("| 2 | 0.50 | 800 |")


def test_cli_json_prints_one_parseable_line_per_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "routing", "--workers", "4", "--load", "0.8", "--requests", "2000", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines]
    assert [row["policy"] for row in rows] == list(POLICIES)
    for row in rows:
        assert {
            "policy",
            "workers",
            "load",
            "service_time_s",
            "jitter",
            "requests",
            "p50_s",
            "p95_s",
            "p99_s",
            "mean_s",
            "throughput_rps",
        } <= row.keys()
        assert (row["workers"], row["load"], row["requests"]) == (4, 0.8, 2000)


def test_cli_table_and_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "routing", "--requests", "1000", "--service-times", "2,2,4"]) == 0
    assert "3 workers" in capsys.readouterr().out
    assert cli_main(["bench", "routing", "--sweep", "--requests", "200", "--sweep-per-worker", "5"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 16


def test_cli_rejects_flags_that_disagree(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "routing", "--workers", "3", "--service-times", "1,2"]) == 2
    assert "--service-times" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        cli_main(["bench", "routing", "--load", "0"])
    assert caught.value.code == 2
