"""API keys: made once, shown once, stored only as SHA-256 digests.

A key is 256 random bits; its digest is all a gateway ever holds (from the keys file, or hashed at start
from the environment), so neither the file nor a memory dump gives a key away. A fast hash is right for
random keys: unlike passwords there is nothing to guess.

The keys file has one digest per line, optionally followed by `revoked` (that key is then refused with
403 rather than 401) or `admin` (that key sees and cancels every caller's jobs), and `#` comments:

    # sdxl-serve API keys
    3b7e...c1a0  # render-farm, 2026-11-21
    51d4...0be9 admin  # operator
    9f00...77d2 revoked  # leaked 2026-11-20
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

KEY_PREFIX = "sdxl_"
_DIGEST_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
IDENTITY_CHARS = 16  # of the digest: names a key in rate limits and job records without revealing it
_STATUSES = ("active", "revoked", "admin")


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and line."""


def new_key() -> str:
    """A fresh API key (URL-safe, 256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_line(key: str, label: str = "", admin: bool = False) -> str:
    """The keys-file line for `key`, marked `admin` if asked, with an optional label as a comment."""
    line = f"{digest(key)} admin" if admin else digest(key)
    return f"{line}  # {label}" if label else line


@dataclass(frozen=True)
class KeyRing:
    """The digests of the keys a gateway accepts, of those it refuses as revoked, and of the active keys
    that may see every caller's jobs (`admins`, a subset of `active`)."""

    active: frozenset[str] = field(default_factory=frozenset)
    revoked: frozenset[str] = field(default_factory=frozenset)
    admins: frozenset[str] = field(default_factory=frozenset)

    def __len__(self) -> int:
        return len(self.active) + len(self.revoked)

    def __repr__(self) -> str:  # for the start-up log: counts, never digests
        admins = f", {len(self.admins)} admin" if self.admins else ""
        return f"KeyRing({len(self.active)} active, {len(self.revoked)} revoked{admins})"

    def merged(self, other: KeyRing) -> KeyRing:
        """Both rings; a key revoked in either is revoked."""
        revoked = self.revoked | other.revoked
        admins = (self.admins | other.admins) - revoked
        return KeyRing(active=(self.active | other.active) - revoked, revoked=revoked, admins=admins)

    @classmethod
    def from_keys(cls, keys: list[str]) -> KeyRing:
        """A ring of the given keys (not digests), all active."""
        return cls(active=frozenset(digest(k) for k in keys))


def parse_keys_file(text: str, source: str = "keys file") -> KeyRing:
    """The ring a keys file describes. Raises KeysFileError naming the first bad line."""
    found: dict[str, set[str]] = {status: set() for status in _STATUSES}
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.partition("#")[0].split()
        if not words:
            continue
        match = _DIGEST_RE.match(words[0].lower())
        status = words[1].lower() if len(words) > 1 else "active"
        if match is None or len(words) > 2 or status not in _STATUSES:
            raise KeysFileError(
                f"{source}, line {number}: expected a SHA-256 hex digest, optionally followed "
                "by `revoked` or `admin` (generate one with `sdxl-serve keys new`)"
            )
        found[status].add(match[1])
    revoked = frozenset(found["revoked"])
    admins = frozenset(found["admin"]) - revoked
    return KeyRing(active=frozenset(found["active"] | admins) - revoked, revoked=revoked, admins=admins)


def load_keys_file(path: Path) -> KeyRing:
    """Read and parse a keys file. Raises KeysFileError (unreadable or malformed)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"cannot read the keys file {path}: {exc}") from exc
    return parse_keys_file(text, source=str(path))


def split_keys(text: str) -> list[str]:
    """Keys given in the environment: separated by commas or whitespace."""
    return [k for k in re.split(r"[\s,]+", text) if k]
