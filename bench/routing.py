"""Routing policies compared by discrete-event simulation: one shared queue, random, power of two choices.

`sdxl-serve bench routing --workers 16 --load 0.8` (one configuration) or `--sweep` (a markdown table of
p99 latency over cluster sizes and loads). Poisson arrivals at rate load x capacity; service times of mean
`--service-time` (2.33 s: the reference TPU v5e-4 demo, four 1024x1024 images) with coefficient of
variation `--jitter`. Every policy sees the same arrivals and the same job sizes (common random numbers),
so differences between them are the policy's, not the sampling's. Latency is wait plus service (plus
`--overhead-ms`); the first `--warmup` fraction of requests is left out of the statistics.

- shared: one FIFO queue, the longest-idle worker takes the head (our Redis consumer group; M/G/N).
- random: each request goes to a uniformly random worker's own FIFO queue (the reference demo).
- p2c: sample two distinct workers, join the one with fewer jobs (queued plus in service).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from common.config import ConfigError

Policy = Literal["shared", "p2c", "random"]
Distribution = Literal["lognormal", "gamma", "exp"]
POLICIES: tuple[Policy, ...] = get_args(Policy)
DISTRIBUTIONS: tuple[Distribution, ...] = get_args(Distribution)

# The reference demo's generation time for four 1024x1024 images at 20 steps (docs/benchmarks.md).
DEFAULT_SERVICE_TIME_S = 2.33
SWEEP_WORKERS = (4, 16, 64, 256)
SWEEP_LOADS = (0.5, 0.8, 0.9, 0.95)
SWEEP_PER_WORKER = 5_000


@dataclass(frozen=True)
class SimConfig:
    """One simulated configuration; `service_times_s`, when set, gives each worker its own mean."""

    workers: int = 4
    load: float = 0.8
    service_time_s: float = DEFAULT_SERVICE_TIME_S
    jitter: float = 0.05
    distribution: Distribution = "lognormal"
    requests: int = 20_000
    seed: int = 0
    overhead_s: float = 0.0
    warmup: float = 0.1
    service_times_s: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.workers >= 1, f"workers must be >= 1 (got {self.workers})"),
            (self.load > 0, f"load must be > 0 (got {self.load})"),
            (self.service_time_s > 0, f"service_time_s must be > 0 (got {self.service_time_s})"),
            (self.jitter >= 0, f"jitter must be >= 0 (got {self.jitter})"),
            (self.distribution in DISTRIBUTIONS, f"distribution must be one of {DISTRIBUTIONS}"),
            (self.overhead_s >= 0, f"overhead_s must be >= 0 (got {self.overhead_s})"),
            (0 <= self.warmup < 1, f"warmup must be in [0, 1) (got {self.warmup})"),
            (self.measured >= 1, f"requests ({self.requests}) leave nothing to measure after the warm-up"),
        ]
        if self.service_times_s is not None:
            checks += [
                (
                    len(self.service_times_s) == self.workers,
                    f"workers ({self.workers}) != number of service_times_s ({len(self.service_times_s)})",
                ),
                (all(s > 0 for s in self.service_times_s), "every service_times_s entry must be > 0"),
            ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def means_s(self) -> tuple[float, ...]:
        """Each worker's mean service time."""
        return self.service_times_s or (self.service_time_s,) * self.workers

    @property
    def arrival_rate(self) -> float:
        """Requests per second: the load times the cluster's capacity, sum of 1/S_i."""
        return self.load * sum(1 / s for s in self.means_s)

    @property
    def cv(self) -> float:
        """Coefficient of variation of service times (an exponential's is 1 whatever `jitter` says)."""
        return 1.0 if self.distribution == "exp" else self.jitter

    @property
    def warmup_requests(self) -> int:
        return int(self.requests * self.warmup)

    @property
    def measured(self) -> int:
        return self.requests - self.warmup_requests


@dataclass(frozen=True)
class Workload:
    """Arrival times (s) and job sizes (multiples of the serving worker's mean service time)."""

    arrivals: tuple[float, ...]
    sizes: tuple[float, ...]


