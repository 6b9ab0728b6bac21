"""Who is on the other end: the TCP peer, or what a trusted proxy says it saw. Sans-IO.

X-Forwarded-For is a list each proxy appends the address it received from to; only the
entries added by proxies we trust are believable. So, when the peer is trusted, walk the
list from the right, skipping trusted proxies; the first address that is not one is the
client (everything left of it could have been written by the client itself). A peer that is
not trusted is the client, whatever header it sent.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .config import Network

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.9:5000"
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def limit_key(ip: str) -> str:
    """What per-IP limits count: an IPv4 address, or an IPv6 client's /64.

    One IPv6 host is usually given a whole /64 and can pick any of its 2**64 addresses;
    counted per address, it would have a fresh limit for every request.
    """
    if ":" not in ip:  # IPv4 (or no address at all): counted as it is, no parse needed
        return ip
    addr = _parse(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return ip


def _trusted(addr: IPAddress, proxies: Iterable[Network]) -> bool:
    return any(addr.version == net.version and addr in net for net in proxies)


def client_ip(peer: str | None, forwarded_for: Iterable[str], proxies: tuple[Network, ...]) -> str:
    """The client's address as text.

    `peer` is the TCP peer's address; `forwarded_for` the X-Forwarded-For header values in
    order (a request may carry several header lines); `proxies` the trusted networks.
    """
    addr = _parse(peer) if peer else None
    if addr is None:
        return peer or "unknown"
    if not proxies or not _trusted(addr, proxies):
        return str(addr)
    hops = [h for value in forwarded_for for h in value.split(",")]
    for hop in reversed(hops):
        hop_addr = _parse(hop)
        if hop_addr is None:
            # Garbage in the chain: nothing left of it can be believed; the last trusted
            # hop is the best we know.
            return str(addr)
        if not _trusted(hop_addr, proxies):
            return str(hop_addr)
        addr = hop_addr
    return str(addr)
