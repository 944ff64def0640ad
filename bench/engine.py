"""The engine against one request at a time: `sdxl-serve bench engine [--quick] [--json]`.

Starts two clusters side by side, each a private redis-server, a gateway and one worker on the tiny model with
4 virtual CPU devices: one worker runs one request at a time (`--engine request`, as workers always did), the
other fills its batch with the rows of several requests (`--engine rows`, the engine). The worker arguments of
each mode are one table, `MODES`; `--mode-args MODE=ARGS` replaces a row (`--standin-step-s` runs the stand-in
worker instead of the model, for a test of the harness). Both clusters are warmed up, then measured in turns,
the same Poisson arrivals given to each:

- capacity: a burst of requests at once to each cluster, answered requests per second (request mode's is the
  unit of the offered loads below, `--loads` times it);
- `n=1` requests (20-step `euler`): images per second delivered, p50 and p99 latency, per offered load;
- a mix of 4-step unguided `euler_trailing`, 20-step `euler` and 30-step `dpmpp_2m_karras` requests (`n=1`,
  drawn uniformly): p50 and p99 latency per class, per offered load (in units of request mode's capacity for
  the mix);
- a lone `n=4` request (20-step `euler`) on an idle cluster: its latency in each mode;
- compiles after warm-up: the worker's executable lookups in the compilation cache between the end of the
  warm-up and the end of the run (each compile looks one up: a miss compiles, a hit loads).

Latency is the client's, from sending `POST /v1/generate` to its answer. Prints markdown tables, or with `--json`
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from bench.host import describe
from bench.load import classify
from bench.routing import number_type, percentile
from common.config import ConfigError
from common.rediskeys import RedisKeys
from common.registry import Registry
from testkit import ProcessGroup, RedisOptions, free_port, gateway_args, redis_process, sdxl_serve_argv, wait_http
from testkit import worker_args as tiny_worker_args
from testkit.cluster import NO_RATE_LIMITS
from testkit.procs import exited

# How each mode's worker is started, beyond what both share: the one switch between the two.
MODES: dict[str, tuple[str, ...]] = {
    "request": ("--engine", "request"),
    "rows": ("--engine", "rows"),
}
# Counters of the worker's compiles, the first one it exports: a compile counter of its own when it has one,
# else its compilation cache lookups (every compile looks its executable up).
COMPILE_METRICS = ("sdxl_worker_compiles_total", "sdxl_worker_compile_cache_total")
PROMPT = "a lighthouse at dusk"
SIZE = "64x64"
MAX_STEPS = 30
DEFAULT_STEPS = 20
LOADS = (0.5, 0.8, 1.2, 3.0)
READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class RequestClass:
    """A kind of request of the mix: its steps, scheduler and guidance."""

    name: str
    steps: int
    scheduler: str
    guidance_scale: float

    def body(self, seed: int, n: int = 1) -> dict[str, Any]:
        """The `POST /v1/generate` body of one request of this class."""
        return {
            "prompt": PROMPT,
            "seed": seed,
            "n": n,
            "num_inference_steps": self.steps,
            "scheduler": self.scheduler,
            "guidance_scale": self.guidance_scale,
        }


SHORT = RequestClass("4-step euler_trailing unguided", 4, "euler_trailing", 0.0)
MEDIUM = RequestClass("20-step euler", 20, "euler", 7.5)
LONG = RequestClass("30-step dpmpp_2m_karras", 30, "dpmpp_2m_karras", 7.5)
MIX = (SHORT, MEDIUM, LONG)


@dataclass(frozen=True)
class EngineConfig:
    """One run: the worker each mode starts, the loads and how long each is offered."""

    model: Path | None = None  # the tiny model (None: made for the run, unless the stand-in runs)
    standin_step_s: float | None = None  # run the stand-in worker at this many seconds per step instead
    modes: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(MODES))
    loads: tuple[float, ...] = LOADS
    requests: int = 40  # offered at each load, to each mode
    burst: int = 16
    lone_repeats: int = 3
    cpu_devices: int = 4
    timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if set(self.modes) != set(MODES):
            raise ConfigError(f"--mode-args names a mode that is not one of {', '.join(MODES)}")
        if not self.loads or min(self.loads) <= 0:
            raise ConfigError("--loads must be positive multiples of request mode's capacity, e.g. 0.5,0.8,1.2,3")


def quick(config: EngineConfig) -> EngineConfig:
    """A smoke run of `config`: 4 requests at one load, bursts of 4, one lone request per mode."""
    return replace(config, loads=(1.2,), requests=4, burst=4, lone_repeats=1)


@dataclass(frozen=True)
class Outcome:
    """One request: its class, kind (`ok` or an error kind), images answered, sent and answered (s)."""

    name: str
    kind: str
    images: int
    sent_s: float
    done_s: float

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s


def worker_argv(config: EngineConfig, mode: str, redis_url: str, worker_id: str, model: Path | None) -> list[str]:
    """The command line of `mode`'s worker: the stand-in, or the real worker on the tiny model."""
    extra = config.modes[mode]
    if config.standin_step_s is not None:
        return [sys.executable, "-m", "testkit.standin", "--redis-url", redis_url, "--worker-id", worker_id,
                "--sizes", SIZE, "--max-steps", str(MAX_STEPS), "--default-steps", str(DEFAULT_STEPS),
                "--step-s", str(config.standin_step_s), "--log-level", "warning", *extra]  # fmt: skip
    assert model is not None
    args = tiny_worker_args(
        redis_url, model, worker_id, "--cpu-devices", str(config.cpu_devices), *extra,
        size=SIZE, max_steps=MAX_STEPS, default_steps=DEFAULT_STEPS,
    )  # fmt: skip
    return sdxl_serve_argv("--log-level", "warning", *args)


