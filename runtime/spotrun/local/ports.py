"""Free TCP ports for the servers local mode (and its tests) start later: rendezvous, emulators.

The usual trick, bind port 0 and close, returns a port from the kernel's ephemeral range
(`net.ipv4.ip_local_port_range`, 32768-60999 by default). The kernel hands the same range out
to every outgoing connection's source port, so in the moment between the probe and the
server's own bind, a client connecting anywhere (a TCPStore peer, a bucket request) can take
it, and rank 0's TCPStore fails with EADDRINUSE. Ports below the ephemeral range are only ever
taken by a process that binds them by number, so a port picked at random there and found free
stays free until its server binds it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Below the ephemeral range, above the well-known Kubernetes ports (6443, 10248-10259) and
# below the NodePort range (30000-32767).
LOWEST = 15000
HIGHEST = 29999
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_TRIES = 200


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for source ports (Linux's default where it cannot be read)."""
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def candidates(ephemeral: tuple[int, int]) -> range:
    """The ports to pick from: [LOWEST, HIGHEST] less any overlap with `ephemeral`."""
    low, high = ephemeral
    if high < LOWEST or low > HIGHEST:
        return range(LOWEST, HIGHEST + 1)
    if low > LOWEST:
        return range(LOWEST, low)
    if high < HIGHEST:
        return range(high + 1, HIGHEST + 1)
    return range(0)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing has bound on `host`, outside the kernel's ephemeral range.

    Falls back to a kernel-chosen port when the ephemeral range leaves no room (a machine
    configured so) or every try is taken.
    """
    pool = candidates(ephemeral_range())
    for port in random.sample(pool, min(_TRIES, len(pool))):
        if _bindable(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
