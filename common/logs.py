"""Logging shared by every entry point: one line per event, as text or as JSON for log pipelines.

Lines written while a request or a job is handled carry its ids: the gateway binds the request id
(`X-Request-ID`, or one it makes) and the job id; the worker binds the same two from the job it runs,
so one `grep` or one log query follows a request from the HTTP call to the worker that ran it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]%(ids)s %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)


class ContextFilter(logging.Filter):
    """Put the bound request and job ids on every record: as fields (JSON) and as `ids` (text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = {"request_id": request_id.get(), "job_id": job_id.get()}
        text = ""
        for name, value in ids.items():
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
            if getattr(record, name, None) is not None:
                text += f" {name}={getattr(record, name)}"
        record.ids = text
        return True


@contextlib.contextmanager
def bound(*, request: str | None = None, job: str | None = None) -> Iterator[None]:
    """Tag the lines logged inside with a request id and a job id (None leaves one as it was)."""
    tokens = []
    if request is not None:
        tokens.append((request_id, request_id.set(request)))
    if job is not None:
        tokens.append((job_id, job_id.set(job)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def setup_logging(level: str, fmt: LogFormat = "text") -> None:
    """One line per event on stderr; `json` writes one JSON object per line."""
    logging.basicConfig(level=level.upper(), handlers=[make_handler(fmt, sys.stderr)], force=True)
    logging.captureWarnings(True)  # Python's warnings become log lines too, not bare text in a JSON log
    # JAX reports at INFO that it found no TPU or GPU plugin on every CPU-only start.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def make_handler(fmt: LogFormat, stream: TextIO) -> logging.Handler:
    """A handler writing `fmt` lines, with the bound ids, to `stream`."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                JSON_FIELDS,
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "exc_info": "exception"},
                reserved_attrs=[*RESERVED_ATTRS, "ids"],
            )
        )  # `ids` is the text format's rendering
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    return handler
