"""The fault injector: `sdxl-serve bench nemesis`.

A real cluster (redis-server with AOF, gateways, stand-in workers beside one real tiny-model worker), every
process reaching Redis through a TCP proxy the harness controls; clients submit through the HTTP API and
record every answer while a seeded schedule injects faults (lost replies, killed pub/sub and client
connections, SIGKILLed and SIGSTOPped workers, Redis restarted and rolled back to a snapshot, garbage on
every channel, a gateway restarted, a worker partitioned, delay). Then the checker: every accepted request
answered once, no id with two results, nothing pending, queue depth 0, every process alive and serving.
The same seed replays the same schedule.

    sdxl-serve bench nemesis --seed 1 --duration 60 [--json] [--tiny-model DIR | --no-real-worker]
        [--engine rows|request] [--rows-per-device N] [--n N]

Exit status 0 when the promise held, 1 when the checker found a violation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.routing import number_type

if TYPE_CHECKING:  # imported when it runs: the CLI builds its parser without the harness
    from testkit.nemesis import NemesisConfig

KINDS_HELP = "KIND=N,... (default: 2 of each kind; see testkit/schedule.py for the kinds)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="the schedule's seed: the same seed, the same faults")
    parser.add_argument("--duration", type=number_type(float, 1.0, 3600.0), default=60.0, help="seconds of faults")
    parser.add_argument("--faults", default="", metavar="KIND=N,...", help=KINDS_HELP)
    parser.add_argument(
        "--each", type=number_type(int, 0, 100, low_inclusive=True), default=2, help="of every kind not in --faults"
    )
    parser.add_argument("--gateways", type=number_type(int, 1, 9, low_inclusive=True), default=2)
    parser.add_argument(
        "--workers", type=number_type(int, 1, 17, low_inclusive=True), default=3, help="stand-in workers"
    )
    parser.add_argument("--tiny-model", type=Path, default=None, help="the real worker's model (default: made once)")
    parser.add_argument("--no-real-worker", action="store_true", help="stand-in workers only")
    _add_workload(parser)
    parser.add_argument("--clients", type=number_type(int, 1, 65, low_inclusive=True), default=4)
    parser.add_argument("--request-timeout", type=number_type(float, 1.0, 600.0), default=15.0)
    parser.add_argument("--quiet-bound", type=number_type(float, 1.0, 3600.0), default=60.0)
    parser.add_argument("--work-dir", type=Path, default=None, help="logs, Redis data (default: a new temp dir)")
    parser.add_argument(
        "--webhooks",
        action="store_true",
        help="every request asks for a webhook, to a receiver that answers 503 to a fifth of the attempts; the "
        "checker requires every ended job's webhook to arrive",
    )
    parser.add_argument(
        "--differing-webhook-gateways",
        type=number_type(int, 0, 8, low_inclusive=True),
        default=0,
        help="with --webhooks, this many more gateways whose webhook configuration differs (alternately without "
        "the signing secret and without the allow-list): they take due messages but serve no client",
    )
    parser.add_argument("--json", action="store_true", help="the whole report as one JSON object")


def _add_workload(parser: argparse.ArgumentParser) -> None:
    """How every worker (stand-in and real) schedules its devices, spelled as `sdxl-serve worker` spells it, and
    how many images each client request asks for."""
    parser.add_argument(
        "--engine",
        choices=["rows", "request"],
        default=None,
        help="every worker's --engine (default: rows): rows fills the batch with the images of several requests, "
        "request runs one request at a time",
    )
    parser.add_argument(
        "--rows-per-device",
        type=number_type(int, 1, 65, low_inclusive=True),
        default=None,
        help="every worker's --rows-per-device (default: 4)",
    )
    parser.add_argument(
        "--n",
        type=number_type(int, 1, 5, low_inclusive=True),
        default=None,
        help="images per request, the body's n, at most the workers' 4 per request (default: the API's)",
    )


def main(args: argparse.Namespace) -> int:
    # Imported here: the CLI builds its parser without the harness, which no image ships.
    from testkit.nemesis import render, run_nemesis

    report = asyncio.run(run_nemesis(_config(args)))
    print(json.dumps(report.to_json(), indent=2) if args.json else render(report))
    return 0 if report.verdict.passed else 1


def _config(args: argparse.Namespace) -> NemesisConfig:
    from testkit.clients import LoadConfig
    from testkit.nemesis import NemesisConfig, default_counts
    from testkit.procs import write_tiny_model
    from testkit.schedule import REQUESTABLE

    counts: dict[Any, int] = {**default_counts(args.each), **_parse_counts(args.faults, REQUESTABLE)}
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="sdxl-nemesis-"))
    model = None if args.no_real_worker else (args.tiny_model or write_tiny_model(work_dir / "tiny-model"))
    return NemesisConfig(
        work_dir=work_dir,
        seed=args.seed,
        duration_s=args.duration,
        counts=counts,
        cluster={"gateways": args.gateways, "standin_workers": args.workers, "tiny_model": model, **_engine(args)},
        load=LoadConfig(clients=args.clients, request_timeout_s=args.request_timeout, n=args.n),
        quiet_bound_s=args.quiet_bound,
        webhooks=args.webhooks,
        differing_webhook_gateways=args.differing_webhook_gateways,
    )


def _engine(args: argparse.Namespace) -> dict[str, Any]:
    """The workers' engine flags given on the command line (ClusterConfig's defaults for the rest)."""
    given = {"engine": args.engine, "rows_per_device": args.rows_per_device}
    return {name: value for name, value in given.items() if value is not None}


def _parse_counts(text: str, kinds: tuple[str, ...]) -> dict[str, int]:
    counts = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, number = part.partition("=")
        if kind not in kinds or not number.isdigit():
            kinds_text = ", ".join(kinds)
            raise SystemExit(f"sdxl-serve bench nemesis: --faults: {part!r} is not KIND=N, KIND one of {kinds_text}")
        counts[kind] = int(number)
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
