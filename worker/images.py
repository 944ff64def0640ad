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
import uuid

from common.blobstore import BlobStore, BlobStoreError, BlobStoreUnavailable, FileBlobStore, result_key
from common.protocol import Job, JobResult

logger = logging.getLogger(__name__)

RETRY_CAP_S = 5.0
_EXTENSIONS = {"image/png": "png", "image/webp": "webp", "image/jpeg": "jpg"}


class ImageWriter:
    """Puts a result's images into `blobs` and turns the result into one that names them."""

    def __init__(self, blobs: BlobStore, worker_id: str) -> None:
        self.blobs = blobs
        self._worker_id = worker_id

    async def put(self, job: Job, result: JobResult, images: list[bytes]) -> JobResult:
        """Store `images` under this attempt's keys, retrying while the store is unreachable (a transient
        fault: the job stays in hand, its heartbeat alive); returns the result naming them."""
        attempt = f"{self._worker_id}-{uuid.uuid4().hex[:8]}"
        extension = _EXTENSIONS.get(result.media_type, "bin")
        keys = [result_key(job.result_ttl_s, job.id, attempt, n, extension) for n in range(len(images))]
        await self._retrying(job.id, keys, images, result.media_type)
        return result.model_copy(update={"image_keys": keys, "image_sizes": [len(image) for image in images]})

    async def _retrying(self, job_id: str, keys: list[str], images: list[bytes], media_type: str) -> None:
        delay = 0.1
        while True:
            try:
                puts = (self.blobs.put(key, image, media_type) for key, image in zip(keys, images, strict=True))
                await asyncio.gather(*puts)
                return
            except BlobStoreUnavailable as exc:
                logger.warning("job %s: storing its images failed (%s); retrying in %.1fs", job_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP_S)

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
