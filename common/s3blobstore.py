"""The S3 backend of common/blobstore.py, through obstore: a module of its own so that only a process that opens an
S3 store imports obstore (a GPU image running the benchmarks has none)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import S3Store

from common.blobstore import PRESIGN_MAX_S, BlobNotFound, BlobStoreUnavailable, S3Location


def s3_store(location: S3Location) -> S3Store:
    """An obstore client for `location`: its own region or the environment's, a path-style endpoint when one is
    given, bounded timeouts and retries (credentials from the environment, as obstore reads them)."""
    config: dict[str, Any] = {"region": location.region or os.environ.get("AWS_REGION") or "us-east-1"}
    endpoint = location.endpoint
    if endpoint:
        # An S3-compatible server at its own address serves buckets as paths, usually over plain HTTP
        # inside the cluster.
        config.update(endpoint=endpoint, virtual_hosted_style_request=False)
    timeout_s = location.timeout_s
    return S3Store(
        location.bucket,
        prefix=location.prefix or None,
        client_options={
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
            "timeout": timedelta(seconds=timeout_s),
            "connect_timeout": timedelta(seconds=min(timeout_s, 5.0)),
        },
        retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=location.retry_timeout_s)},
        **config,
    )


class S3BlobStore:
    """Objects in an S3 bucket under a prefix, through obstore."""

    def __init__(self, location: S3Location) -> None:
        self.bucket = location.bucket
        self._store = s3_store(location)

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await self._call(obstore.put_async(self._store, key, data, attributes={"Content-Type": content_type}))

    async def get(self, key: str) -> bytes:
        result = await self._call(obstore.get_async(self._store, key), key)
        return bytes(await self._call(result.bytes_async(), key))

    async def exists(self, key: str) -> bool:
        try:
            await self._call(obstore.head_async(self._store, key), key)
        except BlobNotFound:
            return False
        return True

    async def delete(self, keys: Sequence[str]) -> None:
        if keys:
            await self._call(obstore.delete_async(self._store, list(keys)))

    async def presign(self, key: str, expires_s: int) -> str | None:
        expires = timedelta(seconds=min(expires_s, PRESIGN_MAX_S))
        url: str = await self._call(obstore.sign_async(self._store, "GET", key, expires))
        return url

    async def close(self) -> None:
        return None

    @staticmethod
    async def _call(operation: Any, key: str | None = None) -> Any:
        """Await an obstore call, sorting its errors: a missing object, or the store unreachable."""
        try:
            return await operation
        except (NotFoundError, FileNotFoundError):
            raise BlobNotFound(f"no object {key}") from None
        except BaseError as exc:
            raise BlobStoreUnavailable(f"S3 store: {exc}") from exc
