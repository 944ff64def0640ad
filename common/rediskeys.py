"""Every Redis key, stream, group and channel that sdxl-serve uses, in one place.

A deployment can run several independent clusters on one Redis by giving each its own prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

DEFAULT_PREFIX = "sdxl"


@dataclass(frozen=True)
class RedisKeys:
    """The names of one cluster's Redis keys."""

    prefix: str = DEFAULT_PREFIX

    def size_stream(self, size: object) -> str:
        """Stream of the jobs of one image size (`WIDTHxHEIGHT`) that any worker serving it may take: the
        shared queue, whatever a job's step count and scheduler. Every worker that serves the size reads it
        through `workers_group`."""
        return f"{self.prefix}:jobs:{size}"

    def worker_stream(self, worker_id: str) -> str:
        """Stream of the jobs routed to one worker (`random` and `p2c` routing); only that worker reads it,
        and when it is gone a live worker moves what is left to the size streams."""
        return f"{self.prefix}:jobs:worker:{worker_id}"

    def worker_of_stream(self, stream: str) -> str | None:
        """The owner of a worker stream; None for a size stream."""
        head = f"{self.prefix}:jobs:worker:"
        return stream[len(head) :] if stream.startswith(head) else None

    @property
    def job_streams(self) -> str:
        """Set of every job stream in use (size and worker streams): for depth, recovery and operators."""
        return f"{self.prefix}:job-streams"

    @property
    def workers_group(self) -> str:
        """The consumer group, on every job stream, that workers read through."""
        return "workers"

    @property
    def completions_channel(self) -> str:
        """Pub/sub channel carrying the id of each job whose result was just stored."""
        return f"{self.prefix}:completions"

    @property
    def worker_events_channel(self) -> str:
        """Pub/sub channel announcing worker state changes (warming, ready, stopped)."""
        return f"{self.prefix}:worker-events"

    @property
    def job_events_channel(self) -> str:
        """Pub/sub channel of job lifecycle events (JSON: id, type `started` with worker, or `progress` with
        step and total)."""
        return f"{self.prefix}:job-events"

    @property
    def dead_letter_stream(self) -> str:
        """Stream of jobs given up after too many deliveries, with their history."""
        return f"{self.prefix}:dead-letter"

    @property
    def stats(self) -> str:
        """Hash of cluster-wide counters (duplicate results dropped, reclaims, dead letters)."""
        return f"{self.prefix}:stats"

    @property
    def workers_index(self) -> str:
        """Sorted set of worker ids scored by their last heartbeat (the worker's clock, Unix seconds)."""
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        """JSON description of one worker, expiring unless its heartbeat renews it."""
        return f"{self.prefix}:worker:{worker_id}"

    def job(self, job_id: str) -> str:
        """Hash of a job's request (`job`), `status`, stream `entry` and `stream`, `created` (Redis ms), `worker`,
        progress (`step`, `total`); kept until its result expires."""
        return f"{self.prefix}:job:{job_id}"

    @property
    def webhooks_due(self) -> str:
        """Sorted set of the jobs with a webhook message to send, scored by when it may next be taken (Redis ms):
        now for a new one, a retry's time, or the end of a gateway's lease on it (gateway/webhooks.py)."""
        return f"{self.prefix}:webhooks:due"

    def webhook(self, job_id: str) -> str:
        """Hash of a job's webhook outbox: its messages in order, their states and bodies, the delivering
        gateway's lease (common/lua/include/webhook.lua); it outlives the job's last delivery as long as a
        record does."""
        return f"{self.prefix}:webhook:{job_id}"

    def attempts(self, job_id: str) -> str:
        """List of `worker-id@redis-ms` for every delivery of a job: its history for the dead-letter stream."""
        return f"{self.prefix}:attempts:{job_id}"

    def result(self, job_id: str) -> str:
        """Hash with a finished job's metadata (`meta`) and images (`image:0`, `image:1`, ...)."""
        return f"{self.prefix}:result:{job_id}"

    def job_input(self, job_id: str, name: str) -> str:
        """A job's input image `name` (`image`, `mask`) as PNG bytes, for a cluster without a blob store; it expires
        with the job's result TTL, counted from the submit (common/inputs.py)."""
        return f"{self.prefix}:input:{job_id}:{name}"

    def idempotency(self, key: str, scope: str = "") -> str:
        """`job-id fingerprint` of the job an `Idempotency-Key` created. Each caller (`scope`: its key's
        identity or its address) has its own keys; the pair is hashed, so any header value makes a
        well-formed, bounded Redis key and no address is written into one."""
        scoped = hashlib.sha256(scope.encode() + b"\n" + key.encode()).hexdigest()
        return f"{self.prefix}:idempotency:{scoped}"

    def in_flight(self, identity: str) -> str:
        """Sorted set of a caller's jobs that may still be queued or running (ids scored by submit time, Redis
        ms), for its fair-share cap: no lifetime, a job leaves it when it ends (an empty set is gone).
        `identity` is a key's digest prefix or an address, never a key."""
        return f"{self.prefix}:in-flight:{identity}"

    def rate_limit(self, bucket: str, identity: str) -> str:
        """A rate-limit bucket (GCRA: the theoretical arrival time of its next request, in Redis ms), expiring
        once full again. `identity` is a client address or an API key's digest prefix, never a key."""
        return f"{self.prefix}:ratelimit:{bucket}:{identity}"
