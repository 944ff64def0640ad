"""The HTTP boundary: every error leaves as JSON `{"error": {"code", "message", "field"}}`."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from common.redis_conn import UNAVAILABLE
from gateway.errors import ApiError
from gateway.metrics import ERROR_CODE

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
    except UNAVAILABLE as exc:
        logger.warning("redis unavailable on %s %s: %s", request.method, request.path, exc)
        return _respond(request, ApiError(503, "queue_unavailable", "the job queue is unreachable; retry shortly",
                                          headers={"Retry-After": "2"}))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _respond(request, ApiError(exc.status, _code(exc), exc.reason))
    except Exception:  # the gateway's catch-all boundary: log it, answer 500, keep serving
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return _respond(request, ApiError(500, "internal_error", "internal server error"))


def _respond(request: web.Request, error: ApiError) -> web.Response:
    body = error.openai_body() if request.path.startswith(OPENAI_PREFIX) else error.body()
    response = web.json_response(body, status=error.status, headers=error.headers)
    response[ERROR_CODE] = error.code  # for the metrics middleware: rejections by rule
    return response


def _code(exc: web.HTTPException) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
        exc.status, exc.reason.lower().replace(" ", "_"))