@dataclass
class Cluster:
    """One mode's cluster: its gateway's URL, a client session to it and its Redis."""

    mode: str
    url: str
    http: aiohttp.ClientSession
    redis: aioredis.Redis

    async def compiles(self) -> float | None:
        """The worker's compile counter now (see COMPILE_METRICS); None when it exports none."""
        (worker,) = await Registry(self.redis, RedisKeys()).workers()
        if not worker.metrics_port:
            return None
        async with self.http.get(f"http://127.0.0.1:{worker.metrics_port}/metrics") as response:
            text = await response.text()
        return compile_count(text)


def compile_count(exposition: str) -> float | None:
    """The first of COMPILE_METRICS in a Prometheus exposition, summed over its labels; None when absent."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return next((totals[name] for name in COMPILE_METRICS if name in totals), None)


@contextlib.asynccontextmanager
async def cluster(
    config: EngineConfig, mode: str, processes: ProcessGroup, model: Path | None
) -> AsyncIterator[Cluster]:
    """Redis, a gateway and `mode`'s worker, serving; stopped on the way out."""
    with redis_process(RedisOptions()) as server:
        port = free_port()
        flags = ("--request-timeout", str(config.timeout_s), "--max-queue-depth", "0", *NO_RATE_LIMITS)
        processes.start(f"gateway-{mode}", "--log-level", "warning", *gateway_args(server.url(), port, *flags))
        processes.start_argv(f"worker-{mode}", worker_argv(config, mode, server.url(), f"engine-{mode}", model))
        client = aioredis.Redis.from_url(server.url())
        connector = aiohttp.TCPConnector(limit=0)
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=config.timeout_s))
        try:
            await wait_http(f"http://127.0.0.1:{port}/healthz", READY_TIMEOUT_S)
            await worker_ready(processes, f"worker-{mode}", Registry(client, RedisKeys()))
            yield Cluster(mode, f"http://127.0.0.1:{port}", session, client)
        finally:
            processes.stop(f"worker-{mode}")
            processes.stop(f"gateway-{mode}")
            await session.close()
            await client.aclose()


