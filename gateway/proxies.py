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
from collections.abc import Iterable, Sequence

from gateway.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPV6_CLIENT_PREFIX = 64


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
