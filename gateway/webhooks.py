"""Job webhooks at the gateway's edge: the target checked at submit, the addresses every attempt may reach, and
the Standard Webhooks signature.

A webhook URL must be https (http only with `--webhook-allow-http`) and its host must resolve to public
addresses only: loopback, link-local, private, multicast, unspecified, reserved and cloud metadata addresses
are refused, so a caller cannot make the cluster POST into its own network (SSRF). Hosts the operator lists in
`--webhook-allow-hosts` are exempt. The rule is applied again at every attempt, to the addresses the host
resolves to then (a name that resolved to a public address at submit may point inward later: DNS
rebinding), by the resolver of the sending session itself (`GuardedResolver`), so no connection is ever opened
to an address the rule refuses; redirects are never followed. Sending is gateway/webhook_sender.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from common.webhooks import WebhookSpec
from gateway.config import WebhookConfig
from gateway.errors import ApiError

logger = logging.getLogger(__name__)

# host, port -> the addresses it resolves to (text). The gateway's is the event loop's getaddrinfo; tests
# put a stub in its place (gateway/state.py WEBHOOK_RESOLVE).
Resolve = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Cloud metadata endpoints (AWS, GCP, Azure, ... on the link-local address; AWS's IPv6 one).
METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
# IPv6 prefixes that carry an IPv4 address in their last 32 bits (or, NAT64_LOCAL, where RFC 6052 puts it).
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated (RFC 4291), still routed by some stacks
RESOLVE_TIMEOUT_S = 5.0
SIGNATURE_VERSION = "v1"


class TargetRefused(OSError):
    """A webhook's host resolves to an address the rules refuse (or to none)."""


async def system_resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, by the event loop's resolver (getaddrinfo in a thread)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def refusal(address: IPAddress) -> str | None:
    """Why an address may not be a webhook's target (None: a public unicast address, allowed). An IPv6 address
    that carries an IPv4 one (mapped, IPv4-compatible, 6to4, Teredo, NAT64) reaches that IPv4 address, and is
    judged by it: each one it may carry must be allowed."""
    carried = carried_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    if carried is None:
        return _refusal(address)
    for inner in carried:
        why = _refusal(inner)
        if why is not None:
            return f"{why} ({inner}, inside {address})"
    return None


def _refusal(address: IPAddress) -> str | None:
    checks = (
        (address in METADATA, "a cloud metadata address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_private, "a private address"),
        (not address.is_global, "not a public address"),
    )
    return next((why for refused, why in checks if refused), None)


def carried_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses a packet to `address` may reach, for an IPv6 address that embeds one; None for one
    that does not. A local-use NAT64 prefix may be any of RFC 6052's lengths, unknown here: every reading is
    returned, so such an address is allowed only if each of them is."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.teredo is not None:
        return [address.teredo[1]]  # the client: the inverted last 32 bits
    if address.sixtofour is not None:
        return [address.sixtofour]
    packed = address.packed
    if address in NAT64_WELL_KNOWN or (
        address in IPV4_COMPATIBLE and not (address.is_loopback or address.is_unspecified)
    ):
        return [ipaddress.IPv4Address(packed[12:])]
    if address in NAT64_LOCAL:  # RFC 6052 2.2: /96, /48, /56 and /64 prefixes (bits 64..71 are skipped)
        readings = (packed[12:16], packed[6:8] + packed[9:11], packed[7:8] + packed[9:12], packed[9:13])
        return [ipaddress.IPv4Address(reading) for reading in readings]
    return None


def literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def checked_addresses(config: WebhookConfig, resolve: Resolve, host: str, port: int) -> list[str]:
    """The addresses of `host` that a webhook may reach; TargetRefused when one of them (or the literal
    address) is refused, or the host does not resolve. An allow-listed host is taken as it resolves."""
    host = host.lower().rstrip(".")
    literal = literal_address(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                addresses = await resolve(host, port)
        except (OSError, TimeoutError) as exc:
            raise TargetRefused(f"{host} does not resolve ({exc or 'timed out'})") from None
    if host in config.allow_hosts:
        return addresses
    for text in addresses:
        why = refusal(ipaddress.ip_address(text.partition("%")[0]))
        if why is not None:
            raise TargetRefused(f"{host} resolves to {text}, {why} (the operator may allow it: --webhook-allow-hosts)")
    if not addresses:
        raise TargetRefused(f"{host} resolves to no address")
    return addresses


async def check_target(config: WebhookConfig, resolve: Resolve, url: str) -> None:
    """Refuse, with 400 naming `webhook.url` and the rule, a URL a webhook may not be sent to."""
    try:
        parsed = URL(url)
    except ValueError:
        parsed = URL()
    if not parsed.is_absolute() or not parsed.host:
        raise ApiError(400, "webhook_url_invalid", "webhook.url: must be an absolute URL", field="webhook.url")
    schemes = ("https", "http") if config.allow_http else ("https",)
    if parsed.scheme not in schemes:
        raise ApiError(
            400,
            "webhook_url_scheme",
            f"webhook.url: must be {' or '.join(schemes)} (the operator allows plain http with --webhook-allow-http)",
            field="webhook.url",
        )
    try:
        await checked_addresses(config, resolve, parsed.host, parsed.port or 443)
    except TargetRefused as exc:
        raise ApiError(400, "webhook_url_refused", f"webhook.url: {exc}", field="webhook.url") from None


class GuardedResolver(AbstractResolver):
    """The sending session's resolver: what `checked_addresses` allows, at each connection, or TargetRefused
    (aiohttp passes it up as the cause of its connection error). aiohttp does not ask a resolver about an
    address literal: the sender checks those itself before it sends."""

    def __init__(self, config: WebhookConfig, resolve: Resolve) -> None:
        self._config = config
        self._resolve = resolve

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await checked_addresses(self._config, self._resolve, host, port)
        return [_result(host, address, port) for address in addresses]

    async def close(self) -> None:
        return None


def _result(host: str, address: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return {"hostname": host, "host": address, "port": port, "family": family, "proto": 0, "flags": 0}


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header per Standard Webhooks: `v1,` and the base64 HMAC-SHA256, under the secret's
    key (the base64 after `whsec_`), of `{id}.{timestamp}.{body}`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return f"{SIGNATURE_VERSION}," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt."""
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, message_id, timestamp, body),
        "user-agent": "sdxl-serve-webhooks",
    }


def spec_for(body: Any, key_identity: str, own_secret: bool, config: WebhookConfig) -> WebhookSpec:
    """The spec kept with a job: the request's URL and events (in a fixed order, each once), the key that made
    it and whether that key's own secret signs them (else the cluster's), and whether its host is allow-listed
    here (every gateway that sends it must allow it)."""
    events = tuple(event for event in ("started", "progress", "completed") if event in body.events)
    allowed = allow_listed(config, body.url)
    return WebhookSpec(url=body.url, events=events, key=key_identity, allowed=allowed, own_secret=own_secret)


def allow_listed(config: WebhookConfig, url: str) -> bool:
    """Whether `url`'s host is exempt from the address rules on this gateway (`--webhook-allow-hosts`)."""
    return _host(url) in config.allow_hosts


def _host(url: str) -> str:
    try:
        host = URL(url).host or ""
    except ValueError:
        host = ""
    return host.lower().rstrip(".")
