"""The demo page (gateway/static) in headless Chromium against the real cluster: a job followed live to its
four images, cancelled, followed by polling when the event stream fails, and the errors a user can meet.

The browser is Debian's chromium driven by Playwright's async API. The tiny model finishes a job in about
a second, too fast to race reliably, so the tests that need to see the queue and the steps pause the two
workers (SIGSTOP) while the page submits: the job then waits in the queue with the page already following
its events. The pause lasts well under the workers' heartbeat TTL, so neither is taken for dead.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from PIL import Image
from playwright.async_api import Browser, ConsoleMessage, Error, FilePayload, Page, Route, async_playwright, expect

from common.jobstore import JobStore
from common.protocol import SCHEDULERS, LoraRef
from common.rediskeys import RedisKeys
from testkit import free_port, wait_http
from testkit.procs import sdxl_serve_argv
from tests.support import (
    READY_TIMEOUT_S,
    TEST_SHAPES,
    Cluster,
    ProcessGroup,
    RedisServer,
    tiny_worker_args,
    wait_ready,
)
from worker.tiny_safety import FLAG_ALL, write_tiny_safety_checker

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
SHAPE = TEST_SHAPES[1]  # 64x64 at 3 steps; the cluster's default shape is TEST_SHAPES[0]
JOB_TIMEOUT_MS = 30_000
FAILED_LOAD = "console: Failed to load resource:"
PAGE_KEY = "sk-demo-page-key-0123456789abcdef"
ALL_IMAGES_LOADED = """() => {
  const images = [...document.querySelectorAll("img.result-image")];
  return images.length === 4 && images.every((image) => image.complete && image.naturalWidth > 0);
}"""


@dataclass
class DemoPage:
    """The page, and every console error and uncaught exception it produced."""

    page: Page
    url: str
    errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} at {message.location.get('url')}")

    def on_page_error(self, error: Error) -> None:
        self.errors.append(f"uncaught: {error}")

    def assert_no_errors(self, *failed_paths: str) -> None:
        """No console errors but the browser's own report of each request that the test made fail."""
        failed = tuple(f" at {self.url}{path}" for path in failed_paths)
        assert [e for e in self.errors if not (e.startswith(FAILED_LOAD) and e.endswith(failed))] == []

    async def submit(self, prompt: str, steps: int | None = None) -> None:
        await self.page.get_by_label("Prompt", exact=True).fill(prompt)
        if steps is not None:
            await self.page.get_by_label("Steps").fill(str(steps))
        await self.page.get_by_role("button", name="Generate").click()

    async def job_id(self) -> str:
        job_id = await self.page.locator("#results").get_attribute("data-job-id")
        assert job_id
        return job_id


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed: `make install` installs it (Debian's package, with apt-get)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def demo(browser: Browser, cluster: Cluster) -> AsyncIterator[DemoPage]:
    """The demo page, loaded from the cluster's gateway, with its console watched."""
    context = await browser.new_context(base_url=cluster.url, viewport={"width": 1100, "height": 800})
    page = await context.new_page()
    demo = DemoPage(page, cluster.url)
    page.on("console", demo.on_console)
    page.on("pageerror", demo.on_page_error)
    await page.goto("/")
    yield demo
    await context.close()


@contextmanager
def workers_paused(processes: ProcessGroup, cluster: Cluster) -> Iterator[None]:
    """Freeze the cluster's workers, so a job submitted meanwhile waits in the queue; thaw them after."""
    workers = [processes.processes[worker_id] for worker_id in cluster.worker_ids]
    for worker in workers:
        worker.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGCONT)


