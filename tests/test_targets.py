"""Which addresses a job may target (docs/architecture.md, "Targets"), and what the others
become."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poller.settings import ConfigError, Settings
from poller.targets import TargetPolicy, parse_networks

POLICY = TargetPolicy()


@pytest.mark.parametrize(("target", "address"), [
    ("127.0.0.1", "127.0.0.1"),
    (" 127.0.0.1 ", "127.0.0.1"),  # whitespace is normalised away
    ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped: pinged as IPv4
    ("2001:DB8::1", "2001:db8::1"),
    ("::1", "::1"),
    ("10.20.30.40", "10.20.30.40"),
])
def test_allowed_targets_are_normalised(target: str, address: str) -> None:
    assert POLICY.check(target) == (address, None)


@pytest.mark.parametrize(("target", "why"), [
    ("0.0.0.0", "denied network 0.0.0.0/8"),
    ("::", "denied network ::/128"),
    ("224.0.0.1", "denied network 224.0.0.0/4"),
    ("ff02::1", "denied network ff00::/8"),
    ("255.255.255.255", "denied network 255.255.255.255/32"),
    ("169.254.1.1", "denied network 169.254.0.0/16"),
    ("fe80::1", "denied network fe80::/10"),
    ("fe80::1%eth0", "zone"),
    ("::ffff:224.0.0.1", "denied network 224.0.0.0/4"),  # mapped, then checked
    ("not-an-ip", "invalid target"),
    (None, "no target"),
])
def test_refused_targets_say_why(target: str | None, why: str) -> None:
    address, problem = POLICY.check(target)
    assert address is None and problem is not None and why in problem


def test_the_deny_list_is_a_setting() -> None:
    settings = Settings.from_env({"DATABASE_URL": "postgresql://h/db",
                                  "TARGET_DENY": "10.0.0.0/8, 2001:db8::/32"})
    policy = TargetPolicy(parse_networks(settings.target_deny))
    assert policy.check("10.1.2.3")[0] is None
    assert policy.check("224.0.0.1")[0] == "224.0.0.1"  # the defaults were replaced
    assert TargetPolicy(parse_networks("none")).check("0.0.0.0")[0] == "0.0.0.0"
    with pytest.raises(ConfigError, match="TARGET_DENY: 'nope' is not an IP network"):
        Settings.from_env({"DATABASE_URL": "postgresql://h/db", "TARGET_DENY": "10.0.0.0/8,nope"})


@given(st.ip_addresses())
def test_what_passes_is_canonical_and_outside_every_denied_network(
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    address, problem = POLICY.check(str(addr))
    assert (address is None) != (problem is None)
    if address is not None:
        parsed = ipaddress.ip_address(address)
        assert str(parsed) == address
        assert not any(parsed.version == n.version and parsed in n
                       for n in parse_networks(",".join(
                           ["0.0.0.0/8", "::/128", "224.0.0.0/4", "ff00::/8",
                            "255.255.255.255/32", "169.254.0.0/16", "fe80::/10"])))


_NETS4 = st.builds(lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False),
                  st.ip_addresses(v=4), st.integers(0, 32))


@given(st.ip_addresses(v=4), st.lists(_NETS4, max_size=4),
       st.sampled_from(["{}", " {} ", "::ffff:{}"]))
def test_the_ipv4_fast_path_agrees_with_ipaddress(
        addr: ipaddress.IPv4Address, deny: list[ipaddress.IPv4Network], form: str) -> None:
    """Canonical IPv4 text takes a fast path (no `ipaddress`, no cache); any other spelling
    of the same address takes the general one: both give the same answer."""
    policy = TargetPolicy(deny)
    fast = policy.check(str(addr))
    general = policy._check(form.format(addr))
    assert fast[0] == general[0]
    assert (fast[1] is None) == (general[1] is None)
