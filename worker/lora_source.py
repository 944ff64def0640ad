"""Where a worker's LoRA adapters come from (`--lora-dir`): a folder of `NAME.safetensors` files, or the same files
under a prefix of an S3 bucket, which every host of a cluster can name. An adapter may also be a folder `NAME/`:

- diffusers' (`save_lora_weights`, its training scripts): `NAME/pytorch_lora_weights.safetensors`, read as a lone
  file (its alpha in its own header);
- PEFT's `save_pretrained`: `NAME/adapter_model.safetensors` beside `NAME/adapter_config.json`, which holds its
  alpha; without that config the alpha is unknown, so such a folder is not offered (one log line saying what to add).

Where both `NAME.safetensors` and `NAME/` are there, the file is the adapter; a folder holding both diffusers' and
PEFT's weights is read as diffusers'.

The adapters offered are the files' stems (the folders' names) that are valid adapter names (`LORA_NAME_PATTERN`);
any other file is skipped, with one log line per name. The folder is listed again at every heartbeat (`rescan`), so
an adapter copied in is offered without a restart and one removed stops being offered. A file is read whole only
when the engine loads it into its device pool (`read`), up to `--lora-max-mb`.

The engine loads an adapter through `adapter_loader(source, parse)`: the `LoraFiles` `read` returns, parsed by
worker/lora_files.py's reader with the pipeline's layers bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.blobstore import s3_location
from common.protocol import LORA_NAME_PATTERN, LoraRef
from worker.config import WorkerConfig
from worker.lora import Adapter
from worker.lora_scale import DIFFUSERS_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
_NAME = re.compile(LORA_NAME_PATTERN)
_MB = 1 << 20
# The files of a folder adapter that a listing names (`NAME/<file>`).
FOLDER_FILES = (DIFFUSERS_WEIGHTS, PEFT_WEIGHTS, PEFT_CONFIG)


class LoraSourceError(Exception):
    """An adapter that cannot be read: not offered, gone, unreadable or too large. The message names it."""


@dataclass(frozen=True)
class LoraFiles:
    """An adapter's bytes: its safetensors file, and a PEFT folder's `adapter_config.json` (None for a lone file)."""

    weights: bytes
    config: bytes | None = None


class LoraSource:
    """The adapters of one place: `names` as of the last `scan`, and each one's bytes on `read`. A backend lists the
    files there, as paths relative to it (`_list`: `NAME.safetensors`, and a folder's `NAME/<file>` of
    `FOLDER_FILES`), and reads one file, bounded (`_read`). Which listed files are adapters is decided here, the same
    for every backend."""

    def __init__(self, where: str, max_bytes: int) -> None:
        self.where = where
        self.max_bytes = max_bytes
        self.names: tuple[str, ...] = ()
        self._weights: dict[str, str] = {}  # each adapter's safetensors file, as of the last scan
        self._skipped: set[str] = set()  # files already logged as skipped: logged once each

    def scan(self) -> tuple[str, ...]:
        """List the place again: the adapters offered from now on, sorted. A place that cannot be listed (removed,
        unreachable) offers none until it is back."""
        try:
            entries = self._list()
        except (OSError, LoraSourceError) as exc:
            if self.names:
                logger.warning("LoRA adapters at %s cannot be listed (%s); offering none", self.where, exc)
            entries = []
        listed = frozenset(entries)
        weights: dict[str, str] = {}
        for entry in sorted(listed, key=lambda entry: "/" in entry):  # a lone file before a folder of its name
            name = self._adapter_name(entry, listed)
            if name is not None:
                weights.setdefault(name, entry)
        self._weights = weights
        self.names = tuple(sorted(weights))
        return self.names

    async def rescan(self) -> tuple[str, ...]:
        """`scan` off the event loop."""
        return await asyncio.to_thread(self.scan)

    def _adapter_name(self, filename: str, listed: Collection[str]) -> str | None:
        """The adapter `filename` (one of the place's `listed` files) is the weights of, if any."""
        folder, _, inner = filename.rpartition("/")
        if not folder:
            stem = filename[: -len(SUFFIX)] if filename.endswith(SUFFIX) else None
        elif "/" in folder or inner not in (DIFFUSERS_WEIGHTS, PEFT_WEIGHTS):
            stem = None
        elif inner == PEFT_WEIGHTS and f"{folder}/{DIFFUSERS_WEIGHTS}" in listed:
            stem = None  # diffusers' file is the folder's adapter
        else:
            stem = folder
        if stem is None or not self._valid_name(filename, stem):
            return None
        if folder and inner == PEFT_WEIGHTS and f"{folder}/{PEFT_CONFIG}" not in listed:
            self._skip(
                filename,
                "LoRA folder %s/%s skipped: its %s has no %s beside it, which holds the adapter's lora_alpha; copy in "
                "the %s that PEFT's save_pretrained wrote with it",
                folder, PEFT_WEIGHTS, PEFT_CONFIG, PEFT_CONFIG,
            )  # fmt: skip
            return None
        return stem

    def _valid_name(self, filename: str, stem: str) -> bool:
        if _NAME.fullmatch(stem) is not None:
            return True
        self._skip(
            filename, "LoRA file %s/%s skipped: its name is not an adapter name (%s)", filename, LORA_NAME_PATTERN
        )
        return False

    def _skip(self, filename: str, message: str, what: str, *details: str) -> None:
        """Log why `filename` is not an adapter, once per file: the place is listed again at every heartbeat."""
        if filename not in self._skipped:
            self._skipped.add(filename)
            logger.warning(message, self.where.rstrip("/"), what, *details)

    def read(self, name: str) -> LoraFiles:
        """The bytes of adapter `name`'s files; LoraSourceError when it is not offered, unreadable or larger than
        `max_bytes`."""
        if _NAME.fullmatch(name) is None:
            raise LoraSourceError(f"adapter {name!r}: not an adapter name")
        weights = self._weights.get(name, f"{name}{SUFFIX}")
        if not weights.endswith(f"/{PEFT_WEIGHTS}"):
            return LoraFiles(self._bounded(name, weights))
        return LoraFiles(self._bounded(name, weights), self._bounded(name, f"{name}/{PEFT_CONFIG}"))

    def _bounded(self, name: str, path: str) -> bytes:
        data = self._read(name, path)
        if len(data) > self.max_bytes:  # bounded reads stop one byte past the bound: a file that grew meanwhile
            raise LoraSourceError(self._too_large(name, path, len(data)))
        return data

    def _too_large(self, name: str, path: str, size: int) -> str:
        return f"adapter {name!r}: {self._at(path)} is {size / _MB:.1f} MB, over --lora-max-mb {self.max_bytes / _MB:g}"

    def _at(self, path: str) -> str:
        return f"{self.where.rstrip('/')}/{path}"

    def _list(self) -> list[str]:
        raise NotImplementedError

    def _read(self, name: str, path: str) -> bytes:
        """The file at `path` (relative to the place) of adapter `name`, at most `max_bytes` and one more."""
        raise NotImplementedError


class LoraFolder(LoraSource):
    """A folder of `NAME.safetensors` files on this host (or a volume every host mounts)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        super().__init__(str(folder), max_bytes)
        self.folder = folder

    def _list(self) -> list[str]:
        entries = []
        for entry in os.scandir(self.folder):
            if entry.is_file():
                entries.append(entry.name)
            elif entry.is_dir():
                inside = (f"{entry.name}/{inner}" for inner in FOLDER_FILES)
                entries.extend(path for path in inside if os.path.isfile(os.path.join(self.folder, path)))
        return entries

    def _read(self, name: str, relative: str) -> bytes:
        path = self.folder / relative
        try:
            with path.open("rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size > self.max_bytes:
                    raise LoraSourceError(self._too_large(name, relative, size))
                return file.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise LoraSourceError(f"adapter {name!r}: {path} is gone") from None
        except OSError as exc:
            raise LoraSourceError(f"adapter {name!r}: cannot read {path}: {exc}") from None


class LoraBucket(LoraSource):
    """The `NAME.safetensors` objects directly under a prefix of an S3 bucket, and the `NAME/` folders' files one
    level down (`s3://bucket/prefix?endpoint=...`, credentials from the environment as for the image store): every
    host that names it offers the same set."""

    def __init__(self, url: str, max_bytes: int) -> None:
        super().__init__(url.split("?", 1)[0], max_bytes)
        # obstore is imported only for a bucket: a worker with a folder or no adapters runs without it.
        from common.s3blobstore import s3_store

        self._store = s3_store(s3_location(url))

    def _list(self) -> list[str]:
        import obstore
        from obstore.exceptions import BaseError

        try:
            listed = obstore.list(self._store).collect()
        except BaseError as exc:
            raise LoraSourceError(str(exc).splitlines()[0]) from None
        return [meta["path"] for meta in listed if meta["path"].count("/") <= 1]

    def _read(self, name: str, key: str) -> bytes:
        import obstore
        from obstore.exceptions import BaseError, NotFoundError

        try:
            result = obstore.get(self._store, key)
            if result.meta["size"] > self.max_bytes:
                raise LoraSourceError(self._too_large(name, key, result.meta["size"]))
            return bytes(result.bytes())
        except (NotFoundError, FileNotFoundError):
            raise LoraSourceError(f"adapter {name!r}: {self._at(key)} is gone") from None
        except BaseError as exc:
            raise LoraSourceError(f"adapter {name!r}: cannot read it: {str(exc).splitlines()[0]}") from None


def is_bucket(lora_dir: str) -> bool:
    """Whether `--lora-dir` names an S3 prefix rather than a folder."""
    return lora_dir.startswith("s3://")


def open_lora_source(config: WorkerConfig) -> LoraSource | None:
    """The adapters `config` offers (scanned once now), or None without `--lora-dir`."""
    if config.lora_dir is None:
        return None
    max_bytes = int(config.lora_max_mb * _MB)
    where = config.lora_dir
    source = LoraBucket(where, max_bytes) if is_bucket(where) else LoraFolder(Path(where), max_bytes)
    names = source.scan()
    logger.info("LoRA adapters at %s: %d offered (%s)", source.where, len(names), ", ".join(names) or "none yet")
    return source


def adapter_loader(source: LoraSource, parse: Callable[[str, LoraFiles], Adapter]) -> Callable[[str], Adapter]:
    """The engine's `load(name) -> Adapter`: the adapter's files from `source`, parsed by `parse`
    (worker/lora_files.py's `read_adapter` with the pipeline's layers bound)."""

    def load(name: str) -> Adapter:
        return parse(name, source.read(name))

    return load


def refusal(loras: Sequence[LoraRef], offered: Collection[str], most: int) -> str | None:
    """Why this worker cannot run a job naming `loras` (None when it can): more adapters than `most`, or one it does not
    offer. The gateway routes no such job here; one that arrives all the same (a race, an older gateway) fails."""
    if len(loras) > most:
        return f"loras: {len(loras)} adapters named; this worker applies at most {most} per request"
    for index, lora in enumerate(loras):
        if lora.name not in offered:
            return f"loras[{index}].name: adapter {lora.name!r} is not offered by this worker"
    return None