async def test_a_job_is_followed_live_to_four_images(
    demo: DemoPage, cluster: Cluster, processes: ProcessGroup, artifacts: Path
) -> None:
    page = demo.page
    with workers_paused(processes, cluster):
        await demo.submit("a lighthouse at dusk, oil painting", steps=SHAPE.steps)
        await expect(page.locator("#queue-position")).to_contain_text("Queue position:")
        await expect(page.get_by_role("button", name="Cancel")).to_be_visible()

    progress = page.locator("#progress")
    await expect(progress).to_have_attribute("value", str(SHAPE.steps), timeout=JOB_TIMEOUT_MS)
    await expect(progress).to_have_attribute("max", str(SHAPE.steps))
    await expect(page.locator("#progress-text")).to_have_text(f"{SHAPE.steps} / {SHAPE.steps}")
    await expect(page.locator("#results")).to_have_attribute("data-state", "succeeded", timeout=JOB_TIMEOUT_MS)
    await page.wait_for_function(ALL_IMAGES_LOADED, timeout=JOB_TIMEOUT_MS)

    # Steps arrived as events while the job ran, not only filled in from the final result.
    steps_seen = int(await progress.get_attribute("data-steps-seen") or 0)
    assert 1 <= steps_seen <= SHAPE.steps

    images = page.locator("img.result-image")
    sizes = await images.evaluate_all("(images) => images.map((image) => [image.naturalWidth, image.naturalHeight])")
    assert sizes == [[SHAPE.width, SHAPE.height]] * 4
    job_id = await demo.job_id()
    urls = [f"/v1/jobs/{job_id}/images/{k}" for k in range(4)]
    assert await images.evaluate_all("(images) => images.map((image) => image.getAttribute('src'))") == urls
    links = page.locator("a.download")
    assert await links.evaluate_all("(links) => links.map((link) => link.getAttribute('href'))") == urls
    assert await links.evaluate_all("(links) => links.map((link) => link.download)") == [
        f"sdxl-{job_id}-{k + 1}.png" for k in range(4)
    ]
    response = await page.request.get(urls[0])
    assert response.ok and response.headers["content-type"] == "image/png"

    timings = page.locator("#timings")
    await expect(timings).to_contain_text(f"size {SHAPE.width}\N{MULTIPLICATION SIGN}{SHAPE.height}")
    await expect(timings).to_contain_text("scheduler euler")
    await expect(timings).to_contain_text(re.compile(rf"worker ({'|'.join(map(re.escape, cluster.worker_ids))})"))
    await expect(timings).to_contain_text(re.compile(r"generate \d+ ms"))
    await expect(page.locator("#status")).to_contain_text("Done in")
    await expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    await expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    await page.screenshot(path=artifacts / "demo-page.png", full_page=True)
    demo.assert_no_errors()


async def test_the_inputs_offer_what_the_workers_serve(demo: DemoPage) -> None:
    page = demo.page
    await expect(page.locator("#generate-form")).to_have_attribute("data-served", "loaded")
    steps = page.get_by_label("Steps")
    for name, value in (("min", "1"), ("max", str(SHAPE.steps)), ("placeholder", str(TEST_SHAPES[0].steps))):
        await expect(steps).to_have_attribute(name, value)
    await expect(page.get_by_label("Size").locator("option")).to_have_text(["64x64"])
    await expect(page.get_by_label("Scheduler").locator("option")).to_have_text(list(SCHEDULERS))
    await expect(page.locator("#generate-form")).to_have_attribute("data-loras", "none")
    await expect(page.locator("#loras")).to_be_hidden()  # the cluster offers no adapters: no picker
    await demo.submit("a red fox", steps=SHAPE.steps + 1)  # past the range: the browser does not send it
    assert await steps.evaluate("(input) => input.validity.rangeOverflow")
    await expect(page.locator("#results")).to_have_attribute("data-state", "idle")
    demo.assert_no_errors()


async def test_a_value_the_workers_no_longer_serve_names_the_field(demo: DemoPage) -> None:
    # The page was loaded when the workers served more than they do now: the gateway's 400 names the field.
    async def stale(route: Route) -> None:
        card = {"id": "m", "sizes": ["64x64", "128x128"], "min_steps": 1, "max_steps": 50, "default_steps": 2}
        await route.fulfill(json={"object": "list", "data": [{**card, "schedulers": list(SCHEDULERS)}]})

    page = demo.page
    await page.route("**/v1/models", stale)
    await page.reload()
    await expect(page.locator("#generate-form")).to_have_attribute("data-served", "loaded")
    await demo.submit("a red fox", steps=7)
    error = page.locator("#error")
    await expect(error).to_contain_text("Invalid Steps (num_inference_steps)")
    await expect(error).to_contain_text(f"run 1..{SHAPE.steps} steps, not 7")
    steps = page.get_by_label("Steps")
    await expect(steps).to_have_attribute("aria-invalid", "true")
    await expect(steps).to_be_focused()
    await expect(page.locator("#results")).to_have_attribute("data-state", "error")
    await expect(page.get_by_role("button", name="Generate")).to_be_enabled()

    await steps.fill("")
    await page.get_by_label("Size").select_option("128x128")
    await page.get_by_role("button", name="Generate").click()
    await expect(error).to_contain_text("(width)")
    await expect(page.locator("img.result-image")).to_have_count(0)
    demo.assert_no_errors("/v1/jobs")


