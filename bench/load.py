"""Open-loop Poisson load against a running gateway: `sdxl-serve bench load --url URL --rate R --duration D`.

Start times are drawn up front from a Poisson process and each request is sent at its time whether or
not the earlier ones have been answered. A closed loop (send, wait, send) slows down with the cluster and
so never shows the queueing a real crowd of users would meet; an open loop shows it as latency and errors.

Reports what was sent and answered, errors by kind ("503 no_workers", "504 timeout", "timeout" for the
client's own limit, "connection_error"), the client's end-to-end latency over the successes, throughput,
the gateway's queued_ms and generate_ms, and how many requests each worker served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from bench.routing import number_type, percentile
from common.config import ConfigError

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
OK = "ok"


@dataclass(frozen=True)
class LoadConfig:
    """One load run: where, how fast, for how long, and what each request asks for."""

    url: str
    rate: float
    duration_s: float
    prompt: str = DEFAULT_PROMPT
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    timeout_s: float = 300.0
    concurrency_limit: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"--url must start with http:// or https:// (got {self.url!r})")
        for name in ("rate", "duration_s", "timeout_s", "concurrency_limit"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 (got {getattr(self, name)})")

    def body(self, index: int) -> dict[str, Any]:
        """The JSON body of request `index`: its seed is its index, so runs are reproducible."""
        body: dict[str, Any] = {"prompt": self.prompt, "seed": index}
        optional = {"width": self.width, "height": self.height, "num_inference_steps": self.steps}
        return body | {key: value for key, value in optional.items() if value is not None}


@dataclass(frozen=True)
class Outcome:
    """One request: its kind ("ok" or an error kind), when it went out and came back (s from the start)."""

    kind: str
    sent_s: float
    done_s: float
    lag_s: float = 0.0
    worker: str | None = None
    queued_ms: float | None = None
    generate_ms: float | None = None

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s


@dataclass(frozen=True)
class LoadReport:
    """What a run measured. Latencies are over successful requests only (None when there were none)."""

    url: str
    rate: float
    duration_s: float
    seed: int
    sent: int
    succeeded: int
    errors: dict[str, int]
    offered_rps: float
    throughput_rps: float
    elapsed_s: float
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    mean_s: float | None
    queued_ms_p50: float | None
    generate_ms_p50: float | None
    generate_ms_mean: float | None  # with the CV below: the service-time distribution to simulate
    generate_ms_cv: float | None
    workers: dict[str, int]
    send_lag_max_ms: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def arrival_times(rate: float, duration_s: float, rng: random.Random) -> list[float]:
    """Start times (s) of a Poisson process at `rate` per second over [0, duration_s)."""
    times, now = [], rng.expovariate(rate)
    while now < duration_s:
        times.append(now)
        now += rng.expovariate(rate)
    return times


def classify(status: int, raw: bytes) -> tuple[str, dict[str, Any]]:
    """The kind of an HTTP answer and its JSON body: "ok", or "STATUS CODE" from the error body."""
    try:
        body = json.loads(raw)
    except ValueError:
        return f"{status} non_json", {}
    if not isinstance(body, dict):
        return f"{status} non_json", {}
    if status == 200 and isinstance(body.get("images"), list):
        return OK, body
    error = body.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return f"{status} {code or 'unknown'}", body


def _outcome(kind: str, body: dict[str, Any], sent_s: float, done_s: float, lag_s: float) -> Outcome:
    timings = body.get("timings") if kind == OK else None
    timings = timings if isinstance(timings, dict) else {}
    worker = body.get("worker") if kind == OK else None
    return Outcome(
        kind=kind,
        sent_s=sent_s,
        done_s=done_s,
        lag_s=lag_s,
        worker=str(worker) if worker is not None else None,
        queued_ms=timings.get("queued_ms"),
        generate_ms=timings.get("generate_ms"),
    )


async def send_one(
    session: aiohttp.ClientSession, config: LoadConfig, index: int, scheduled_s: float, origin: float
) -> Outcome:
    """Send request `index` now and wait for its answer; client-side failures become error kinds."""
    sent_s = time.perf_counter() - origin
    body: dict[str, Any] = {}
    try:
        async with session.post(f"{config.url}/v1/generate", json=config.body(index)) as response:
            kind, body = classify(response.status, await response.read())
    except TimeoutError:  # the client's --timeout (aiohttp's own timeouts are TimeoutErrors too)
        kind = "timeout"
    except aiohttp.ClientConnectionError:
        kind = "connection_error"
    except aiohttp.ClientError as exc:  # a malformed answer: count it rather than end the run
        kind = f"client_error {type(exc).__name__}"
    return _outcome(kind, body, sent_s, time.perf_counter() - origin, sent_s - scheduled_s)


async def run_load(config: LoadConfig) -> LoadReport:
    """Send the run's requests, each at its Poisson start time, and report on them once all are answered."""
    schedule = arrival_times(config.rate, config.duration_s, random.Random(config.seed))
    connector = aiohttp.TCPConnector(limit=config.concurrency_limit)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        origin = time.perf_counter()
        tasks = []
        for index, scheduled_s in enumerate(schedule):
            delay = origin + scheduled_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send_one(session, config, index, scheduled_s, origin)))
        outcomes = await asyncio.gather(*tasks)
    return summarize(config, outcomes)


