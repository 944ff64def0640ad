"""The prompt policy (gateway/policy.py) over real HTTP: the blocklist on every generation route, its reloads,
and a real moderation hook server failing open and closed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from common.config import ConfigError
from gateway import policy
from gateway.cli import gateway_config
from gateway.config import PolicyConfig
from gateway.policy import BlocklistError, parse_blocklist
from gateway.state import POLICY
from sdxl_serve.cli import build_parser
from tests.protection import Client, gateway
from tests.support import ClientFactory, RedisServer, queued_jobs

ROUTES = ("/v1/jobs", "/v1/generate", "/v1/images/generations")
FIELDS = ("prompt", "negative_prompt")
BLOCKLIST = "# words, then expressions\nlighthouse\nre:sk[uo]lls?\n"


def body_for(field: str, text: str) -> dict[str, Any]:
    return {"prompt": "a harbour", field: text}


async def refusal(response: Any) -> tuple[str, str | None]:
    """The code and the field of an error answer, in either the native or the OpenAI shape."""
    error = (await response.json())["error"]
    return error["code"], error.get("field", error.get("param"))


def reloaded(client: Client) -> asyncio.Event:
    """An event set when the gateway's blocklist is next replaced."""
    event = asyncio.Event()
    rules = client.app[POLICY].blocklist
    assert rules is not None
    rules.on_reload.append(event.set)
    return event


