"""What every client saw (the history), and the checks over it and over the cluster once the faults stop.

A client records every answer it gets, attempt by attempt; a poller adds what `GET /v1/jobs/{id}` shows
later. A result is identified by a digest of what the job API shows of it (status, worker, the worker's
timings, or the error): two executions of one job never share timings, so a second visible result of
one id shows up as a second digest. A sighting is an interval, not an instant: the gateway read what it
answered at some moment between the request's sending (`sent_s`) and the answer's arrival (`at_s`), and
under delay that can be seconds, across a rollback of Redis.

The promise checked, per request (an Idempotency-Key), once the cluster is quiet:
- every accepted request (answered with a job id) got exactly one terminal answer: images, an error, or
  an id that resolves (`lost` or `stuck` otherwise; `answered_twice` if two of its jobs finished). A
  client whose job became unknown (Redis rolled back) asks again with its key, as a real one would;
- one job id never showed two different results;
- nothing pending in the consumer groups, queue depth 0, no job record left queued or running (`stuck`);
- every process that should live does, and every gateway serves a new request.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
LIVE = frozenset({"queued", "running"})
UNKNOWN = "unknown"  # the state of a job id the API answers 404 for
EVIDENCE_LIMIT = 20  # offending jobs whose every observation goes into the report
MAX_RESULTS_EXPLAINED = 4  # a job showing more results than this is a violation, whatever the rollbacks


@dataclass(frozen=True)
class Answer:
    """One HTTP answer (or the lack of one: status 0) as a client saw it."""

    at_s: float
    status: int
    job_id: str | None = None
    state: str | None = None  # succeeded, failed, cancelled, queued, running, unknown (404)
    digest: str | None = None  # of a terminal result
    error: str | None = None  # an error code, or the exception for status 0
    sent_s: float | None = None  # when its request was sent (None: unknown, taken as `at_s`)

    @property
    def asked_s(self) -> float:
        """The earliest moment the gateway may have read what this answer shows."""
        return self.at_s if self.sent_s is None else self.sent_s


@dataclass(frozen=True)
class Rollback:
    """Redis put back to an older snapshot, on the clients' clock: the snapshot's copy began at `taken_s`, the
    old server had exited by `stopped_s` (it answers until then), the restored one listened from `restored_s`."""

    taken_s: float
    stopped_s: float
    restored_s: float


def result_digest(status: str, worker: Any, timings: Any, error: Any = None) -> str:
    """The identity of one stored result, as the job API shows it (`total_ms` is the gateway's, left out)."""
    shown = {k: v for k, v in (timings or {}).items() if k != "total_ms"}
    text = json.dumps([status, worker, shown, error], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RequestHistory:
    """One logical request: its Idempotency-Key, route, body, and every answer to every attempt."""

    key: str
    route: str
    body: dict[str, Any] = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)

    @property
    def job_ids(self) -> set[str]:
        return {a.job_id for a in self.answers if a.job_id is not None}

    @property
    def accepted(self) -> bool:
        return bool(self.job_ids)


@dataclass
class History:
    """Every request of a run, and what later reads of each job showed. `to_json` for the record."""

    requests: dict[str, RequestHistory] = field(default_factory=dict)
    reads: dict[str, list[Answer]] = field(default_factory=dict)  # job id -> GET /v1/jobs/{id} answers

    def record(self, key: str, route: str, body: dict[str, Any], answer: Answer) -> None:
        self.requests.setdefault(key, RequestHistory(key, route, body)).answers.append(answer)

    def read(self, job_id: str, answer: Answer) -> None:
        self.reads.setdefault(job_id, []).append(answer)

    def observations(self, job_id: str) -> list[Answer]:
        """Everything seen of one job: answers to requests that named it, then reads."""
        named = [a for r in self.requests.values() for a in r.answers if a.job_id == job_id]
        return [*named, *self.reads.get(job_id, [])]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def accepted_ids(self) -> set[str]:
        return {job_id for r in self.requests.values() for job_id in r.job_ids}

    def resolved(self, job_id: str) -> bool:
        return any(a.state in TERMINAL for a in self.observations(job_id))

    def last_state(self, job_id: str) -> str | None:
        states = [a.state for a in self.observations(job_id) if a.state is not None]
        return states[-1] if states else None

    def answered(self, request: RequestHistory) -> set[str]:
        """The request's jobs that reached a terminal state."""
        return {job_id for job_id in request.job_ids if self.resolved(job_id)}

    def waiting(self) -> list[RequestHistory]:
        """Accepted requests without a terminal answer yet."""
        return [r for r in self.requests.values() if r.accepted and not self.answered(r)]

    def vanished(self, request: RequestHistory) -> bool:
        """Every job the request was given is unknown now (404): Redis forgot it; a client asks again."""
        return all(self.last_state(job_id) == UNKNOWN for job_id in request.job_ids)


@dataclass
class ClusterState:
    """The cluster as the checker found it at the end."""

    pending_entries: int
    queue_depth: int
    stuck_records: list[str]  # job ids whose record says queued or running, with no result
    dead_processes: list[str]
    failed_probes: list[str]
    counters: dict[str, int] = field(default_factory=dict)
    # Job webhooks: terminal jobs (as the clients last saw them) whose `completed` never reached the receiver,
    # and the jobs still with messages due at the end.
    webhooks_missing: list[str] = field(default_factory=list)
    outbox_depth: int = 0
    webhooks_received: int = 0  # attempts that reached the receiver (a fifth answered 503, and sent again)


@dataclass
class Verdict:
    """The checker's findings: counts, the offending requests (by Idempotency-Key) and jobs, and whether the
    promise held."""

    requests: int
    accepted: int
    unacknowledged: int  # every attempt failed before a job id came back: the client knows
    answered: int
    lost: list[str]  # requests: no terminal answer, and no job of theirs still live
    stuck: list[str]  # requests: no terminal answer, a job of theirs still queued or running
    answered_twice: dict[str, list[str]]  # requests: two jobs reached a terminal state
    duplicate_results: dict[str, list[str]]  # jobs: two different results shown
    rerun_after_rollback: dict[str, list[str]]  # jobs: a result erased by a rollback, then a new one
    resubmitted: list[str]  # requests asked again after their job vanished (a Redis rollback)
    forgotten: list[str]  # jobs answered, then unknown (404) to a later read: a result Redis no longer has
    state: ClusterState
    violations: list[str] = field(default_factory=list)
    evidence: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # what was seen of each offender

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def webhooks_missing(history: History, delivered: set[str]) -> list[str]:
    """The jobs the clients last saw ended (succeeded, failed, cancelled) whose `completed` webhook the receiver
    never got: a due delivery lost."""
    return sorted(j for j in history.accepted_ids() if history.last_state(j) in TERMINAL and j not in delivered)


def check(history: History, state: ClusterState, rollbacks: Sequence[Rollback] = ()) -> Verdict:
    """Judge a finished run. `rollbacks`: a job whose result may have been read between a snapshot and the
    stop of the Redis it was restored to (the rollback erased that result) may finish again with another
    result, first seen after the restore; that is reported apart, not as a duplicate."""
    duplicates = _duplicates(history)
    reruns = {j: d for j, d in duplicates.items() if _explained(history.observations(j), rollbacks)}
    accepted = [r for r in history.requests.values() if r.accepted]
    waiting = history.waiting()
    stuck = sorted(r.key for r in waiting if _live(history, r, state))
    verdict = Verdict(
        requests=len(history.requests),
        accepted=len(accepted),
        unacknowledged=len(history.requests) - len(accepted),
        answered=len(accepted) - len(waiting),
        lost=sorted(r.key for r in waiting if r.key not in stuck),
        stuck=stuck,
        answered_twice={r.key: sorted(ids) for r in accepted if len(ids := history.answered(r)) > 1},
        duplicate_results={j: d for j, d in duplicates.items() if j not in reruns},
        rerun_after_rollback=reruns,
        resubmitted=sorted(r.key for r in accepted if len(r.job_ids) > 1),
        forgotten=sorted(
            j for j in history.accepted_ids() if history.resolved(j) and history.last_state(j) == "unknown"
        ),
        state=state,
    )
    verdict.violations = _violations(verdict)
    verdict.evidence = _evidence(history, verdict)
    return verdict


def _live(history: History, request: RequestHistory, state: ClusterState) -> bool:
    return any(history.last_state(j) in LIVE or j in state.stuck_records for j in request.job_ids)


def _duplicates(history: History) -> dict[str, list[str]]:
    found = {}
    for job_id in sorted(history.accepted_ids()):
        digests = sorted({a.digest for a in history.observations(job_id) if a.digest is not None})
        if len(digests) > 1:
            found[job_id] = digests
    return found


def _explained(observations: list[Answer], rollbacks: Sequence[Rollback]) -> bool:
    """Whether the job's results can be put in an order in which each was erased by a rollback before the next
    was first seen, each change by a later rollback than the one before (a result that one rollback erased
    was stored before that rollback's stop, so the same rollback cannot also be the one after which it was
    stored). The order is searched, not taken from the first answers: a sighting that was slow to arrive can
    land after the next result's first one."""
    results: dict[str, list[Answer]] = {}
    for answer in observations:
        if answer.digest is not None:
            results.setdefault(answer.digest, []).append(answer)
    if len(results) > MAX_RESULTS_EXPLAINED:
        return False
    ordered = sorted(rollbacks, key=lambda r: r.restored_s)
    return any(_chained(order, ordered) for order in itertools.permutations(results.values()))


def _chained(results: Sequence[list[Answer]], rollbacks: list[Rollback]) -> bool:
    """Whether each result in `results` gives way to the next through its own rollback, in time order. The
    earliest rollback that fits is taken for each change: it leaves the most for the changes after it."""
    after = 0
    for earlier, later in itertools.pairwise(results):
        fits = [k for k in range(after, len(rollbacks)) if _erased(earlier, rollbacks[k], later)]
        if not fits:
            return False
        after = fits[0] + 1
    return True


def _erased(earlier: list[Answer], rollback: Rollback, later: list[Answer]) -> bool:
    """Whether `rollback` may have erased the `earlier` result and the `later` one came after it: some
    sighting of the earlier one may have read it between the snapshot and the old server's exit (answered
    after the copy began, asked before the exit), and every sighting of the later one arrived after the
    restore."""
    read_in_between = any(a.at_s > rollback.taken_s and a.asked_s < rollback.stopped_s for a in earlier)
    return read_in_between and min(a.at_s for a in later) > rollback.restored_s


def _evidence(history: History, v: Verdict) -> dict[str, list[dict[str, Any]]]:
    """Every answer about each offender (requests by key, jobs by id), for the first EVIDENCE_LIMIT."""
    evidence: dict[str, list[dict[str, Any]]] = {}
    for key in [*v.lost, *v.stuck, *v.answered_twice][:EVIDENCE_LIMIT]:
        request = history.requests[key]
        reads = [a for job_id in sorted(request.job_ids) for a in history.reads.get(job_id, [])]
        evidence[key] = [asdict(a) for a in [*request.answers, *reads]]
    for job_id in list(v.duplicate_results)[:EVIDENCE_LIMIT]:
        evidence[job_id] = [asdict(a) for a in history.observations(job_id)]
    return evidence


def _violations(v: Verdict) -> list[str]:
    state = v.state
    checks = [
        (v.lost, f"{len(v.lost)} accepted request(s) never got a terminal answer, and their jobs are gone"),
        (v.stuck, f"{len(v.stuck)} accepted request(s) stuck: their job is still queued or running"),
        (v.answered_twice, f"{len(v.answered_twice)} request(s) answered by two jobs"),
        (v.duplicate_results, f"{len(v.duplicate_results)} job id(s) showed two different results"),
        (state.stuck_records, f"{len(state.stuck_records)} job record(s) left queued or running with no result"),
        (state.pending_entries, f"{state.pending_entries} stream entr(ies) left pending"),
        (state.queue_depth, f"queue depth {state.queue_depth}, not 0"),
        (state.dead_processes, f"processes dead: {', '.join(state.dead_processes)}"),
        (state.failed_probes, f"gateways not serving: {'; '.join(state.failed_probes)}"),
        (state.webhooks_missing, f"{len(state.webhooks_missing)} ended job(s) whose webhook never arrived"),
        (state.outbox_depth, f"{state.outbox_depth} job(s) with webhook messages still due"),
    ]
    return [message for failed, message in checks if failed]
