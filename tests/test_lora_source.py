"""A worker's LoRA adapters: the flags that configure them, the folder they come from, what the worker advertises
and what it does with a job naming one it does not offer."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common.blobstore import s3_location
from common.config import ConfigError
from common.protocol import LoraRef
from common.rediskeys import RedisKeys
from common.registry import Registry
from common.s3blobstore import S3BlobStore
from sdxl_serve.cli import build_parser
from testkit.objectstore import S3Server
from tests.protection import running_worker
from tests.support import RedisServer
from worker.cli import worker_config
from worker.config import WorkerConfig
from worker.lora import Adapter
from worker.lora_source import (
    LoraBucket,
    LoraFiles,
    LoraFolder,
    LoraSourceError,
    adapter_loader,
    open_lora_source,
    refusal,
)

MB = 1 << 20


def worker_flags(*argv: str) -> WorkerConfig:
    return worker_config(build_parser().parse_args(["worker", "--worker-id", "w", *argv]))


def adapter_file(folder: Path, name: str, size: int = 16) -> Path:
    path = folder / f"{name}.safetensors"
    path.write_bytes(b"\x01" * size)
    return path


def test_the_lora_flags_default_to_none_offered_and_read_into_the_config(tmp_path: Path) -> None:
    plain = worker_flags()
    assert (plain.lora_dir, plain.lora_cache, plain.max_loras, plain.lora_max_rank, plain.lora_max_mb) == (
        None,
        8,
        4,
        64,
        1024.0,
    )
    assert plain.offered_max_loras == 0  # no folder: a request may name none
    given = worker_flags(
        "--lora-dir", str(tmp_path), "--lora-cache", "3", "--max-loras", "2", "--lora-max-rank", "16",
        "--lora-max-mb", "5",
    )  # fmt: skip
    assert (given.lora_dir, given.lora_cache, given.max_loras, given.lora_max_rank, given.lora_max_mb) == (
        str(tmp_path),
        3,
        2,
        16,
        5.0,
    )
    assert given.offered_max_loras == 2
    assert worker_flags("--lora-dir", str(tmp_path), "--engine", "request").offered_max_loras == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lora-cache", "0"], "--lora-cache must be >= 1"),
        (["--max-loras", "0"], "--max-loras must be 1..8"),
        (["--max-loras", "9"], "--max-loras must be 1..8"),
        (["--lora-cache", "2", "--max-loras", "3"], "--max-loras must be <= --lora-cache"),
        (["--lora-max-rank", "0"], "--lora-max-rank must be >= 1"),
        (["--lora-max-mb", "0"], "--lora-max-mb must be > 0"),
    ],
)
def test_a_bad_lora_flag_is_named(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        worker_flags(*argv)


def test_a_missing_or_unreadable_lora_folder_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        worker_flags("--lora-dir", str(tmp_path / "absent"))
    assert str(missing.value) == (
        f"--lora-dir {tmp_path / 'absent'} is not a readable folder: create it, or name the folder (or "
        "s3://bucket/prefix) of the NAME.safetensors adapters"
    )
    a_file = adapter_file(tmp_path, "x")
    with pytest.raises(ConfigError, match=r"^--lora-dir .* is not a readable folder"):
        worker_flags("--lora-dir", str(a_file))


def test_the_folder_offers_adapter_files_by_stem_and_skips_other_names_with_one_line_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter_file(tmp_path, "pixel-art_v1.2")
    adapter_file(tmp_path, "ink")
    adapter_file(tmp_path, "bad name")  # a space: no request could name it
    adapter_file(tmp_path, ".hidden")
    (tmp_path / "notes.txt").write_text("not an adapter")
    (tmp_path / "folder.safetensors").mkdir()
    source = LoraFolder(tmp_path, MB)
    with caplog.at_level(logging.WARNING, logger="worker.lora_source"):
        assert source.scan() == ("ink", "pixel-art_v1.2")
        assert source.scan() == ("ink", "pixel-art_v1.2")
    skipped = [record.getMessage() for record in caplog.records]
    assert len(skipped) == 2 and all("skipped: its name is not an adapter name" in line for line in skipped)
    assert "bad name.safetensors" in skipped[0] + skipped[1] and ".hidden.safetensors" in skipped[0] + skipped[1]


async def test_a_rescan_offers_an_adapter_added_and_drops_one_removed(tmp_path: Path) -> None:
    adapter_file(tmp_path, "first")
    source = LoraFolder(tmp_path, MB)
    assert source.scan() == ("first",)
    adapter_file(tmp_path, "second")
    (tmp_path / "first.safetensors").unlink()
    assert await source.rescan() == ("second",) and source.names == ("second",)


def test_read_gives_the_file_and_refuses_one_over_the_bound(tmp_path: Path) -> None:
    adapter_file(tmp_path, "small", size=100)
    adapter_file(tmp_path, "big", size=MB + 1)
    source = LoraFolder(tmp_path, MB)
    assert source.read("small") == LoraFiles(b"\x01" * 100)
    with pytest.raises(LoraSourceError, match=r"adapter 'big': .*big.safetensors is 1.0 MB, over --lora-max-mb 1"):
        source.read("big")
    with pytest.raises(LoraSourceError, match=r"adapter 'gone': .* is gone"):
        source.read("gone")
    with pytest.raises(LoraSourceError, match="not an adapter name"):
        source.read("../small")


def peft_folder(folder: Path, name: str, weights: bytes = b"\x02" * 8, config: bytes | None = b"{}") -> Path:
    """A PEFT `save_pretrained` folder's two files (their contents are the reader's concern)."""
    path = folder / name
    path.mkdir()
    (path / "adapter_model.safetensors").write_bytes(weights)
    if config is not None:
        (path / "adapter_config.json").write_bytes(config)
    return path


def test_a_peft_folder_is_an_adapter_named_by_the_folder_and_read_with_its_config(tmp_path: Path) -> None:
    peft_folder(tmp_path, "peft-style", config=b'{"lora_alpha": 8}')
    peft_folder(tmp_path, "ink", weights=b"folder")  # beside ink.safetensors: the file is the adapter
    adapter_file(tmp_path, "ink", size=3)
    (tmp_path / "empty").mkdir()  # a folder with no adapter_model.safetensors is no adapter
    source = LoraFolder(tmp_path, MB)
    assert source.scan() == ("ink", "peft-style")
    assert source.read("peft-style") == LoraFiles(b"\x02" * 8, b'{"lora_alpha": 8}')
    assert source.read("ink") == LoraFiles(b"\x01" * 3)


def test_a_peft_folder_without_its_config_is_not_offered_and_logged_once_saying_what_to_add(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its alpha is in the config: without it the adapter cannot be read as trained, so it is not offered (rather
    than failing its jobs), until the config is copied in."""
    peft_folder(tmp_path, "no-config", config=None)
    peft_folder(tmp_path, "whole")
    source = LoraFolder(tmp_path, MB)
    with caplog.at_level(logging.WARNING, logger="worker.lora_source"):
        assert source.scan() == ("whole",)
        assert source.scan() == ("whole",)
    assert [record.getMessage() for record in caplog.records] == [
        f"LoRA folder {tmp_path}/no-config skipped: its adapter_model.safetensors has no adapter_config.json beside "
        "it, which holds the adapter's lora_alpha; copy in the adapter_config.json that PEFT's save_pretrained "
        "wrote with it"
    ]
    (tmp_path / "no-config" / "adapter_config.json").write_bytes(b"{}")
    assert source.scan() == ("no-config", "whole")
    assert source.read("no-config") == LoraFiles(b"\x02" * 8, b"{}")


