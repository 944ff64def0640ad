"""The HTTP boundary: every error leaves as JSON `{"error": {"code", "message", "field"}}`."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from common.redis_conn import UNAVAILABLE
from gateway.errors import ApiError

logger = logging.getLogger(__name__)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn domain errors, aiohttp's HTTP errors and anything unexpected into JSON error responses."""
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except UNAVAILABLE as exc:
        logger.warning("redis unavailable on %s %s: %s", request.method, request.path, exc)
        error = ApiError(503, "queue_unavailable", "the job queue is unreachable; retry shortly")
        return web.json_response(error.body(), status=503, headers={"Retry-After": "2"})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = ApiError(exc.status, _code(exc), exc.reason)
        return web.json_response(error.body(), status=exc.status)
    except Exception:  # the gateway's catch-all boundary: log it, answer 500, keep serving
        logger.exception("unhandled error on %s %s", request.method, request.path)
        error = ApiError(500, "internal_error", "internal server error")
        return web.json_response(error.body(), status=500)


def _code(exc: web.HTTPException) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
        exc.status, exc.reason.lower().replace(" ", "_"))
