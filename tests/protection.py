"""Helpers of the protection tests: a gateway in this process with chosen settings."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from common.config import GatewayConfig
from gateway.app import create_app
from tests.conftest import ClientFactory, RedisServer

Client = TestClient[Any, Any]


async def gateway(aiohttp_client: ClientFactory, redis_server: RedisServer, **settings: Any) -> Client:
    """A gateway on db 0 (1 s request timeout) with `settings` over the defaults."""
    config = GatewayConfig(redis_url=redis_server.url(0), request_timeout_s=1.0, result_ttl_s=60, **settings)
    return await aiohttp_client(create_app(config))


async def error_of(response: Any) -> dict[str, Any]:
    """The `error` object of an error answer, checking the shape every refusal has."""
    body = await response.json()
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "field"} and error["message"], body
    return error
