"""The Kubernetes manifests (deploy/k8s) against the code they run.

Each overlay is rendered with `kubectl kustomize` (those checks skip where kubectl is missing); the base and
the components are also read as plain YAML, so every check runs without kubectl too. Container arguments
are parsed by the real `sdxl-serve` parser in the environment the image and the manifest set; ports, probe
paths, stream and group names, metric names and references between objects are compared with what the
code serves and uses. Each check returns its problems, so the last tests can show it fails on a broken copy.
"""

from __future__ import annotations

import argparse
import base64
import copy
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp.test_utils import TestClient

from common.protocol import Shape
from common.redis_conn import parse_sentinel_url
from common.rediskeys import RedisKeys
from gateway.metrics import WORKER_STATES
from testkit.jobs import make_job, succeeded
from tests.deployfiles import CLI_ENV, ROOT, metric_names, parse, served_routes, stage_values
from tests.queues import Queue

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
RAW = "base+components"  # the plain files, read without kustomize
SOURCES = [RAW, *OVERLAYS]
SELF_CONTAINED = {"cpu"}  # overlays that generate their own Secret
# Image name -> Dockerfile target (and the subcommand that image runs).
IMAGES = {"sdxl-serve-gateway": "gateway", "sdxl-serve-worker": "worker"}
# The Secret real clusters create before the first apply (base/redis.yaml says how).
EXTERNAL_SECRET = ("sdxl-redis", "password")
# Metrics the alerts may use that the code does not export: kube-state-metrics'.
EXTERNAL_METRICS = {"kube_pod_container_status_restarts_total"}
ACCELERATORS = ("google.com/tpu", "nvidia.com/gpu")
Doc = dict[str, Any]


# --- Reading the manifests


@cache
def _rendered(source: str) -> tuple[Doc, ...]:
    if source == RAW:
        files = [*sorted(K8S.glob("base/*.yaml")), *sorted(K8S.glob("components/*/*.yaml"))]
        return tuple(
            doc
            for path in files
            if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text())
            if doc
        )
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: overlays are not rendered (base and components are checked raw)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / source)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def documents(source: str) -> list[Doc]:
    """A fresh copy, so a test may change it."""
    return copy.deepcopy(list(_rendered(source)))


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc | None:
    return next((doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name), None)


def workloads(docs: list[Doc]) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def image_name(image: str) -> str:
    """`REGISTRY/sdxl-serve-worker:tpu` -> `sdxl-serve-worker`."""
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def _secret_value(docs: list[Doc], name: str, key: str) -> str:
    """The secret's value if the manifests define it, else a URL-safe stand-in naming it."""
    secret = named(docs, "Secret", name)
    if secret is not None and key in secret.get("data", {}):
        return base64.b64decode(secret["data"][key]).decode()
    if secret is not None and key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    return f"secret-{name}-{key}"


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a value, args included, from the variables defined so far."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), text)


def container_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        source = entry.get("valueFrom", {})
        if "value" in entry:
            env[entry["name"]] = _expand(str(entry["value"]), env)
        elif "secretKeyRef" in source:
            env[entry["name"]] = _secret_value(docs, source["secretKeyRef"]["name"], source["secretKeyRef"]["key"])
        else:
            env[entry["name"]] = f"from-{next(iter(source), 'nothing')}"
    return env


@dataclass
class Ours:
    """A container running one of our images, with its command line as the CLI reads it."""

    workload: Doc
    container: Doc
    target: str
    args: argparse.Namespace
    env: dict[str, str]
    init: bool

    @property
    def served_port(self) -> int:
        port: int = self.args.port if self.args.command == "gateway" else self.args.metrics_port
        return port


