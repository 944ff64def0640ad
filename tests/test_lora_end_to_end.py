"""LoRA adapters through the whole path: adapters written by `sdxl-serve tiny-lora` as a user would, a real worker
process offering them from `--lora-dir`, a real gateway process, HTTP requests naming them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from common.rediskeys import RedisKeys
from common.registry import Registry, WorkerInfo
from testkit import ProcessGroup, free_port, gateway_args, wait_http
from tests.support import READY_TIMEOUT_S, Cluster, RedisServer, post_generate, tiny_worker_args, wait_ready

pytestmark = pytest.mark.e2e

WORKER = "lora-worker"


def tiny_lora(folder: Path, name: str, model: Path, *flags: str, suffix: str = ".safetensors") -> None:
    """`sdxl-serve tiny-lora FOLDER/NAME.safetensors --model MODEL FLAGS`, as a user makes one (`suffix` "": a PEFT
    folder, FOLDER/NAME)."""
    command = [sys.executable, "-m", "sdxl_serve", "tiny-lora", str(folder / f"{name}{suffix}"), "--model"]
    subprocess.run([*command, str(model), *flags], check=True, capture_output=True)


@pytest.fixture(scope="module")
def lora_cluster(
    redis_server: RedisServer, tiny_model: Path, processes: ProcessGroup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A gateway and one worker offering `ink` (kohya), `oil` (PEFT), `wash` (PEFT's `save_pretrained` folder, alpha 8
    at rank 4), `wash-file` (the folder's safetensors alone: alpha 4), `stain` (diffusers' `save_lora_weights`
    folder), `stain-file` (its file alone) and `broken` (not safetensors), but not `no-config` (a PEFT folder without
    its config), with a pool of two slots, on database 6."""
    folder = tmp_path_factory.mktemp("adapters")
    tiny_lora(folder, "ink", tiny_model, "--format", "kohya", "--seed", "1", "--rank", "4")
    tiny_lora(folder, "oil", tiny_model, "--format", "peft", "--seed", "2", "--rank", "2")
    tiny_lora(folder, "wash", tiny_model, "--format", "peft-folder", "--rank", "4", "--alpha", "8", suffix="")
    (folder / "wash-file.safetensors").write_bytes((folder / "wash" / "adapter_model.safetensors").read_bytes())
    (folder / "no-config").mkdir()
    (folder / "no-config" / "adapter_model.safetensors").write_bytes((folder / "wash-file.safetensors").read_bytes())
    tiny_lora(folder, "stain/pytorch_lora_weights", tiny_model, "--format", "diffusers", "--seed", "3", "--alpha", "2")
    (folder / "stain-file.safetensors").write_bytes(
        (folder / "stain" / "pytorch_lora_weights.safetensors").read_bytes()
    )
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    redis_url = redis_server.url(6)
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    processes.start("lora-gateway", *gateway_args(redis_url, port, "--request-timeout", "120"))
    lora_flags = ("--lora-dir", str(folder), "--lora-cache", "2", "--max-loras", "2")
    processes.start(WORKER, *tiny_worker_args(redis_url, tiny_model, WORKER, *lora_flags))
    try:
        asyncio.run(wait_ready(redis_url, 1))
    except TimeoutError:
        pytest.fail("LoRA worker not ready:\n" + processes.log(WORKER)[-3000:])
    asyncio.run(wait_http(f"http://127.0.0.1:{port}/healthz", READY_TIMEOUT_S))
    yield Cluster(url=f"http://127.0.0.1:{port}", redis_url=redis_url, worker_ids=(WORKER,))
    processes.stop(WORKER)
    processes.stop("lora-gateway")


async def images(cluster: Cluster, **body: Any) -> list[str]:
    payload = await post_generate(cluster.url, seed=3, n=1, num_inference_steps=2, **body)
    assert payload["worker"] == WORKER
    found: list[str] = payload["images"]
    return found


