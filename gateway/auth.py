"""Who is calling: an API key's holder, or an address without one.

When keys are configured, every `/v1` route needs `Authorization: Bearer KEY`: 401 without one or with an
unknown key, 403 with a revoked one. With `--public-demo` the demo page's routes stay open to callers
without a key (they are then limited per address, under the stricter public limits); a caller that does
present a key is still held to it. The gateway holds key digests only, and names a key (in rate limits,
job records and in-flight sets) by a prefix of its digest, so no key reaches a log, a metric or Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aiohttp import web

from common.apikeys import IDENTITY_CHARS, KeyRing, KeysFileError, digest, load_keys_file
from gateway.config import GatewayConfig
from gateway.errors import ApiError

logger = logging.getLogger(__name__)

# How often the keys file is looked at; a revocation takes effect within this.
KEYS_RELOAD_INTERVAL_S = 2.0
_CHALLENGE = 'Bearer realm="sdxl-serve"'

CallerClass = Literal["key", "address", "public"]
# The owner recorded with a job made without a key under --public-demo: anyone with its id may follow it.
PUBLIC_OWNER = "public"


@dataclass(frozen=True)
class Caller:
    """A request's rate-limit class and identity: a key's digest prefix, or the client's address.

    Callers are tenants, kept apart from each other, only while keys are configured (classes `key` and
    `public`); without keys (`address`) the cluster is one tenant, as a development cluster is.
    """

    caller_class: CallerClass
    identity: str
    admin: bool = False  # a key marked `admin` in the keys file: sees every caller's jobs
    digest: str = field(default="", repr=False)  # a key's full digest: its revocation ends its event streams

    @property
    def tenant(self) -> bool:
        """Kept apart from other callers: keys are configured."""
        return self.caller_class != "address"

    @property
    def scope(self) -> str:
        """The namespace of this caller's idempotency keys."""
        return f"{self.caller_class}:{self.identity}"

    @property
    def owner(self) -> str:
        """What the jobs this caller makes record as their owner."""
        return {"key": self.identity, "public": PUBLIC_OWNER}.get(self.caller_class, "")

    def may_see(self, owner: str | None) -> bool:
        """Whether a job with this recorded owner (None: record gone) exists for this caller."""
        if not self.tenant or self.admin:
            return True
        return owner is not None and owner in (PUBLIC_OWNER, self.owner)


CALLER = web.RequestKey("caller", Caller)


class KeyStore:
    """The keys a gateway accepts: from the environment (digests, fixed) and a keys file (re-read when it
    changes; an unreadable or malformed new version is logged and the previous one kept)."""

    def __init__(self, config: GatewayConfig) -> None:
        self._fixed = config.api_keys
        self._path = config.api_keys_file
        self._stamp: tuple[int, int, int] | None = None
        self.enabled = config.auth_enabled
        self.ring = self._fixed.merged(self._read()) if self._path is not None else self._fixed
        self.on_reload: list[Callable[[], object]] = []  # told after the keys were replaced

    def _read(self) -> KeyRing:
        assert self._path is not None
        stamp = _stamp(self._path)
        ring = load_keys_file(self._path)
        self._stamp = stamp
        return ring

    def reload_if_changed(self) -> bool:
        """Re-read the keys file if it changed since the last read; True if the keys were replaced."""
        if self._path is None:
            return False
        try:
            if _stamp(self._path) == self._stamp:
                return False
            ring = self._fixed.merged(self._read())
        except (OSError, KeysFileError) as exc:
            logger.warning("keeping the previous API keys: %s", exc)
            return False
        self.ring = ring
        logger.info("API keys reloaded from %s: %r", self._path, ring)
        return True

    def caller(self, request: web.Request, public: bool, address: str) -> Caller:
        """The caller of a `/v1` route; raises 401 or 403. `public`: the route is open without a key."""
        if not self.enabled:
            return Caller("address", address)
        header = request.headers.get("Authorization")
        if header is None:
            if public:
                return Caller("public", address)
            raise ApiError(
                401,
                "missing_api_key",
                "this route needs an API key: send Authorization: Bearer KEY",
                field="Authorization",
                headers={"WWW-Authenticate": _CHALLENGE},
            )
        scheme, _, key = header.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise ApiError(
                401,
                "invalid_authorization",
                "the Authorization header must be `Bearer KEY`",
                field="Authorization",
                headers={"WWW-Authenticate": _CHALLENGE},
            )
        hashed = digest(key)
        if hashed in self.ring.revoked:
            raise ApiError(403, "revoked_api_key", "this API key has been revoked", field="Authorization")
        if hashed not in self.ring.active:
            raise ApiError(
                401,
                "invalid_api_key",
                "unknown API key",
                field="Authorization",
                headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
            )
        return Caller("key", f"key-{hashed[:IDENTITY_CHARS]}", admin=hashed in self.ring.admins, digest=hashed)

    def accepts(self, caller: Caller) -> bool:
        """Whether the keys in force still accept this caller (its key was not revoked or removed since)."""
        return caller.caller_class != "key" or caller.digest in self.ring.active

    async def watch(self) -> None:
        """Re-read the keys file whenever it changes, until cancelled."""
        while True:
            await asyncio.sleep(KEYS_RELOAD_INTERVAL_S)
            if await asyncio.to_thread(self.reload_if_changed):
                for callback in self.on_reload:
                    callback()


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