def ours(docs: list[Doc]) -> Iterator[Ours]:
    for workload in workloads(docs):
        spec = pod_spec(workload)
        for init, container in [(True, c) for c in spec.get("initContainers", [])] + [
            (False, c) for c in spec["containers"]
        ]:
            target = IMAGES.get(image_name(container["image"]))
            if target is None:
                continue
            assert container.get("command", ["sdxl-serve"]) == ["sdxl-serve"], "run the image's entrypoint"
            env = {**stage_values(target, "ENV"), **container_env(docs, container)}
            argv = [_expand(str(arg), env) for arg in container.get("args", [])]
            yield Ours(workload, container, target, parse(argv, env), env, init)


def servers(docs: list[Doc]) -> list[Ours]:
    """The gateway and worker containers (not init containers)."""
    return [o for o in ours(docs) if not o.init]


def the_worker(docs: list[Doc]) -> Ours:
    [worker] = [o for o in servers(docs) if o.args.command == "worker"]
    return worker


def redis_container(docs: list[Doc]) -> tuple[Doc, Doc]:
    [(workload, container)] = [
        (w, c) for w in workloads(docs) for c in pod_spec(w)["containers"] if image_name(c["image"]) == "redis"
    ]
    return workload, container


def secret_refs(container: Doc) -> dict[str, tuple[str, str]]:
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def container_port(container: Doc, port: int | str) -> int | None:
    """A probe's or Service's port (a number or a port name) as a number, if the container has it."""
    numbers = {p["containerPort"] for p in container.get("ports", [])}
    names = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    return names.get(str(port)) if isinstance(port, str) else (port if port in numbers else None)


# --- The checks: each returns what is wrong


def command_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for o in servers(docs):
        if o.args.command != o.target:
            problems.append(f"{o.workload['metadata']['name']}: the {o.target} image runs `{o.args.command}`")
    if sorted(o.args.command for o in servers(docs)) != ["gateway", "worker"]:
        problems.append("expected one gateway and one worker Deployment")
    return problems


def env_problems(docs: list[Doc]) -> list[str]:
    """Every SDXL_SERVE_* variable set is one the CLI reads: a renamed one would be ignored silently."""
    return [
        f"{o.workload['metadata']['name']}: the CLI reads no {entry['name']}"
        for o in ours(docs)
        for entry in o.container.get("env", [])
        if entry["name"].startswith("SDXL_SERVE_") and entry["name"] not in CLI_ENV
    ]


def port_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for o in servers(docs):
        name = o.workload["metadata"]["name"]
        ports = [p["containerPort"] for p in o.container.get("ports", [])]
        if ports != [o.served_port]:
            problems.append(f"{name}: containerPorts {ports}, but the arguments serve on {o.served_port}")
        host = o.args.host if o.args.command == "gateway" else o.args.metrics_host
        if host != "0.0.0.0":
            problems.append(f"{name}: bound to {host}: unreachable from the kubelet and Prometheus")
    return problems


def probe_problems(docs: list[Doc]) -> list[str]:
    problems = []
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": None}
    for o in servers(docs):
        name = o.workload["metadata"]["name"]
        for kind, path in expected.items():
            probe = o.container.get(kind)
            if probe is None:
                problems += [f"{name}: no {kind}"] if path else []
                continue
            get = probe["httpGet"]
            if get["path"] not in served_routes()[o.args.command] or get["path"] != (path or get["path"]):
                problems.append(f"{name}: {kind} on {get['path']}, expected {path or 'a served route'}")
            if container_port(o.container, get["port"]) != o.served_port:
                problems.append(f"{name}: {kind} on port {get['port']}, the process serves {o.served_port}")
    return problems


def grace_problems(docs: list[Doc]) -> list[str]:
    """Kubernetes must not SIGKILL a worker in its drain, nor a gateway with requests still waiting."""
    problems = []
    for o in servers(docs):
        spec = pod_spec(o.workload)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        pre_stop = o.container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        drain = o.args.drain_timeout if o.args.command == "worker" else o.args.request_timeout
        if grace <= sleep + drain:
            problems.append(f"{o.workload['metadata']['name']}: grace {grace}s <= preStop {sleep}s + drain {drain}s")
    return problems


