"""The blob store's two backends against real storage: a directory, and SeaweedFS's S3 gateway (no mocks)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from common.blobstore import (
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    BlobStoreUnavailable,
    FileBlobStore,
    S3Location,
    check_url,
    open_blob_store,
    result_key,
    ttl_of,
)
from common.s3blobstore import S3BlobStore
from testkit.objectstore import S3Server

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64


@pytest.fixture(params=["file", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "file":
        opened = open_blob_store(f"file://{tmp_path}")
    else:
        server: S3Server = request.getfixturevalue("s3_env")
        opened = open_blob_store(server.url("images", f"run-{tmp_path.name}"))
    assert opened is not None
    yield opened
    await opened.close()


async def test_an_object_is_stored_read_and_removed(store: BlobStore) -> None:
    key = result_key(3600, "a" * 32, "worker-1-abc", 0, "png")
    assert not await store.exists(key)
    await store.put(key, PNG, "image/png")
    assert await store.exists(key)
    assert await store.get(key) == PNG
    await store.delete([key, result_key(3600, "a" * 32, "worker-1-abc", 1, "png")])  # one never written
    assert not await store.exists(key)
    with pytest.raises(BlobNotFound):
        await store.get(key)


async def test_a_rewrite_replaces_the_object_whole(store: BlobStore) -> None:
    key = result_key(60, "b" * 32, "w", 0, "webp")
    await store.put(key, b"first", "image/webp")
    await store.put(key, PNG, "image/webp")
    assert await store.get(key) == PNG


async def test_a_presigned_url_fetches_the_object_without_credentials(s3_env: S3Server) -> None:
    store = open_blob_store(s3_env.url("images", "presign"))
    assert store is not None
    key = result_key(60, "c" * 32, "w", 0, "png")
    await store.put(key, PNG, "image/png")
    url = await store.presign(key, 60)
    assert url is not None and "X-Amz-Signature=" in url
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "image/png"
            assert await response.read() == PNG
        async with session.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")) as response:
            assert response.status == 403  # the signature is what grants access


async def test_the_file_store_has_no_presigned_urls(tmp_path: Path) -> None:
    assert await FileBlobStore(tmp_path).presign(result_key(60, "d" * 32, "w", 0, "png"), 60) is None


async def test_an_unreachable_s3_store_is_a_transient_fault(s3_env: S3Server) -> None:
    store = S3BlobStore(S3Location("images", "down", s3_env.endpoint, None, timeout_s=0.5, retry_timeout_s=1.0))
    s3_env.pause()
    try:
        with pytest.raises(BlobStoreUnavailable, match="S3 store"):
            await store.put(result_key(60, "e" * 32, "w", 0, "png"), PNG, "image/png")
    finally:
        s3_env.resume()
    await store.put(result_key(60, "e" * 32, "w", 0, "png"), PNG, "image/png")  # and once it is back, it works


async def test_a_file_write_is_never_seen_in_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The object appears under its name only once whole: the write goes to a temporary name first."""
    store = FileBlobStore(tmp_path)
    key = result_key(60, "f" * 32, "w", 0, "png")
    seen: list[list[str]] = []
    original = os.replace

    def spy(src: str, dst: str, *, src_dir_fd: int, dst_dir_fd: int) -> None:
        seen.append(sorted(os.listdir(dst_dir_fd)))
        with open(os.open(src, os.O_RDONLY, dir_fd=src_dir_fd), "rb") as partial:
            assert partial.read() == PNG  # whole before it is renamed
        original(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "replace", spy)
    await store.put(key, PNG, "image/png")
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(".tmp-")  # only the partial, then
    assert sorted(p.name for p in (tmp_path / "ttl-60" / ("f" * 32) / "w").iterdir()) == ["0.png"]