def test_a_peft_config_gone_after_the_scan_or_over_the_bound_is_refused_naming_the_file(tmp_path: Path) -> None:
    peft_folder(tmp_path, "config-gone")
    peft_folder(tmp_path, "big-config", config=b" " * (MB + 1))
    source = LoraFolder(tmp_path, MB)
    assert source.scan() == ("big-config", "config-gone")
    (tmp_path / "config-gone" / "adapter_config.json").unlink()
    with pytest.raises(LoraSourceError, match=r"^adapter 'config-gone': .*/config-gone/adapter_config.json is gone$"):
        source.read("config-gone")
    with pytest.raises(LoraSourceError, match=r"adapter 'big-config': .*/big-config/adapter_config.json is 1.0 MB"):
        source.read("big-config")


def diffusers_folder(folder: Path, name: str, weights: bytes = b"\x03" * 8) -> Path:
    """The folder diffusers' `save_lora_weights` writes: `pytorch_lora_weights.safetensors` alone."""
    path = folder / name
    path.mkdir()
    (path / "pytorch_lora_weights.safetensors").write_bytes(weights)
    return path


def test_a_diffusers_folder_is_an_adapter_named_by_the_folder_and_read_as_a_lone_file(tmp_path: Path) -> None:
    diffusers_folder(tmp_path, "trained")
    both = diffusers_folder(tmp_path, "both", weights=b"diffusers")  # beside PEFT's files: diffusers' is read
    (both / "adapter_model.safetensors").write_bytes(b"peft")
    (both / "adapter_config.json").write_bytes(b"{}")
    diffusers_folder(tmp_path, "ink", weights=b"folder")  # beside ink.safetensors: the file is the adapter
    adapter_file(tmp_path, "ink", size=3)
    source = LoraFolder(tmp_path, MB)
    assert source.scan() == ("both", "ink", "trained")
    assert source.read("trained") == LoraFiles(b"\x03" * 8)
    assert source.read("both") == LoraFiles(b"diffusers")
    assert source.read("ink") == LoraFiles(b"\x01" * 3)