@pytest.mark.parametrize(
    ("status", "code", "headline"),
    [
        (503, "no_workers", "Server busy: no worker is ready yet, retry in 3 seconds."),
        (503, "queue_unavailable", "Server busy: the job queue is unreachable, retry in 3 seconds."),
        (429, "rate_limited", "Server busy: too many requests, retry in 3 seconds."),
    ],
)
async def test_a_busy_server_says_when_to_retry(demo: DemoPage, status: int, code: str, headline: str) -> None:
    # The cluster cannot be made busy on demand, so Playwright answers in the gateway's place.
    async def busy(route: Route) -> None:
        await route.fulfill(
            status=status,
            headers={"Retry-After": "3"},
            json={"error": {"code": code, "message": "try later", "field": None}},
        )

    await demo.page.route("**/v1/jobs", busy)
    await demo.submit("a red fox")

    error = demo.page.locator("#error")
    await expect(error.locator("strong")).to_have_text(headline)
    await expect(error).to_contain_text("try later")
    demo.assert_no_errors("/v1/jobs")


async def test_a_queued_job_is_cancelled_from_the_keyboard(
    demo: DemoPage, cluster: Cluster, processes: ProcessGroup
) -> None:
    page = demo.page
    with workers_paused(processes, cluster):
        prompt = page.get_by_label("Prompt", exact=True)
        await prompt.fill("a ship in a bottle")
        await prompt.press("Control+Enter")
        await expect(page.locator("#queue-position")).to_be_visible()
        await page.get_by_role("button", name="Cancel").focus()
        await page.keyboard.press("Enter")
        await expect(page.locator("#results")).to_have_attribute("data-state", "cancelled")
        response = await page.request.get(f"/v1/jobs/{await demo.job_id()}")
        assert (await response.json())["status"] == "cancelled"

    await expect(page.locator("#error")).to_contain_text("Cancelled")
    await expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    await expect(page.locator("img.result-image")).to_have_count(0)
    await expect(page.get_by_role("button", name="Generate")).to_be_focused()
    demo.assert_no_errors()


async def test_a_broken_event_stream_falls_back_to_polling(demo: DemoPage) -> None:
    page = demo.page

    async def refuse(route: Route) -> None:
        await route.abort()

    await page.route("**/v1/jobs/*/events", refuse)
    await page.get_by_label("Output format").select_option("jpeg")
    await demo.submit("a lighthouse, polled")  # blank steps: the cluster's default shape

    await expect(page.locator("#results")).to_have_attribute("data-state", "succeeded", timeout=JOB_TIMEOUT_MS)
    default = TEST_SHAPES[0]
    await expect(page.locator("#progress-text")).to_have_text(f"{default.steps} / {default.steps}")
    await page.wait_for_function(ALL_IMAGES_LOADED, timeout=JOB_TIMEOUT_MS)
    links = page.locator("a.download")
    assert all(name.endswith(".jpg") for name in await links.evaluate_all("(ls) => ls.map((l) => l.download)"))
    response = await page.request.get(await links.first.get_attribute("href") or "")
    assert response.headers["content-type"] == "image/jpeg"
    demo.assert_no_errors(f"/v1/jobs/{await demo.job_id()}/events")


PLACEHOLDERS_FIT = """() => {
  const context = document.createElement("canvas").getContext("2d");
  return [...document.querySelectorAll("input[placeholder], textarea[placeholder]")].map((input) => {
    const style = getComputedStyle(input);
    context.font = style.font;
    // A number input keeps room for its spin buttons (about 15 px in Chromium).
    const spin = input.type === "number" ? 15 : 0;
    const room = input.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight) - spin;
    return { id: input.id, text: input.placeholder, fits: context.measureText(input.placeholder).width <= room };
  });
}"""


