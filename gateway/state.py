"""The gateway's shared state: typed aiohttp `AppKey`s for each resource (no module globals)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from common.jobstore import JobStore
from common.registry import Registry
from common.streams import JobStreams
from common.webhooks import Outbox
from gateway.auth import KeyStore
from gateway.config import GatewayConfig
from gateway.journal import Journal
from gateway.limits import Access, ThroughputMeter
from gateway.listener import JobListener
from gateway.metrics import GatewayMetrics
from gateway.placement import Placement
from gateway.policy import PromptPolicy
from gateway.positions import PositionBoard
from gateway.ratelimit import RateLimiter
from gateway.signed_urls import UrlSigner
from gateway.tenants import EventStreams, Waiters
from gateway.webhook_sender import WebhookSender
from gateway.webhooks import Resolve

CONFIG = web.AppKey("config", GatewayConfig)
GATEWAY_ID = web.AppKey("gateway_id", str)
REDIS = web.AppKey("redis", aioredis.Redis)
JOBS = web.AppKey("jobs", JobStore)
STREAMS = web.AppKey("streams", JobStreams)
REGISTRY = web.AppKey("registry", Registry)
LISTENER = web.AppKey("listener", JobListener)
JOURNAL = web.AppKey("journal", Journal)
POSITIONS = web.AppKey("positions", PositionBoard)
OPENAPI = web.AppKey("openapi", dict[str, Any])
PLACEMENT = web.AppKey("placement", Placement)
METRICS = web.AppKey("metrics", GatewayMetrics)
KEY_STORE = web.AppKey("key_store", KeyStore)
LIMITER = web.AppKey("limiter", RateLimiter)
THROUGHPUT = web.AppKey("throughput", ThroughputMeter)
ACCESS = web.AppKey("access", dict[tuple[str, str], Access])  # (method, path template) -> its protection
EVENT_STREAMS = web.AppKey("event_streams", EventStreams)  # open event streams by caller (gateway/tenants.py)
WAITERS = web.AppKey("waiters", Waiters)  # requests waiting for a result, by caller (gateway/tenants.py)
OUTBOX = web.AppKey("outbox", Outbox)  # job webhooks' messages (common/webhooks.py)
WEBHOOK_SENDER = web.AppKey("webhook_sender", WebhookSender)
WEBHOOK_RESOLVE: web.AppKey[Resolve] = web.AppKey("webhook_resolve")  # webhook hosts to addresses (a stub in tests)
URL_SIGNER = web.AppKey("url_signer", UrlSigner)  # signs the image URLs given out (gateway/signed_urls.py)
POLICY = web.AppKey("policy", PromptPolicy)  # the prompt blocklist and moderation hook (gateway/policy.py)
