"""What one job costs Redis, with its images in Redis and with them in a blob store.

Runs the job's whole Redis lifecycle against a private redis-server, as the gateway and the worker issue it:
submit (script), claim (XREADGROUP), start (script), one progress report per step (script), the result
(script, with or without the images), the completion announcement to a subscribed listener, and the
gateway's read of the result (with the images, or the metadata and then the objects from the store). The
images are four 1024x1024 images encoded as the worker does (bench/encode.py's contents: noise, the worst
case, and a smooth gradient). Reported per job, from the server's own INFO: memory held while the result
lives, bytes in and out, commands, and the server's CPU time.

    .venv/bin/python bench/storage.py [--jobs 50] [--steps 20] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.encode import images as pixels
from bench.host import describe
from common.blobstore import FileBlobStore
from common.jobstore import JobStore
from common.protocol import GenerationParams, Job, JobResult, Shape, Timings
from common.rediskeys import RedisKeys
from common.streams import JobStreams
from sdxl_serve.processes import start_redis_server, stop
from worker.delivery import Delivery
from worker.encode import Encoding, encode_all
from worker.images import ImageWriter

SHAPE = Shape(width=1024, height=1024, steps=20)
WORKER = "bench-worker"


def encoded(content: str, output_format: str) -> list[bytes]:
    """Four 1024x1024 images of `content`, encoded as a worker would."""
    with ThreadPoolExecutor(4) as pool:
        return encode_all(pixels(content, 1024), Encoding(output_format, 90, 1), pool)  # type: ignore[arg-type]


async def server_info(client: aioredis.Redis) -> dict[str, float]:
    info: dict[str, Any] = await client.info("all")
    return {
        "memory": info["used_memory"],
        "net_in": info["total_net_input_bytes"],
        "net_out": info["total_net_output_bytes"],
        "commands": info["total_commands_processed"],
        "cpu_s": info["used_cpu_user"] + info["used_cpu_sys"],
    }


async def one_job(
    store: JobStore, delivery: Delivery, writer: ImageWriter | None, images: list[bytes], media_type: str, steps: int
) -> None:
    keys = RedisKeys()
    params = GenerationParams(prompt="a red fox", guidance_scale=5.0).resolved(SHAPE, seed=1)
    job = Job(id=uuid.uuid4().hex, params=params, result_ttl_s=3600)
    await store.submit(job, keys.size_stream(SHAPE.size))
    claimed = await delivery.claim(WORKER, [keys.size_stream(SHAPE.size)], block_ms=1000)
    assert claimed is not None
    await delivery.start(claimed, WORKER)
    for step in range(1, steps + 1):
        await delivery.progress(job.id, WORKER, step, steps)
    result = JobResult(
        id=job.id, status="succeeded", worker=WORKER, seed=1, shape=SHAPE, media_type=media_type,
        image_count=len(images), timings=Timings(queued_ms=1, generate_ms=1, encode_ms=1),
    )  # fmt: skip
    if writer is not None:
        result = await writer.put(job, result, images)
    await delivery.complete(claimed, result, [] if writer is not None else images)
    stored = await store.fetch_result(job.id)
    assert stored is not None and stored.images == images


async def measure(
    url: str, images: list[bytes], media_type: str, blobs: FileBlobStore | None, jobs: int, steps: int
) -> dict[str, float]:
    client = aioredis.Redis.from_url(url)
    listener = aioredis.Redis.from_url(url)
    pubsub = listener.pubsub()
    await pubsub.subscribe(RedisKeys().completions_channel)  # a gateway listens: announcements cost bytes too
    await client.flushall()
    await JobStreams(client, RedisKeys()).ensure_group(RedisKeys().size_stream(SHAPE.size))
    store = JobStore(client, RedisKeys(), blobs=blobs)
    delivery = Delivery(client, RedisKeys())
    writer = ImageWriter(blobs, WORKER) if blobs is not None else None
    await one_job(store, delivery, writer, images, media_type, steps)  # scripts loaded, connections open
    before = await server_info(client)
    for _ in range(jobs):
        await one_job(store, delivery, writer, images, media_type, steps)
    after = await server_info(client)
    await pubsub.aclose()
    await listener.aclose()
    await client.aclose()
    return {name: (after[name] - before[name]) / jobs for name in before}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-storage-") as scratch:
        server = await start_redis_server(Path(scratch))
        try:
            for content, output_format in itertools.product(("noise", "gradient"), ("png", "webp")):
                images = encoded(content, output_format)
                media_type = f"image/{output_format}"
                for where in ("redis", "blob store"):
                    blobs = FileBlobStore(Path(scratch) / "images") if where == "blob store" else None
                    figures = await measure(server.url(), images, media_type, blobs, args.jobs, args.steps)
                    rows.append({"content": content, "format": output_format, "images": where,
                                 "image_bytes": sum(map(len, images)), **figures})  # fmt: skip
        finally:
            await stop([server.process], timeout_s=10)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"bench/storage.py --jobs {args.jobs} --steps {args.steps} on {describe()}")
    print("| content | format | images in | 4 images | Redis memory/job | net in/job | net out/job | commands/job | "
          "Redis CPU/job |")  # fmt: skip
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['content']} | {r['format']} | {r['images']} | {r['image_bytes'] / 1e6:.2f} MB | "
              f"{r['memory'] / 1e3:.1f} KB | {r['net_in'] / 1e3:.1f} KB | {r['net_out'] / 1e3:.1f} KB | "
              f"{r['commands']:.1f} | {r['cpu_s'] * 1e3:.2f} ms |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20, help="progress reports per job (one per denoising step)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        report(rows, args)


if __name__ == "__main__":
    main()
