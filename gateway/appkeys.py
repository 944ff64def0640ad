"""Typed keys of the gateway's shared resources (no module globals)."""

from __future__ import annotations

import redis.asyncio as aioredis
from aiohttp import web

from common.config import GatewayConfig
from common.queue import CompletionListener, JobQueue
from common.registry import Registry

CONFIG = web.AppKey("config", GatewayConfig)
GATEWAY_ID = web.AppKey("gateway_id", str)
REDIS = web.AppKey("redis", aioredis.Redis)
QUEUE = web.AppKey("queue", JobQueue)
REGISTRY = web.AppKey("registry", Registry)
LISTENER = web.AppKey("listener", CompletionListener)
