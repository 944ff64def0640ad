"""The client's address: the peer's, or behind trusted proxies the one they vouch for in X-Forwarded-For.

X-Forwarded-For is a list each proxy appends its peer's address to, so only its right end can be
believed, and only as far as the proxies that wrote it are trusted: the list is walked from the right,
past every trusted hop, to the first address that is not one (the client). Whatever a client wrote into
the header itself sits left of that and is never reached. A malformed hop ends the walk at the last
address a trusted proxy vouched for, so garbage cannot mint a fresh identity.

For rate limits an IPv6 client is its /64: one host is usually given a whole /64 and could otherwise
change address per request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from aiohttp import web

from gateway.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPV6_CLIENT_PREFIX = 64
# A host as X-Forwarded-Host may carry it: a name or IPv4 address, or a bracketed IPv6 one, and a port.
_HOST = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?")


def parse_address(text: str) -> IPAddress | None:
    """An address as proxies write it (`192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]:443`);
    IPv4-mapped IPv6 addresses become IPv4. None when it is not one."""
    text = text.strip()
    if text.startswith("["):
        text, closed, _ = text[1:].partition("]")
        if not closed:
            return None
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[IPNetwork]) -> str:
    """The client's address given the peer's and the X-Forwarded-For header values, in order."""
    address = parse_address(peer or "")
    if address is None:  # a Unix socket, or no peer at all
        return peer or "unknown"
    if not _is_trusted(address, trusted):
        return str(address)
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        parsed = parse_address(hop)
        if parsed is None:
            break
        address = parsed
        if not _is_trusted(address, trusted):
            break
    return str(address)


def client_identity(address: str) -> str:
    """What a client is counted as in rate limits: its address, or for IPv6 its /64."""
    parsed = parse_address(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{parsed}/{IPV6_CLIENT_PREFIX}", strict=False))
    return str(parsed) if parsed is not None else address


def _is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address.version == network.version and address in network for network in trusted)


def public_origin(request: web.Request, trusted: Sequence[IPNetwork]) -> str:
    """`scheme://host[:port]` as the client reached it: the request's own, or behind a trusted proxy the one it
    reports in X-Forwarded-Proto and X-Forwarded-Host (the first of each: the hop nearest the client). A value
    that is not a plain scheme or host is ignored."""
    scheme, host = request.scheme, request.host
    peer = parse_address(request.remote or "")
    if peer is not None and _is_trusted(peer, trusted):
        proto = _first(request.headers.get("X-Forwarded-Proto")).lower()
        forwarded_host = _first(request.headers.get("X-Forwarded-Host"))
        scheme = proto if proto in ("http", "https") else scheme
        host = forwarded_host if _HOST.fullmatch(forwarded_host) else host
    return f"{scheme}://{host}"


def _first(value: str | None) -> str:
    return (value or "").split(",")[0].strip()
