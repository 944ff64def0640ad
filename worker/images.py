"""Writing a job's images to the blob store before its result, and removing those of a losing attempt.

Exactly-once visibility: every object is written (and retried until it is) before the result record that
names it is stored, so no result is ever visible without its images. Each attempt writes under its own keys;
when the result script drops this attempt's result (another attempt, or a cancel, won), its objects are
removed. Objects of an attempt that died before its result was stored are swept with the expired ones
(the file backend here, an S3 bucket's lifecycle rules there).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from common.blobstore import BlobStore, BlobStoreError, BlobStoreUnavailable, FileBlobStore, result_key
from common.protocol import Job, JobResult

logger = logging.getLogger(__name__)

RETRY_CAP_S = 5.0
_EXTENSIONS = {"image/png": "png", "image/webp": "webp", "image/jpeg": "jpg"}


class ImagesNotStored(BlobStoreError):
    """The store refused a job's images for longer than the writer's bound (a full or read-only volume, a
    bucket that denies writes): the job cannot be delivered with them."""


class ImageWriter:
    """Puts a result's images into `blobs` and turns the result into one that names them. A store that stays
    unwritable for `give_up_after_s` fails the put (ImagesNotStored) rather than holding the job forever."""

    def __init__(self, blobs: BlobStore, worker_id: str, give_up_after_s: float = 60.0) -> None:
        self.blobs = blobs
        self._worker_id = worker_id
        self._give_up_after_s = give_up_after_s

    async def put(self, job: Job, result: JobResult, images: list[bytes]) -> JobResult:
        """Store `images` under this attempt's keys, retrying while the store is unreachable (a transient
        fault: the job stays in hand, its heartbeat alive) up to the bound; returns the result naming them."""
        attempt = f"{self._worker_id}-{uuid.uuid4().hex[:8]}"
        extension = _EXTENSIONS.get(result.media_type, "bin")
        keys = [result_key(job.result_ttl_s, job.id, attempt, n, extension) for n in range(len(images))]
        await self._retrying(job.id, keys, images, result.media_type)
        return result.model_copy(update={"image_keys": keys, "image_sizes": [len(image) for image in images]})

    async def _retrying(self, job_id: str, keys: list[str], images: list[bytes], media_type: str) -> None:
        delay, deadline = 0.1, time.monotonic() + self._give_up_after_s
        while True:
            try:
                puts = (self.blobs.put(key, image, media_type) for key, image in zip(keys, images, strict=True))
                await asyncio.gather(*puts)
                return
            except BlobStoreUnavailable as exc:
                if time.monotonic() >= deadline:
                    await self.discard_keys(keys)
                    raise ImagesNotStored(
                        f"the image store refused writes for {self._give_up_after_s:g}s: {exc}"
                    ) from exc
                logger.warning("job %s: storing its images failed (%s); retrying in %.1fs", job_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP_S)

    async def writable(self) -> str | None:
        """None if the store takes a small object now (written and removed again), else why not."""
        key = result_key(60, "write-probe", f"{self._worker_id}-{uuid.uuid4().hex[:8]}", 0, "bin")
        try:
            await self.blobs.put(key, b"probe", "application/octet-stream")
        except BlobStoreError as exc:
            return str(exc)
        await self.discard_keys([key])
        return None

    async def discard_keys(self, keys: list[str]) -> None:
        """Remove `keys`' objects, best effort (the sweep or the bucket's lifecycle rules take what is left)."""
        try:
            await self.blobs.delete(keys)
        except BlobStoreError as exc:
            logger.warning("objects %s stay until they expire (%s)", ", ".join(keys), exc)

    async def discard(self, result: JobResult) -> None:
        """Remove the objects of a result that was not stored (best effort: the sweep or the bucket's
        lifecycle rules remove what this cannot)."""
        if not result.image_keys:
            return
        try:
            await self.blobs.delete(result.image_keys)
        except BlobStoreError as exc:
            logger.warning("job %s: the dropped attempt's images stay until they expire (%s)", result.id, exc)

    async def sweep_forever(self, interval_s: float) -> None:
        """Remove expired objects of a file store every `interval_s` (an S3 bucket expires its own)."""
        if not isinstance(self.blobs, FileBlobStore):
            return
        while True:
            try:
                removed = await self.blobs.sweep()
                if removed:
                    logger.info("swept %d expired image files", removed)
            except BlobStoreError as exc:
                logger.warning("image sweep failed (%s); next in %.0fs", exc, interval_s)
            await asyncio.sleep(interval_s)