async def worker_ready(processes: ProcessGroup, name: str, registry: Registry) -> None:
    """Wait for the worker `name` to serve; one that exits first (a flag it does not take, say) is a ConfigError
    with the last line of its log."""
    ready = asyncio.ensure_future(registry.wait_for_ready(1, READY_TIMEOUT_S))
    died = asyncio.ensure_future(exited(processes.processes[name]))
    await asyncio.wait({ready, died}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        died.cancel()
        ready.result()
        return
    ready.cancel()
    last = (processes.log(name).strip().splitlines() or ["(no output)"])[-1]
    raise ConfigError(f"{name} exited with status {died.result()} before it was ready: {last}")


async def send(target: Cluster, name: str, body: dict[str, Any], origin: float) -> Outcome:
    """`POST /v1/generate` and wait for the answer."""
    sent = time.perf_counter() - origin
    try:
        async with target.http.post(f"{target.url}/v1/generate", json=body) as response:
            kind, answer = classify(response.status, await response.read())
    except TimeoutError:
        kind, answer = "timeout", {}
    except aiohttp.ClientError as exc:
        kind, answer = f"client_error {type(exc).__name__}", {}
    images = len(answer.get("images") or []) if kind == "ok" else 0
    return Outcome(name, kind, images, sent, time.perf_counter() - origin)


# What a workload sends as its request number `index`: the class's name and the body.
Workload = Callable[[int], tuple[str, dict[str, Any]]]


def n1_workload(index: int) -> tuple[str, dict[str, Any]]:
    """`n=1` requests, 20-step euler."""
    return "n=1", MEDIUM.body(index)


def mix_workload(seed: int) -> Workload:
    """The mix's classes, drawn uniformly (the same draws for every mode: the request's index picks it)."""
    classes = random.Random(f"{seed}:mix")
    picks: dict[int, RequestClass] = {}

    def pick(index: int) -> tuple[str, dict[str, Any]]:
        while len(picks) <= index:
            picks[len(picks)] = classes.choice(MIX)
        chosen = picks[index]
        return chosen.name, chosen.body(index)

    return pick


async def burst(target: Cluster, workload: Workload, count: int) -> tuple[float, list[Outcome]]:
    """`count` requests at once: answered requests per second from the first sent to the last answered."""
    origin = time.perf_counter()
    outcomes = await asyncio.gather(*(send(target, *workload(k), origin) for k in range(count)))
    ok = [o for o in outcomes if o.kind == "ok"]
    span = max((o.done_s for o in outcomes), default=0.0)
    return (len(ok) / span if span > 0 else 0.0), list(outcomes)


def arrivals(rate: float, count: int, seed: int) -> list[float]:
    """The first `count` times (s) of a Poisson process at `rate` per second."""
    rng, now, times = random.Random(seed), 0.0, []
    for _ in range(count):
        now += rng.expovariate(rate)
        times.append(now)
    return times


async def poisson(target: Cluster, workload: Workload, rate: float, count: int, seed: int) -> list[Outcome]:
    """An open loop: `count` requests, each sent at its Poisson time, whatever the earlier ones' state."""
    schedule = arrivals(rate, count, seed)
    origin = time.perf_counter()
    tasks = []
    for index, at in enumerate(schedule):
        delay = origin + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(target, *workload(index), origin)))
    return list(await asyncio.gather(*tasks))


