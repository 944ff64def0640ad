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
import contextlib
import errno
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

REDIS = "redis"  # the default: images stay in the result's Redis hash (no blob store)
_TMP = ".tmp-"  # the file backend's in-progress writes: never a key, never swept while young
PRESIGN_MAX_S = 7 * 24 * 3600  # S3 signatures (SigV4) are valid for at most a week
# Opening a key's directories and files: a symbolic link is an error (ELOOP), never followed.
_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_OURS = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)  # a path gone, or through a link (or a file)


class BlobStoreError(Exception):
    """A blob store problem; the message says what and where."""


class BlobStoreUnavailable(BlobStoreError):
    """The store could not be reached or refused the request for now: retry later, nothing is lost."""


class BlobStoreMismatch(BlobStoreError):
    """A result names objects in a blob store this process is not configured with: `--blob-store` differs
    between the processes of one cluster."""


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
    # obstore is imported only for an S3 store: a command that never opens one runs without it.
    from common.s3blobstore import S3BlobStore

    return S3BlobStore(s3_location(url))


@dataclass(frozen=True)
class S3Location:
    """Where an `s3://bucket/prefix?endpoint=...&region=...&timeout=...` URL points, and how long to wait on it."""

    bucket: str
    prefix: str
    endpoint: str | None
    region: str | None
    timeout_s: float = 30.0
    retry_timeout_s: float = 20.0  # all of one call's retries


def s3_location(url: str) -> S3Location:
    """The parts of an S3 store's URL, checked (BlobStoreError names what is wrong)."""
    check_url(url)
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise BlobStoreError("an S3 location is s3://bucket/prefix")
    options = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    timeout_s = float(options.get("timeout", 30))
    return S3Location(
        bucket=parts.netloc,
        prefix=parts.path.strip("/"),
        endpoint=options.get("endpoint"),
        region=options.get("region"),
        timeout_s=timeout_s,
        retry_timeout_s=min(20.0, 2 * timeout_s),
    )


class FileBlobStore:
    """Objects as files under `root`, one directory level per key segment.

    No symbolic link below `root` is ever followed: each directory of a key is opened with O_NOFOLLOW, relative
    to the one above it, and the sweep walks by descriptors without following links (os.fwalk). A link planted
    in the store could otherwise point a read, a write or the sweep's deletions at files outside it. `root`
    itself may be a link (an operator's choice of volume).
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def _parts(key: str) -> list[str]:
        parts = key.split("/")
        if any(part in ("", ".", "..") or part.startswith(_TMP) for part in parts):
            raise BlobStoreError(f"not a valid object key: {key!r}")
        return parts

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            await self._io(_write, self.root, self._parts(key), data)
        except LinkRefused as exc:
            raise LinkRefused(f"file store: not storing {key}: {exc}") from None

    async def get(self, key: str) -> bytes:
        try:
            data: bytes = await self._io(_read, self.root, self._parts(key))
        except (BlobNotFound, LinkRefused) as exc:
            raise BlobNotFound(f"no object {key}{_why_not(exc)}") from None
        return data

    async def exists(self, key: str) -> bool:
        try:
            found: bool = await self._io(_is_file, self.root, self._parts(key))
        except (BlobNotFound, LinkRefused):
            return False
        return found

    async def delete(self, keys: Sequence[str]) -> None:
        await self._io(_unlink_all, self.root, [self._parts(key) for key in keys])

    async def presign(self, key: str, expires_s: int) -> str | None:
        return None

    async def close(self) -> None:
        return None

    async def sweep(self, now: float | None = None) -> int:
        """Remove the objects whose result has expired (their `ttl-N/` prefix against the file's age), and
        write leftovers older than an hour; returns how many files went. Empty directories go too; a link
        is never followed (one that has expired goes itself, never what it points at)."""
        removed: int = await self._io(_sweep, self.root, time.time() if now is None else now)
        return removed

    @staticmethod
    async def _io(fn: Any, *args: Any) -> Any:
        """Run blocking file I/O on a thread; a missing file is BlobNotFound, a link in the way LinkRefused,
        any other OS error means the volume is not usable right now."""
        try:
            return await asyncio.to_thread(fn, *args)
        except FileNotFoundError as exc:
            raise BlobNotFound(str(exc)) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise LinkRefused(f"{exc.filename!r} on its path is a symbolic link (never followed)") from None
            raise BlobStoreUnavailable(f"file store: {exc}") from exc


class LinkRefused(BlobStoreError):
    """A key's path in a file store runs through a symbolic link (or a file where a directory should be): the
    store never follows one, and stores nothing through one."""


def _why_not(exc: BlobStoreError) -> str:
    return f" ({exc})" if isinstance(exc, LinkRefused) else ""


def _open_dir(root: Path, parts: Sequence[str], create: bool = False) -> int:
    """A descriptor of the directory `root/parts...`, each level opened relative to the one above without
    following a link; `create` makes the missing levels. The caller closes it."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            child = os.open(part, _DIR_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write(root: Path, parts: list[str], data: bytes) -> None:
    root.mkdir(parents=True, exist_ok=True)
    directory = _open_dir(root, parts[:-1], create=True)
    partial = f"{_TMP}{uuid.uuid4().hex}-{parts[-1]}"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_NOFOLLOW, 0o644, dir_fd=directory)
        with open(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # on disk before it has its name: a crash leaves no torn object
        # Atomic, and a link already under the name is replaced, never written through.
        os.replace(partial, parts[-1], src_dir_fd=directory, dst_dir_fd=directory)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial, dir_fd=directory)
        os.close(directory)


