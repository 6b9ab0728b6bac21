"""The client address: TCP peer, or X-Forwarded-For believed only from trusted proxies."""

from __future__ import annotations

import ipaddress

import aiohttp
import pytest

from gateway.clientip import client_ip, limit_key
from tests.conftest import GatewayFactory, Upstream
from tests.redis_server import redis_limits

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


def test_an_untrusted_peer_is_the_client_whatever_it_forwards() -> None:
    assert client_ip("203.0.113.9", ["1.2.3.4"], PROXIES) == "203.0.113.9"


def test_a_trusted_peer_yields_the_right_most_untrusted_forwarded_address() -> None:
    xff = ["6.6.6.6, 198.51.100.7, 10.0.0.3"]  # 6.6.6.6 was written by the client itself
    assert client_ip("10.0.0.2", xff, PROXIES) == "198.51.100.7"


def test_several_header_lines_read_as_one_list() -> None:
    assert client_ip("10.0.0.2", ["6.6.6.6", "198.51.100.7, 10.1.1.1"], PROXIES) == "198.51.100.7"


def test_a_chain_of_only_trusted_proxies_yields_the_left_most_of_them() -> None:
    assert client_ip("10.0.0.2", ["10.0.0.9, 10.0.0.8"], PROXIES) == "10.0.0.9"


def test_a_trusted_peer_without_the_header_is_the_client() -> None:
    assert client_ip("10.0.0.2", [], PROXIES) == "10.0.0.2"


def test_garbage_in_the_chain_stops_the_walk_at_the_last_trusted_hop() -> None:
    assert client_ip("10.0.0.2", ["1.2.3.4, not-an-ip, 10.0.0.5"], PROXIES) == "10.0.0.5"


def test_ports_brackets_and_mapped_addresses_are_normalised() -> None:
    assert client_ip("10.0.0.2", ["198.51.100.7:5000"], PROXIES) == "198.51.100.7"
    assert client_ip("10.0.0.2", ["[2001:db8::1]:443"], PROXIES) == "2001:db8::1"
    assert client_ip("::ffff:203.0.113.9", [], PROXIES) == "203.0.113.9"
    assert client_ip("::1", ["2001:db8::2"], PROXIES) == "2001:db8::2"


def test_no_trusted_proxies_means_the_header_is_never_read() -> None:
    assert client_ip("10.0.0.2", ["1.2.3.4"], ()) == "10.0.0.2"


async def test_a_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # (Probes such as /healthz never meet the per-IP limit: a /v1 route does.)
    # 127.0.0.1 is not a trusted proxy here: each "different" forwarded address is the same
    # client, so the per-IP limit (1 at once) refuses the second.
    gw = await gateway_factory(
        upstream.url,
        server={"trusted_proxies": ["10.0.0.0/8"]},
        limits={"per_ip_rpm": 1},
    )
    r1 = await http.get(f"{gw.url}/v1/models", headers={"X-Forwarded-For": "198.51.100.1"})
    r2 = await http.get(f"{gw.url}/v1/models", headers={"X-Forwarded-For": "198.51.100.2"})
    assert (r1.status, r2.status) == (200, 429)


async def test_forwarded_for_from_a_trusted_proxy_separates_clients(
    gateway_factory: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        upstream.url,
        server={"trusted_proxies": ["127.0.0.1/32"]},
        limits={"per_ip_rpm": 1},
    )
    r1 = await http.get(f"{gw.url}/v1/models", headers={"X-Forwarded-For": "198.51.100.1"})
    r2 = await http.get(f"{gw.url}/v1/models", headers={"X-Forwarded-For": "198.51.100.2"})
    r3 = await http.get(f"{gw.url}/v1/models", headers={"X-Forwarded-For": "198.51.100.1"})
    assert (r1.status, r2.status, r3.status) == (200, 200, 429)


def test_limit_key_is_the_ipv4_address_or_the_ipv6_slash_64() -> None:
    assert limit_key("198.51.100.7") == "198.51.100.7"
    assert limit_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert limit_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert limit_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert limit_key("unknown") == "unknown"


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_per_ip_limits_count_an_ipv6_client_per_slash_64(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    limits: dict[str, object] = {"per_ip_rpm": 1}
    if backend == "redis":
        limits.update(redis_limits(request.getfixturevalue("redis_url"), per_ip_rpm=1))
    gw = await gateway_factory(
        upstream.url, server={"trusted_proxies": ["127.0.0.1/32"]}, limits=limits
    )

    async def status(client: str) -> int:
        headers = {"X-Forwarded-For": client}
        async with http.get(f"{gw.url}/v1/models", headers=headers) as r:
            return r.status

    assert await status("2001:db8:1:2::1") == 200
    # Another address of the same /64: the same host picking a fresh address.
    assert await status("2001:db8:1:2:dead:beef:0:7") == 429
    assert await status("2001:db8:1:3::1") == 200  # another /64, another client