def stats(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Requests, errors by kind, images per second delivered and p50/p99 latency over the successes."""
    ok = sorted((o for o in outcomes if o.kind == "ok"), key=lambda o: o.latency_s)
    first = min((o.sent_s for o in outcomes), default=0.0)
    span = max((o.done_s for o in outcomes), default=0.0) - first
    latencies = [o.latency_s for o in ok]
    return {
        "requests": len(outcomes),
        "errors": dict(Counter(o.kind for o in outcomes if o.kind != "ok")),
        "images_per_s": round(sum(o.images for o in ok) / span, 3) if span > 0 else 0.0,
        "p50_s": round(percentile(latencies, 0.5), 3) if latencies else None,
        "p99_s": round(percentile(latencies, 0.99), 3) if latencies else None,
    }


def by_class(outcomes: Sequence[Outcome]) -> dict[str, dict[str, Any]]:
    """`stats` per request class, in the mix's order."""
    names = [c.name for c in MIX if any(o.name == c.name for o in outcomes)]
    return {name: stats([o for o in outcomes if o.name == name]) for name in names}


def turns(clusters: Sequence[Cluster], round_: int) -> Iterator[Cluster]:
    """The clusters in turn, the first one changing every round, so that drift of the machine falls on both."""
    offset = round_ % len(clusters)
    yield from [*clusters[offset:], *clusters[:offset]]


async def warm_up(target: Cluster) -> None:
    """A request of every class, and a lone `n=4`, so that nothing measured waits for a first run."""
    origin = time.perf_counter()
    for request in (*MIX, MEDIUM):
        await send(target, request.name, request.body(0, n=4 if request is MEDIUM else 1), origin)


async def loads(
    config: EngineConfig, clusters: Sequence[Cluster], workload: Workload, per_class: bool
) -> dict[str, Any]:
    """Capacity of each mode (a burst), then each offered load in turn, in units of request mode's capacity."""
    capacity = {}
    for target in clusters:
        capacity[target.mode], _ = await burst(target, workload, config.burst)
    rows = []
    for k, load in enumerate(config.loads):
        rate = load * capacity["request"]
        for target in turns(clusters, k):
            outcomes = await poisson(target, workload, rate, config.requests, config.seed + k)
            row = {"mode": target.mode, "load": load, "offered_rps": round(rate, 3), **stats(outcomes)}
            rows.append(row | ({"classes": by_class(outcomes)} if per_class else {}))
    return {"capacity_rps": {mode: round(rps, 3) for mode, rps in capacity.items()}, "runs": rows}


async def lone(config: EngineConfig, clusters: Sequence[Cluster]) -> dict[str, float | None]:
    """Median latency of a lone `n=4` request on an idle cluster, per mode."""
    latencies: dict[str, list[float]] = {target.mode: [] for target in clusters}
    for k in range(config.lone_repeats):
        for target in turns(clusters, k):
            outcome = await send(target, "n=4", MEDIUM.body(k, n=4), time.perf_counter())
            if outcome.kind == "ok":
                latencies[target.mode].append(outcome.latency_s)
    return {mode: round(percentile(sorted(v), 0.5), 3) if v else None for mode, v in latencies.items()}


async def measure(config: EngineConfig, clusters: Sequence[Cluster]) -> dict[str, Any]:
    """Every measurement, both modes in turn."""
    for target in clusters:
        await warm_up(target)
    before = {target.mode: await target.compiles() for target in clusters}
    report = {
        "n1": await loads(config, clusters, n1_workload, per_class=False),
        "mix": await loads(config, clusters, mix_workload(config.seed), per_class=True),
        "lone_n4_s": await lone(config, clusters),
    }
    after = {target.mode: await target.compiles() for target in clusters}
    report["compiles_after_warmup"] = {mode: _since(before[mode], after[mode]) for mode in before}
    return report


def _since(before: float | None, after: float | None) -> float | None:
    """The counter's rise; a counter with no sample yet (nothing counted) was at 0; None when never exported."""
    return None if after is None else after - (before or 0.0)


async def run(config: EngineConfig, command: str) -> dict[str, Any]:
    """Start both clusters, measure, stop them; the report."""
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-engine-") as scratch:
        model = config.model
        if model is None and config.standin_step_s is None:
            from testkit import write_tiny_model

            model = write_tiny_model(Path(scratch) / "tiny")
        processes = ProcessGroup(Path(scratch))
        try:
            async with contextlib.AsyncExitStack() as stack:
                clusters = [await stack.enter_async_context(cluster(config, m, processes, model)) for m in MODES]
                report = await measure(config, clusters)
        finally:
            processes.stop_all()
    worker = "stand-in" if config.standin_step_s is not None else f"tiny model, {config.cpu_devices} CPU devices"
    modes = {mode: shlex.join(args) for mode, args in config.modes.items()}
    return {"machine": describe(), "command": command, "worker": worker, "mode_args": modes, **report}


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join("-" if cell is None else str(cell) for cell in cells) + " |"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    lines = [f"`{report['command']}` on {report['machine']} ({report['worker']})", ""]
    for key, title in (("n1", "n=1 requests"), ("mix", "the mix")):
        capacity = ", ".join(f"{mode} {rps} req/s" for mode, rps in report[key]["capacity_rps"].items())
        lines += [f"{title}: capacity (a burst of requests at once) {capacity}", ""]
        lines += [*_load_table(report[key]["runs"], per_class=key == "mix"), ""]
    lone, compiles = report["lone_n4_s"], report["compiles_after_warmup"]
    lines += [_row(["", *lone]), _row(["---", *("---:" for _ in lone)])]
    lines += [_row(["lone n=4 request, latency (s)", *lone.values()])]
    lines += [_row(["compiles after warm-up", *(compiles[mode] for mode in lone)])]
    return "\n".join(lines)


def _load_table(runs: list[dict[str, Any]], per_class: bool) -> list[str]:
    if per_class:
        header = ["load", "offered req/s", "mode", "class", "p50 s", "p99 s", "errors"]
        body = [
            _row([r["load"], r["offered_rps"], r["mode"], name, c["p50_s"], c["p99_s"], _errors(c)])
            for r in runs
            for name, c in r["classes"].items()
        ]
    else:
        header = ["load", "offered req/s", "mode", "images/s", "p50 s", "p99 s", "errors"]
        body = [
            _row([r["load"], r["offered_rps"], r["mode"], r["images_per_s"], r["p50_s"], r["p99_s"], _errors(r)])
            for r in runs
        ]
    return [_row(header), _row(["---:" for _ in header]), *body]


def _errors(stats_: dict[str, Any]) -> str:
    return ", ".join(f"{kind} x{count}" for kind, count in stats_["errors"].items()) or "0"


def _mode_args(text: str) -> tuple[str, tuple[str, ...]]:
    mode, sep, args = text.partition("=")
    if not sep or mode not in MODES:
        raise argparse.ArgumentTypeError(f"expected MODE=ARGS with MODE one of {', '.join(MODES)}, got {text!r}")
    return mode, tuple(shlex.split(args))


def _loads(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated multiples, e.g. 0.5,0.8,1.2,3, got {text!r}"
        ) from None


_positive = number_type(float, 0)
_positive_int = number_type(int, 0)
_TABLE = "; ".join(f"{mode}={shlex.join(args)}" for mode, args in MODES.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare this benchmark's flags."""
    parser.add_argument("--model", type=Path, default=None, help="the tiny model's folder (default: made for the run)")
    parser.add_argument(
        "--loads", type=_loads, default=LOADS, help="offered loads, multiples of request mode's capacity"
    )
    parser.add_argument("--requests", type=_positive_int, default=40, help="requests offered at each load, per mode")
    parser.add_argument("--burst", type=_positive_int, default=16, help="requests at once to measure capacity")
    parser.add_argument("--lone-repeats", type=_positive_int, default=3, help="lone n=4 requests per mode")
    parser.add_argument("--cpu-devices", type=_positive_int, default=4)
    parser.add_argument("--timeout", type=_positive, default=600.0, help="the gateway's and the client's limit, s")
    parser.add_argument("--seed", type=int, default=0, help="seeds the arrivals and the mix")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 requests at one load, small bursts")
    parser.add_argument(
        "--mode-args",
        type=_mode_args,
        action="append",
        default=[],
        metavar="MODE=ARGS",
        help=f"the worker arguments of a mode instead of its row of the table ({_TABLE})",
    )
    parser.add_argument("--standin-step-s", type=_positive, default=None, help="stand-in workers at this s per step")
    parser.add_argument("--json", action="store_true", help="one JSON object")


def config_of(args: argparse.Namespace) -> EngineConfig:
    """The run the flags describe; `--quick` makes it a smoke run."""
    config = EngineConfig(
        model=args.model,
        standin_step_s=args.standin_step_s,
        modes=dict(MODES) | dict(args.mode_args),
        loads=args.loads,
        requests=args.requests,
        burst=args.burst,
        lone_repeats=args.lone_repeats,
        cpu_devices=args.cpu_devices,
        timeout_s=args.timeout,
        seed=args.seed,
    )
    return quick(config) if args.quick else config


def command_of(config: EngineConfig) -> str:
    """The command line that runs `config` again."""
    words = ["sdxl-serve", "bench", "engine", "--loads", ",".join(map(str, config.loads))]
    words += ["--requests", str(config.requests), "--burst", str(config.burst)]
    words += ["--lone-repeats", str(config.lone_repeats), "--seed", str(config.seed)]
    if config.standin_step_s is not None:
        words += ["--standin-step-s", str(config.standin_step_s)]
    else:
        words += ["--cpu-devices", str(config.cpu_devices)]
    for mode, args in config.modes.items():
        if args != MODES[mode]:
            words += ["--mode-args", f"{mode}={shlex.join(args)}"]
    return shlex.join(words)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit status."""
    config = config_of(args)
    report = asyncio.run(run(config, command_of(config)))
    print(json.dumps(report) if args.json else markdown(report))
    return 0
