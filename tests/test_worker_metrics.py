"""A worker's own port on real worker processes: /metrics, /healthz and /readyz."""

from __future__ import annotations

import aiohttp
import pytest

from tests.support import TEST_SHAPES, Cluster, post_generate, scrape, wait_ready

pytestmark = pytest.mark.e2e


async def test_each_worker_publishes_its_port_and_reports_its_work(cluster: Cluster) -> None:
    workers = {w.id: w for w in await wait_ready(cluster.redis_url, 2)}
    assert all(w.metrics_port for w in workers.values())
    async with aiohttp.ClientSession() as session:
        for worker in workers.values():
            url = f"http://127.0.0.1:{worker.metrics_port}"
            for path in ("/healthz", "/readyz"):
                async with session.get(f"{url}{path}") as response:
                    assert response.status == 200
        payload = await post_generate(cluster.url, seed=21, output_format="jpeg")
        url = f"http://127.0.0.1:{workers[payload['worker']].metrics_port}"
        samples = await scrape(session, url)
    assert samples[("sdxl_worker_jobs_total", (("outcome", "succeeded"),))] >= 1
    assert samples[("sdxl_worker_devices", (("kind", "cpu"),))] == 4
    assert samples[("sdxl_worker_busy", ())] == 0
    assert samples[("sdxl_worker_encode_seconds_count", (("format", "jpeg"),))] >= 1
    shape = str(TEST_SHAPES[0])
    assert samples[("sdxl_worker_generate_seconds_count", (("shape", shape),))] >= 1
    assert {
        phase
        for (name, labels) in samples
        if name == "sdxl_worker_compile_seconds"
        for key, phase in labels
        if key == "phase"
    } == {"lower", "compile", "warmup"}
    assert samples[("sdxl_worker_start_to_ready_seconds", ())] > 0
    # The job's four guided images, two UNet samples each per step (other tests' jobs may have run there too).
    steps = TEST_SHAPES[0].steps
    assert samples[("sdxl_worker_unet_samples_total", (("class", "guided"),))] >= 4 * 2 * steps