def redis_problems(docs: list[Doc]) -> list[str]:
    """Every Redis URL names the Redis Service, its port, and the password the Redis container requires."""
    problems = []
    workload, redis = redis_container(docs)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    password = container_env(docs, redis)["REDIS_PASSWORD"]
    if "--appendonly yes" not in " ".join(redis.get("args", [])):
        problems.append("Redis runs without the append-only file: a restart would lose queued jobs")
    for o in servers(docs):
        url = urlparse(o.args.redis_url)
        service = named(docs, "Service", url.hostname or "")
        if service is None or labels.items() < service["spec"]["selector"].items():
            problems.append(f"{o.target}: {url.hostname} is not a Service of the Redis pods")
            continue
        [port] = [p for p in service["spec"]["ports"] if p["port"] == (url.port or 6379)] or [None]
        if port is None or container_port(redis, port.get("targetPort", port["port"])) is None:
            problems.append(f"{o.target}: port {url.port} of {url.hostname} does not reach Redis")
        if url.password != password:
            problems.append(f"{o.target}: the Redis URL's password is not the one Redis requires")
    return problems


def reference_problems(docs: list[Doc], self_contained: bool) -> list[str]:
    """Secrets, Services, PodDisruptionBudgets and PodMonitors point at things that exist."""
    defined = {
        (s["metadata"]["name"], key)
        for s in of_kind(docs, "Secret")
        for key in [*s.get("data", {}), *s.get("stringData", {})]
    }
    used = {ref for w in workloads(docs) for c in pod_spec(w)["containers"] for ref in secret_refs(c).values()}
    used |= {
        (ref["name"], ref["key"])
        for auth in of_kind(docs, "TriggerAuthentication")
        for ref in auth["spec"]["secretTargetRef"]
    }
    allowed = set() if self_contained else {EXTERNAL_SECRET}
    problems = [f"Secret {name} (key {key}) is used but not defined" for name, key in used - defined - allowed]
    for kind in ("Service", "PodDisruptionBudget", "PodMonitor"):
        for doc in of_kind(docs, kind):
            problems += _selector_problems(docs, doc)
    return problems


