"""API keys: made once, shown once, stored only as SHA-256 digests.

A key is 256 random bits; its digest is all a gateway ever holds (from the keys file, or hashed at start
from the environment), so neither the file nor a memory dump gives a key away. A fast hash is right for
random keys: unlike passwords there is nothing to guess.

The keys file has one digest per line, optionally followed by `revoked` (that key is then refused with
403 rather than 401), and `#` comments:

    # sdxl-serve API keys
    3b7e...c1a0  # render-farm, 2026-11-21
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
IDENTITY_CHARS = 16  # of the digest: names a key in rate limits without revealing it


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and line."""


def new_key() -> str:
    """A fresh API key (URL-safe, 256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_line(key: str, label: str = "") -> str:
    """The keys-file line for `key`, with an optional label as a comment."""
    return f"{digest(key)}  # {label}".rstrip(" #") if label else digest(key)


@dataclass(frozen=True)
class KeyRing:
    """The digests of the keys a gateway accepts, and of those it refuses as revoked."""

    active: frozenset[str] = field(default_factory=frozenset)
    revoked: frozenset[str] = field(default_factory=frozenset)

    def __len__(self) -> int:
        return len(self.active) + len(self.revoked)

    def __repr__(self) -> str:  # for the start-up log: counts, never digests
        return f"KeyRing({len(self.active)} active, {len(self.revoked)} revoked)"

    def merged(self, other: KeyRing) -> KeyRing:
        """Both rings; a key revoked in either is revoked."""
        revoked = self.revoked | other.revoked
        return KeyRing(active=(self.active | other.active) - revoked, revoked=revoked)

    @classmethod
    def from_keys(cls, keys: list[str]) -> KeyRing:
        """A ring of the given keys (not digests), all active."""
        return cls(active=frozenset(digest(k) for k in keys))


def parse_keys_file(text: str, source: str = "keys file") -> KeyRing:
    """The ring a keys file describes. Raises KeysFileError naming the first bad line."""
    active: set[str] = set()
    revoked: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.partition("#")[0].split()
        if not words:
            continue
        match = _DIGEST_RE.match(words[0].lower())
        status = words[1].lower() if len(words) > 1 else "active"
        if match is None or len(words) > 2 or status not in ("active", "revoked"):
            raise KeysFileError(
                f"{source}, line {number}: expected a SHA-256 hex digest, optionally followed "
                "by `revoked` (generate one with `sdxl-serve keys new`)"
            )
        (revoked if status == "revoked" else active).add(match[1])
    return KeyRing(active=frozenset(active - revoked), revoked=frozenset(revoked))


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
