"""Request ids and the access log: one line per request, carrying the id the worker logs for its job.

A request keeps the `X-Request-ID` its client or proxy sent when it is a safe token (letters, digits and
`._:-`, at most 128), else it gets a new one; either way the answer carries it back in `X-Request-ID`.
"""

from __future__ import annotations

import logging
import re
import uuid

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from common.logs import bound
from common.protocol import REQUEST_ID_PATTERN

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID = web.RequestKey("request_id", str)
_VALID = re.compile(REQUEST_ID_PATTERN)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request its id and tag every line logged while handling it."""
    sent = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = sent if _VALID.match(sent) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    with bound(request=request_id):
        return await handler(request)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer, streamed ones included (headers go out at prepare, before the handler returns)."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id


class AccessLogger(AbstractAccessLogger):
    """`remote "METHOD path" status bytes seconds`, with the request id, and every part a field in JSON."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        request_id = request.get(REQUEST_ID)
        self.logger.info(
            '%s "%s %s" %d %d %.3fs',
            request.remote,
            request.method,
            request.path_qs,
            response.status,
            response.body_length,
            time,
            extra={
                "request_id": request_id,
                "remote": request.remote,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "bytes": response.body_length,
                "duration_s": round(time, 6),
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
