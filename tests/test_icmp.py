"""In-process ICMP with real packets: loopback, and test hosts in network namespaces.

Every host test runs with ping sockets and with raw sockets. The namespace hosts need root
(CI runs as root) and skip elsewhere with the reason.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poller.models import SampleStatus
from poller.pingers import PingResult
from poller.pingers.icmp import (
    _ECHO,
    _HEADER,
    _PADDED,
    TIMEOUT_TEXT,
    IcmpPinger,
    IcmpUnavailable,
    _checksum,
    _open,
    _Requests,
)
from tests.support.netns import NetnsHost, unavailable_reason

KINDS = ["dgram", "raw"]
_GROUP_RANGE = "/proc/sys/net/ipv4/ping_group_range"


def _set_group_range(value: str) -> None:
    done = subprocess.run(["sysctl", "-q", "-w", f"net.ipv4.ping_group_range={value}"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot set net.ipv4.ping_group_range here: {done.stderr.strip()}")


def _group_range() -> tuple[int, int]:
    low, high = Path(_GROUP_RANGE).read_text().split()
    return int(low), int(high)


@contextmanager
def _group_range_set(value: str) -> Iterator[None]:
    before = "{} {}".format(*_group_range())
    _set_group_range(value)
    try:
        yield
    finally:
        _set_group_range(before)


@pytest.fixture(scope="session")
def ping_sockets_allowed() -> Iterator[None]:
    """Let this process's group open ping sockets; restores the sysctl afterwards."""
    low, high = _group_range()
    gid = os.getgid()
    if low <= gid <= high:
        yield
    elif os.geteuid() != 0:
        pytest.skip(f"ping sockets need gid {gid} in net.ipv4.ping_group_range (root to set)")
    else:
        with _group_range_set(f"{gid} {gid}"):
            yield


@pytest.fixture(params=KINDS)
async def pinger(request: pytest.FixtureRequest) -> AsyncIterator[IcmpPinger]:
    if request.param == "dgram":
        request.getfixturevalue("ping_sockets_allowed")
    elif os.geteuid() != 0:
        pytest.skip("raw sockets need root or CAP_NET_RAW")
    p = IcmpPinger(timeout_s=1.0, socket_kind=request.param)
    await p.start()
    assert p.socket_kinds[4] == request.param
    yield p
    await p.close()


async def ping_all(pinger: IcmpPinger, ips: list[str], window: int = 200) -> list[PingResult]:
    sem = asyncio.Semaphore(window)

    async def one(ip: str) -> PingResult:
        async with sem:
            return await pinger.ping(ip)

    return list(await asyncio.gather(*(one(ip) for ip in ips)))


async def test_loopback_v4_and_v6(pinger: IcmpPinger) -> None:
    targets = ["127.0.0.1", "127.0.0.2", "127.1.2.3"] + (["::1"] if 6 in pinger.socket_kinds
                                                        else [])
    results = await ping_all(pinger, targets * 50)
    assert all(r.status is SampleStatus.SUCCESS for r in results), results
    assert all(r.rtt_ms is not None and 0 < r.rtt_ms < 50 for r in results)
    assert pinger.in_flight == 0


async def test_many_in_flight_match_their_own_replies(pinger: IcmpPinger) -> None:
    ips = [f"127.0.{i // 250}.{i % 250 + 1}" for i in range(3000)]
    results = await ping_all(pinger, ips, window=1000)
    assert [r.status for r in results].count(SampleStatus.SUCCESS) == len(ips)


async def test_invalid_target_is_a_system_error(pinger: IcmpPinger) -> None:
    assert (await pinger.ping("not-an-ip")).status is SampleStatus.SYSTEM_ERROR


