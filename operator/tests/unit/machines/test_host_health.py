"""Host health from two sides, the Node (API server) and the host agents' gossip: who lost sight of the host."""

import pytest
from test_lifecycle import NOW, machine, pod_of, run

from kubefly.conditions import get_condition
from kubefly.machines.lifecycle import HostHealth, host_verdict

SINCE = "2026-11-23T11:59:00Z"
STAYS = "the machine stays bound to it; to run elsewhere now, delete this Machine and create a new one"
DESTRUCTIVE = ("delete", "fork", "create a new")


@pytest.mark.parametrize("node_ready, agents, status, reason, event", [
    (False, "alive", "Unknown", "HostUnreportedByAPI", "Normal"),  # a control-plane or kubelet hiccup
    (False, "suspect", "False", "HostNotReady", "Warning"),
    (False, "dead", "False", "HostNotReady", "Warning"),  # both sides lost it: host loss
    (False, None, "False", "HostNotReady", "Warning"),  # no gossip view: the Node alone decides, as before
    (True, "dead", "False", "HostUnreachableByAgents", "Warning"),  # degraded: peers cannot reach its agent
    (True, "suspect", "True", "HostReady", None),
    (True, "alive", "True", "HostReady", None),
    (True, None, "True", "HostReady", None),
])
def test_the_rules(node_ready, agents, status, reason, event):
    v = host_verdict("a1", HostHealth("a1", node_ready, SINCE, agents), STAYS)
    assert (v.status, v.reason, v.event) == (status, reason, event)
    if reason == "HostNotReady":
        assert STAYS in v.message and "comes back when the host does" in v.message
    else:
        assert not any(word in v.message for word in DESTRUCTIVE), v.message


def test_the_message_names_the_side_that_lost_sight_of_the_host():
    api_only = host_verdict("a1", HostHealth("a1", False, SINCE, "alive"), STAYS).message
    assert "API server" in api_only and "alive in gossip" in api_only and SINCE in api_only
    both = host_verdict("a1", HostHealth("a1", False, SINCE, "dead"), STAYS).message
    assert "NotReady" in both and "dead in gossip" in both
    peers = host_verdict("a1", HostHealth("a1", True, SINCE, "dead"), STAYS).message
    assert "Ready for the API server" in peers and "peers lost its agent" in peers
    assert host_verdict("a1", None, STAYS).reason == "HostGone"


def test_an_api_outage_is_no_host_loss_for_the_machine():
    """Every Node NotReady for a few seconds after the control plane was paused, the agents fine all
    along: no Warning, no remedy, the machine keeps its Ready and its pod, one Normal Event."""
    m = machine(status={"host": "a1", "region": "ams"})
    pod = pod_of(run(m))
    run(m, pod=pod)
    assert get_condition(m["status"]["conditions"], "Ready")["status"] == "True"
    plan = run(m, pod=pod, host=HostHealth("a1", False, SINCE, "alive"))
    assert [(t, r) for t, r, _ in plan.events] == [("Normal", "HostUnreportedByAPI")]
    assert get_condition(plan.status["conditions"], "HostReady")["status"] == "Unknown"
    assert get_condition(plan.status["conditions"], "Ready")["status"] == "True"
    assert plan.delete_pod_grace is None and plan.create_pod is None
    assert m["status"]["events"][-1]["status"] == "unreported"
    plan = run(m, pod=pod, host=HostHealth("a1", True, NOW.isoformat(), "alive"))
    assert [(t, r) for t, r, _ in plan.events] == [("Normal", "HostRecovered")]
    assert get_condition(plan.status["conditions"], "HostReady")["status"] == "True"


def test_host_loss_seen_by_both_sides_is_the_alarm_with_its_remedy():
    m = machine(status={"host": "a1", "region": "ams"})
    pod = pod_of(run(m))
    run(m, pod=pod)
    plan = run(m, pod=pod, host=HostHealth("a1", False, SINCE, "dead"))
    assert [(t, r) for t, r, _ in plan.events] == [("Warning", "HostNotReady")]
    assert get_condition(plan.status["conditions"], "Ready")["reason"] == "HostNotReady"
    assert "delete this Machine" in get_condition(plan.status["conditions"], "HostReady")["message"]
