"""Signed image URLs: an image fetched without the API key, for a limited time.

OpenAI clients (and `<img>` tags) fetch an image URL as it is, with no `Authorization` header, so the URL itself
carries the right to fetch: `?expires=UNIX&sig=HMAC`. The HMAC covers the path, the expiry and the job's owner
as recorded at submit (gateway/tenants.py), so a URL opens one image of one job, of the caller it was made for,
until it expires; nothing else. The key is the gateway's URL-signing secret (`--url-signing-secret`, else one
derived from the cluster's `--webhook-secret`): every gateway of a cluster must hold the same one, or a URL made
by one gateway is refused by the next. With neither, each gateway draws its own at start (and says so), which
serves a single gateway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.errors import ApiError

logger = logging.getLogger(__name__)

EXPIRES, SIGNATURE = "expires", "sig"
_DERIVATION = b"sdxl-serve image URL signing"


class UrlSigner:
    """Signs and checks image URLs with one secret; a URL is good for `ttl_s` seconds from signing."""

    def __init__(self, secret: bytes, ttl_s: int) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    @classmethod
    def for_config(cls, config: GatewayConfig) -> UrlSigner:
        """The signer of a gateway: its own secret, one derived from the cluster's webhook secret, or a random
        one (good for this process only)."""
        ttl_s = min(config.signed_url_ttl_s, config.result_ttl_s)
        if config.url_signing_secret:
            return cls(config.url_signing_secret.encode(), ttl_s)
        if config.webhooks.secret:
            return cls(hmac.new(config.webhooks.secret.encode(), _DERIVATION, hashlib.sha256).digest(), ttl_s)
        if config.auth_enabled:
            logger.warning(
                "no --url-signing-secret (nor --webhook-secret): image URLs are signed with a secret of this "
                "gateway's own, which other gateways refuse; give every gateway the same --url-signing-secret"
            )
        return cls(secrets.token_bytes(32), ttl_s)

    def sign(self, path: str, owner: str, now: float | None = None) -> str:
        """`path` with the query that lets anyone fetch it, until `ttl_s` from now, while `owner` owns the job."""
        expires = int(now if now is not None else time.time()) + self.ttl_s
        return f"{path}?{EXPIRES}={expires}&{SIGNATURE}={self._mac(path, owner, expires)}"

    def check(self, request: web.Request, owner: str) -> None:
        """Raise 403 unless the request's URL bears a current signature for the job's `owner`."""
        expires_text = request.query.get(EXPIRES, "")
        if not expires_text.isdigit() or len(expires_text) > 12:
            raise _refused(f"{EXPIRES} must be the Unix time the URL expires at")
        expires = int(expires_text)
        given = request.query.get(SIGNATURE, "")
        if not hmac.compare_digest(given, self._mac(request.path, owner, expires)):
            raise _refused("the signature does not match this URL")
        if expires < time.time():
            raise _refused("the signed URL has expired; fetch the job again for a fresh one")

    def _mac(self, path: str, owner: str, expires: int) -> str:
        message = f"{path}\n{owner}\n{expires}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def is_signed(request: web.Request) -> bool:
    """Whether the request presents a signature (it is then checked, and refused if it is not good)."""
    return SIGNATURE in request.query


def _refused(why: str) -> ApiError:
    return ApiError(403, "invalid_signature", f"signed image URL refused: {why}", field=SIGNATURE)