def test_the_engines_loader_parses_what_the_source_reads(tmp_path: Path) -> None:
    adapter_file(tmp_path, "ink", size=7)
    seen: list[tuple[str, LoraFiles]] = []

    def parse(name: str, files: LoraFiles) -> Adapter:
        seen.append((name, files))
        return Adapter(name=name, targets={})

    load = adapter_loader(LoraFolder(tmp_path, MB), parse)
    assert load("ink").name == "ink" and seen == [("ink", LoraFiles(b"\x01" * 7))]


def test_no_folder_no_source(tmp_path: Path) -> None:
    assert open_lora_source(WorkerConfig()) is None
    adapter_file(tmp_path, "ink")
    source = open_lora_source(WorkerConfig(lora_dir=str(tmp_path)))
    assert source is not None and source.names == ("ink",)


def test_refusal_names_the_adapter_or_the_count() -> None:
    loras = [LoraRef(name="ink"), LoraRef(name="oil")]
    assert refusal(loras, ["ink", "oil"], 2) is None
    assert refusal([], [], 0) is None
    assert refusal(loras, ["ink"], 4) == "loras[1].name: adapter 'oil' is not offered by this worker"
    assert refusal(loras, ["ink", "oil"], 1) == "loras: 2 adapters named; this worker applies at most 1 per request"


async def published_loras(registry: Registry, wanted: list[str], timeout_s: float = 10.0) -> list[str]:
    """The worker's published `loras` once a heartbeat has carried `wanted` (or whatever it says at the deadline)."""
    loras: list[str] = []
    for _ in range(int(timeout_s / 0.05)):
        (published,) = await registry.workers()
        if (loras := published.loras) == wanted:
            break
        await asyncio.sleep(0.05)  # a heartbeat is due every 0.5 s: polled, as Redis does not announce it
    return loras


