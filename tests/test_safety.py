"""The image safety checker (worker/safety.py): a random-weight checker written by worker/tiny_safety.py, loaded
from PyTorch-layout safetensors, run by a real worker behind a real gateway, with thresholds that flag every
image or none, seen in each answer: in a worker in this process, and in real worker and gateway processes on the
tiny model over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis
from PIL import Image

from testkit import free_port, gateway_args, wait_http
from tests.protection import Client, gateway, running_worker
from tests.support import (
    READY_TIMEOUT_S,
    TEST_SHAPES,
    ClientFactory,
    ProcessGroup,
    RedisServer,
    scrape,
    tiny_worker_args,
    wait_ready,
)
from worker.runner import Worker
from worker.safety import SafetyChecker, SafetyCheckerError, read_params, replacement
from worker.tiny_safety import FLAG_ALL, FLAG_NONE, write_tiny_safety_checker

GREY = 128  # the stand-in pipeline's pixels


@pytest.fixture(scope="module")
def checkers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety")
    return {
        "flag-all": write_tiny_safety_checker(root / "flag-all", FLAG_ALL),
        "flag-none": write_tiny_safety_checker(root / "flag-none", FLAG_NONE),
    }


def batch() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 96, 128, 3), dtype=np.uint8)


def test_the_thresholds_decide_and_flagged_images_are_replaced(checkers: dict[str, Path]) -> None:
    pixels = batch()
    flagged = SafetyChecker.load(checkers["flag-all"]).screen(pixels)
    assert flagged.nsfw == [True] * 3 and not flagged.pixels.any()
    passed = SafetyChecker.load(checkers["flag-none"]).screen(pixels)
    assert passed.nsfw == [False] * 3 and (passed.pixels == pixels).all()


def test_a_blurred_replacement_keeps_the_size_and_loses_the_detail() -> None:
    image = batch()[0]
    blurred = replacement(image, "blur")
    assert blurred.shape == image.shape
    assert np.abs(np.diff(blurred.astype(int), axis=1)).mean() < np.abs(np.diff(image.astype(int), axis=1)).mean() / 10


def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(checkers: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "config.json").write_text((checkers["flag-all"] / "config.json").read_text())
    tensors = load_file(str(checkers["flag-all"] / "model.safetensors"))
    del tensors["concept_embeds"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(SafetyCheckerError, match="concept_embeds"):
        SafetyChecker.load(folder)


def test_the_weights_read_back_are_the_ones_written(checkers: dict[str, Path]) -> None:
    import jax
    from transformers import CLIPConfig

    from worker.safety import _read_config, checker_module

    config = CLIPConfig.from_dict(_read_config(checkers["flag-all"]))
    module = checker_module(config)
    size = config.vision_config.image_size
    written = module.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))["params"]
    read = read_params(checkers["flag-all"] / "model.safetensors", written)
    pairs = zip(jax.tree_util.tree_leaves(read), jax.tree_util.tree_leaves(written), strict=True)
    differing = [i for i, (a, b) in enumerate(pairs) if a.shape != b.shape]
    assert not differing
    # The random tower's weights round-trip exactly (the thresholds were overwritten on purpose).
    assert np.array_equal(read["visual_projection"]["kernel"], np.asarray(written["visual_projection"]["kernel"]))


def decoded(image: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB"))


def checked(worker: Worker, verdict: str) -> float:
    value = worker.metrics.registry.get_sample_value("sdxl_worker_images_checked_total", {"verdict": verdict})
    return value or 0.0


async def answers(client: Client) -> dict[str, Any]:
    """The three answers a prompt gets: /v1/generate's, its job's status document, the OpenAI route's."""
    body = {"prompt": "a lighthouse"}
    generate = await client.post("/v1/generate", json=body)
    assert generate.status == 200, await generate.text()
    job_id = (await generate.json())["id"]
    status = await (await client.get(f"/v1/jobs/{job_id}")).json()
    openai = await client.post("/v1/images/generations", json=body | {"response_format": "b64_json"})
    assert openai.status == 200, await openai.text()
    return {"generate": await generate.json(), "status": status, "openai": await openai.json()}