@given(st.sampled_from([4, 6]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_echo_requests_carry_the_checksum_of_the_whole_packet(
        version: int, ident: int, seq: int) -> None:
    """The incremental checksum equals RFC 792's sum over the packet, for every identifier
    and sequence number (ICMPv6 leaves it to the kernel: zero)."""
    packet = _Requests(version, ident)(seq)
    reference = 0
    if version == 4:
        reference = _checksum(_HEADER.pack(_ECHO[4][0], 0, 0, ident, seq) + _PADDED)
        assert _checksum(packet) == 0  # a packet with a right checksum sums to zero
    assert packet == _HEADER.pack(_ECHO[version][0], 0, reference, ident, seq) + _PADDED


def test_no_socket_says_what_to_grant() -> None:
    low, high = _group_range()
    if low <= os.getgid() <= high:
        if os.geteuid() != 0:
            pytest.skip("ping sockets are allowed here and only root may forbid them")
        with _group_range_set("1 0"), pytest.raises(IcmpUnavailable) as err:
            _open(4, "dgram")
    else:
        with pytest.raises(IcmpUnavailable) as err:
            _open(4, "dgram")
    assert "net.ipv4.ping_group_range" in str(err.value) and "NET_RAW" in str(err.value)


# Hosts in network namespaces ----------------------------------------------------------

@pytest.fixture(scope="session")
def hosts() -> Iterator[dict[str, NetnsHost]]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 10000
    made = {
        "clean": NetnsHost(f"sc-clean-{tag}", 1),
        "lossy": NetnsHost(f"sc-lossy-{tag}", 2),
        "slow": NetnsHost(f"sc-slow-{tag}", 3),
    }
    try:
        for host in made.values():
            host.create()
        made["lossy"].drop_echo_requests(10)
        made["slow"].answer_after(delay_ms=20, jitter_ms=5)
        yield made
    finally:
        for host in made.values():
            host.destroy()


async def test_clean_host(pinger: IcmpPinger, hosts: dict[str, NetnsHost]) -> None:
    results = await ping_all(pinger, [hosts["clean"].ip] * 300)
    assert all(r.status is SampleStatus.SUCCESS for r in results)
    rtts = [r.rtt_ms for r in results if r.rtt_ms is not None]
    assert len(rtts) == 300
    assert statistics.median(rtts) < 5  # a veth hop, no added delay


@pytest.mark.slow  # seconds: out of the fast lane
async def test_lossy_host_loses_about_ten_percent(pinger: IcmpPinger,
                                                  hosts: dict[str, NetnsHost]) -> None:
    n = 1500
    results = await ping_all(pinger, [hosts["lossy"].ip] * n, window=500)
    lost = sum(r.status is SampleStatus.MISSED for r in results)
    assert all(r.status is not SampleStatus.SYSTEM_ERROR for r in results)
    # Each request is dropped independently with p = 0.1, so losses ~ Binomial(1500, 0.1):
    # mean 150, sd ≈ 11.6. ±4.5 sd (98…202, 6.5%…13.5%) fails by chance about once in
    # 150,000 runs, yet catches a pinger that loses replies of its own (or sees none lost).
    assert 98 <= lost <= 202, lost


async def test_slow_host_answers_after_twenty_ms(pinger: IcmpPinger,
                                                 hosts: dict[str, NetnsHost]) -> None:
    results = await ping_all(pinger, [hosts["slow"].ip] * 300)
    rtts = [r.rtt_ms for r in results
            if r.status is SampleStatus.SUCCESS and r.rtt_ms is not None]
    assert len(rtts) == 300
    # The responder draws 15-25 ms (median 20) but its own event loop sends late on a
    # loaded machine: medians of 23.2-23.3 ms were seen in full-suite runs on 2 cores. A
    # pinger that timed replies when it read them (not at the kernel's receive time), or
    # from the dispatch, would be far off this band.
    assert 18 <= statistics.median(rtts) <= 28
    assert min(rtts) >= 14  # the responder never answers early


@pytest.mark.slow  # seconds: out of the fast lane
async def test_absent_host_is_missed(pinger: IcmpPinger, hosts: dict[str, NetnsHost]) -> None:
    results = await ping_all(pinger, [hosts["clean"].absent_ip] * 5)
    assert all(r.status is SampleStatus.MISSED for r in results)
    assert all(r.detail in (TIMEOUT_TEXT, "destination host unreachable") for r in results)