@dataclass(frozen=True)
class SimResult:
    """One policy's statistics over the measured (post warm-up) requests."""

    policy: Policy
    config: SimConfig
    p50_s: float
    p95_s: float
    p99_s: float
    mean_s: float
    throughput_rps: float
    utilisation: float

    def to_json(self) -> dict[str, Any]:
        """Flat keys, one object per policy: what `--json` prints."""
        config = self.config
        row: dict[str, Any] = {
            "policy": self.policy,
            "workers": config.workers,
            "load": config.load,
            "service_time_s": config.service_time_s,
            "jitter": config.cv,
            "distribution": config.distribution,
            "requests": config.requests,
            "seed": config.seed,
            "overhead_ms": config.overhead_s * 1000,
            "arrival_rate_rps": round(config.arrival_rate, 6),
        }
        if config.service_times_s is not None:
            row["service_times_s"] = list(config.service_times_s)
        stats = {
            "p50_s": self.p50_s,
            "p95_s": self.p95_s,
            "p99_s": self.p99_s,
            "mean_s": self.mean_s,
            "throughput_rps": self.throughput_rps,
            "utilisation": self.utilisation,
        }
        return row | {key: round(value, 6) for key, value in stats.items()}


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, linearly interpolated between ranks."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def unit_sizes(rng: random.Random, count: int, distribution: Distribution, cv: float) -> list[float]:
    """`count` draws of mean 1 and coefficient of variation `cv` (all 1.0 when cv is 0)."""
    if distribution == "exp":
        return [rng.expovariate(1.0) for _ in range(count)]
    if cv == 0:
        return [1.0] * count
    if distribution == "gamma":
        return [rng.gammavariate(1 / cv**2, cv**2) for _ in range(count)]
    sigma = math.sqrt(math.log1p(cv**2))
    return [rng.lognormvariate(-(sigma**2) / 2, sigma) for _ in range(count)]


def make_workload(config: SimConfig) -> Workload:
    """The arrivals and job sizes every policy is given for this configuration and seed."""
    rng = random.Random(config.seed)
    rate, now, arrivals = config.arrival_rate, 0.0, []
    for _ in range(config.requests):
        now += rng.expovariate(rate)
        arrivals.append(now)
    return Workload(tuple(arrivals), tuple(unit_sizes(rng, config.requests, config.distribution, config.cv)))


# A policy takes the workload, each worker's mean and the routing RNG and returns, per request in arrival
# order, the worker that served it and when it finished.
Router = Callable[[Workload, Sequence[float], random.Random], tuple[list[int], list[float]]]


def route_shared(workload: Workload, means: Sequence[float], rng: random.Random) -> tuple[list[int], list[float]]:
    """One FIFO queue: the head goes to the worker free soonest, or, if several are idle, idle longest."""
    # Redis hands a stream entry to the consumer blocked longest, hence longest-idle; this matters only
    # when workers differ in speed.
    free_at = [(0.0, worker) for worker in range(len(means))]
    workers, finishes = [], []
    for arrival, size in zip(workload.arrivals, workload.sizes, strict=True):
        ready, worker = heapq.heappop(free_at)
        finish = max(arrival, ready) + means[worker] * size
        heapq.heappush(free_at, (finish, worker))
        workers.append(worker)
        finishes.append(finish)
    return workers, finishes


def route_random(workload: Workload, means: Sequence[float], rng: random.Random) -> tuple[list[int], list[float]]:
    """Each request joins a uniformly random worker's own FIFO queue."""
    free_at = [0.0] * len(means)
    workers, finishes = [], []
    for arrival, size in zip(workload.arrivals, workload.sizes, strict=True):
        worker = rng.randrange(len(means))
        free_at[worker] = max(arrival, free_at[worker]) + means[worker] * size
        workers.append(worker)
        finishes.append(free_at[worker])
    return workers, finishes


def route_p2c(workload: Workload, means: Sequence[float], rng: random.Random) -> tuple[list[int], list[float]]:
    """Sample two distinct workers, join the one with fewer jobs queued or in service."""
    count = len(means)
    # Finish times of each worker's jobs, in order (FIFO): the ones not yet past are its queue.
    queues: list[deque[float]] = [deque() for _ in range(count)]
    workers, finishes = [], []
    for arrival, size in zip(workload.arrivals, workload.sizes, strict=True):
        first, second = rng.sample(range(count), 2) if count > 1 else (0, 0)
        # sample() returns the pair in random order, so taking `first` on a tie breaks ties at random.
        worker = first if _jobs_at(queues[first], arrival) <= _jobs_at(queues[second], arrival) else second
        queue = queues[worker]
        finish = max(arrival, queue[-1] if queue else 0.0) + means[worker] * size
        queue.append(finish)
        workers.append(worker)
        finishes.append(finish)
    return workers, finishes


