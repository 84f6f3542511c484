"""The host agents' view of which hosts are alive (gossip membership), beside the Nodes' view.

A Node NotReady says only that the API server has not heard from the host's
kubelet: after a control-plane outage every Node is NotReady for a few
seconds while hosts and agents ran fine. The agents probe each other (SWIM)
without the API server, so the operator asks them: every POLL_S it reads
GET /v1/members from two agents (at the hosts' InternalIPs, the agents' members
port; rotating), and a host's state is the best either saw it in. No answer for
STALE_AFTER_S: no gossip view, and the Node alone decides, as without agents.

A death is believed only once it has lasted DEAD_AFTER_S in the view: a host
that restarted, or whose agent stalled for a moment, is declared dead by a
peer and refutes it within seconds; users get no Warning for a rumour.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import aiohttp
import structlog

from kubefly.gossip.membership import ALIVE, DEAD, SUSPECT

log = structlog.get_logger("kubefly.controllers.gossipview")
POLL_S = 2.0
STALE_AFTER_S = 10.0
DEAD_AFTER_S = 6.0  # about three polls: longer than a refutation takes to spread among the agents
ASK = 2  # agents asked per round: one agent cut off from its peers would see everyone dead
_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2}


def parse_members(doc: dict) -> dict[str, str]:
    """host -> alive|suspect|dead from one agent's /v1/members (the agent that answered is alive)."""
    out = {m["host"]: m["state"] for m in doc.get("members") or []
           if isinstance(m, dict) and isinstance(m.get("host"), str) and m.get("state") in _RANK}
    me = (doc.get("self") or {}).get("host")
    if isinstance(me, str) and me:
        out[me] = ALIVE
    return out


def merge(views: list[dict[str, str]]) -> dict[str, str]:
    """The best state any agent saw each host in."""
    out: dict[str, str] = {}
    for view in views:
        for host, state in view.items():
            if host not in out or _RANK[state] < _RANK[out[host]]:
                out[host] = state
    return out


class GossipView:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.states: dict[str, str] = {}
        self.at: float | None = None
        self.dead_since: dict[str, float] = {}
        self._told: dict[str, str] = {}  # what state() said at the last update: changes are against it

    def state(self, host: str) -> str | None:
        """alive, suspect, dead; None: no fresh view, or no agent of that host in it.

        A host dead in the view for less than DEAD_AFTER_S is only suspect."""
        now = self.clock()
        if self.at is None or now - self.at > STALE_AFTER_S:
            return None
        state = self.states.get(host)
        if state == DEAD and now - self.dead_since[host] < DEAD_AFTER_S:  # update() keeps both in step
            return SUSPECT
        return state

    def update(self, states: dict[str, str]) -> set[str]:
        """Take a fresh view; the hosts whose state() changed (a view that went stale counts as changed)."""
        now = self.clock()
        if self.at is None or now - self.at > STALE_AFTER_S:
            self.dead_since = {}  # a view resumed after a gap (a new leadership term) times deaths afresh
        self.dead_since = {h: self.dead_since.get(h, now) for h, st in states.items() if st == DEAD}
        self.states, self.at = states, now
        return self._changes()

    def expire(self) -> set[str]:
        """Hosts that lose their gossip state because no agent answered for too long."""
        if self.at is not None and self.clock() - self.at > STALE_AFTER_S and self.states:
            self.states, self.dead_since = {}, {}
        return self._changes()

    def _changes(self) -> set[str]:
        told = {h: st for h in self.states if (st := self.state(h)) is not None}
        changed = {h for h in told.keys() | self._told.keys() if told.get(h) != self._told.get(h)}
        self._told = told
        return changed


async def poll(view: GossipView, addresses: Callable[[], dict[str, str]], port: int,
               on_change: Callable[[set[str]], None], stop: asyncio.Event) -> None:
    """Keep `view` fresh from the agents at `addresses()` (host -> IP); call on_change with changed hosts."""
    turn = 0
    timeout = aiohttp.ClientTimeout(total=1.5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set():
            hosts = sorted(addresses().items())
            answers: list[dict[str, str]] = []
            for i in range(min(len(hosts), ASK + 2)):  # a round stays short when agents do not answer
                if len(answers) >= ASK:
                    break
                host, ip = hosts[(turn + i) % len(hosts)]
                try:
                    async with session.get(f"http://{ip}:{port}/v1/members") as resp:
                        if resp.status == 200:
                            answers.append(parse_members(await resp.json()))
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    continue
            turn += 1
            changed = view.update(merge(answers)) if answers else view.expire()
            if changed:
                log.info("gossip view of hosts changed", hosts={h: view.state(h) for h in sorted(changed)})
                on_change(changed)
            try:
                await asyncio.wait_for(stop.wait(), POLL_S)
            except TimeoutError:
                pass
