"""Hybrid logical clock: versions that order writes across hosts.

A timestamp is one int: wall-clock milliseconds in the high bits, a 16-bit
logical counter in the low bits. It never goes backwards on one host (even
if the wall clock does, or across restarts when seeded from the store), and
it moves past every timestamp the host has seen, so a later write by the
same origin always wins last-writer-wins.
"""

from __future__ import annotations

import time
from typing import Callable

LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1
# A remote timestamp further ahead of our wall clock than this is refused:
# one host with a broken clock must not drag every version into the future.
MAX_DRIFT_MS = 60_000


def pack(wall_ms: int, logical: int = 0) -> int:
    return (wall_ms << LOGICAL_BITS) | logical


def wall_ms(ts: int) -> int:
    return ts >> LOGICAL_BITS


def wall_s(ts: int) -> float:
    return (ts >> LOGICAL_BITS) / 1000.0


class ClockDrift(ValueError):
    pass


class HLC:
    def __init__(self, last: int = 0, clock: Callable[[], float] = time.time):
        self._clock = clock
        self.last = last

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def now(self) -> int:
        """A timestamp for a local event, greater than every one before it."""
        pt = pack(self._now_ms())
        self.last = pt if pt > self.last else self.last + 1
        return self.last

    def observe(self, remote: int) -> None:
        """Move past a timestamp received from a peer (refusing absurd drift)."""
        if wall_ms(remote) - self._now_ms() > MAX_DRIFT_MS:
            raise ClockDrift(f"remote clock {wall_ms(remote) - self._now_ms()} ms ahead")
        if remote > self.last:
            self.last = remote
