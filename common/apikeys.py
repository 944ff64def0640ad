"""API keys: made once, shown once, stored only as SHA-256 digests.

A key is 256 random bits; its digest is all a gateway ever holds (from the keys file, or hashed at start
from the environment), so neither the file nor a memory dump gives a key away. A fast hash is right for
random keys: unlike passwords there is nothing to guess.

The keys file has one digest per line, optionally followed by `revoked` (that key is then refused with
403 rather than 401) or `admin` (that key sees and cancels every caller's jobs), and by the key's webhook
secret (`whsec_...`, which signs the webhooks of its jobs; its holder verifies them with it), and `#` comments:

    # sdxl-serve API keys
    3b7e...c1a0  # render-farm, 2026-11-21
    51d4...0be9 admin  # operator
    77aa...01f3 whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw  # design-tool
    9f00...77d2 revoked  # leaked 2026-11-20
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

KEY_PREFIX = "sdxl_"
_DIGEST_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
IDENTITY_CHARS = 16  # of the digest: names a key in rate limits and job records without revealing it
_STATUSES = ("active", "revoked", "admin")
WEBHOOK_SECRET_PREFIX = "whsec_"  # Standard Webhooks: the base64 of the signing key follows
_SECRET_RE = re.compile(r"^whsec_[A-Za-z0-9+/]{32,88}={0,2}$")


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and line."""


def new_key() -> str:
    """A fresh API key (URL-safe, 256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    """A fresh webhook signing secret in the Standard Webhooks form: `whsec_` and 32 random bytes in base64."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def is_webhook_secret(text: str) -> bool:
    """`whsec_` followed by 24..64 bytes in base64."""
    if not _SECRET_RE.match(text):
        return False
    try:
        return 24 <= len(base64.b64decode(text[len(WEBHOOK_SECRET_PREFIX) :], validate=True)) <= 64
    except ValueError:
        return False


def key_line(key: str, label: str = "", admin: bool = False, webhook_secret: str = "") -> str:
    """The keys-file line for `key`, marked `admin` if asked, with its webhook secret if given and an optional
    label as a comment."""
    line = " ".join(word for word in (digest(key), "admin" if admin else "", webhook_secret) if word)
    return f"{line}  # {label}" if label else line


@dataclass(frozen=True)
class KeyRing:
    """The digests of the keys a gateway accepts, of those it refuses as revoked, and of the active keys
    that may see every caller's jobs (`admins`, a subset of `active`); the webhook secrets of those that
    have one, by digest."""

    active: frozenset[str] = field(default_factory=frozenset)
    revoked: frozenset[str] = field(default_factory=frozenset)
    admins: frozenset[str] = field(default_factory=frozenset)
    webhook_secrets: Mapping[str, str] = field(default_factory=dict, hash=False, repr=False)

    def __len__(self) -> int:
        return len(self.active) + len(self.revoked)

    def __repr__(self) -> str:  # for the start-up log: counts, never digests
        admins = f", {len(self.admins)} admin" if self.admins else ""
        return f"KeyRing({len(self.active)} active, {len(self.revoked)} revoked{admins})"

    def merged(self, other: KeyRing) -> KeyRing:
        """Both rings; a key revoked in either is revoked."""
        revoked = self.revoked | other.revoked
        admins = (self.admins | other.admins) - revoked
        secrets_ = {**self.webhook_secrets, **other.webhook_secrets}
        return KeyRing((self.active | other.active) - revoked, revoked, admins, secrets_)

    def webhook_secret(self, identity: str) -> str | None:
        """The webhook secret of the active key named `identity` (`key-` and its digest prefix), if it has one."""
        for hashed, secret in self.webhook_secrets.items():
            if f"key-{hashed[:IDENTITY_CHARS]}" == identity and hashed in self.active:
                return secret
        return None

    @classmethod
    def from_keys(cls, keys: list[str]) -> KeyRing:
        """A ring of the given keys (not digests), all active."""
        return cls(active=frozenset(digest(k) for k in keys))


def parse_keys_file(text: str, source: str = "keys file") -> KeyRing:
    """The ring a keys file describes. Raises KeysFileError naming the first bad line."""
    found: dict[str, set[str]] = {status: set() for status in _STATUSES}
    webhook_secrets: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.partition("#")[0].split()
        if not words:
            continue
        match = _DIGEST_RE.match(words[0].lower())
        secret = words.pop() if len(words) > 1 and words[-1].startswith(WEBHOOK_SECRET_PREFIX) else None
        status = words[1].lower() if len(words) > 1 else "active"
        if (
            match is None
            or len(words) > 2
            or status not in _STATUSES
            or not is_webhook_secret(secret or "whsec_" + "A" * 32)
        ):
            raise KeysFileError(
                f"{source}, line {number}: expected a SHA-256 hex digest, optionally followed by `revoked` or "
                "`admin`, then by a webhook secret `whsec_...` (generate them with `sdxl-serve keys new`)"
            )
        found[status].add(match[1])
        if secret is not None:
            webhook_secrets[match[1]] = secret
    revoked = frozenset(found["revoked"])
    admins = frozenset(found["admin"]) - revoked
    return KeyRing(frozenset(found["active"] | admins) - revoked, revoked, admins, webhook_secrets)


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
