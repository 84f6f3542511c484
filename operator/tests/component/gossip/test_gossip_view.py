"""The operator's gossip view of hosts, read from real agents' members API on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest

from kubefly.controllers import gossipview
from kubefly.gossip.harness import AgentCluster, free_port

pytestmark = pytest.mark.component


class WithMembersAPI(AgentCluster):
    """Agents 0 and 1 also serve the read-only members API, as the chart runs them."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.members_port = {a.host: free_port() for a in self.agents[:2]}

    def command(self, a):
        cmd = super().command(a)
        if a.host in self.members_port:
            cmd += ["--members-api", f"127.0.0.1:{self.members_port[a.host]}"]
        return cmd


async def test_the_view_sees_a_killed_host_dead_and_never_a_live_one():
    cluster = WithMembersAPI(3, extra_args=("--probe-interval", "0.2", "--probe-timeout", "0.1", "--suspicion-mult", "2"))
    view, changes, stop = gossipview.GossipView(), [], asyncio.Event()
    asked = cluster.agents[0]
    await cluster.start()
    try:
        # The poller reaches agents at <IP>:<one port>; on loopback each has its own port, so ask agent 0.
        task = asyncio.create_task(gossipview.poll(view, lambda: {asked.host: "127.0.0.1"},
                                                   cluster.members_port[asked.host], changes.append, stop))
        hosts = [a.host for a in cluster.agents]
        deadline = time.monotonic() + 30
        while [view.state(h) for h in hosts] != ["alive"] * 3:
            assert time.monotonic() < deadline, f"every host alive in the view: {view.states}"
            await asyncio.sleep(0.2)
        victim = cluster.agents[2]
        cluster.kill(victim)
        killed = time.monotonic()
        while view.state(victim.host) != "dead":
            assert time.monotonic() < killed + 30, f"{victim.host} dead in the view: {view.states}"
            assert view.state(asked.host) == "alive" and view.state(cluster.agents[1].host) == "alive"
            await asyncio.sleep(0.2)
        print(f"[gossip view] {victim.host} dead {time.monotonic() - killed:.1f}s after SIGKILL")
        assert any(victim.host in c for c in changes)
        stop.set()
        await task
    finally:
        stop.set()
        await cluster.close()


def test_merge_takes_the_best_state_any_agent_saw():
    a = gossipview.parse_members({"self": {"host": "h1"}, "members": [{"host": "h2", "state": "dead"},
                                                                    {"host": "h3", "state": "suspect"}]})
    b = gossipview.parse_members({"self": {"host": "h2"}, "members": [{"host": "h1", "state": "alive"},
                                                                    {"host": "h3", "state": "dead"}, {"bad": 1}]})
    assert a == {"h1": "alive", "h2": "dead", "h3": "suspect"}
    assert gossipview.merge([a, b]) == {"h1": "alive", "h2": "alive", "h3": "suspect"}


def test_a_view_nobody_refreshed_is_no_view():
    now = [0.0]
    view = gossipview.GossipView(clock=lambda: now[0])
    assert view.state("h1") is None
    assert view.update({"h1": "alive"}) == {"h1"}
    assert view.update({"h1": "alive"}) == set()
    now[0] = gossipview.STALE_AFTER_S + 1
    assert view.state("h1") is None and view.expire() == {"h1"}


def test_a_death_counts_only_once_it_lasts():
    """A restarted host, or an agent that stalled, is declared dead by a peer and refutes it in
    seconds: the view says suspect until the death has lasted DEAD_AFTER_S, then dead (a change)."""
    now = [0.0]
    view = gossipview.GossipView(clock=lambda: now[0])
    assert view.update({"h1": "alive", "h2": "alive"}) == {"h1", "h2"}
    now[0] = 2.0
    assert view.update({"h1": "alive", "h2": "dead"}) == {"h2"}
    assert view.state("h2") == "suspect"
    now[0] = 4.0
    assert view.update({"h1": "alive", "h2": "alive"}) == {"h2"}  # refuted: never dead
    assert view.state("h2") == "alive"
    now[0] = 6.0
    assert view.update({"h1": "alive", "h2": "dead"}) == {"h2"}
    now[0] = 6.0 + gossipview.DEAD_AFTER_S - 0.1
    assert view.update({"h1": "alive", "h2": "dead"}) == set() and view.state("h2") == "suspect"
    now[0] = 6.0 + gossipview.DEAD_AFTER_S
    assert view.update({"h1": "alive", "h2": "dead"}) == {"h2"} and view.state("h2") == "dead"


def test_a_death_is_timed_afresh_when_the_view_resumes_after_a_gap():
    """The poller stops while its replica is not the leader; a death seen before the gap is not a
    death that lasted through it."""
    now = [0.0]
    view = gossipview.GossipView(clock=lambda: now[0])
    view.update({"h1": "alive", "h2": "dead"})
    now[0] = gossipview.STALE_AFTER_S + 30  # no round meanwhile: leadership lost, then regained
    view.update({"h1": "alive", "h2": "dead"})
    assert view.state("h2") == "suspect"
    now[0] += gossipview.DEAD_AFTER_S
    assert view.update({"h1": "alive", "h2": "dead"}) == {"h2"} and view.state("h2") == "dead"