def _read(root: Path, parts: list[str]) -> bytes:
    directory = _open_dir(root, parts[:-1])
    try:
        fd = os.open(parts[-1], os.O_RDONLY | _FILE_NOFOLLOW, dir_fd=directory)
    finally:
        os.close(directory)
    with open(fd, "rb") as file:
        return file.read()


def _is_file(root: Path, parts: list[str]) -> bool:
    directory = _open_dir(root, parts[:-1])
    try:
        return stat.S_ISREG(os.stat(parts[-1], dir_fd=directory, follow_symlinks=False).st_mode)
    finally:
        os.close(directory)


def _unlink_all(root: Path, keys: list[list[str]]) -> None:
    for parts in keys:
        _unlink(root, parts[:-1], lambda name, directory: os.unlink(name, dir_fd=directory), parts[-1])
    # An attempt's directory is its own (result_key): once empty, it goes. Directories above it may be in use
    # by another attempt's write; the sweep removes them when empty.
    for parent in {tuple(parts[:-1]) for parts in keys if len(parts) > 1}:
        _unlink(root, parent[:-1], _remove_if_empty, parent[-1])


def _unlink(root: Path, parents: Sequence[str], remove: Callable[[str, int], None], name: str) -> None:
    """`remove(name, directory)` in `root/parents...`; nothing when that is gone, or reached only through a link
    (what is behind one is not the store's)."""
    try:
        directory = _open_dir(root, parents)
    except OSError as exc:
        if exc.errno in _NOT_OURS:
            return
        raise
    try:
        with contextlib.suppress(FileNotFoundError):
            remove(name, directory)
    finally:
        os.close(directory)


def _sweep(root: Path, now: float) -> int:
    if not root.is_dir():
        return 0
    removed = 0
    top_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for top in os.listdir(top_fd):
            ttl = ttl_of(top)
            if ttl is None:
                continue
            # Bottom up, by descriptors, never following a link (a linked `ttl-N` is not walked at all).
            for _path, dirs, files, directory in os.fwalk(top, topdown=False, follow_symlinks=False, dir_fd=top_fd):
                for name in files:
                    limit = max(ttl, 3600) if name.startswith(_TMP) else ttl
                    removed += _remove_if_older(name, directory, now - limit)
                for name in dirs:
                    _remove_if_empty(name, directory)
            _remove_if_empty(top, top_fd)
    finally:
        os.close(top_fd)
    return removed


def _remove_if_older(name: str, directory: int, cutoff: float) -> int:
    try:
        if os.stat(name, dir_fd=directory, follow_symlinks=False).st_mtime < cutoff:
            os.unlink(name, dir_fd=directory)  # a link goes itself, never what it points at
            return 1
    except FileNotFoundError:  # another sweeper (another worker) took it first
        pass
    return 0


def _remove_if_empty(name: str, directory: int) -> None:
    try:
        os.rmdir(name, dir_fd=directory)  # refuses a link (ENOTDIR): nothing behind one is touched
    except OSError:  # not empty, already gone, or not a directory
        pass