def _selector_problems(docs: list[Doc], doc: Doc) -> list[str]:
    """A Service, PodDisruptionBudget or PodMonitor selects pods, and each port it names is theirs."""
    selector = doc["spec"]["selector"]
    selector = selector.get("matchLabels", selector).items()
    pods = [w for w in workloads(docs) if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
    what = f"{doc['kind']} {doc['metadata']['name']}"
    ports = [p.get("targetPort", p.get("port")) for p in doc["spec"].get("ports", [])]
    ports += [p["port"] for p in doc["spec"].get("podMetricsEndpoints", [])]
    return ([] if pods else [f"{what} selects no pods"]) + [
        f"{what}: no container port {port}"
        for port in ports
        if not any(container_port(c, port) for w in pods for c in pod_spec(w)["containers"])
    ]


def scrape_problems(docs: list[Doc]) -> list[str]:
    """Prometheus annotations and PodMonitors scrape /metrics on the port each process serves it."""
    problems = []
    for o in servers(docs):
        name = o.workload["metadata"]["name"]
        notes = o.workload["spec"]["template"]["metadata"].get("annotations", {})
        if notes.get("prometheus.io/port") != str(o.served_port):
            problems.append(f"{name}: prometheus.io/port {notes.get('prometheus.io/port')} != {o.served_port}")
        if notes.get("prometheus.io/path") not in served_routes()[o.args.command]:
            problems.append(f"{name}: prometheus.io/path {notes.get('prometheus.io/path')} is not served")
    for monitor in of_kind(docs, "PodMonitor"):
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            if endpoint.get("path") != "/metrics":
                problems.append(f"PodMonitor {monitor['metadata']['name']} scrapes {endpoint.get('path')}")
    return problems


_QUANTITY = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(text: str) -> float:
    """A Kubernetes quantity such as `10Gi`, in bytes."""
    match = re.fullmatch(r"([\d.]+)([KMGT]i?)?", str(text))
    assert match, f"not a quantity: {text}"
    return float(match[1]) * _QUANTITY[match[2] or ""]


def volume_problems(docs: list[Doc]) -> list[str]:
    """The worker's caches (weights at HF_HOME, executables at --compile-cache) are volumes, not the
    container's own layer, and the compilation cache's bound fits in its volume."""
    worker = the_worker(docs)
    mounts = {m["mountPath"]: m["name"] for m in worker.container.get("volumeMounts", [])}
    problems = [
        f"worker: nothing mounted at {path}"
        for path in (worker.env["HF_HOME"], str(worker.args.compile_cache))
        if path not in mounts
    ]
    worker_volumes = {v["name"]: v for v in pod_spec(worker.workload).get("volumes", [])}
    cache_volume = worker_volumes.get(mounts.get(str(worker.args.compile_cache), ""), {})
    limit = cache_volume.get("emptyDir", {}).get("sizeLimit")
    if limit is not None and worker.args.compile_cache_max_gb * 1e9 >= quantity(limit):
        problems.append(
            f"worker: --compile-cache-max-gb {worker.args.compile_cache_max_gb} fills its {limit} "
            "volume: the kubelet evicts a pod over its emptyDir sizeLimit"
        )
    for workload in workloads(docs):
        spec = pod_spec(workload)
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            problems += [
                f"{workload['metadata']['name']}: volume {m['name']} is not defined"
                for m in container.get("volumeMounts", [])
                if m["name"] not in volumes
            ]
    return problems


def accelerator_problems(docs: list[Doc]) -> list[str]:
    """A worker's images per request are a multiple of the chips it gets (one image per chip at least)."""
    worker = the_worker(docs)
    limits = worker.container.get("resources", {}).get("limits", {})
    chips = [int(limits[name]) for name in ACCELERATORS if name in limits]
    if len(chips) > 1:
        return ["the worker asks for two kinds of accelerator"]
    if chips and worker.args.images_per_request % chips[0]:
        return [f"--images-per-request {worker.args.images_per_request} is not a multiple of {chips[0]} chips"]
    return []


def keda_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for scaled in of_kind(docs, "ScaledObject"):
        problems += _scaled_object_problems(docs, scaled)
    return problems


def _scaled_object_problems(docs: list[Doc], scaled: Doc) -> list[str]:
    spec = scaled["spec"]
    worker = the_worker(docs)
    if spec["scaleTargetRef"]["name"] != worker.workload["metadata"]["name"]:
        return [f"the ScaledObject scales {spec['scaleTargetRef']['name']}, not the workers"]
    if worker.args.sizes is None:
        return ["the worker's --sizes must be explicit, so its streams can be checked"]
    problems = [] if spec.get("minReplicaCount", 0) >= 1 else ["minReplicaCount 0: see scaledobject.yaml"]
    keys = RedisKeys(worker.args.key_prefix)
    triggers = spec["triggers"]
    streams = {t["metadata"]["stream"] for t in triggers}
    wanted = {keys.size_stream(size) for size in worker.args.sizes}
    if streams != wanted:
        problems.append(f"trigger streams {sorted(streams)} != the workers' size streams {sorted(wanted)}")
    modifiers = spec["advanced"]["scalingModifiers"]
    if sorted(term.strip() for term in modifiers["formula"].split("+")) != sorted(t["name"] for t in triggers):
        problems.append(f"formula {modifiers['formula']!r} is not the sum of every trigger")
    if modifiers.get("metricType") != "AverageValue":
        problems.append("the formula's target must be per worker (AverageValue)")
    for trigger in triggers:
        problems += _trigger_problems(docs, worker, trigger, modifiers["target"])
    return problems


def _trigger_problems(docs: list[Doc], worker: Ours, trigger: Doc, target: str) -> list[str]:
    meta, name = trigger["metadata"], trigger.get("name")
    problems: list[str] = []
    # With consumerGroup KEDA counts the group's pending entries or lag instead of the stream's length:
    # that leaves out the queue or the jobs in service (scaledobject.yaml; the last test here).
    problems += [f"{name}: sets {key}" for key in ("consumerGroup", "lagCount", "pendingEntriesCount") if key in meta]
    if meta.get("streamLength") != target:
        problems.append(f"{name}: streamLength {meta.get('streamLength')} != the formula's target {target}")
    if worker.args.redis_url.startswith("redis+sentinel://"):
        problems += _sentinel_trigger_problems(worker, trigger)
    else:
        problems += _direct_trigger_problems(docs, worker, trigger)
    auth = named(docs, "TriggerAuthentication", trigger.get("authenticationRef", {}).get("name", ""))
    secrets = {r["parameter"]: (r["name"], r["key"]) for r in (auth or {}).get("spec", {}).get("secretTargetRef", [])}
    if secrets.get("password") != secret_refs(redis_container(docs)[1]).get("REDIS_PASSWORD"):
        problems.append(f"{name}: its password is not Redis's")
    return problems


def _direct_trigger_problems(docs: list[Doc], worker: Ours, trigger: Doc) -> list[str]:
    """The trigger reads the one Redis server the workers use."""
    meta, name = trigger["metadata"], trigger.get("name")
    problems = [] if trigger["type"] == "redis-streams" else [f"{name}: not a redis-streams trigger"]
    url = urlparse(worker.args.redis_url)
    service = named(docs, "Service", url.hostname or "")
    namespace = (service or {}).get("metadata", {}).get("namespace", "NAMESPACE")
    if meta.get("address") != f"{url.hostname}.{namespace}.svc:{url.port or 6379}":
        problems.append(f"{name}: address {meta.get('address')} is not the workers' Redis")
    if meta.get("databaseIndex") != (url.path.strip("/") or "0"):
        problems.append(f"{name}: databaseIndex {meta.get('databaseIndex')} != the workers' {url.path}")
    return problems


def _sentinel_trigger_problems(worker: Ours, trigger: Doc) -> list[str]:
    """The trigger asks the workers' sentinels for the master of their service, so it follows a failover."""
    meta, name = trigger["metadata"], trigger.get("name")
    target = parse_sentinel_url(worker.args.redis_url)
    problems = [] if trigger["type"] == "redis-sentinel-streams" else [f"{name}: not a redis-sentinel-streams trigger"]
    namespace = worker.workload["metadata"].get("namespace", "NAMESPACE")
    wanted = ",".join(f"{host}.{namespace}.svc:{port}" for host, port in target.sentinels)
    if meta.get("addresses") != wanted or "address" in meta:
        problems.append(f"{name}: addresses {meta.get('addresses')} are not the workers' sentinels {wanted}")
    if meta.get("sentinelMaster") != target.service:
        problems.append(f"{name}: sentinelMaster {meta.get('sentinelMaster')} != the workers' {target.service}")
    if meta.get("databaseIndex") != str(target.db):
        problems.append(f"{name}: databaseIndex {meta.get('databaseIndex')} != the workers' {target.db}")
    return problems


# --- Alert expressions

_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, keywords, labels or durations)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    return {
        m[0]
        for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", text)
        if m[0] not in _PROMQL_WORDS and not text[m.end() :].lstrip().startswith("(")
    }


