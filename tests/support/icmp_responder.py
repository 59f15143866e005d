"""An ICMP echo responder that answers after a delay, run inside a test network namespace.

These kernels have no netem, so delay is made in user space: the namespace's kernel echo is
switched off (`net.ipv4.icmp_echo_ignore_all=1`) and this process answers each echo
request `delay ± jitter` ms (uniform) after the kernel received it: the delay is counted
from the kernel's receive timestamp, not from when this loop got round to the packet, so a
burst of requests (or a busy machine) does not add its own wait to every answer.

    ip netns exec <ns> python -m tests.support.icmp_responder --delay-ms 20 --jitter-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import struct
import time

from poller.pingers.icmp import _SO_TIMESTAMPNS, _checksum, _kernel_time


def reply_for(packet: bytes) -> tuple[str, bytes] | None:
    ihl = (packet[0] & 0x0F) * 4
    src = socket.inet_ntoa(packet[12:16])
    icmp = packet[ihl:]
    if len(icmp) < 8 or icmp[0] != 8:  # echo requests only
        return None
    body = b"\0\0\0\0" + icmp[4:]  # type 0 (echo reply), code 0, checksum 0, same id/seq/data
    body = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
    return src, body


async def main(delay_ms: float, jitter_ms: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        while True:
            try:
                packet, ancdata, _, _ = sock.recvmsg(4096, 64)
            except BlockingIOError:
                return
            answer = reply_for(packet)
            if answer is not None:
                wait = random.uniform(delay_ms - jitter_ms, delay_ms + jitter_ms) / 1000
                waited = (time.time_ns() - _kernel_time(ancdata)) / 1e9  # since it arrived
                loop.call_at(loop.time() + wait - waited, sock.sendto, answer[1],
                             (answer[0], 0))

    loop.add_reader(sock.fileno(), readable)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay-ms", type=float, default=20)
    parser.add_argument("--jitter-ms", type=float, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.delay_ms, args.jitter_ms))
