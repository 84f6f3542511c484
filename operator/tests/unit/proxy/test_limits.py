"""The edge's view of load and the host's slot accounting, over a static replica."""

from __future__ import annotations

import asyncio
import json

import pytest

from kubefly.gossip.client import LocalReplica
from kubefly.proxy import config as config_mod
from kubefly.proxy.proxy import Proxy
from kubefly.proxy.replica import StaticReplica


def row(mid, host, load=0, hard=4):
    return {"org": "o", "app": "web", "machine_id": mid, "instance_id": mid, "region": "ams", "host": host,
            "address": "127.0.0.1", "state": "started", "check_status": "passing", "load": load,
            "services": [{"internal_port": 9000, "ports": [80], "http_ports": [80], "soft_limit": 2, "hard_limit": hard}]}


@pytest.fixture
def proxy(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([row("here", "h1", load=3), row("there", "h2", load=9), row("nolimit", "h2", load=9, hard=None)]))
    return Proxy(StaticReplica(path, "h1", "ams"), config_mod.Config())


def by_id(proxy, mid):
    return next(i for i in proxy.replica.instances("o", "web") if i.machine_id == mid)


def test_own_host_load_is_the_exact_count_not_the_gossiped_one(proxy):
    here = by_id(proxy, "here")
    assert proxy.load(here) == 0
    assert proxy.acquire(here, 4)
    assert proxy.load(here) == 1


def test_gossiped_load_ranks_but_never_rules_out(proxy):
    there = by_id(proxy, "there")
    assert proxy.load(there) == 3  # gossip says 9 (old news): capped below the hard limit (4)
    proxy.outstanding[there.key] = 4  # this edge's own requests in flight are exact
    assert proxy.load(there) == 4
    assert proxy.load(by_id(proxy, "nolimit")) == 9


async def test_slots_stop_at_the_hard_limit_and_a_release_wakes_a_waiter(proxy):
    here = by_id(proxy, "here")
    assert all(proxy.acquire(here, 2) for _ in range(2))
    assert not proxy.acquire(here, 2)
    waiter = asyncio.create_task(proxy._wait_for_slot(("o", "web"), 5))
    await asyncio.sleep(0)
    proxy.release(here)
    await asyncio.wait_for(waiter, 1)  # woken by the release, not by its 5 s timeout
    assert proxy.acquire(here, 2)
    assert not proxy.waiters[("o", "web")]


def test_hop_address_comes_from_the_agents_member_data():
    replica = LocalReplica()
    replica.apply_snapshot({"self": {"host": "h1", "region": "ams"},
                            "instances": [row("there", "h2"), row("far", "h3"), row("lost", "h4")]})
    # What GET /v1/members answers: each member's advertised gossip address.
    replica.apply_members({"members": [{"host": "h2", "addr": "10.1.0.2:7946", "state": "alive"},
                                       {"host": "h3", "addr": "fd00::3:7946", "state": "alive"}]})
    proxy = Proxy(replica, config_mod.Config(), hop_port=5281)
    inst = {i.machine_id: i for i in replica.instances("o", "web")}
    assert proxy._hop_target(inst["there"]) == ("10.1.0.2", 5281)  # every host's proxy: the same hop port
    assert proxy._hop_target(inst["far"]) == ("fd00::3", 5281)
    assert proxy._hop_target(inst["lost"]) is None  # no member address: skipped, never guessed
    proxy.config = config_mod.Config(hop_port=4999)
    assert proxy._hop_target(inst["there"]) == ("10.1.0.2", 4999)


def test_strategy_choice_and_validation(tmp_path):
    cfg = config_mod.Config(leastload_threshold=3, strategies={"o/big": "closest"})
    assert cfg.strategy_for("o", "web", 3) == "closest"
    assert cfg.strategy_for("o", "web", 4) == "leastload"
    assert cfg.strategy_for("o", "big", 100) == "closest"
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategies: {o/web: fastest}\n")
    with pytest.raises(ValueError, match="unknown strategy"):
        config_mod.load(bad, {})


class _Body:
    """A request body of `size` bytes that arrives when released (the proxy reads it with read_upto)."""

    def __init__(self, size: int):
        self.size, self.empty, self.arrived = size, size == 0, asyncio.Event()

    async def read_upto(self, limit: int) -> tuple[bytes, bool]:
        await self.arrived.wait()
        return (b"x" * self.size, True) if self.size <= limit else (b"", False)


class _Req:
    def __init__(self, size: int):
        self.body = _Body(size)


async def test_bodies_held_for_a_retry_share_one_budget_and_past_it_stream(tmp_path):
    """Each body up to replay_body_limit is held so the request can be retried elsewhere, but all
    of them together stay within replay_budget_bytes: past it, a body streams (not replayable)."""
    path = tmp_path / "rows.json"
    path.write_text("[]")
    cfg = config_mod.Config(replay_body_limit=600, replay_budget_bytes=1000)
    proxy = Proxy(StaticReplica(path, "h1", "ams"), cfg)
    reqs = [_Req(500), _Req(500), _Req(500)]
    reads = [asyncio.create_task(proxy._read_for_replay(r, cfg)) for r in reqs]
    await asyncio.sleep(0)
    assert proxy._replay_held == 1000  # reserved before reading: 600 + 400, the third gets nothing
    for r in reqs:
        r.body.arrived.set()
    (b1, ok1, h1), (b2, ok2, h2), (b3, ok3, h3) = await asyncio.gather(*reads)
    assert (ok1, h1, ok2, ok3, h3) == (True, 500, False, False, 0) and h2 == 0
    assert proxy._replay_held == 500  # what was not used went back at once
    proxy._release_replay(h1)
    assert proxy._replay_held == 0
    body, ok, held = await proxy._read_for_replay(_Req(0), cfg)
    assert (body, ok, held) == (b"", True, 0)