def promql_matchers(expr: str) -> Iterator[tuple[str, str, str, str]]:
    """(metric, label, operator, value) of every `metric{label op "value"}`."""
    for selector in re.finditer(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector[2]):
            yield selector[1], label, op, value


def queue_events() -> set[str]:
    """The counters the queue keeps in its stats hash (exported as sdxl_queue_events_total{event})."""
    files = [*sorted((ROOT / "common" / "lua").glob("*.lua")), ROOT / "worker" / "delivery.py"]
    source = "".join(path.read_text() for path in files)
    return set(re.findall(r"HINCRBY', KEYS\[\d\], '(\w+)'", source) + re.findall(r'hincrby\([^,]+, "(\w+)"', source))


def alert_problems(docs: list[Doc]) -> list[str]:
    problems = []
    known = metric_names() | EXTERNAL_METRICS
    values = {
        ("sdxl_workers", "state"): set(WORKER_STATES),
        ("sdxl_queue_events_total", "event"): queue_events(),
        ("kube_pod_container_status_restarts_total", "container"): {the_worker(docs).container["name"]},
    }
    for rule_set in of_kind(docs, "PrometheusRule"):
        for rule in (r for group in rule_set["spec"]["groups"] for r in group["rules"]):
            expr, name = str(rule["expr"]), rule.get("alert", rule.get("record"))
            problems += [f"{name}: no metric {metric}" for metric in sorted(promql_metric_names(expr) - known)]
            for metric, label, op, value in promql_matchers(expr):
                allowed = values.get((metric, label))
                wanted = value.split("|") if op == "=~" else [value]
                if allowed is not None and not set(wanted) <= allowed:
                    problems.append(f"{name}: {metric}{{{label}}} has no value {value!r}")
    return problems


