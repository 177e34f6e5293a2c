"""A userspace delaying router: every IPv4 packet routed into a TUN device comes back out of it a fixed time later.

netns_lab.py runs it inside the "public network" namespace when a lab is made with a WAN delay (this kernel
has no netem): there, packets between hosts are routed into the TUN device, this process holds each one for
the delay and writes it back, and the kernel routes it on to its destination. Whole packets are delayed,
addresses untouched: every host still sees its peers' real addresses (a TCP proxy would hide them).

    python wan_delay.py TUN_NAME DELAY_MS

Prints ``ready`` once the device exists (the lab then brings it up and routes through it). Each line on stdin
sets a new one-way delay in ms for packets read from then on (packets already held keep theirs, so the order
is kept); end of stdin or SIGTERM stops it. Memory is bounded: past :data:`MAX_HELD` packets held, new ones are
dropped, as a full router queue would.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_HELD = 20000  # packets held at once (about 30 MB of full-size packets)
MAX_PACKET = 65536


def open_tun(name: str) -> int:
    """A TUN device ``name`` (IP packets, no extra header), gone when the returned descriptor closes."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def run(fd: int, delay: float) -> None:
    """Hold every packet read from ``fd`` for ``delay`` seconds (stdin lines change it), then write it back."""
    held: collections.deque[tuple[float, bytes]] = collections.deque()
    control = sys.stdin.fileno()
    watched = [fd, control]
    while True:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else None
        readable, _, _ = select.select(watched, [], [], timeout)
        if control in readable:
            line = sys.stdin.readline()
            if not line:
                return
            delay = float(line) / 1000
        if fd in readable:
            now = time.monotonic()
            while True:
                try:
                    packet = os.read(fd, MAX_PACKET)
                except BlockingIOError:
                    break
                if len(held) < MAX_HELD:
                    held.append((now + delay, packet))
        now = time.monotonic()
        while held and held[0][0] <= now:
            with contextlib.suppress(OSError):  # an unroutable packet: dropped, as a router would
                os.write(fd, held.popleft()[1])


def main() -> None:
    name, delay_ms = sys.argv[1], float(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    fd = open_tun(name)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    run(fd, delay_ms / 1000)


if __name__ == "__main__":
    main()
