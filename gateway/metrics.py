"""Prometheus metrics of a gateway, on its own registry (no process globals), served at `/metrics`.

Per-request figures are counted by a middleware as they happen; cluster-wide figures (queue depth,
workers by state, the queue's own counters kept in Redis) are read when Prometheus scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from common.registry import SERVING_STATES, WorkerInfo

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From a refused request (milliseconds) to a synchronous generation (seconds to minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
WORKER_STATES = ("warming", "ready", "busy", "draining")
# Set on error responses by the error middleware, read by the metrics middleware.
ERROR_CODE = web.ResponseKey("error_code", str)


class _Counters(Collector):
    """Counters kept elsewhere (in Redis by the scripts, or by the job events listener), as last read."""

    def __init__(self, name: str, documentation: str) -> None:
        self.values: Mapping[str, int] = {}
        self._name = name
        self._documentation = documentation

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=["event"])
        for event, value in sorted(self.values.items()):
            family.add_metric([event], value)
        yield family


class GatewayMetrics:
    """Every metric a gateway exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sdxl_gateway_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "sdxl_gateway_request_seconds",
            "Time to answer (event streams: their whole life)",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "sdxl_gateway_rejections", "Requests answered with an error, by its code", ["code"], registry=r
        )
        self.queue_depth = Gauge("sdxl_queue_depth", "Jobs queued or in service, over all streams", registry=r)
        self.waiting = Gauge("sdxl_gateway_waiting_requests", "Requests waiting for a result", registry=r)
        self.event_streams = Gauge("sdxl_gateway_event_streams", "Open job event streams", registry=r)
        self.workers = Gauge("sdxl_workers", "Registered workers by state", ["state"], registry=r)
        # Capacity in images, for workers whose batch holds the rows of several requests: their entries say how
        # many rows they hold and how many are free. Workers that run one request at a time advertise none.
        self.rows = Gauge("sdxl_worker_rows", "Rows (images at once) of the serving workers' batches", registry=r)
        self.rows_in_use = Gauge(
            "sdxl_worker_rows_in_use", "Rows of the serving workers denoising or claimed for a job", registry=r
        )
        self.queue_counters = _Counters("sdxl_queue_events", "Cluster-wide queue events (from Redis)")
        r.register(self.queue_counters)
        self.listener_counters = _Counters(
            "sdxl_gateway_listener_events",
            "Job events listener: subscriptions (re-subscriptions included), completions recovered by a "
            "re-check, malformed messages skipped, restarts after an error; and jobs Redis lost that this "
            "gateway queued again (resubmitted), ended jobs whose lost webhook it gave back (webhooks_restored), "
            "jobs whose lost input images it stored again (inputs_restored), and copies of input images it dropped "
            "(inputs_dropped: over --journal-input-bytes, or past their result TTL)",
        )
        r.register(self.listener_counters)
        self._add_webhooks(r)

    def _add_webhooks(self, r: CollectorRegistry) -> None:
        """Job webhooks: attempts by outcome, their time, the lag from an event to its delivery, the outbox."""
        self.webhook_attempts = Counter(
            "sdxl_webhook_attempts",
            "Webhook attempts by event and outcome: delivered, retry, gave-up (given up: a 4xx, a refused target, "
            "the retry window spent), stale (the lease ran out first: another gateway sends it)",
            ["event", "outcome"],
            registry=r,
        )
        self.webhook_skips = Counter(
            "sdxl_webhook_skips",
            "Webhook messages this gateway took but could not send, and left to another gateway, by reason: "
            "no_secret (it lacks the signing secret), not_allow_listed (the host was allow-listed where the job "
            "was accepted, not here)",
            ["reason"],
            registry=r,
        )
        self.webhook_attempt_seconds = Histogram(
            "sdxl_webhook_attempt_seconds",
            "One webhook attempt, from connect to answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.webhook_lag_seconds = Histogram(
            "sdxl_webhook_lag_seconds",
            "From a webhook event (a job's end) to its delivery, retries included",
            buckets=(*LATENCY_BUCKETS, 600, 3600, 86400),
            registry=r,
        )
        self.webhook_outbox = Gauge(
            "sdxl_webhook_outbox_depth", "Jobs with webhook messages due, leased or waiting for a retry", registry=r
        )

    def set_workers(self, workers: list[WorkerInfo]) -> None:
        """Workers by state, and the rows of those serving: their capacity and what of it is in use."""
        for state in WORKER_STATES:
            self.workers.labels(state).set(sum(w.state == state for w in workers))
        serving = [w for w in workers if w.state in SERVING_STATES]
        self.rows.set(sum(w.rows for w in serving))
        self.rows_in_use.set(sum(max(w.rows - w.free_rows, 0) for w in serving))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metrics_middleware(metrics: GatewayMetrics) -> web.middleware:  # type: ignore[valid-type]
    """Count every answer by route template (bounded cardinality), method and status."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            if code := response.get(ERROR_CODE):
                metrics.rejections.labels(code).inc()
            return response
        finally:
            metrics.requests.labels(route, request.method, str(status)).inc()
            metrics.latency.labels(route, request.method).observe(time.perf_counter() - started)

    return middleware
