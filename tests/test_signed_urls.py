"""Signed image URLs (gateway/signed_urls.py) over real HTTP: the OpenAI route's `url`s are absolute, fetched
without the API key while current, bound to the job's owner, and good at every gateway sharing the secret."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
import redis.asyncio as aioredis
from yarl import URL

from common.apikeys import IDENTITY_CHARS, KeyRing, digest, new_key
from gateway.config import GatewayConfig, WebhookConfig
from gateway.signed_urls import UrlSigner
from gateway.state import URL_SIGNER
from tests.protection import Client, gateway
from tests.support import ClientFactory, RedisServer, claim_next, finish

KEY, OTHER = new_key(), new_key()
RING = KeyRing(active=frozenset({digest(KEY), digest(OTHER)}))
SECRET = "s" * 32
IMAGES = [b"first-image", b"second-image"]


async def generate_urls(client: Client, redis_client: aioredis.Redis, key: str = KEY, **extra: Any) -> list[str]:
    """The image URLs the official client is given for a two-image request, a test playing the worker."""
    base = str(client.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0, **extra) as oai:
        answer = asyncio.create_task(oai.images.generate(prompt="a cat", n=2, response_format="url"))
        await finish(redis_client, await claim_next(redis_client), IMAGES)
        response = await answer
    assert response.data is not None
    return [image.url or "" for image in response.data]


@pytest.fixture
async def keyed(aiohttp_client: ClientFactory, redis_server: RedisServer, fake_worker: None) -> AsyncIterator[Client]:
    yield await gateway(aiohttp_client, redis_server, api_keys=RING, url_signing_secret=SECRET)


async def test_a_signed_url_is_fetched_without_the_key(keyed: Client, redis_client: aioredis.Redis) -> None:
    urls = await generate_urls(keyed, redis_client)
    assert all(url.startswith(str(keyed.make_url("/v1/jobs/"))) for url in urls)
    for url, image in zip(urls, IMAGES, strict=True):
        async with keyed.session.get(url) as fetched:  # no Authorization header, as an OpenAI client fetches it
            assert (fetched.status, await fetched.read()) == (200, image)
    unsigned = urls[0].partition("?")[0]
    async with keyed.session.get(unsigned) as refused:
        assert refused.status == 401


async def test_a_tampered_expired_or_other_owners_url_is_refused(keyed: Client, redis_client: aioredis.Redis) -> None:
    url = URL((await generate_urls(keyed, redis_client))[0])
    signer = keyed.app[URL_SIGNER]
    path = url.path
    other_image = url.with_path(path[:-1] + "1").with_query(url.query)  # the signature of image 0 on image 1
    later = url.update_query(expires=int(url.query["expires"]) + 60)
    owner = f"key-{digest(KEY)[:IDENTITY_CHARS]}"
    expired = url.join(URL(signer.sign(path, owner, now=time.time() - 7200)))
    for_another = url.join(URL(signer.sign(path, "key-someone-else")))
    for forged in (other_image, later, expired, for_another):
        async with keyed.session.get(forged) as refused:
            body = await refused.json()
            assert (refused.status, body["error"]["code"], body["error"]["field"]) == (403, "invalid_signature", "sig")


async def test_a_url_made_at_one_gateway_opens_at_another_with_the_same_secret(
    keyed: Client, aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    url = URL((await generate_urls(keyed, redis_client))[0])
    same = await gateway(aiohttp_client, redis_server, api_keys=RING, url_signing_secret=SECRET)
    other = await gateway(aiohttp_client, redis_server, api_keys=RING, url_signing_secret="t" * 32)
    async with same.session.get(same.make_url(url.path_qs)) as fetched:
        assert (fetched.status, await fetched.read()) == (200, IMAGES[0])
    async with other.session.get(other.make_url(url.path_qs)) as refused:
        assert refused.status == 403


def test_the_secret_derives_from_the_webhook_secret_when_not_given() -> None:
    hook = WebhookConfig(secret="whsec_" + "A" * 32)
    one, two = (UrlSigner.for_config(GatewayConfig(webhooks=hook)) for _ in range(2))
    assert one.sign("/p", "o", now=0) == two.sign("/p", "o", now=0)
    three = UrlSigner.for_config(GatewayConfig())
    assert three.sign("/p", "o", now=0) != one.sign("/p", "o", now=0)


async def test_urls_take_the_public_url(
    aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    client = await gateway(aiohttp_client, redis_server, webhooks=WebhookConfig(public_url="https://api.example.com/"))
    urls = await generate_urls(client, redis_client)
    assert all(url.startswith("https://api.example.com/v1/jobs/") for url in urls)


@pytest.mark.parametrize("trusted", [True, False])
async def test_urls_take_the_scheme_and_host_a_trusted_proxy_forwards(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    fake_worker: None,
    trusted: bool,
) -> None:
    proxies = (ipaddress.ip_network("127.0.0.0/8"),) if trusted else ()
    client = await gateway(aiohttp_client, redis_server, trusted_proxies=proxies)
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "images.example.com:8443"}
    url = urlsplit((await generate_urls(client, redis_client, default_headers=forwarded))[0])
    own = urlsplit(str(client.make_url("/")))
    expected = ("https", "images.example.com:8443") if trusted else (own.scheme, own.netloc)
    assert (url.scheme, url.netloc) == expected
