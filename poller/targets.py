"""Which addresses a job may target, and the one normal form each is pinged at.

A target is stripped of surrounding whitespace and parsed with `ipaddress`; an IPv4-mapped
IPv6 address (`::ffff:192.0.2.1`) is pinged as the IPv4 address it maps; an address with a
zone (`fe80::1%eth0`) is refused, as is any address inside a denied network. The default
deny list holds what is never a monitoring target: unspecified (0.0.0.0/8, ::), multicast,
the limited broadcast address and link-local. `TARGET_DENY` replaces it (comma-separated
networks; `none` allows every address). A refused target is never sent to a pinger: its
slots are recorded as `system_error` so the app shows why.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .pingers import canonical_ipv4, parse_ip

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_DENY = ("0.0.0.0/8", "::/128", "224.0.0.0/4", "ff00::/8", "255.255.255.255/32",
                "169.254.0.0/16", "fe80::/10")


def parse_networks(text: str) -> tuple[IpNetwork, ...]:
    """`TARGET_DENY`'s value → networks; ValueError names the entry that is not one."""
    if text.strip().lower() == "none":
        return ()
    nets = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network (like 224.0.0.0/4)") from None
    return tuple(nets)


class TargetPolicy:
    def __init__(self, deny: Iterable[IpNetwork] | None = None) -> None:
        self._deny = tuple(parse_networks(",".join(DEFAULT_DENY)) if deny is None else deny)
        # IPv4 networks as (address, mask) integers: the fast path below checks a canonical
        # IPv4 target (nearly every job) in about a microsecond, with no cache.
        self._deny4 = tuple((int(n.network_address), int(n.netmask), n) for n in self._deny
                            if isinstance(n, ipaddress.IPv4Network))
        self._seen: dict[str, tuple[str | None, str | None]] = {}

    def check(self, target: str | None) -> tuple[str | None, str | None]:
        """(address to ping, None) or (None, why it is refused)."""
        if target is None:
            return None, "the job has no target IP address"
        n = canonical_ipv4(target)
        if n is not None:
            for address, mask, net in self._deny4:
                if n & mask == address:
                    return None, f"target {target!r} is in the denied network {net}"
            return target, None
        found = self._seen.get(target)  # anything else: parsed once, cached
        if found is None:
            found = self._seen[target] = self._check(target)
            if len(self._seen) > 1 << 14:  # bounded: targets come from user input
                self._seen.clear()
        return found

    def _check(self, target: str) -> tuple[str | None, str | None]:
        if "%" in target:
            return None, f"target {target!r}: addresses with a zone are not allowed"
        parsed = parse_ip(target)
        if parsed is None:
            return None, f"invalid target address {target!r}"
        addr = ipaddress.ip_address(parsed[1])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        for net in self._deny:
            if addr.version == net.version and addr in net:
                return None, f"target {target!r} is in the denied network {net}"
        text = str(addr)
        return (target if text == target else text), None  # one string per job, not two
