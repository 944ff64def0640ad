"""Which adapters are in which of the devices' bank slots (worker/lora_bank.py), kept on the host.

A request pins the adapters it names for as long as the engine holds it: a pinned adapter stays in its slot. An
adapter that is not resident is read on a background thread (the `load` callable, then checked and padded for the
bank), so a slow file never stalls the rows that are running; the engine collects what was read at its next step
boundary and writes it to a free slot, or to the least recently used slot that nothing pins. An adapter read but
with no slot to take (every slot pinned) waits on the host until one is unpinned.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from worker.lora import LoraError, Padded

logger = logging.getLogger(__name__)

# Reads, checks and pads an adapter by name (on the loading thread); raises for one that cannot be used.
Prepare = Callable[[str], Padded]
# Writes a padded adapter into a bank slot (on the engine's thread).
Write = Callable[[int, Padded], None]


class LoraPool:
    """`slots` bank slots by adapter name, least recently used first out among those nothing pins."""

    def __init__(self, slots: int, prepare: Prepare) -> None:
        self._prepare = prepare
        self._free = list(range(slots))
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        # What `loaded` returns: a tuple replaced whole, as another thread (the worker's advertising) reads it.
        self._names: tuple[str, ...] = ()
        self._components: dict[str, frozenset[str]] = {}
        self._pins: Counter[str] = Counter()
        self._loading: set[str] = set()
        self._read: dict[str, Padded] = {}  # read, waiting for a slot
        self._done: queue.SimpleQueue[tuple[str, Padded | BaseException]] = queue.SimpleQueue()
        self._arrived = threading.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lora-load")

    def pin(self, names: Iterable[str]) -> None:
        """Keep `names` in their slots until unpinned; start reading those neither resident nor being read."""
        for name in names:
            self._pins[name] += 1
            if name in self._resident:
                self._resident.move_to_end(name)
                self._names = tuple(self._resident)
            elif name not in self._loading and name not in self._read:
                self._loading.add(name)
                self._executor.submit(self._load, name)

    def unpin(self, names: Iterable[str]) -> None:
        for name in names:
            self._pins[name] -= 1
            if self._pins[name] <= 0:
                del self._pins[name]

    def slot(self, name: str) -> int | None:
        """The slot `name` is in, None if not resident."""
        return self._resident.get(name)

    def components(self, name: str) -> frozenset[str]:
        """The components a resident adapter changes."""
        return self._components[name]

    def loaded(self) -> tuple[str, ...]:
        """The names of the resident adapters, most recently used last (any thread may call it)."""
        return self._names

    def collect(self, write: Write) -> dict[str, LoraError]:
        """Place what the loading thread has read (`write` puts it in its slot); returns the adapters that could
        not be read, by name, with the reason."""
        self._arrived.clear()
        failed: dict[str, LoraError] = {}
        while True:
            try:
                name, outcome = self._done.get_nowait()
            except queue.Empty:
                break
            self._loading.discard(name)
            if isinstance(outcome, BaseException):
                failed[name] = _as_lora_error(name, outcome)
            else:
                self._read[name] = outcome
        for name in list(self._read):
            self._place(name, write)
        return failed

    def wait(self, timeout_s: float) -> None:
        """Return when a read ends (or after `timeout_s`): for an engine with nothing to run but what is read."""
        if self._loading:
            self._arrived.wait(timeout_s)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _place(self, name: str, write: Write) -> None:
        slot = self._take_slot()
        if slot is None:
            return
        padded = self._read.pop(name)
        write(slot, padded)
        self._resident[name] = slot
        self._components[name] = padded.components
        self._names = tuple(self._resident)
        logger.info("LoRA adapter %s in slot %d", name, slot)

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop(0)
        for name, slot in self._resident.items():
            if name not in self._pins:
                del self._resident[name]
                del self._components[name]
                logger.info("LoRA adapter %s leaves slot %d", name, slot)
                return slot
        return None

    def _load(self, name: str) -> None:
        try:
            outcome: Padded | BaseException = self._prepare(name)
        except Exception as error:  # whatever reading one adapter raises fails the requests that name it only
            outcome = error
        self._done.put((name, outcome))
        self._arrived.set()


def _as_lora_error(name: str, error: BaseException) -> LoraError:
    if isinstance(error, LoraError):
        return error
    return LoraError(f"adapter {name!r} could not be loaded: {type(error).__name__}: {error}")
