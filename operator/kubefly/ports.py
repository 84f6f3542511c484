"""Free loopback ports for the processes that tests, benchmarks and dev tools start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_TAKEN: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (gossip uses both), below the
    ephemeral range so outgoing connections cannot take it between now and bind,
    and never handed out twice by this process."""
    lo, _ = _ephemeral_range()
    for _ in range(1000):
        port = random.randrange(10000, lo)
        if port in _TAKEN:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                t.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        _TAKEN.add(port)
        return port
    raise RuntimeError("no free port")