async def worker_info(cluster: Cluster, until: Any = lambda info: True) -> WorkerInfo:
    """The worker's registry entry, once `until` holds of it (its heartbeats refresh it)."""
    client = redis.asyncio.Redis.from_url(cluster.redis_url)
    try:
        registry = Registry(client, RedisKeys("sdxl"))
        async with asyncio.timeout(30):
            while True:
                (info,) = await registry.workers()
                if until(info):
                    return info
                await asyncio.sleep(0.2)  # a heartbeat carries the change; the registry has no event for it
    finally:
        await client.aclose()


async def test_the_worker_offers_its_folder_and_the_gateway_lists_it(lora_cluster: Cluster) -> None:
    info = await worker_info(lora_cluster)
    offered = ["broken", "ink", "oil", "stain", "stain-file", "wash", "wash-file"]
    assert (info.loras, info.max_loras) == (offered, 2)
    async with aiohttp.ClientSession() as session, session.get(f"{lora_cluster.url}/v1/loras") as response:
        listed = await response.json()
    assert [entry["id"] for entry in listed["data"]] == offered


async def test_an_adapter_changes_the_image_and_scale_zero_leaves_it_as_it_was(lora_cluster: Cluster) -> None:
    plain = await images(lora_cluster)
    inked = await images(lora_cluster, loras=[{"name": "ink", "scale": 1.0}])
    unscaled = await images(lora_cluster, loras=[{"name": "ink", "scale": 0.0}])
    assert inked != plain
    assert unscaled == plain
    assert await images(lora_cluster, loras=[{"name": "ink", "scale": 1.0}]) == inked  # the pool's copy, again


async def test_a_peft_folder_is_applied_with_the_alpha_of_its_config(lora_cluster: Cluster) -> None:
    """The folder's alpha 8 at rank 4 doubles the update of its safetensors alone (alpha the rank): at half the
    scale, the same image, bit for bit (doubling and halving are exact)."""
    washed = await images(lora_cluster, loras=[{"name": "wash", "scale": 0.5}])
    assert washed != await images(lora_cluster)
    assert washed == await images(lora_cluster, loras=[{"name": "wash-file", "scale": 1.0}])
    assert washed != await images(lora_cluster, loras=[{"name": "wash-file", "scale": 0.5}])


async def test_a_diffusers_folder_is_applied_as_its_file_and_a_peft_folder_without_its_config_is_refused(
    lora_cluster: Cluster,
) -> None:
    stained = await images(lora_cluster, loras=[{"name": "stain"}])
    assert stained != await images(lora_cluster)
    assert stained == await images(lora_cluster, loras=[{"name": "stain-file"}])
    async with aiohttp.ClientSession() as session:
        body = {"prompt": "a red fox", "n": 1, "num_inference_steps": 2, "loras": [{"name": "no-config"}]}
        async with session.post(f"{lora_cluster.url}/v1/generate", json=body) as response:
            refused = await response.json()
    assert response.status == 400, refused  # not offered: refused at the gateway, no job fails
    assert "no-config" in refused["error"]["message"]


async def test_two_adapters_of_both_formats_in_one_request_and_the_pool_is_advertised(lora_cluster: Cluster) -> None:
    both = await images(lora_cluster, loras=[{"name": "ink"}, {"name": "oil", "scale": -0.5}])
    assert both != await images(lora_cluster, loras=[{"name": "ink"}])
    info = await worker_info(lora_cluster, lambda info: set(info.loras_loaded) == {"ink", "oil"})
    assert sorted(info.loras_loaded) == ["ink", "oil"]


async def test_an_adapter_that_cannot_be_read_fails_its_job_and_the_worker_carries_on(lora_cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as session:
        body = {"prompt": "a red fox", "n": 1, "num_inference_steps": 2, "loras": [{"name": "broken"}]}
        async with session.post(f"{lora_cluster.url}/v1/generate", json=body) as response:
            failed = await response.json()
    assert response.status == 500, failed
    assert "broken" in failed["error"]["message"]
    assert len(await images(lora_cluster, loras=[{"name": "oil"}])) == 1