def _jobs_at(queue: deque[float], now: float) -> int:
    while queue and queue[0] <= now:
        queue.popleft()
    return len(queue)


ROUTERS: dict[Policy, Router] = {"shared": route_shared, "p2c": route_p2c, "random": route_random}


def simulate(policy: Policy, config: SimConfig, workload: Workload | None = None) -> SimResult:
    """Run one policy over the configuration's workload (made from its seed unless given)."""
    if workload is None:
        workload = make_workload(config)
    # Routing draws come from their own stream so that they never shift the workload's.
    workers, finishes = ROUTERS[policy](workload, config.means_s, random.Random(f"{config.seed}:routing"))
    return _result(policy, config, workload, workers, finishes)


def compare(config: SimConfig) -> list[SimResult]:
    """Every policy over one shared workload."""
    workload = make_workload(config)
    return [simulate(policy, config, workload) for policy in POLICIES]


def _result(
    policy: Policy, config: SimConfig, workload: Workload, workers: list[int], finishes: list[float]
) -> SimResult:
    skip = config.warmup_requests
    latencies = sorted(
        finish - arrival + config.overhead_s
        for arrival, finish in zip(workload.arrivals[skip:], finishes[skip:], strict=True)
    )
    means = config.means_s
    busy = sum(means[worker] * size for worker, size in zip(workers, workload.sizes, strict=True))
    makespan = max(finishes)
    return SimResult(
        policy=policy,
        config=config,
        p50_s=percentile(latencies, 0.50),
        p95_s=percentile(latencies, 0.95),
        p99_s=percentile(latencies, 0.99),
        mean_s=statistics.fmean(latencies),
        throughput_rps=config.requests / makespan,
        utilisation=busy / (config.workers * makespan),
    )


def sweep(
    base: SimConfig,
    workers: Sequence[int] = SWEEP_WORKERS,
    loads: Sequence[float] = SWEEP_LOADS,
    per_worker: int = SWEEP_PER_WORKER,
) -> list[list[SimResult]]:
    """`compare` at every cluster size and load, the other settings taken from `base`.

    A run has max(base.requests, per_worker x N) requests: with a fixed total, each of 256 workers would
    see about 80 jobs, too few for its own queue (random, p2c) to fill up, and their p99 would come out
    far below the steady state's.
    """
    return [
        compare(replace(base, workers=n, load=load, requests=max(base.requests, per_worker * n)))
        for n in workers
        for load in loads
    ]


