"""Who is calling: an API key's holder, or an address without one.

When keys are configured, every `/v1` route needs `Authorization: Bearer KEY`: 401 without one or with an
unknown key, 403 with a revoked one. With `--public-demo` the demo page's routes stay open to callers
without a key (they are then limited per address, under the stricter public limits); a caller that does
present a key is still held to it. The gateway holds key digests only, and names a key (in rate limits)
by a prefix of its digest, so no key reaches a log, a metric or Redis.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Caller:
    """A request's rate-limit class and identity: a key's digest prefix, or the client's address."""

    caller_class: CallerClass
    identity: str


class KeyStore:
    """The keys a gateway accepts: from the environment (digests, fixed) and a keys file (re-read when it
    changes; an unreadable or malformed new version is logged and the previous one kept)."""

    def __init__(self, config: GatewayConfig) -> None:
        self._fixed = config.api_keys
        self._path = config.api_keys_file
        self._stamp: tuple[int, int, int] | None = None
        self.enabled = config.auth_enabled
        self.ring = self._fixed.merged(self._read()) if self._path is not None else self._fixed

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
        return Caller("key", f"key-{hashed[:IDENTITY_CHARS]}")

    async def watch(self) -> None:
        """Re-read the keys file whenever it changes, until cancelled."""
        while True:
            await asyncio.sleep(KEYS_RELOAD_INTERVAL_S)
            await asyncio.to_thread(self.reload_if_changed)


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
