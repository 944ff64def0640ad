"""The client's address (gateway/proxies.py): X-Forwarded-For believed only as far as trusted proxies go."""

from __future__ import annotations

import pytest

from gateway.config import parse_networks
from gateway.proxies import client_address, client_identity, parse_address

PROXIES = parse_networks("10.0.0.0/8, 2001:db8:ffff::/48")


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("198.51.100.7", [], "198.51.100.7"),  # no proxy
        ("198.51.100.7", ["203.0.113.9"], "198.51.100.7"),  # an untrusted peer's header is ignored
        ("10.0.0.2", ["203.0.113.9"], "203.0.113.9"),  # one trusted proxy
        ("10.0.0.2", ["1.1.1.1, 203.0.113.9, 10.0.0.3"], "203.0.113.9"),  # spoofed left part never reached
        ("10.0.0.2", ["1.1.1.1", "203.0.113.9"], "203.0.113.9"),  # several header lines, in order
        ("10.0.0.2", ["10.0.0.5, 10.0.0.4"], "10.0.0.5"),  # every hop trusted: the leftmost
        ("10.0.0.2", ["1.1.1.1, garbage, 10.0.0.3"], "10.0.0.3"),  # garbage: the last vouched-for address
        ("10.0.0.2", [""], "10.0.0.2"),
        ("10.0.0.2", ["203.0.113.9:4711"], "203.0.113.9"),  # with a port
        ("10.0.0.2", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("::ffff:10.0.0.2", ["203.0.113.9"], "203.0.113.9"),  # IPv4-mapped peer
        ("2001:db8:ffff::1", ["2001:db8:1::5"], "2001:db8:1::5"),
        (None, ["203.0.113.9"], "unknown"),  # a Unix socket
    ],
)
def test_the_walk_stops_at_the_first_untrusted_hop(peer: str | None, forwarded: list[str], client: str) -> None:
    assert client_address(peer, forwarded, PROXIES) == client
    assert client_address(peer, forwarded, ()) == (str(parse_address(peer)) if peer else "unknown")


def test_ipv6_clients_are_counted_by_their_64() -> None:
    assert client_identity("2001:db8:1:2:aaaa::1") == client_identity("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_identity("203.0.113.9") == "203.0.113.9" and client_identity("unknown") == "unknown"


@pytest.mark.parametrize("text", ["", "x", "1.2.3", "1.2.3.4.5", "[::1", "::1]:80"])
def test_non_addresses_are_none(text: str) -> None:
    assert parse_address(text) is None