def sweep_table(rows: list[list[SimResult]]) -> str:
    """A markdown table of p99 latency by policy, one row per configuration."""
    lines = [
        "| workers | load | requests | shared p99 (s) | p2c p99 (s) | random p99 (s) | shared / random |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for results in rows:
        p99 = {result.policy: result.p99_s for result in results}
        config = results[0].config
        lines.append(
            f"| {config.workers} | {config.load:.2f} | {config.requests} | {p99['shared']:.2f} "
            f"| {p99['p2c']:.2f} | {p99['random']:.2f} | {p99['shared'] / p99['random']:.2f} |"
        )
    return "\n".join(lines)


def results_table(results: list[SimResult]) -> str:
    """A readable table of one configuration's results, with a line saying what was simulated."""
    config = results[0].config
    if config.service_times_s:
        means = f"per-worker means {list(config.service_times_s)} s"
    else:
        means = f"service {config.service_time_s} s"
    lines = [
        f"{config.workers} workers, load {config.load:.2f} ({config.arrival_rate:.3f} req/s), {means} "
        f"{config.distribution} cv {config.cv}, {config.requests} requests (first {config.warmup:.0%} "
        f"warm-up), seed {config.seed}",
        f"{'policy':<8}{'p50 s':>9}{'p95 s':>9}{'p99 s':>9}{'mean s':>9}{'req/s':>9}{'util':>7}",
    ]
    for r in results:
        lines.append(
            f"{r.policy:<8}{r.p50_s:>9.3f}{r.p95_s:>9.3f}{r.p99_s:>9.3f}{r.mean_s:>9.3f}"
            f"{r.throughput_rps:>9.3f}{r.utilisation:>7.3f}"
        )
    return "\n".join(lines)


def number_type(
    kind: Callable[[str], float], low: float, high: float = math.inf, low_inclusive: bool = False
) -> Callable[[str], float]:
    """An argparse type: `kind(text)` within (low, high), or [low, high) with `low_inclusive`.

    Out-of-range values fail at parse time, so the command exits 2 with the flag named.
    """

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (low <= value if low_inclusive else low < value) or value >= high:
            bounds = f"{'[' if low_inclusive else '('}{low}, {high})"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value

    return parse


_positive = number_type(float, 0)
_positive_int = number_type(int, 0)
_non_negative = number_type(float, 0, low_inclusive=True)
_fraction = number_type(float, 0, 1, low_inclusive=True)


def _service_times(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds, got {text!r}") from None
    if not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"every service time must be > 0, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare this benchmark's flags: the simulated cluster and its load, then the runs."""
    _add_cluster_arguments(parser)
    _add_run_arguments(parser)


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_positive_int, default=None, help="cluster size N (default 4)")
    parser.add_argument(
        "--load", type=_positive, default=0.8, help="utilisation rho: arrivals at rho x capacity (default 0.8)"
    )
    parser.add_argument(
        "--service-time",
        type=_positive,
        default=DEFAULT_SERVICE_TIME_S,
        help=f"mean seconds per request (default {DEFAULT_SERVICE_TIME_S}: TPU v5e-4, 4x 1024^2)",
    )
    parser.add_argument(
        "--service-times",
        type=_service_times,
        default=None,
        metavar="S1,S2,...",
        help="each worker's own mean service time; sets N, capacity is sum(1/S_i)",
    )
    parser.add_argument(
        "--jitter",
        type=_non_negative,
        default=0.05,
        help="coefficient of variation of service times; 0 = deterministic (default 0.05)",
    )
    parser.add_argument(
        "--distribution",
        choices=DISTRIBUTIONS,
        default="lognormal",
        help="service-time distribution (exp: exponential, CV 1, ignores --jitter)",
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=_positive_int, default=20_000, help="requests per run")
    parser.add_argument("--warmup", type=_fraction, default=0.1, help="fraction of requests left out of statistics")
    parser.add_argument(
        "--overhead-ms", type=_non_negative, default=0.0, help="fixed serving overhead added to every latency"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sweep", action="store_true", help=f"N in {SWEEP_WORKERS} x load in {SWEEP_LOADS}: a markdown table of p99"
    )
    parser.add_argument(
        "--sweep-per-worker",
        type=_positive_int,
        default=SWEEP_PER_WORKER,
        help="in the sweep, at least this many requests per worker in a run (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per policy (and configuration) a line")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The simulated configuration the flags describe; ConfigError names a flag that does not fit."""
    service_times: tuple[float, ...] | None = args.service_times
    if service_times is not None and args.workers not in (None, len(service_times)):
        raise ConfigError(f"--workers {args.workers} disagrees with the {len(service_times)} --service-times")
    if service_times is not None and args.sweep:
        raise ConfigError("--sweep sets the cluster size: it does not combine with --service-times")
    workers = len(service_times) if service_times else (args.workers or 4)
    return SimConfig(
        workers=workers,
        load=args.load,
        service_time_s=args.service_time,
        jitter=args.jitter,
        distribution=args.distribution,
        requests=args.requests,
        seed=args.seed,
        overhead_s=args.overhead_ms / 1000,
        warmup=args.warmup,
        service_times_s=service_times,
    )


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit status."""
    config = config_from_args(args)
    started = time.perf_counter()
    rows = sweep(config, per_worker=args.sweep_per_worker) if args.sweep else [compare(config)]
    if args.json:
        print("\n".join(json.dumps(result.to_json()) for results in rows for result in results))
    elif args.sweep:
        print(
            f"p99 latency by routing policy: service {config.service_time_s} s {config.distribution} "
            f"cv {config.cv}, max({config.requests}, {args.sweep_per_worker} x N) requests per run, "
            f"seed {config.seed} ({time.perf_counter() - started:.1f} s to simulate)\n"
        )
        print(sweep_table(rows))
    else:
        print(results_table(rows[0]))
    return 0
