"""The routed gate: a host agent says a machine without checks is published only once its row is
in its own store and on its way to the peers, so a pod Ready behind the gate is routable."""

from __future__ import annotations

import asyncio

import pytest

from kubefly import labels
from kubefly.gossip.harness import free_port
from kubefly.gossip.checks import CheckSpec
from kubefly.gossip.sources import LocalMachine, PodSource
from test_restart_without_state import agent, machine, row, until

pytestmark = pytest.mark.component


async def test_a_machine_is_told_published_after_its_row_is_written_and_reaches_the_peer():
    pa, pb = free_port(), free_port()
    edge, worker = agent("edge", pa, [pb]), agent("worker", pb, [pa])
    told: list[tuple[str, bool]] = []
    worker.on_published = lambda m: told.append((m.machine_id, row(worker, m.machine_id) is not None))
    await edge.start()
    await worker.start()
    try:
        # A machine with checks is told through its verdict (the checks gate), not here.
        checked = LocalMachine("acme", "web", "k1", "k1-1", "r0", "10.0.0.8", "started",
                               checks=(CheckSpec.from_json({"name": "a", "type": "tcp", "port": 9}),))
        worker.set_local({m.key: m for m in (machine("w1"), machine("s1", "stopped", ""), machine("c1", "created", ""),
                                             machine("n1", "started", ""), checked)})
        # Told for the started machine with an address, each time the agent reconciles; its own
        # row was already in its view when told.
        assert told == [("w1", True)]
        worker.set_local({m.key: m for m in (machine("w1"),)})
        assert told == [("w1", True)] * 2
        started = asyncio.get_running_loop().time()
        await until(lambda: row(edge, "w1") is not None, timeout=2)
        print(f"[component] published row at the peer {asyncio.get_running_loop().time() - started:.3f}s after told")
    finally:
        await worker.stop()
        await edge.stop()


def _pod(gated: bool, routed: str | None = None) -> dict:
    conds = [{"type": "Ready", "status": "False"}] + ([{"type": labels.ROUTED, "status": routed}] if routed else [])
    return {"metadata": {"namespace": "acme", "name": "w1", "annotations": {labels.INSTANCE_ID: "w1-1"}},
            "spec": {"readinessGates": [{"conditionType": labels.ROUTED}]} if gated else {},
            "status": {"conditions": conds}}


@pytest.mark.parametrize("pod, writes", [(_pod(True), 1), (_pod(True, "False"), 1), (_pod(True, "True"), 0),
                                         (_pod(False), 0), (None, 0)])
def test_the_routed_gate_is_written_only_where_it_is_not_yet_passed(pod, writes):
    src = PodSource("worker", "r0", lambda _: None)
    if pod is not None:
        src._pods["acme/w1"] = pod
    written = []
    src._write_condition = lambda *job: written.append((*job[:3], job[3]("T")["type"]))
    src.report_published(machine("w1"))
    src._writer.shutdown(wait=True)
    assert written == [("acme", "w1", "w1-1", labels.ROUTED)] * writes