def _p50(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _mean_cv(name: str, values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        return {f"{name}_mean": None, f"{name}_cv": None}
    mean = statistics.fmean(values)
    return {f"{name}_mean": mean, f"{name}_cv": statistics.stdev(values) / mean if mean else None}


def summarize(config: LoadConfig, outcomes: list[Outcome]) -> LoadReport:
    """The report on a run's outcomes (pure: tests can feed it made-up outcomes)."""
    ok = [o for o in outcomes if o.kind == OK]
    latencies = sorted(o.latency_s for o in ok)
    first_sent = min((o.sent_s for o in outcomes), default=0.0)
    elapsed = max((o.done_s for o in outcomes), default=0.0) - first_sent
    # Sends that fell behind schedule (a saturated client) stretch the window and show as a lower rate.
    send_window = max(config.duration_s, max((o.sent_s for o in outcomes), default=0.0))
    stats = (
        (
            percentile(latencies, 0.5),
            percentile(latencies, 0.95),
            percentile(latencies, 0.99),
            statistics.fmean(latencies),
        )
        if latencies
        else (None, None, None, None)
    )
    return LoadReport(
        url=config.url,
        rate=config.rate,
        duration_s=config.duration_s,
        seed=config.seed,
        sent=len(outcomes),
        succeeded=len(ok),
        errors=dict(Counter(o.kind for o in outcomes if o.kind != OK).most_common()),
        offered_rps=len(outcomes) / send_window,
        throughput_rps=len(ok) / elapsed if elapsed > 0 else 0.0,
        elapsed_s=elapsed,
        p50_s=stats[0],
        p95_s=stats[1],
        p99_s=stats[2],
        mean_s=stats[3],
        queued_ms_p50=_p50(o.queued_ms for o in ok),
        generate_ms_p50=_p50(o.generate_ms for o in ok),
        **_mean_cv("generate_ms", [o.generate_ms for o in ok if o.generate_ms is not None]),
        workers=dict(sorted(Counter(o.worker or "?" for o in ok).items())),
        send_lag_max_ms=max((o.lag_s for o in outcomes), default=0.0) * 1000,
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report_text(report: LoadReport) -> str:
    """A readable summary of a run."""
    lines = [
        f"{report.rate} req/s for {report.duration_s} s against {report.url} (seed {report.seed})",
        f"sent {report.sent}, succeeded {report.succeeded}; offered {report.offered_rps:.2f} req/s, "
        f"throughput {report.throughput_rps:.2f} req/s over {report.elapsed_s:.1f} s",
        f"latency (s, successes): p50 {_seconds(report.p50_s)}  p95 {_seconds(report.p95_s)}  "
        f"p99 {_seconds(report.p99_s)}  mean {_seconds(report.mean_s)}",
        f"gateway p50 (ms): queued {report.queued_ms_p50}, generate {report.generate_ms_p50} "
        f"(mean {report.generate_ms_mean}, CV {report.generate_ms_cv})",
        "errors: " + (", ".join(f"{kind} x{count}" for kind, count in report.errors.items()) or "none"),
        "workers: " + (", ".join(f"{worker} x{count}" for worker, count in report.workers.items()) or "none"),
        f"latest send behind schedule by {report.send_lag_max_ms:.1f} ms",
    ]
    return "\n".join(lines)


_positive = number_type(float, 0)
_positive_int = number_type(int, 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare this benchmark's flags."""
    parser.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8000")
    parser.add_argument("--rate", type=_positive, required=True, help="mean requests per second")
    parser.add_argument("--duration", type=_positive, required=True, help="seconds over which to send")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--width", type=_positive_int, default=None, help="default: the cluster's")
    parser.add_argument("--height", type=_positive_int, default=None, help="default: the cluster's")
    parser.add_argument("--steps", type=_positive_int, default=None, help="num_inference_steps; default: the cluster's")
    parser.add_argument("--timeout", type=_positive, default=300.0, help="client limit per request, seconds")
    parser.add_argument(
        "--concurrency-limit",
        type=_positive_int,
        default=1000,
        help="most connections open at once; beyond it requests wait in the client",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the arrival times")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit status (0 when it ran, whatever the gateway answered)."""
    config = LoadConfig(
        url=args.url.rstrip("/"),
        rate=args.rate,
        duration_s=args.duration,
        prompt=args.prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        timeout_s=args.timeout,
        concurrency_limit=args.concurrency_limit,
        seed=args.seed,
    )
    report = asyncio.run(run_load(config))
    print(json.dumps(report.to_json()) if args.json else report_text(report))
    return 0
