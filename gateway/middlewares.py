"""The HTTP boundary: every error leaves as JSON `{"error": {"code", "message", "field"}}`; every request to a
protected route passes body size, API key and rate limit first."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from redis.exceptions import OutOfMemoryError

from common.blobstore import BlobNotFound, BlobStoreMismatch, BlobStoreUnavailable
from common.redis_conn import UNAVAILABLE
from gateway.auth import CALLER
from gateway.config import GatewayConfig
from gateway.errors import ApiError, unreadable_reason
from gateway.limits import OPEN, RATE_DECISION, Access
from gateway.metrics import ERROR_CODE
from gateway.proxies import client_address, client_identity
from gateway.signed_urls import is_signed
from gateway.state import ACCESS, CONFIG, KEY_STORE, LIMITER

logger = logging.getLogger(__name__)


# Routes that speak the OpenAI API answer errors in its shape.
OPENAI_PREFIX = "/v1/images/"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn domain errors, aiohttp's HTTP errors and anything unexpected into JSON error responses."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _respond(request, exc)
    except OutOfMemoryError as exc:
        logger.error("redis is full (maxmemory) on %s %s: %s", request.method, request.path, exc)
        return _respond(
            request,
            ApiError(
                503, "storage_full", "the job queue's storage is full; retry shortly", headers={"Retry-After": "10"}
            ),
        )
    except UNAVAILABLE as exc:
        logger.warning("redis unavailable on %s %s: %s", request.method, request.path, exc)
        return _respond(
            request,
            ApiError(
                503, "queue_unavailable", "the job queue is unreachable; retry shortly", headers={"Retry-After": "2"}
            ),
        )
    except (BlobStoreUnavailable, BlobNotFound) as exc:
        return _respond(request, _image_store_error(request, exc))
    except BlobStoreMismatch as exc:  # an operator's error, not a bug: one line, no traceback
        logger.error("%s %s: %s", request.method, request.path, exc)
        return _respond(request, ApiError(500, "image_store_mismatch", str(exc)))
    except (HttpProcessingError, web.RequestPayloadError) as exc:  # aiohttp could not read the request's body: a
        # corrupt Content-Encoding, a malformed chunk or multipart header; the client's fault wherever it is read.
        # The rest of the connection's bytes cannot be trusted either: aiohttp closes it, and the answer says so.
        response = _respond(
            request, ApiError(400, "unreadable_body", f"the request body cannot be read: {unreadable_reason(exc)}")
        )
        response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # A 405 keeps its Allow header (RFC 9110 requires it): the methods the route does serve.
        kept = {name: exc.headers[name] for name in ("Allow",) if name in exc.headers}
        return _respond(request, ApiError(exc.status, _code(exc), exc.reason, headers=kept))
    except Exception:  # the gateway's catch-all boundary: log it, answer 500, keep serving
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return _respond(request, ApiError(500, "internal_error", "internal server error"))


def _image_store_error(request: web.Request, exc: BlobStoreUnavailable | BlobNotFound) -> ApiError:
    """An unreachable image store is transient (503, retry); a missing object is gone: the result still
    names it, but it expired or was removed first."""
    if isinstance(exc, BlobNotFound):
        return ApiError(404, "image_gone", f"the image is no longer stored: {exc}")
    logger.warning("image store unavailable on %s %s: %s", request.method, request.path, exc)
    return ApiError(
        503, "image_store_unavailable", "the image store is unreachable; retry shortly", headers={"Retry-After": "2"}
    )


def _respond(request: web.Request, error: ApiError) -> web.Response:
    body = error.openai_body() if request.path.startswith(OPENAI_PREFIX) else error.body()
    response = web.json_response(body, status=error.status, headers=error.headers)
    response[ERROR_CODE] = error.code  # for the metrics middleware: rejections by rule
    return response


def _code(exc: web.HTTPException) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
        exc.status, exc.reason.lower().replace(" ", "_")
    )


@web.middleware
async def protection_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse oversized bodies, unauthenticated callers and callers over their rate, in that order."""
    app = request.app
    config = app[CONFIG]
    access = access_of(request)
    limit = body_limit(config, access)
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, "body_too_large", f"the request body is over {limit} bytes")
    if access.kind is None:
        return await handler(request)
    address = client_address(request.remote, request.headers.getall("X-Forwarded-For", []), config.trusted_proxies)
    # A signed URL stands in for the key; the route checks the signature against the job's owner.
    public = (access.public and config.public_demo) or (access.signed and is_signed(request))
    caller = app[KEY_STORE].caller(request, public, client_identity(address))
    request[CALLER] = caller
    rate = config.rate_limits.get(caller.caller_class, access.kind)
    if rate is not None:
        decision = await app[LIMITER].check(f"{caller.caller_class}-{access.kind}", caller.identity, rate)
        request[RATE_DECISION] = decision
        if not decision.allowed:
            raise ApiError(
                429,
                "rate_limited",
                f"too many {access.kind} requests (at most {rate.describe()}); retry in {decision.retry_after_s} s",
                headers=decision.headers(),
            )
    return await handler(request)


def body_limit(config: GatewayConfig, access: Access) -> int:
    """The most bytes a route's body may have: more for one that takes input images."""
    return config.max_image_body_bytes if access.images else config.max_body_bytes


def access_of(request: web.Request) -> Access:
    resource = request.match_info.route.resource
    if resource is None:
        return OPEN
    return request.app[ACCESS].get((request.method, resource.canonical), OPEN)


async def rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Tell every limited caller where it stands (`RateLimit-Limit`, `-Remaining`, `-Reset`)."""
    decision = request.get(RATE_DECISION)
    if decision is not None:
        for name, value in decision.headers().items():
            response.headers.setdefault(name, value)