def rewrite(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def blocklist(tmp_path: Path) -> Path:
    path = tmp_path / "blocklist.txt"
    path.write_text(BLOCKLIST, encoding="utf-8")
    return path


async def policed(aiohttp_client: ClientFactory, redis_server: RedisServer, **settings: Any) -> Client:
    return await gateway(aiohttp_client, redis_server, policy=PolicyConfig(**settings))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field", FIELDS)
async def test_a_blocked_prompt_is_refused_on_every_route_before_anything_is_queued(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    fake_worker: None,
    blocklist: Path,
    route: str,
    field: str,
) -> None:
    client = await policed(aiohttp_client, redis_server, blocklist=blocklist)
    # Full-width letters and upper case normalise to the listed word; the expression matches a plural.
    for text in ("a \uff2c\uff29\uff27\uff28\uff34\uff28\uff2f\uff35\uff33\uff25 at dusk", "Three SKULLS"):
        response = await client.post(route, json=body_for(field, text))
        assert response.status == 400
        assert await refusal(response) == ("prompt_rejected", field)
    assert await queued_jobs(redis_client) == 0


async def test_an_allowed_prompt_passes_and_words_match_whole(
    aiohttp_client: ClientFactory, redis_server: RedisServer, fake_worker: None, blocklist: Path
) -> None:
    client = await policed(aiohttp_client, redis_server, blocklist=blocklist)
    response = await client.post("/v1/jobs", json={"prompt": "lighthousekeeper's cottage", "negative_prompt": "blur"})
    assert response.status == 202


async def test_the_blocklist_is_reloaded_when_the_file_changes_and_a_bad_version_is_kept_out(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    fake_worker: None,
    blocklist: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(policy, "BLOCKLIST_RELOAD_INTERVAL_S", 0.05)
    client = await policed(aiohttp_client, redis_server, blocklist=blocklist)

    async def refused(text: str) -> bool:
        return (await client.post("/v1/jobs", json={"prompt": text})).status == 400

    assert not await refused("a windmill")
    event = reloaded(client)
    rewrite(blocklist, "windmill\n")
    await asyncio.wait_for(event.wait(), 10)
    assert await refused("a windmill")
    assert not await refused("a lighthouse")
    rewrite(blocklist, "re:(unclosed\n")  # logged; the rules in force stay
    rules = client.app[POLICY].blocklist
    assert rules is not None and not rules.reload(force=True)
    assert await refused("a windmill")


async def test_sighup_reloads_the_blocklist(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    fake_worker: None,
    blocklist: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(policy, "BLOCKLIST_RELOAD_INTERVAL_S", 3600.0)  # only the signal can reload it
    client = await policed(aiohttp_client, redis_server, blocklist=blocklist)
    rewrite(blocklist, "windmill\n")
    assert (await client.post("/v1/jobs", json={"prompt": "a windmill"})).status == 202
    event = reloaded(client)
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.wait_for(event.wait(), 10)
    assert (await client.post("/v1/jobs", json={"prompt": "a windmill"})).status == 400


def test_a_blocklist_that_does_not_parse_stops_the_gateway_at_start_naming_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("fine\nre:[unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"--prompt-blocklist: .*bad.txt:2: not a regular expression"):
        gateway_config(build_parser().parse_args(["gateway", "--prompt-blocklist", str(path)]))
    with pytest.raises(ConfigError, match="--prompt-blocklist: cannot read"):
        gateway_config(build_parser().parse_args(["gateway", "--prompt-blocklist", str(tmp_path / "none")]))


def test_comments_and_blank_lines_are_not_rules() -> None:
    assert len(parse_blocklist("# a comment\n\n  word  \nre:x+\n", "f")) == 2
    with pytest.raises(BlocklistError, match="f:1"):
        parse_blocklist("re:(", "f")


class Hook:
    """A moderation service: flags a field containing `forbidden`, fails on `explode`, hangs on `hang`."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.never = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        prompts = await request.json()
        self.seen.append(prompts)
        text = json.dumps(prompts)
        if "hang" in text:
            await self.never.wait()
        if "explode" in text:
            return web.Response(status=500, text="boom")
        flagged = [field for field in FIELDS if "forbidden" in prompts[field]]
        verdict = {"flagged": bool(flagged), "field": flagged[0] if flagged else None, "reason": "not on this demo"}
        return web.json_response(verdict)


@pytest.fixture
async def hook(aiohttp_server: AiohttpServer) -> tuple[Hook, str]:
    hook = Hook()
    app = web.Application()
    app.router.add_post("/moderate", hook.handle)
    server = await aiohttp_server(app)
    return hook, str(server.make_url("/moderate"))


@pytest.mark.parametrize("route", ROUTES)
async def test_the_moderation_hook_is_asked_on_every_route_and_its_verdict_kept(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    fake_worker: None,
    hook: tuple[Hook, str],
    route: str,
) -> None:
    service, url = hook
    client = await policed(aiohttp_client, redis_server, moderation_url=url)
    for field in FIELDS:
        response = await client.post(route, json=body_for(field, "something forbidden"))
        assert response.status == 400
        assert await refusal(response) == ("prompt_rejected", field)
        assert "not on this demo" in json.dumps(await response.json())
    assert await queued_jobs(redis_client) == 0
    assert service.seen[-1] == {"prompt": "a harbour", "negative_prompt": "something forbidden"}


@pytest.mark.parametrize(("fail", "trouble"), [("closed", "explode"), ("closed", "hang"), ("open", "hang")])
async def test_a_failing_hook_refuses_when_closed_and_lets_through_when_open(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    fake_worker: None,
    hook: tuple[Hook, str],
    fail: str,
    trouble: str,
) -> None:
    _, url = hook
    client = await policed(
        aiohttp_client, redis_server, moderation_url=url, moderation_timeout_s=0.3, moderation_fail=fail
    )
    response = await client.post("/v1/jobs", json={"prompt": f"a harbour, {trouble}"})
    if fail == "closed":
        assert response.status == 503
        assert await refusal(response) == ("moderation_unavailable", None)
        assert await queued_jobs(redis_client) == 0
    else:
        assert response.status == 202
        assert await queued_jobs(redis_client) == 1


async def test_an_unreachable_hook_fails_closed_by_default(
    aiohttp_client: ClientFactory, redis_server: RedisServer, fake_worker: None
) -> None:
    client = await policed(aiohttp_client, redis_server, moderation_url="http://127.0.0.1:9/moderate")
    response = await client.post("/v1/jobs", json={"prompt": "a harbour"})
    assert response.status == 503
