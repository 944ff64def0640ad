"""The gateway's domain errors; the error middleware turns them into JSON responses."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import ValidationError


class ApiError(Exception):
    """An error to report to the client: HTTP status, a rule code, a message and the field at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}, **self.extra}

    def openai_body(self) -> dict[str, Any]:
        """The same error in the OpenAI API's shape, for the OpenAI-compatible routes."""
        kind = (
            ("invalid_request_error" if self.status < 500 else "server_error")
            if self.status != 429
            else "rate_limit_error"
        )
        if self.status in (401, 403):
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.field, "code": self.code}}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r}, field={self.field!r})"


def from_validation_error(exc: ValidationError) -> ApiError:
    """The first problem of a pydantic validation error, naming the field and the rule it broke."""
    err = exc.errors(include_url=False)[0]
    field = field_name(err["loc"]) or None
    code = err["type"]
    if code == "json_invalid":
        return ApiError(400, "invalid_json", f"request body is not valid JSON: {err['msg']}")
    if code == "model_type" and field is None:  # the body itself; a nested object's is named below
        return ApiError(400, "invalid_body", "request body must be a JSON object")
    return ApiError(400, code, f"{field}: {err['msg']}" if field else err["msg"], field=field)


def field_name(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as a client writes the field: `loras[0].scale`, `webhook.url`."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name


def unreadable_reason(exc: BaseException) -> str:
    """aiohttp's reason for refusing a body it could not read, without its status prefix (a payload error's
    cause's message), at most 200 characters."""
    cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) and exc.__cause__ is not None else exc
    reason = cause.message if isinstance(cause, HttpProcessingError) else str(cause)
    return (reason.strip() or type(cause).__name__)[:200]