async def test_the_file_store_sweeps_objects_whose_result_expired(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    short, long = result_key(60, "g" * 32, "w", 0, "png"), result_key(3600, "h" * 32, "w", 0, "png")
    await store.put(short, PNG, "image/png")
    await store.put(long, PNG, "image/png")
    (tmp_path / "unrelated.txt").write_text("not ours")
    now = (tmp_path / short).stat().st_mtime
    assert await store.sweep(now + 30) == 0
    assert await store.sweep(now + 61) == 1
    assert not await store.exists(short) and await store.exists(long)
    assert not (tmp_path / "ttl-60" / ("g" * 32)).exists()  # empty directories go with their objects
    assert await store.sweep(now + 3601) == 1
    assert (tmp_path / "unrelated.txt").exists()


def test_keys_carry_their_results_lifetime() -> None:
    key = result_key(3600, "i" * 32, "worker-1-abc", 2, "webp")
    assert key == f"ttl-3600/{'i' * 32}/worker-1-abc/2.webp"
    assert ttl_of(key) == 3600
    assert ttl_of("other/x.png") is None


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("file://relative/dir", "absolute path"),
        ("s3:///prefix", "names its bucket"),
        ("s3://bucket/p?endpont=http://x", "unknown S3 option"),
        ("gs://bucket", "must be redis, file:///path or s3://bucket/prefix"),
    ],
)
def test_a_bad_store_url_is_refused_naming_the_rule(url: str, rule: str) -> None:
    with pytest.raises(BlobStoreError, match=rule):
        check_url(url)


async def test_a_file_key_cannot_leave_the_root(tmp_path: Path) -> None:
    with pytest.raises(BlobStoreError, match="not a valid object key"):
        await FileBlobStore(tmp_path).put("ttl-60/../../etc/x", PNG, "image/png")


def names_under(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*"))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the store with a file in it, old enough for any sweep to remove were it the store's."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "w").mkdir(parents=True)
    for path in (elsewhere / "0.png", elsewhere / "w" / "0.png"):
        path.write_bytes(PNG)
        os.utime(path, (0, 0))
    return elsewhere


async def test_the_sweep_never_follows_a_link_out_of_the_store(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "store"
    store = FileBlobStore(root)
    await store.put(result_key(60, "j" * 32, "w", 0, "png"), PNG, "image/png")
    (root / "ttl-120").symlink_to(outside)  # a linked top-level entry
    (root / "ttl-60" / ("k" * 32)).symlink_to(outside)  # a linked job directory
    (root / "ttl-60" / ("j" * 32) / "w" / "1.png").symlink_to(outside / "0.png")  # a linked object
    assert await store.sweep(time.time() + 3600) == 2  # the real object and the link to a file, itself
    assert names_under(outside) == ["0.png", "0.png", "w"]
    assert (root / "ttl-120").is_symlink() and (root / "ttl-60" / ("k" * 32)).is_symlink()


async def test_a_link_in_the_store_is_never_read_or_written_through(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "store"
    (root / "ttl-60").mkdir(parents=True)
    (root / "ttl-60" / ("l" * 32)).symlink_to(outside)
    (root / "ttl-60" / ("m" * 32)).mkdir()
    (root / "ttl-60" / ("m" * 32) / "w").symlink_to(outside / "w", target_is_directory=True)
    (root / "ttl-60" / ("n" * 32)).mkdir()
    (root / "ttl-60" / ("n" * 32) / "0.png").symlink_to(outside / "0.png")
    store = FileBlobStore(root)
    for key in (
        result_key(60, "l" * 32, "w", 0, "png"),
        result_key(60, "m" * 32, "w", 0, "png"),
        f"ttl-60/{'n' * 32}/0.png",
    ):
        with pytest.raises(BlobNotFound, match="symbolic link"):
            await store.get(key)
        assert not await store.exists(key)
    for key in (result_key(60, "l" * 32, "w", 1, "png"), result_key(60, "m" * 32, "w", 1, "png")):
        with pytest.raises(BlobStoreError, match="symbolic link") as refused:
            await store.put(key, b"new", "image/png")
        assert not isinstance(refused.value, BlobStoreUnavailable)  # not a fault to retry
    assert names_under(outside) == ["0.png", "0.png", "w"]
    await store.delete([result_key(60, "m" * 32, "w", 0, "png")])
    assert (outside / "w" / "0.png").exists()