# --- The tests

ALWAYS: dict[str, Callable[[list[Doc]], list[str]]] = {
    "commands": command_problems,
    "environment": env_problems,
    "ports": port_problems,
    "probes": probe_problems,
    "grace": grace_problems,
    "redis": redis_problems,
    "scraping": scrape_problems,
    "volumes": volume_problems,
    "accelerators": accelerator_problems,
    "autoscaling": keda_problems,
    "alerts": alert_problems,
}


@pytest.mark.parametrize("check", ALWAYS)
@pytest.mark.parametrize("source", SOURCES)
def test_manifests_match_the_code(source: str, check: str) -> None:
    assert ALWAYS[check](documents(source)) == []


@pytest.mark.parametrize("source", SOURCES)
def test_references_resolve(source: str) -> None:
    assert reference_problems(documents(source), self_contained=source in SELF_CONTAINED) == []


async def test_a_gateways_readiness_probe_passes_with_no_worker_ready(client: TestClient[Any, Any]) -> None:
    """A failing readinessProbe takes the pod out of its Service. Were a gateway's to need a ready worker, a
    worker rollout or a scale from zero would leave the Service without endpoints: clients would meet the
    ingress's error page instead of the gateway's 503 with Retry-After, and finished jobs' images go dark."""
    gateways = [o for o in servers(documents(RAW)) if o.args.command == "gateway"]
    assert gateways
    for gateway in gateways:
        path = gateway.container["readinessProbe"]["httpGet"]["path"]
        response = await client.get(path)  # a real gateway on a real Redis, no worker registered
        assert response.status == 200, f"{gateway.workload['metadata']['name']}: {path} answers {response.status}"
        response = await client.post("/v1/jobs", json={"prompt": "a cat"})
        assert response.status == 503 and "Retry-After" in response.headers


def test_the_external_secret_is_documented() -> None:
    name, key = EXTERNAL_SECRET
    command = f"create secret generic {name} --from-literal={key}="
    assert command in (K8S / "base" / "redis.yaml").read_text()
    assert command in (ROOT / "docs" / "operations.md").read_text()


@pytest.mark.parametrize("source", SELF_CONTAINED)
def test_generated_password_fits_in_a_url_unescaped(source: str) -> None:
    docs = documents(source)
    secret = named(docs, "Secret", EXTERNAL_SECRET[0])
    assert secret is not None
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", _secret_value(docs, *EXTERNAL_SECRET))


