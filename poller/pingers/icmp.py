"""In-process ICMP echo, IPv4 and IPv6, on one shared socket per address family.

Written by hand because the Python ICMP libraries measured here (icmplib) open a socket
per ping and time replies in user space: 5-15x the CPU and RTTs inflated by milliseconds
under load. Here:
- ping sockets (SOCK_DGRAM, unprivileged: the process group must be inside the
  `net.ipv4.ping_group_range` sysctl) first, raw sockets (CAP_NET_RAW) as the fallback;
- one socket per family, read by an event-loop reader callback, non-blocking;
- replies matched on (address, identifier, sequence); with ping sockets the kernel owns
  the identifier and only delivers our replies, with raw sockets we filter on our own;
- RTT = kernel receive timestamp (SO_TIMESTAMPNS) minus the send time taken just before
  sendto, so a busy event loop does not inflate it;
- a large receive buffer, so a burst of replies is not dropped as false loss;
- raw IPv4 sockets set ICMP_FILTER (and raw IPv6 ICMP6_FILTER) so they do not read back
  every echo request sent on loopback.
Pings in flight are bounded by the caller (the prober's CONCURRENCY) and by 65,536
sequence numbers per family.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import struct
import time
from collections import deque
from typing import Literal

from ..models import SampleStatus
from . import Done, PingResult, parse_ip, ping, system_error

SocketKind = Literal["auto", "dgram", "raw"]

_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux, 64-bit timespec
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SOL_RAW = 255
_ICMP_FILTER = 1
_ICMP6_FILTER = 1
_RCVBUF = 8 * 1024 * 1024
_EXPIRY_TICK_S = 0.1
_PAYLOAD = b"soundcheck-ping"  # 15 bytes, plus 1 of padding below: 16-byte payload
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}  # IP version → address family
_ECHO = {4: (8, 0), 6: (128, 129)}  # family → (echo request type, echo reply type)
_UNREACHABLE = {4: 3, 6: 1}

TIMEOUT_TEXT = "timeout: no reply"
UNREACHABLE_TEXT = "destination host unreachable"


class IcmpUnavailable(RuntimeError):
    """Neither a ping socket nor a raw socket could be opened."""


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


_HEADER = struct.Struct("!BBHHH")
_PADDED = _PAYLOAD + b"\0"


class _Requests:
    """Echo requests of one family and identifier, built per ping without summing the
    packet: only the sequence number changes, so the checksum is the precomputed sum of
    the rest plus that number (RFC 1624's incremental update), folded."""

    def __init__(self, version: int, ident: int) -> None:
        self.kind, self.ident, self.v4 = _ECHO[version][0], ident, version == 4
        self.rest = _HEADER.pack(self.kind, 0, 0, ident, 0) + _PADDED
        self.partial = sum(struct.unpack(f"!{len(self.rest) // 2}H", self.rest))

    def __call__(self, seq: int) -> bytes:
        checksum = 0
        if self.v4:
            total = self.partial + seq
            total = (total >> 16) + (total & 0xFFFF)
            total += total >> 16
            checksum = ~total & 0xFFFF
        return _HEADER.pack(self.kind, 0, checksum, self.ident, seq) + _PADDED


class _Wait:
    """One ping out: its callback and send time. Compared by identity, so a sequence
    number reused after wrapping never completes the wrong ping."""

    __slots__ = ("deadline", "done", "fam", "key", "sent_ns")

    def __init__(self, fam: _Family, key: tuple[bytes, int], done: Done, sent_ns: int,
                 deadline: float) -> None:
        self.fam, self.key, self.done, self.sent_ns, self.deadline = (
            fam, key, done, sent_ns, deadline)


class _Family:
    """One socket of one address family and the pings waiting on it."""

    def __init__(self, version: int, sock: socket.socket, raw: bool) -> None:
        self.version = version
        self.af = _AF[version]
        self.sock = sock
        self.raw = raw
        # Raw sockets see every echo reply on the host: ours carry this identifier.
        self.ident = os.getpid() & 0xFFFF if raw else 0
        self.request = _Requests(version, self.ident)
        self.seq = itertools.count()
        # Keyed by (packed address, sequence): a reply's source and an error's quoted
        # destination come as bytes or text in the kernel's own form, whatever the text
        # the ping was asked for.
        self.waiting: dict[tuple[bytes, int], _Wait] = {}


def _open(version: int, kind: SocketKind) -> _Family:
    family = _AF[version]
    proto = socket.IPPROTO_ICMP if version == 4 else socket.IPPROTO_ICMPV6
    errors = []
    for raw in ([False, True] if kind == "auto" else [kind == "raw"]):
        try:
            sock = socket.socket(family, socket.SOCK_RAW if raw else socket.SOCK_DGRAM, proto)
        except PermissionError as exc:
            errors.append(exc)
            continue
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        if raw and version == 4:
            allowed = (1 << 0) | (1 << 3)  # echo reply, destination unreachable
            sock.setsockopt(_SOL_RAW, _ICMP_FILTER, struct.pack("I", ~allowed & 0xFFFFFFFF))
        elif raw:
            blocked = [0xFFFFFFFF] * 8  # ICMP6_FILTER: a set bit blocks that type
            for t in (1, 129):
                blocked[t >> 5] &= ~(1 << (t & 31))
            sock.setsockopt(socket.IPPROTO_ICMPV6, _ICMP6_FILTER, struct.pack("8I", *blocked))
        return _Family(version, sock, raw)
    raise IcmpUnavailable(
        f"cannot open an ICMPv{version} socket ({errors[-1] if errors else 'unsupported'}): "
        "allow ping sockets with the sysctl net.ipv4.ping_group_range (e.g. "
        "'0 2147483647', a safe pod sysctl) or grant the NET_RAW capability"
    )


class IcmpPinger:
    def __init__(self, timeout_s: float = 2.0, socket_kind: SocketKind = "auto") -> None:
        self._timeout = timeout_s
        self._kind = socket_kind
        self._families: dict[int, _Family] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # Every ping has the same timeout, so deadlines arrive in send order: one queue
        # and one timer for all of them instead of a timer per ping.
        self._deadlines: deque[_Wait] = deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def socket_kinds(self) -> dict[int, str]:
        """IP version → "dgram" or "raw", for logs and tests."""
        return {v: "raw" if f.raw else "dgram" for v, f in self._families.items()}

    @property
    def in_flight(self) -> int:
        return sum(len(f.waiting) for f in self._families.values())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._families[4] = _open(4, self._kind)
        # A host without IPv6: IPv6 targets are answered with system_error.
        with contextlib.suppress(IcmpUnavailable, OSError):
            self._families[6] = _open(6, self._kind)
        for fam in self._families.values():
            self._loop.add_reader(fam.sock.fileno(), self._on_readable, fam)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fam in self._families.values():
            if self._loop is not None:
                self._loop.remove_reader(fam.sock.fileno())
            fam.waiting.clear()
            fam.sock.close()
        self._families.clear()
        self._deadlines.clear()

    def submit(self, ip: str, done: Done) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("IcmpPinger.start() was not called")
        try:
            # Dotted-quad IPv4, nearly every target: one C call checks and packs it.
            target, packed, version = ip, socket.inet_pton(socket.AF_INET, ip), 4
        except (OSError, ValueError, TypeError):
            parsed = parse_ip(ip)
            if parsed is None:
                loop.call_soon(done, system_error(f"invalid target address {ip!r}"))
                return
            version, target = parsed
            packed = socket.inet_pton(_AF[version], target)
        fam = self._families.get(version)
        if fam is None:
            loop.call_soon(done, system_error(f"no ICMPv{version} socket"))
            return
        for _ in range(65536):
            key = (packed, next(fam.seq) & 0xFFFF)
            if key not in fam.waiting:
                break
        else:
            loop.call_soon(done, system_error("too many pings in flight"))
            return
        sent_ns = time.time_ns()
        try:
            fam.sock.sendto(fam.request(key[1]), (target, 0))
        except OSError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
                result = PingResult(SampleStatus.MISSED, None, UNREACHABLE_TEXT)
            else:
                result = system_error(f"sendto failed: {exc.strerror}")
            loop.call_soon(done, result)
            return
        wait = _Wait(fam, key, done, sent_ns, loop.time() + self._timeout)
        fam.waiting[key] = wait
        self._deadlines.append(wait)
        if self._timer is None:
            self._timer = loop.call_at(wait.deadline, self._expire_due)

    async def ping(self, ip: str) -> PingResult:
        return await ping(self, ip)

    def _expire_due(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        queue = self._deadlines
        while queue and queue[0].deadline <= now:
            wait = queue.popleft()
            if wait.fam.waiting.get(wait.key) is wait:
                del wait.fam.waiting[wait.key]
                wait.done(PingResult(SampleStatus.MISSED, None, TIMEOUT_TEXT))
        # At most every _EXPIRY_TICK_S: the queue also holds pings already answered, whose
        # deadlines are as dense as the sends; waking for each would cost a loop turn per
        # ping. A timeout is noticed up to that much late (its sample still says when the
        # ping started).
        self._timer = self._loop.call_at(max(queue[0].deadline, now + _EXPIRY_TICK_S),
                                         self._expire_due) if queue else None

    def _on_readable(self, fam: _Family) -> None:
        while True:
            try:
                data, ancdata, _, source = fam.sock.recvmsg(2048, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. an ICMP error queued on the socket; the ping will time out
            self._on_packet(fam, data, source[0], _kernel_time(ancdata))

    def _on_packet(self, fam: _Family, data: bytes, source: str, received_ns: int) -> None:
        if fam.raw and fam.version == 4:
            data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 sockets include the IP header
        if len(data) < 8:
            return
        kind, _, _, ident, seq = struct.unpack_from("!BBHHH", data)
        if kind == _ECHO[fam.version][1]:
            if fam.raw and ident != fam.ident:
                return  # another process's reply
            try:
                key = (socket.inet_pton(fam.af, source.split("%", 1)[0] if fam.version == 6
                                        else source), seq)
            except OSError:
                return
            wait = fam.waiting.pop(key, None)
            if wait is not None:
                # Floor of 1 µs: a success always has rtt > 0.
                rtt_ms = max(received_ns - wait.sent_ns, 1_000) / 1e6
                wait.done(PingResult(SampleStatus.SUCCESS, round(rtt_ms, 3)))
        elif kind == _UNREACHABLE[fam.version] and fam.raw:
            quoted = _quoted_echo(fam, data[8:])
            wait = fam.waiting.pop(quoted, None) if quoted else None
            if wait is not None:
                wait.done(PingResult(SampleStatus.MISSED, None, UNREACHABLE_TEXT))


def _quoted_echo(fam: _Family, inner: bytes) -> tuple[bytes, int] | None:
    """(packed destination, sequence) of our echo request quoted in an ICMP error, if it
    is ours."""
    if fam.version == 4:
        if len(inner) < 20:
            return None
        dest = inner[16:20]
        inner = inner[(inner[0] & 0x0F) * 4:]
    else:
        if len(inner) < 40:
            return None
        dest = inner[24:40]
        inner = inner[40:]
    if len(inner) < 8:
        return None
    _, _, _, ident, seq = struct.unpack_from("!BBHHH", inner)
    return (dest, seq) if ident == fam.ident else None


def _kernel_time(ancdata: list[tuple[int, int, bytes]]) -> int:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack_from("qq", data)
            return int(sec) * 1_000_000_000 + int(nsec)
    return time.time_ns()