@pytest.mark.parametrize("which", ["flag-all", "flag-none"])
async def test_a_real_worker_marks_and_replaces_flagged_images_in_every_answer(
    aiohttp_client: ClientFactory, redis_server: RedisServer, checkers: dict[str, Path], which: str
) -> None:
    flagging = which == "flag-all"
    # Its own id, and the workers' default heartbeat TTL: a loaded CI machine must not expire its registry entry.
    async with running_worker(
        redis_server.url(0), f"checker-{which}", safety_checker=checkers[which], watermark=False, heartbeat_ttl_s=10.0
    ) as worker:
        client = await gateway(aiohttp_client, redis_server, request_timeout_s=30.0)
        got = await answers(client)
        count = len(got["generate"]["images"])
        assert got["generate"]["nsfw"] == [flagging] * count
        assert all((decoded(image) == (0 if flagging else GREY)).all() for image in got["generate"]["images"])
        assert got["status"]["status"] == "succeeded" and got["status"]["result"]["nsfw"] == [flagging] * count
        assert [item["nsfw"] for item in got["openai"]["data"]] == [flagging] * len(got["openai"]["data"])
        # Each job's own images are checked, no more: the OpenAI route's job makes only the images it asked for.
        assert checked(worker, "flagged" if flagging else "passed") == count + len(got["openai"]["data"])
        assert checked(worker, "passed" if flagging else "flagged") == 0


async def test_without_a_checker_no_verdict_is_given(aiohttp_client: ClientFactory, redis_server: RedisServer) -> None:
    async with running_worker(redis_server.url(0), shapes=TEST_SHAPES):
        client = await gateway(aiohttp_client, redis_server, request_timeout_s=30.0)
        body = await (await client.post("/v1/generate", json={"prompt": "a lighthouse"})).json()
        assert body["nsfw"] is None


# --- The same two checkers in a real `sdxl-serve worker` process on the tiny model, behind a real gateway.

DATABASES = {"flag-all": 4, "flag-none": 5}  # of the session's Redis, apart from the other clusters'


@dataclass(frozen=True)
class CheckedCluster:
    """A gateway and one tiny-model worker whose checker is `which`, and the worker's metrics address."""

    which: str
    url: str
    metrics_url: str


@pytest.fixture(scope="module", params=list(DATABASES))
def checked_cluster(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    tiny_model: Path,
    processes: ProcessGroup,
    checkers: dict[str, Path],
) -> Iterator[CheckedCluster]:
    which: str = request.param
    redis_url = redis_server.url(DATABASES[which])
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    gateway_name, worker_name = f"gateway-{which}", f"worker-{which}"
    processes.start(gateway_name, *gateway_args(redis_url, port, "--request-timeout", "120"))
    flags = ("--safety-checker", str(checkers[which]), "--metrics-port", "0")
    processes.start(worker_name, *tiny_worker_args(redis_url, tiny_model, worker_name, *flags))
    try:
        (info,) = asyncio.run(wait_ready(redis_url, 1))
    except TimeoutError:
        pytest.fail("worker not ready:\n" + processes.log(worker_name)[-3000:])
    asyncio.run(wait_http(f"http://127.0.0.1:{port}/healthz", READY_TIMEOUT_S))
    yield CheckedCluster(which, f"http://127.0.0.1:{port}", f"http://{info.host}:{info.metrics_port}")
    processes.stop(worker_name)
    processes.stop(gateway_name)


async def http_answers(url: str) -> dict[str, Any]:
    """`answers`, over real HTTP to a gateway process."""
    body = {"prompt": "a lighthouse"}
    async with aiohttp.ClientSession(url) as session:
        async with session.post("/v1/generate", json=body) as response:
            assert response.status == 200, await response.text()
            generate = await response.json()
        async with session.get(f"/v1/jobs/{generate['id']}") as response:
            status = await response.json()
        async with session.post("/v1/images/generations", json=body | {"response_format": "b64_json"}) as response:
            assert response.status == 200, await response.text()
            openai = await response.json()
    return {"generate": generate, "status": status, "openai": openai}


async def test_a_worker_process_reports_its_checkers_verdict_in_every_answer_and_its_metric(
    checked_cluster: CheckedCluster,
) -> None:
    flagging = checked_cluster.which == "flag-all"
    got = await http_answers(checked_cluster.url)
    count = len(got["generate"]["images"])
    assert count >= 1 and got["generate"]["nsfw"] == [flagging] * count
    if flagging:  # replaced with black (the default); the tiny model's noise passes as it is
        assert all(not decoded(image).any() for image in got["generate"]["images"])
    else:
        assert all(decoded(image).std() > 0 for image in got["generate"]["images"])
    assert got["status"]["status"] == "succeeded" and got["status"]["result"]["nsfw"] == [flagging] * count
    assert [item["nsfw"] for item in got["openai"]["data"]] == [flagging] * len(got["openai"]["data"])
    async with aiohttp.ClientSession() as session:
        samples = await scrape(session, checked_cluster.metrics_url)
    verdicts = {verdict: samples.get(("sdxl_worker_images_checked_total", (("verdict", verdict),)), 0.0)
                for verdict in ("flagged", "passed")}  # fmt: skip
    # Two jobs, each checked for its own images: /v1/generate's `count`, and the OpenAI route's (its `n`).
    checked = count + len(got["openai"]["data"])
    assert verdicts == ({"flagged": checked, "passed": 0} if flagging else {"flagged": 0, "passed": checked})