@pytest.mark.parametrize("width", [1100, 390])
async def test_every_placeholder_fits_its_input(browser: Browser, cluster: Cluster, width: int) -> None:
    context = await browser.new_context(base_url=cluster.url, viewport={"width": width, "height": 800})
    page = await context.new_page()
    await page.goto("/")
    await expect(page.locator("#generate-form")).to_have_attribute("data-served", "loaded")
    await expect(page.get_by_label("Steps")).to_have_attribute("placeholder", re.compile(r"^\d+$"))
    placeholders = await page.evaluate(PLACEHOLDERS_FIT)
    await context.close()
    assert [p for p in placeholders if not p["fits"]] == []
    assert {p["id"] for p in placeholders} >= {"steps", "seed", "prompt"}


async def test_a_submit_the_browser_blocks_clears_the_last_error(demo: DemoPage) -> None:
    async def busy(route: Route) -> None:
        await route.fulfill(status=429, headers={"Retry-After": "3"}, json={"error": {"code": "rate_limited"}})

    await demo.page.route("**/v1/jobs", busy)
    await demo.submit("a red fox")
    error = demo.page.locator("#error")
    await expect(error).to_be_visible()

    # An empty prompt: the browser refuses the submit itself (the prompt is required), no request is made.
    await demo.submit("")
    await expect(error).to_be_hidden()
    assert await demo.page.get_by_label("Prompt", exact=True).evaluate("(input) => !input.validity.valid")
    demo.assert_no_errors("/v1/jobs")


async def test_the_page_says_the_tiny_model_makes_noise(demo: DemoPage) -> None:
    await expect(demo.page.locator("#generate-form")).to_have_attribute("data-served", "loaded")
    notice = demo.page.get_by_role("note")
    await expect(notice).to_be_visible()
    await expect(notice).to_contain_text("random-weight")
    await expect(notice).to_contain_text("noise")
    demo.assert_no_errors()