async def test_the_worker_advertises_its_folder_and_picks_up_an_adapter_added_while_it_runs(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    adapter_file(tmp_path, "ink")
    registry = Registry(redis_client, RedisKeys())
    async with running_worker(redis_server.url(0), "lora-worker", lora_dir=str(tmp_path), max_loras=3) as worker:
        (published,) = await registry.workers()
        assert (published.loras, published.loras_loaded, published.max_loras) == (["ink"], [], 3)
        worker.presence.loaded_by(lambda: ["ink"])
        adapter_file(tmp_path, "oil")
        assert await published_loras(registry, ["ink", "oil"]) == ["ink", "oil"]
        (published,) = await registry.workers()
        assert published.loras_loaded == ["ink"]


async def test_a_worker_without_a_folder_advertises_no_adapters(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with running_worker(redis_server.url(0), "plain-worker") as worker:
        assert (worker.info.loras, worker.info.loras_loaded, worker.info.max_loras) == ([], [], 0)
        (published,) = await Registry(redis_client, RedisKeys()).workers()
        assert published.max_loras == 0


async def put_adapters(server: S3Server, prefix: str, files: dict[str, bytes]) -> str:
    """Upload `files` under `prefix` of bucket `loras` on the test S3 server; the source's URL."""
    url = server.url("loras", prefix)
    store = S3BlobStore(s3_location(url))
    for key, data in files.items():
        await store.put(key, data, "application/octet-stream")
    return url


async def test_an_s3_prefix_offers_its_adapters_to_every_host_that_names_it(s3_env: S3Server, tmp_path: Path) -> None:
    """The objects directly under the prefix, by stem; nested objects and other names are not adapters. Two sources
    (two hosts) naming the prefix offer the same set, and one added later is offered at the next scan."""
    files = {"ink.safetensors": b"\x01" * 10, "bad name.safetensors": b"", "deeper/oil.safetensors": b"", "x.txt": b""}
    url = await put_adapters(s3_env, f"set-{tmp_path.name}", files)
    one, other = LoraBucket(url, MB), open_lora_source(WorkerConfig(lora_dir=url))
    assert isinstance(other, LoraBucket)
    assert one.scan() == other.names == ("ink",)
    assert one.read("ink") == LoraFiles(b"\x01" * 10)
    await put_adapters(s3_env, f"set-{tmp_path.name}", {"pixel-art.safetensors": b"\x02"})
    assert await one.rescan() == ("ink", "pixel-art")


async def test_an_s3_prefix_offers_peft_and_diffusers_folders_by_their_name_as_a_folder_does(
    s3_env: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = {
        "peft-style/adapter_model.safetensors": b"\x02" * 4,
        "peft-style/adapter_config.json": b'{"lora_alpha": 2}',
        "trained/pytorch_lora_weights.safetensors": b"\x03" * 4,
        "no-config/adapter_model.safetensors": b"\x04",
        "deeper/still/adapter_model.safetensors": b"",
        "deeper/still/pytorch_lora_weights.safetensors": b"",
    }
    url = await put_adapters(s3_env, f"peft-{tmp_path.name}", files)
    source = LoraBucket(url, MB)
    with caplog.at_level(logging.WARNING, logger="worker.lora_source"):
        assert source.scan() == ("peft-style", "trained")
        assert source.scan() == ("peft-style", "trained")
    assert [record.getMessage() for record in caplog.records] == [
        f"LoRA folder {url.split('?')[0]}/no-config skipped: its adapter_model.safetensors has no adapter_config.json "
        "beside it, which holds the adapter's lora_alpha; copy in the adapter_config.json that PEFT's save_pretrained "
        "wrote with it"
    ]
    assert source.read("peft-style") == LoraFiles(b"\x02" * 4, b'{"lora_alpha": 2}')
    assert source.read("trained") == LoraFiles(b"\x03" * 4)
    await put_adapters(s3_env, f"peft-{tmp_path.name}", {"no-config/adapter_config.json": b"{}"})
    assert await source.rescan() == ("no-config", "peft-style", "trained")


async def test_an_s3_adapter_over_the_bound_or_gone_is_refused_by_name(s3_env: S3Server, tmp_path: Path) -> None:
    url = await put_adapters(s3_env, f"bound-{tmp_path.name}", {"big.safetensors": b"\x01" * (MB + 1)})
    source = LoraBucket(url, MB)
    with pytest.raises(LoraSourceError, match=r"adapter 'big': s3://loras/.*/big.safetensors is 1.0 MB, over"):
        source.read("big")
    with pytest.raises(LoraSourceError, match=r"adapter 'gone': s3://loras/.*/gone.safetensors is gone"):
        source.read("gone")


def test_an_s3_lora_dir_is_checked_at_start_in_one_line() -> None:
    assert WorkerConfig(lora_dir="s3://loras/set?endpoint=http://127.0.0.1:1").lora_dir is not None
    with pytest.raises(ConfigError, match=r"^--lora-dir s3://: an S3 store names its bucket"):
        worker_flags("--lora-dir", "s3://")
    with pytest.raises(ConfigError, match=r"^--lora-dir s3://b/p: unknown S3 option\(s\) color"):
        worker_flags("--lora-dir", "s3://b/p?color=red")


def test_an_unreachable_s3_prefix_offers_none_until_it_answers(tmp_path: Path) -> None:
    source = LoraBucket("s3://loras/set?endpoint=http://127.0.0.1:9&timeout=0.5", MB)
    assert source.scan() == ()
