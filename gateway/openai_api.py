"""`POST /v1/images/generations`: the OpenAI Images API over the job queue (being written)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel


class ImageGenerationRequest(BaseModel):
    """OpenAI's request body (placeholder)."""

    prompt: str


class ImagesResponse(BaseModel):
    """OpenAI's response body (placeholder)."""

    created: int


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body (placeholder)."""

    error: dict[str, str | None]


async def images_generations(request: web.Request) -> web.Response:
    """Placeholder."""
    raise web.HTTPNotImplemented()
