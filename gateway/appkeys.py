"""Typed keys of the gateway's shared resources (no module globals)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from common.queue import JobListener, JobQueue
from common.ratelimit import RateLimiter
from common.registry import Registry
from gateway.auth import KeyStore
from gateway.config import GatewayConfig
from gateway.limits import Access, ThroughputMeter
from gateway.metrics import GatewayMetrics
from gateway.positions import PositionBoard
from gateway.routing import Router

CONFIG = web.AppKey("config", GatewayConfig)
GATEWAY_ID = web.AppKey("gateway_id", str)
REDIS = web.AppKey("redis", aioredis.Redis)
QUEUE = web.AppKey("queue", JobQueue)
REGISTRY = web.AppKey("registry", Registry)
LISTENER = web.AppKey("listener", JobListener)
POSITIONS = web.AppKey("positions", PositionBoard)
OPENAPI = web.AppKey("openapi", dict[str, Any])
ROUTER = web.AppKey("router", Router)
METRICS = web.AppKey("metrics", GatewayMetrics)
KEY_STORE = web.AppKey("key_store", KeyStore)
LIMITER = web.AppKey("limiter", RateLimiter)
THROUGHPUT = web.AppKey("throughput", ThroughputMeter)
ACCESS = web.AppKey("access", dict[tuple[str, str], Access])  # (method, path template) -> its protection