@pytest.fixture
def keyed_gateway(cluster: Cluster, processes: ProcessGroup) -> Iterator[str]:
    """A second gateway on the cluster's Redis that needs an API key (no --public-demo); its URL."""
    port = free_port()
    argv = sdxl_serve_argv("gateway", "--redis-url", cluster.redis_url, "--host", "127.0.0.1", "--port", str(port))
    processes.start_argv("keyed-gateway", argv, env={**os.environ, "SDXL_SERVE_API_KEYS": PAGE_KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_http(f"{url}/healthz", 60))
        yield url
    finally:
        processes.stop("keyed-gateway")


async def test_a_keyed_gateway_asks_for_the_key_before_the_first_generate(browser: Browser, keyed_gateway: str) -> None:
    context = await browser.new_context(base_url=keyed_gateway, viewport={"width": 1100, "height": 800})
    page = await context.new_page()
    demo = DemoPage(page, keyed_gateway)
    page.on("console", demo.on_console)
    page.on("pageerror", demo.on_page_error)
    await page.goto("/")
    key = page.get_by_label("API key")
    await expect(key).to_be_visible()  # asked before any Generate
    await expect(page.get_by_role("button", name="Generate")).to_be_disabled()

    await key.fill("sk-wrong")
    await page.get_by_role("button", name="Use key").click()
    await expect(page.locator("#key-error")).to_contain_text("unknown API key")
    await expect(page.get_by_role("button", name="Generate")).to_be_disabled()

    await key.fill(PAGE_KEY)
    await page.get_by_role("button", name="Use key").click()
    await expect(page.locator("#generate-form")).to_have_attribute("data-served", "loaded")
    await expect(key).to_be_hidden()
    await demo.submit("a lighthouse, with a key")
    await expect(page.locator("#results")).to_have_attribute("data-state", "succeeded", timeout=JOB_TIMEOUT_MS)
    await page.wait_for_function(ALL_IMAGES_LOADED, timeout=JOB_TIMEOUT_MS)
    sources = await page.locator("img.result-image").evaluate_all("(images) => images.map((i) => i.src)")
    assert all(source.startswith("blob:") for source in sources)  # fetched with the key

    await page.reload()  # the key is kept for the tab: no second prompt
    await expect(page.locator("#generate-form")).to_have_attribute("data-served", "loaded")
    await expect(key).to_be_hidden()
    await context.close()
    demo.assert_no_errors("/v1/models")  # the first probe, and the wrong key's, answered 401


def module_cluster(
    processes: ProcessGroup, redis_url: str, name: str, worker_id: str, worker_argv: list[str]
) -> Iterator[Cluster]:
    """A module's cluster: a gateway (`gateway-NAME`) and one worker process (`worker_argv`, as `worker_id`) on a
    database of the session's Redis that no other module uses, flushed first; both stopped at the module's end (a
    worker left on the database would take a later module's jobs)."""
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    gateway = f"gateway-{name}"
    processes.start(gateway, "gateway", "--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(port))
    processes.start_argv(worker_id, worker_argv)
    try:
        asyncio.run(wait_ready(redis_url, 1))
    except TimeoutError:
        pytest.fail(f"{worker_id} not ready:\n" + processes.log(worker_id)[-3000:])
    asyncio.run(wait_http(f"http://127.0.0.1:{port}/healthz", READY_TIMEOUT_S))
    yield Cluster(url=f"http://127.0.0.1:{port}", redis_url=redis_url, worker_ids=(worker_id,))
    processes.stop(worker_id)
    processes.stop(gateway)


@pytest.fixture(scope="module")
def flagging_cluster(
    redis_server: RedisServer, tiny_model: Path, processes: ProcessGroup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A gateway and one worker whose safety checker flags every image (database 2 of the session's Redis)."""
    checker = write_tiny_safety_checker(tmp_path_factory.mktemp("checker") / "flag-all", FLAG_ALL)
    redis_url = redis_server.url(2)
    argv = tiny_worker_args(redis_url, tiny_model, "worker-flagging")
    worker = sdxl_serve_argv(*argv, "--safety-checker", str(checker), "--safety-replace", "blur")
    yield from module_cluster(processes, redis_url, "flagging", "worker-flagging", worker)


async def test_flagged_images_are_shown_as_withheld_in_an_unbroken_layout(
    browser: Browser, flagging_cluster: Cluster, artifacts: Path
) -> None:
    context = await browser.new_context(base_url=flagging_cluster.url, viewport={"width": 1100, "height": 800})
    page = await context.new_page()
    demo = DemoPage(page, flagging_cluster.url)
    page.on("console", demo.on_console)
    page.on("pageerror", demo.on_page_error)
    await page.goto("/")
    await demo.submit("a lighthouse at dusk")
    await expect(page.locator("#results")).to_have_attribute("data-state", "succeeded", timeout=JOB_TIMEOUT_MS)

    cells = page.locator("figure.cell")
    await expect(cells).to_have_count(4)
    await expect(page.locator('figure.cell[data-nsfw="true"]')).to_have_count(4)
    await expect(page.locator(".withheld-notice").first).to_have_text("Withheld by the safety checker")
    await expect(page.get_by_role("img", name="image 1 of 4, withheld by the safety checker")).to_be_visible()
    await expect(page.locator("a.download")).to_have_count(0)  # nothing to download but the replacement
    # The same square cells as unflagged images get, two a row, each notice inside its image, nothing spilling.
    layout = await page.evaluate(WITHHELD_LAYOUT)
    assert layout["cells"] == [[300, 300]] * 4, layout
    assert layout["rows"] == 2 and layout["noticesInside"] and not layout["overflows"], layout
    await page.screenshot(path=artifacts / "demo-page-withheld.png", full_page=True)
    demo.assert_no_errors()
    await context.close()


WITHHELD_LAYOUT = """() => {
  const images = [...document.querySelectorAll("figure.cell img.result-image")];
  const notices = [...document.querySelectorAll(".withheld-notice")];
  const box = (node) => node.getBoundingClientRect();
  const inside = notices.every((notice, i) => {
    const n = box(notice), img = box(images[i]);
    return n.left >= img.left - 1 && n.right <= img.right + 1 && n.top >= img.top - 1 && n.bottom <= img.bottom + 1
      && notice.scrollWidth <= notice.clientWidth;
  });
  return {
    cells: images.map((img) => [Math.round(box(img).width), Math.round(box(img).height)]),
    rows: new Set(images.map((img) => Math.round(box(img).top))).size,
    noticesInside: inside,
    overflows: document.documentElement.scrollWidth > document.documentElement.clientWidth,
  };
}"""


@pytest.fixture(scope="module")
def image_cluster(redis_server: RedisServer, processes: ProcessGroup) -> Iterator[Cluster]:
    """A gateway and a stand-in worker that advertises image_input and answers with the input image (testkit/standin.py)
    on database 3 of the session's Redis."""
    redis_url = redis_server.url(3)
    argv = [sys.executable, "-m", "testkit.standin", "--redis-url", redis_url, "--worker-id", "standin-images",
            "--sizes", "64x64", "--max-steps", "3", "--step-s", "0.01", "--image-input"]  # fmt: skip
    yield from module_cluster(processes, redis_url, "images", "standin-images", argv)


async def test_an_image_uploaded_through_the_page_comes_back_from_a_worker_that_takes_images(
    browser: Browser, image_cluster: Cluster
) -> None:
    picture = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint32).reshape(64, 64, 3).astype(np.uint8))
    upload = io.BytesIO()
    picture.save(upload, "PNG")
    context = await browser.new_context(base_url=image_cluster.url, viewport={"width": 1100, "height": 800})
    page = await context.new_page()
    demo = DemoPage(page, image_cluster.url)
    page.on("console", demo.on_console)
    page.on("pageerror", demo.on_page_error)
    await page.goto("/")
    await expect(page.locator("#generate-form")).to_have_attribute("data-served", "loaded")
    strength = page.get_by_label("Strength")
    await expect(strength).to_be_disabled()  # it applies to an input image only
    file: FilePayload = {"name": "picture.png", "mimeType": "image/png", "buffer": upload.getvalue()}
    await page.get_by_label("Input image").set_input_files(files=[file])
    await expect(strength).to_be_enabled()
    await strength.fill("0.6")
    await demo.submit("the same picture", steps=2)
    await expect(page.locator("#results")).to_have_attribute("data-state", "succeeded", timeout=JOB_TIMEOUT_MS)
    await page.wait_for_function(ALL_IMAGES_LOADED, timeout=JOB_TIMEOUT_MS)
    job_id = await demo.job_id()
    async with aioredis.Redis.from_url(image_cluster.redis_url) as client:
        record = await JobStore(client, RedisKeys()).record(job_id)
    assert record is not None and record.job is not None and record.job.inputs is not None
    assert record.job.params.strength == 0.6  # the slider's value, sent with the file as multipart
    response = await page.request.get(f"/v1/jobs/{job_id}/images/0")
    returned = Image.open(io.BytesIO(await response.body())).convert("RGB")
    assert np.array_equal(np.asarray(returned), np.asarray(picture))  # the worker answered with the upload
    await context.close()
    demo.assert_no_errors()


ADAPTERS = ("ink", "oil", "wax")


@pytest.fixture(scope="module")
def lora_cluster(
    redis_server: RedisServer, processes: ProcessGroup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A gateway and a stand-in worker that offers the adapters ink, oil and wax, two at most per request
    (database 7 of the session's Redis, which no other module uses)."""
    folder = tmp_path_factory.mktemp("loras")
    for name in ADAPTERS:
        (folder / f"{name}.safetensors").write_bytes(b"adapter")  # the stand-in lists them, reads none
    redis_url = redis_server.url(7)
    argv = [sys.executable, "-m", "testkit.standin", "--redis-url", redis_url, "--worker-id", "standin-loras",
            "--sizes", "64x64", "--max-steps", "3", "--step-s", "0.01", "--lora-dir", str(folder),
            "--max-loras", "2"]  # fmt: skip
    yield from module_cluster(processes, redis_url, "loras", "standin-loras", argv)


@pytest.fixture
async def lora_demo(browser: Browser, lora_cluster: Cluster) -> AsyncIterator[DemoPage]:
    """The demo page of the cluster that offers adapters, with its console watched (not loaded yet)."""
    context = await browser.new_context(base_url=lora_cluster.url, viewport={"width": 1100, "height": 800})
    page = await context.new_page()
    demo = DemoPage(page, lora_cluster.url)
    page.on("console", demo.on_console)
    page.on("pageerror", demo.on_page_error)
    yield demo
    await context.close()


async def test_adapters_picked_on_the_page_are_queued_with_the_job(
    lora_demo: DemoPage, lora_cluster: Cluster, artifacts: Path
) -> None:
    page = lora_demo.page
    await page.goto("/")
    picker = page.get_by_role("group", name=re.compile("^LoRA adapters"))
    await expect(picker).to_be_visible()
    await expect(picker).to_contain_text("up to 2")
    await expect(picker.get_by_role("checkbox")).to_have_count(len(ADAPTERS))
    oil_scale = page.get_by_label("oil scale")
    await expect(oil_scale).to_be_disabled()  # it applies to a picked adapter only
    await expect(oil_scale).to_have_attribute("min", "-4")
    await expect(oil_scale).to_have_attribute("max", "4")
    await expect(oil_scale).to_have_value("1")

    await page.get_by_label("oil", exact=True).check()
    await oil_scale.fill("-0.5")
    await page.get_by_label("ink", exact=True).check()
    await expect(page.get_by_label("wax", exact=True)).to_be_disabled()  # two picked: the cluster's limit
    await page.screenshot(path=artifacts / "demo-page-loras.png", full_page=True)
    await lora_demo.submit("a lighthouse in ink", steps=2)
    await expect(page.locator("#results")).to_have_attribute("data-state", "succeeded", timeout=JOB_TIMEOUT_MS)
    async with aioredis.Redis.from_url(lora_cluster.redis_url) as client:
        record = await JobStore(client, RedisKeys()).record(await lora_demo.job_id())
    assert record is not None and record.job is not None
    assert record.job.params.loras == [LoraRef(name="ink", scale=1.0), LoraRef(name="oil", scale=-0.5)]

    await page.get_by_label("ink", exact=True).uncheck()
    await expect(page.get_by_label("wax", exact=True)).to_be_enabled()
    lora_demo.assert_no_errors()


async def test_the_gateway_refusing_the_adapters_picked_names_them(lora_demo: DemoPage) -> None:
    # The page was loaded when the cluster offered an adapter it no longer does, and applied three at once.
    async def stale(route: Route) -> None:
        cards = [{"id": name, "object": "lora", "workers": ["w"], "loaded": 0} for name in (*ADAPTERS, "ghost")]
        await route.fulfill(json={"object": "list", "data": cards, "max_loras": 3})

    page = lora_demo.page
    await page.route("**/v1/loras", stale)
    await page.goto("/")
    ghost = page.get_by_label("ghost", exact=True)
    await ghost.check()
    await lora_demo.submit("a ghost", steps=2)
    error = page.locator("#error")
    await expect(error).to_contain_text("Invalid LoRA ghost (loras[0].name)")
    await expect(error).to_contain_text("offers adapter 'ghost'")
    await expect(ghost).to_have_attribute("aria-invalid", "true")
    await expect(ghost).to_be_focused()
    await expect(page.locator("#results")).to_have_attribute("data-state", "error")

    await ghost.uncheck()
    for name in ADAPTERS:
        await page.get_by_label(name, exact=True).check()
    await page.get_by_role("button", name="Generate").click()
    await expect(error).to_contain_text("Invalid LoRA adapters (loras)")
    await expect(error).to_contain_text("at most 2 per request")
    await expect(page.locator("img.result-image")).to_have_count(0)
    lora_demo.assert_no_errors("/v1/jobs")


async def test_adapter_names_are_shown_as_text(lora_demo: DemoPage) -> None:
    hostile = '<img src=x onerror="window.pwned=1">'

    async def listing(route: Route) -> None:
        card = {"id": hostile, "object": "lora", "workers": ["w"], "loaded": 0}
        await route.fulfill(json={"object": "list", "data": [card], "max_loras": 1})

    page = lora_demo.page
    await page.route("**/v1/loras", listing)
    await page.goto("/")
    picker = page.get_by_role("group", name=re.compile("^LoRA adapters"))
    await expect(picker.get_by_role("checkbox", name=hostile, exact=True)).to_be_visible()
    await expect(picker.locator("img")).to_have_count(0)
    assert await page.evaluate("() => window.pwned") is None
    lora_demo.assert_no_errors()
