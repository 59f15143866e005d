"""Test hosts in network namespaces this test session creates and removes (root only).

Each host is a namespace joined to the test's namespace by a veth pair on its own
10.250.<n>.0/24: the test side is .1, the host .2. Nothing leaves the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: iproute2, nftables)"
    probe = subprocess.run(["ip", "netns", "add", f"sc-probe-{os.getpid()}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"sc-probe-{os.getpid()}"], check=False)
    return None


def veth_host(netns: str, subnet: int, prefix: int, outside: str,
              inside: str) -> list[tuple[str, ...]]:
    """The commands, in order, that make network namespace `netns` a host at
    10.250.<subnet>.2/<prefix>, reached through a veth pair whose end `outside` (in the
    caller's namespace) is 10.250.<subnet>.1. Shared by the test hosts here and the node
    agent's pods, each running them its own way."""
    inner = ("ip", "netns", "exec", netns)
    return [("ip", "netns", "add", netns),
            ("ip", "link", "add", outside, "type", "veth", "peer", "name", inside),
            ("ip", "link", "set", inside, "netns", netns),
            ("ip", "addr", "add", f"10.250.{subnet}.1/{prefix}", "dev", outside),
            ("ip", "link", "set", outside, "up"),
            (*inner, "ip", "addr", "add", f"10.250.{subnet}.2/{prefix}", "dev", inside),
            (*inner, "ip", "link", "set", inside, "up"),
            (*inner, "ip", "link", "set", "lo", "up")]


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


@dataclass
class NetnsHost:
    name: str
    subnet: int
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def ip(self) -> str:
        return f"10.250.{self.subnet}.2"

    @property
    def absent_ip(self) -> str:
        """An address on this host's link that nobody answers (ARP fails)."""
        return f"10.250.{self.subnet}.99"

    def run(self, *cmd: str) -> None:
        _sh("ip", "netns", "exec", self.name, *cmd)

    def create(self) -> None:
        for cmd in veth_host(self.name, self.subnet, 24, f"sco{self.subnet}",
                             f"sci{self.subnet}"):
            _sh(*cmd)

    def drop_echo_requests(self, percent: int) -> None:
        self.run("nft", "add", "table", "inet", "loss")
        self.run("nft", "add", "chain", "inet", "loss", "input",
                 "{ type filter hook input priority 0; }")
        self.run("nft", "add", "rule", "inet", "loss", "input", "icmp", "type", "echo-request",
                 "numgen", "random", "mod", "100", "<", str(percent), "drop")

    def answer_after(self, delay_ms: float, jitter_ms: float) -> None:
        self.run("sysctl", "-q", "-w", "net.ipv4.icmp_echo_ignore_all=1")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, "-m",
             "tests.support.icmp_responder", "--delay-ms", str(delay_ms),
             "--jitter-ms", str(jitter_ms)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"  # the responder's socket is open
        self.processes.append(proc)

    def destroy(self) -> None:
        for proc in self.processes:
            proc.terminate()
            proc.wait(timeout=10)
        subprocess.run(["ip", "link", "del", f"sco{self.subnet}"], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
