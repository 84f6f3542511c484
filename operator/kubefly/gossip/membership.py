"""SWIM membership: who is in the cluster, who is suspected, who is dead.

Failure detection (driven by the agent): every probe interval one member,
in shuffled round-robin order, is pinged directly; without an ack within
the probe timeout, k other members are asked to ping it (indirect probe);
without any ack by the end of the interval it becomes *suspect*. A suspect
that does not refute within the suspicion timeout (scaled by log10 of the
cluster size) is declared *dead*. A member refutes a suspicion or death
about itself by raising its incarnation number.

Dissemination: state changes are queued and piggybacked on outgoing
datagrams, each sent a bounded number of times (log-scaled), newest first;
anti-entropy sync also exchanges the whole member list.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

ALIVE, SUSPECT, DEAD = "alive", "suspect", "dead"
_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2}


@dataclass
class Member:
    host: str
    ip: str
    port: int
    region: str
    inc: int = 0
    state: str = ALIVE
    since: float = field(default_factory=time.monotonic)
    rtt: float | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return (self.ip, self.port)

    def update(self) -> list:
        return [self.host, self.ip, self.port, self.region, self.inc, self.state]


def parse_update(u: object) -> list | None:
    if (isinstance(u, list) and len(u) == 6 and isinstance(u[0], str) and u[0]
            and isinstance(u[1], str) and isinstance(u[2], int) and 0 < u[2] < 65536
            and isinstance(u[3], str) and isinstance(u[4], int) and u[4] >= 0 and u[5] in _RANK):
        return u
    return None


class Membership:
    def __init__(self, me: Member, *, probe_interval: float = 1.0, suspicion_mult: float = 4.0,
                 retransmit_mult: int = 3, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[Member, str], None] | None = None):
        self.me = me
        self.members: dict[str, Member] = {}
        self.probe_interval = probe_interval
        self.suspicion_mult = suspicion_mult
        self.retransmit_mult = retransmit_mult
        self._clock = clock
        self._on_change = on_change or (lambda m, old: None)
        self._queue: dict[str, list] = {}  # host -> [update, transmissions left]
        self._order: list[str] = []

    # -- views ------------------------------------------------------------------
    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.state != DEAD]

    def dead(self) -> list[Member]:
        return [m for m in self.members.values() if m.state == DEAD]

    def is_live(self, host: str) -> bool:
        if host == self.me.host:
            return True
        # An origin we have not heard of yet (just restarted) is served, not hidden:
        # only a death we know of takes its rows out of the view.
        m = self.members.get(host)
        return m is None or m.state != DEAD

    def size(self) -> int:
        return 1 + len(self.alive())

    def suspicion_timeout(self) -> float:
        return self.suspicion_mult * max(1.0, math.log10(self.size() + 1)) * self.probe_interval

    def transmissions(self) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(self.size() + 1)))

    def all_updates(self) -> list[list]:
        return [self.me.update()] + [m.update() for m in self.members.values()]

    # -- probing ----------------------------------------------------------------
    def next_probe_target(self) -> Member | None:
        for _ in range(2):
            while self._order:
                m = self.members.get(self._order.pop())
                if m is not None and m.state != DEAD:
                    return m
            self._order = [m.host for m in self.alive()]
            random.shuffle(self._order)
        return None

    def random_alive(self, k: int, exclude: set[str] = frozenset()) -> list[Member]:
        pool = [m for m in self.members.values() if m.state != DEAD and m.host not in exclude]
        return random.sample(pool, min(k, len(pool)))

    def record_rtt(self, host: str, rtt: float) -> None:
        m = self.members.get(host)
        if m is not None:
            m.rtt = rtt if m.rtt is None else 0.7 * m.rtt + 0.3 * rtt

    # -- state changes ----------------------------------------------------------
    def suspect(self, host: str) -> None:
        m = self.members.get(host)
        if m is not None and m.state == ALIVE:
            self._set(m, SUSPECT, m.inc)

    def tick(self) -> None:
        """Declare dead the suspects whose suspicion timed out."""
        now, limit = self._clock(), self.suspicion_timeout()
        for m in list(self.members.values()):
            if m.state == SUSPECT and now - m.since >= limit:
                self._set(m, DEAD, m.inc)

    def apply(self, u: list) -> bool:
        """Merge one update [host, ip, port, region, inc, state]; True if it changed anything."""
        host, ip, port, region, inc, state = u
        if host == self.me.host:
            if state != ALIVE and inc >= self.me.inc:
                # Refute: we are alive, with a newer incarnation than the rumour.
                self.me.inc = inc + 1
                self._enqueue(self.me.update())
                return True
            return False
        m = self.members.get(host)
        if m is None:
            if state == DEAD:
                return False  # no need to learn about members that are already gone
            m = Member(host, ip, port, region, inc, state, self._clock())
            self.members[host] = m
            self._enqueue(m.update())
            self._on_change(m, DEAD)
            return True
        if inc < m.inc:
            return False
        if state == ALIVE:
            if inc == m.inc:
                return False
        elif inc == m.inc and _RANK[state] <= _RANK[m.state]:
            return False
        m.ip, m.port, m.region = ip, port, region
        self._set(m, state, inc)
        return True

    def _set(self, m: Member, state: str, inc: int) -> None:
        old = m.state
        m.state, m.inc = state, inc
        if old != state:
            m.since = self._clock()
        self._enqueue(m.update())
        if old != state:
            self._on_change(m, old)

    def _enqueue(self, u: list) -> None:
        self._queue[u[0]] = [u, self.transmissions()]

    def announce(self) -> None:
        """Queue our own alive state (at start, after a refutation)."""
        self._enqueue(self.me.update())

    def take_updates(self, limit: int = 8) -> list[list]:
        """Updates to piggyback on one datagram, the least-sent first."""
        if not self._queue:
            return []
        picked = sorted(self._queue.items(), key=lambda kv: -kv[1][1])[:limit]
        out = []
        for host, entry in picked:
            out.append(entry[0])
            entry[1] -= 1
            if entry[1] <= 0:
                del self._queue[host]
        return out