def test_accelerator_overlays_autoscale_and_alert() -> None:
    for overlay in ("tpu-v5e", "gpu"):
        kinds = {doc["kind"] for doc in documents(overlay)}
        assert {"ScaledObject", "TriggerAuthentication", "PodMonitor", "PrometheusRule"} <= kinds, overlay


def test_tpu_overlay_asks_for_a_v5e_2x2_host() -> None:
    worker = the_worker(documents("tpu-v5e"))
    spec = pod_spec(worker.workload)
    assert spec["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "2x2",
    }
    assert worker.container["resources"]["limits"]["google.com/tpu"] == "4"
    assert worker.container["resources"]["requests"]["google.com/tpu"] == "4"


def test_gpu_overlay_asks_for_a_gpu() -> None:
    worker = the_worker(documents("gpu"))
    assert int(worker.container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


# --- The checks can fail: each on a copy broken the way a careless edit would break it


def _worker_args(docs: list[Doc]) -> list[str]:
    args: list[str] = the_worker(docs).container["args"]
    return args


def _set_arg(flag: str, value: str) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:
        args = _worker_args(docs)
        args[args.index(flag) + 1] = value

    return mutate


def _set_readiness_path(docs: list[Doc]) -> None:
    the_worker(docs).container["readinessProbe"]["httpGet"]["path"] = "/ready"


def _rename_metric(docs: list[Doc]) -> None:
    rule = of_kind(docs, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0]
    rule["expr"] = rule["expr"].replace("sdxl_workers", "sdxl_worker_count")


def _set_consumer_group(docs: list[Doc]) -> None:
    of_kind(docs, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]["consumerGroup"] = RedisKeys().workers_group


def _misspell_variable(docs: list[Doc]) -> None:
    the_worker(docs).container["env"].append({"name": "SDXL_SERVE_METRICS_PROT", "value": "9400"})


def _rename_secret(docs: list[Doc]) -> None:
    auth = of_kind(docs, "TriggerAuthentication")[0]
    auth["spec"]["secretTargetRef"][0]["name"] = "redis-auth"


BREAKAGES: dict[str, tuple[Callable[[list[Doc]], None], Callable[[list[Doc]], list[str]]]] = {
    "metrics port moved": (_set_arg("--metrics-port", "9401"), port_problems),
    "size added": (_set_arg("--sizes", "1024x1024,768x768"), keda_problems),
    "drain lengthened": (_set_arg("--drain-timeout", "600"), grace_problems),
    "cache bound raised": (_set_arg("--compile-cache-max-gb", "20"), volume_problems),
    "probe path typo": (_set_readiness_path, probe_problems),
    "variable misspelt": (_misspell_variable, env_problems),
    "metric renamed": (_rename_metric, alert_problems),
    "KEDA counting the group": (_set_consumer_group, keda_problems),
    "secret renamed": (_rename_secret, lambda docs: reference_problems(docs, self_contained=False)),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_copy_fails_its_check(breakage: str) -> None:
    mutate, check = BREAKAGES[breakage]
    docs = documents(RAW)
    assert check(docs) == []
    mutate(docs)
    assert check(docs), f"{check.__name__} missed: {breakage}"


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'max(sum by (instance) (sdxl_workers{state=~"ready|busy"})) < 1 and '
        "deriv(max(sdxl_queue_depth)[10m:1m]) > 0 or vector(0) - "
        'max(sdxl_queue_events_total{event="x"} offset 15m)'
    )
    assert promql_metric_names(expr) == {"sdxl_workers", "sdxl_queue_depth", "sdxl_queue_events_total"}


# --- Why the autoscaler reads the streams' length: measured on a real redis-server


async def test_stream_length_counts_queued_and_running_jobs_and_the_group_lag_does_not(
    redis_client: aioredis.Redis,
) -> None:
    keys = RedisKeys()
    shape = Shape(width=64, height=64, steps=2)
    stream = keys.size_stream(shape.size)
    queue = Queue.of(redis_client, keys)
    await queue.streams.ensure_group(stream)
    jobs = [make_job(f"job-{i}", shape, seed=i) for i in range(3)]
    for job in jobs:
        await queue.jobs.submit(job, stream)
    running = await queue.delivery.claim("w1", [stream], block_ms=100)
    assert running is not None and running.job.id == "job-0"
    assert await queue.jobs.cancel("job-2") == "cancelled"  # queued behind job-1: its entry is deleted

    # What KEDA's streamLength reads: job-0 in service and job-1 queued.
    assert await redis_client.xlen(stream) == 2
    [group] = await redis_client.xinfo_groups(stream)
    assert group["name"].decode() == keys.workers_group
    assert group["pending"] == 1  # pendingEntriesCount would leave job-1 out
    assert group["lag"] is None  # lagCount: unknown after a cancel, which KEDA reads as 0

    result = succeeded(jobs[0], "w1")
    assert await queue.delivery.complete(running, result, [b"png"])
    assert await redis_client.xlen(stream) == 1


# --- The Sentinel and object-store components, rendered over the cpu overlay


def _render_with_ha_components(overlay: str) -> list[Doc]:
    """`overlay` with components/sentinel and components/object-store, as an overlay that includes them
    renders it (in a scratch overlay beside the others: kustomize loads only paths under its tree)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the components are not rendered")
    scratch = K8S / f".test-ha-{uuid.uuid4().hex[:8]}"
    scratch.mkdir()
    try:
        (scratch / "kustomization.yaml").write_text(
            f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../overlays/{overlay}]\n"
            "components: [../components/sentinel, ../components/object-store]\n"
        )
        result = subprocess.run([kubectl, "kustomize", str(scratch)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    finally:
        shutil.rmtree(scratch)


@pytest.fixture
def ha_documents() -> list[Doc]:
    """overlays/cpu (no autoscaling) with the Sentinel and object-store components."""
    return _render_with_ha_components("cpu")


def test_keda_follows_sentinel_when_both_components_are_included() -> None:
    """overlays/gpu includes components/autoscaling: with components/sentinel its trigger asks the sentinels."""
    docs = _render_with_ha_components("gpu")
    [scaled] = of_kind(docs, "ScaledObject")
    assert [t["type"] for t in scaled["spec"]["triggers"]] == ["redis-sentinel-streams"]
    assert keda_problems(docs) == []
    # The trigger of the plain component, left as it is, reads a Redis the workers no longer use.
    trigger = scaled["spec"]["triggers"][0]
    trigger["type"], trigger["metadata"]["address"] = "redis-streams", "sdxl-redis.sdxl-serve.svc:6379"
    assert keda_problems(docs) != []


@pytest.mark.parametrize("name", ["sdxl-gateway", "sdxl-worker"])
def test_ha_components_point_at_sentinel_and_the_object_store(ha_documents: list[Doc], name: str) -> None:
    deployment = named(ha_documents, "Deployment", name)
    assert deployment is not None
    container = pod_spec(deployment)["containers"][0]
    env = container_env(ha_documents, container)
    target = parse_sentinel_url(env["SDXL_SERVE_REDIS_URL"])
    password = _secret_value(ha_documents, "sdxl-redis", "password")
    assert (target.sentinels, target.service, target.password) == ((("sdxl-redis-sentinel", 26379),), "sdxl", password)
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert {refs[n]["name"] for n in ("SDXL_SERVE_BLOB_STORE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")} == {
        "sdxl-object-store"
    }
    args = parse(container["args"], {**env, "SDXL_SERVE_BLOB_STORE": "s3://bucket/prefix"})
    assert args.blob_store == "s3://bucket/prefix"
    if name == "sdxl-gateway":
        assert args.durable_accept == "replica"
