"""Where generated images live when they do not live in Redis: a filesystem or an S3-compatible object store.

One small interface (`BlobStore`: put, get, exists, delete, presign) with two backends, chosen by URL:

- `file:///srv/sdxl-images`: a local directory, or a volume shared by the hosts (NFS, a Kubernetes
  ReadWriteMany volume). An object is written to a temporary name and renamed into place, so a reader never
  sees part of one. `FileBlobStore.sweep` removes expired objects; the workers run it.
- `s3://bucket/prefix?endpoint=http://host:port&region=...&timeout=30`: AWS S3, or any S3-compatible store (MinIO,
  SeaweedFS, Ceph, GCS's XML API) through obstore (common/s3blobstore.py, imported only when such a store is
  opened), whose Rust core brings its own retrying HTTP client, request signing and pre-signed URLs and ships
  type stubs. Credentials come from the environment
  (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, or an instance role), never from the URL.

Object keys begin with the lifetime of the result they belong to (`ttl-3600/...`): the file backend's sweep
reads it to know when an object has expired, and an S3 bucket's lifecycle rules expire each such prefix
(docs/operations.md). Any failure to reach the store is `BlobStoreUnavailable`, a transient fault.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

REDIS = "redis"  # the default: images stay in the result's Redis hash (no blob store)
_TMP = ".tmp-"  # the file backend's in-progress writes: never a key, never swept while young
PRESIGN_MAX_S = 7 * 24 * 3600  # S3 signatures (SigV4) are valid for at most a week


class BlobStoreError(Exception):
    """A blob store problem; the message says what and where."""


class BlobStoreUnavailable(BlobStoreError):
    """The store could not be reached or refused the request for now: retry later, nothing is lost."""


class BlobNotFound(BlobStoreError):
    """No object under this key (never written, expired, or removed)."""


class BlobStore(Protocol):
    """An object store for encoded images, keyed by `result_key`."""

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key`, whole or not at all."""

    async def get(self, key: str) -> bytes:
        """The object under `key`; BlobNotFound if there is none."""

    async def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove the objects under `keys`; a key without one is no error."""

    async def presign(self, key: str, expires_s: int) -> str | None:
        """A URL that fetches the object without credentials for `expires_s`, or None if the backend has
        no such URLs (the gateway streams the object instead)."""

    async def close(self) -> None:
        """Release connections and threads."""


def result_key(ttl_s: int, job_id: str, attempt: str, index: int, extension: str) -> str:
    """Where image `index` of one attempt at a job is kept. Each attempt writes its own keys, so a losing
    attempt's objects can be removed without touching the winner's."""
    return f"ttl-{ttl_s}/{job_id}/{attempt}/{index}.{extension}"


def ttl_of(key: str) -> int | None:
    """The result lifetime a key was written for (its `ttl-N/` prefix), or None for a foreign key."""
    head = key.split("/", 1)[0]
    number = head.removeprefix("ttl-")
    return int(number) if head.startswith("ttl-") and number.isdigit() else None


def check_url(url: str) -> None:
    """Raise BlobStoreError unless `url` names a store that `open_blob_store` can open."""
    if url == REDIS:
        return
    parts = urlsplit(url)
    if parts.scheme == "file":
        if not parts.path.startswith("/") or parts.netloc:
            raise BlobStoreError("a file store is an absolute path: file:///srv/sdxl-images")
    elif parts.scheme == "s3":
        if not parts.netloc:
            raise BlobStoreError("an S3 store names its bucket: s3://bucket/prefix")
        options = parse_qs(parts.query)
        unknown = set(options) - {"endpoint", "region", "timeout"}
        if unknown:
            raise BlobStoreError(f"unknown S3 option(s) {', '.join(sorted(unknown))} (endpoint, region, timeout)")
        timeout = options.get("timeout", ["30"])[-1]
        if not timeout.replace(".", "", 1).isdigit() or float(timeout) <= 0:
            raise BlobStoreError(f"the S3 timeout is seconds > 0, not {timeout!r}")
    else:
        raise BlobStoreError("must be redis, file:///path or s3://bucket/prefix")


def open_blob_store(url: str) -> BlobStore | None:
    """The store `url` names; None for `redis` (images kept in Redis). Raises BlobStoreError for a bad URL."""
    check_url(url)
    if url == REDIS:
        return None
    parts = urlsplit(url)
    if parts.scheme == "file":
        return FileBlobStore(Path(parts.path))
    options = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    timeout_s = float(options.get("timeout", 30))
    # obstore is imported only for an S3 store: a command that never opens one runs without it.
    from common.s3blobstore import S3BlobStore

    return S3BlobStore(
        parts.netloc,
        parts.path.strip("/"),
        options.get("endpoint"),
        options.get("region"),
        timeout_s=timeout_s,
        retry_timeout_s=min(20.0, 2 * timeout_s),
    )


class FileBlobStore:
    """Objects as files under `root`, one directory level per key segment."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if any(part in ("", ".", "..") or part.startswith(_TMP) for part in parts):
            raise BlobStoreError(f"not a valid object key: {key!r}")
        return self.root.joinpath(*parts)

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await self._io(self._write, self._path(key), data)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{_TMP}{uuid.uuid4().hex}-{path.name}")
        try:
            with open(partial, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())  # on disk before it has its name: a crash leaves no torn object
            os.replace(partial, path)  # atomic: a reader sees the whole object or none
        finally:
            partial.unlink(missing_ok=True)

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            data: bytes = await self._io(path.read_bytes)
        except BlobNotFound:
            raise BlobNotFound(f"no object {key}") from None
        return data

    async def exists(self, key: str) -> bool:
        found: bool = await self._io(self._path(key).is_file)
        return found

    async def delete(self, keys: Sequence[str]) -> None:
        paths = [self._path(key) for key in keys]
        await self._io(_unlink_all, paths)

    async def presign(self, key: str, expires_s: int) -> str | None:
        return None

    async def close(self) -> None:
        return None

    async def sweep(self, now: float | None = None) -> int:
        """Remove the objects whose result has expired (their `ttl-N/` prefix against the file's age), and
        write leftovers older than an hour; returns how many files went. Empty directories go too."""
        removed: int = await self._io(self._sweep, time.time() if now is None else now)
        return removed

    def _sweep(self, now: float) -> int:
        removed = 0
        if not self.root.is_dir():
            return 0
        for top in self.root.iterdir():
            ttl = ttl_of(top.name)
            if ttl is None or not top.is_dir():
                continue
            for directory, _dirs, files in os.walk(top, topdown=False):
                for name in files:
                    path = Path(directory, name)
                    limit = max(ttl, 3600) if name.startswith(_TMP) else ttl
                    removed += _remove_if_older(path, now - limit)
                _remove_if_empty(Path(directory))
        return removed

    @staticmethod
    async def _io(fn: Any, *args: Any) -> Any:
        """Run blocking file I/O on a thread; a missing file is BlobNotFound, any other OS error means the
        volume is not usable right now."""
        try:
            return await asyncio.to_thread(fn, *args)
        except FileNotFoundError as exc:
            raise BlobNotFound(str(exc)) from None
        except OSError as exc:
            raise BlobStoreUnavailable(f"file store: {exc}") from exc


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
    # An attempt's directory is its own (result_key): once empty, it goes. Directories above it may be in use
    # by another attempt's write; the sweep removes them when empty.
    for directory in {path.parent for path in paths}:
        _remove_if_empty(directory)


def _remove_if_older(path: Path, cutoff: float) -> int:
    try:
        if path.stat().st_mtime < cutoff:
            path.unlink()
            return 1
    except FileNotFoundError:  # another sweeper (another worker) took it first
        pass
    return 0


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:  # not empty, or already gone
        pass
