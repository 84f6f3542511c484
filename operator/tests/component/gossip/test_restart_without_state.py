"""A host whose agent restarts without its store (the chart keeps none) and whose
source has not answered yet: a worker that boots reaches the Kubernetes API only
once kube-proxy has written its rules. Its machines must stay in every replica
meanwhile, not be denied by the agent that knows nothing yet (that made a
restarted worker's Ready machine unroutable until its pod list came in)."""

from __future__ import annotations

import asyncio

import pytest

from kubefly.gossip.agent import Agent, AgentConfig
from kubefly.gossip.harness import free_port
from kubefly.gossip.sources import LocalMachine
from kubefly.gossip.wire import Keys

pytestmark = pytest.mark.component

KEYS = Keys.from_secret(b"a-cluster-key-for-this-test-only")


def agent(host: str, port: int, seeds: list[int], sync_interval: float = 0.3) -> Agent:
    return Agent(AgentConfig(host=host, region="r0", gossip_port=port, seeds=[("127.0.0.1", s) for s in seeds],
                             probe_interval=0.2, probe_timeout=0.1, sync_interval=sync_interval), KEYS)


def machine(mid: str, state: str = "started", address: str = "10.0.0.7") -> LocalMachine:
    return LocalMachine("acme", "web", mid, f"{mid}-1", "r0", address, state,
                        ({"internal_port": 8080, "ports": [80]},))


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def row(a: Agent, mid: str):
    return next((i for i in a.instances("acme", "web") if i.machine_id == mid), None)


async def test_a_restarted_agent_keeps_its_rows_until_its_source_answers():
    pa, pb = free_port(), free_port()
    edge, worker = agent("edge", pa, [pb]), agent("worker", pb, [pa])
    await edge.start()
    await worker.start()
    try:
        worker.set_local({m.key: m for m in (machine("w1"), machine("w2"))})
        await until(lambda: row(edge, "w1") is not None and row(edge, "w2") is not None)
        await worker.stop()
        await asyncio.sleep(0.5)  # its sockets are closed on the next loop turns

        # Back, memory only, the source silent: it pulls its own rows from the edge and keeps them.
        worker = agent("worker", pb, [pa])
        await worker.start()
        await asyncio.sleep(1.5)  # several syncs both ways
        assert not worker.local_known
        assert row(edge, "w1") is not None and row(edge, "w2") is not None
        assert row(worker, "w1") is not None, "its own rows, as the peers hold them"

        # The source answers: w1 runs at a new address, w2 is gone. That, and only that, is refuted.
        worker.set_local({m.key: m for m in (machine("w1", address="10.0.0.9"),)})
        await until(lambda: row(edge, "w2") is None and (row(edge, "w1") or machine("x")).address == "10.0.0.9")
        assert row(worker, "w2") is None
    finally:
        await worker.stop()
        await edge.stop()


async def test_rows_of_stopped_machines_gossip_but_never_route():
    pa, pb = free_port(), free_port()
    edge, worker = agent("edge", pa, [pb]), agent("worker", pb, [pa])
    await edge.start()
    await worker.start()
    try:
        worker.set_local({m.key: m for m in (machine("s1", "stopped", ""), machine("c1", "created", ""))})
        await until(lambda: row(edge, "s1") is not None and row(edge, "c1") is not None)
        assert {(i.state.value, i.routable, i.host) for i in edge.instances("acme", "web")} == {
            ("stopped", False, "worker"), ("created", False, "worker")}
    finally:
        await worker.stop()
        await edge.stop()


async def test_a_host_that_comes_back_unable_to_resolve_its_seeds_is_met_within_a_probe_interval():
    """A booting host cannot resolve its seeds (cluster DNS is a Service, routed only once its
    kube-proxy is up): its peers find it by pinging members they think dead, and both sides
    exchange rows at once. Syncs are made rare here, so they cannot be what finds it."""
    pa, pb, pc = free_port(), free_port(), free_port()
    # A third host, so the edge is never alone (an agent alone rejoins through its seeds every second).
    edge, other = agent("edge", pa, [pc], sync_interval=60), agent("other", pc, [pa], sync_interval=60)
    worker = agent("worker", pb, [pa], sync_interval=60)
    await edge.start()
    await other.start()
    await worker.start()
    try:
        worker.set_local({m.key: m for m in (machine("w1"),)})
        await until(lambda: row(edge, "w1") is not None)
        await worker.stop()
        await until(lambda: row(edge, "w1") is None)  # declared dead: its rows leave the view
        await asyncio.sleep(0.5)

        worker = agent("worker", pb, [], sync_interval=60)  # no seed it can reach
        await worker.start()
        worker.set_local({m.key: m for m in (machine("w1", address="10.0.0.9"),)})
        started = asyncio.get_running_loop().time()
        await until(lambda: (row(edge, "w1") or machine("x")).address == "10.0.0.9", timeout=5)
        print(f"[component] restarted host without seeds: its row at the peer after "
              f"{asyncio.get_running_loop().time() - started:.2f}s (probe interval 0.2 s, syncs every 60 s)")
    finally:
        await worker.stop()
        await other.stop()
        await edge.stop()
