"""URL table of the gateway."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gateway import views

STATIC_DIR = Path(__file__).parent / "static"


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", views.index)
    app.router.add_get("/healthz", views.healthz)
    app.router.add_post("/v1/generate", views.generate)
    app.router.add_get("/v1/jobs/{job_id}", views.job_status)
    app.router.add_static("/static/", STATIC_DIR, name="static")
