"""Events and replacements after an API outage: one Event per transition, no pod replaced on a stale read."""

from kubefly.machines.lifecycle import Exit, HostHealth, reconcile

from test_lifecycle import machine, pod_of, run, world


def test_a_pod_newer_than_the_machine_status_read_is_never_replaced():
    """After an API outage a replica read the Machine before the latest replacement: the pod it finds is
    of a version its status does not know yet. That is a stale read, not a reason to replace."""
    m = machine(status={"host": "a1", "region": "ams"})
    pod = pod_of(run(m))
    stale = {**m, "status": dict(m["status"])}  # version 1
    run(m, pod=pod)
    m["spec"]["image"], m["metadata"]["generation"] = "nginx:2", 2
    run(m, pod=pod)  # replacing: version 2
    new = pod_of(run(m))  # the version-2 pod
    stale["spec"], stale["metadata"] = m["spec"], m["metadata"]
    plan = reconcile(world(stale, pod=new))
    assert plan.delete_pod_grace is None and plan.create_pod is None
    assert plan.events == [] and plan.status.get("events") == stale["status"].get("events")


def test_a_replacement_whose_delete_is_not_seen_yet_is_not_announced_again():
    """One Replacing Event and one `replacing` entry per replacement, however often the machine is
    reconciled before the watch shows the old pod terminating."""
    m = machine(status={"host": "a1", "region": "ams"})
    pod = pod_of(run(m))
    run(m, pod=pod)
    m["spec"]["image"], m["metadata"]["generation"] = "nginx:2", 2
    first = run(m, pod=pod)
    assert [r for _, r, _ in first.events] == ["Replacing"]
    entries = list(m["status"]["events"])
    for _ in range(3):
        again = run(m, pod=pod)  # the old pod, not yet marked deleting
        assert again.delete_pod_grace is not None and again.events == []
        assert m["status"]["events"] == entries and m["status"]["version"] == 2


def test_every_transition_says_so_once():
    """Reconciling the same world twice posts nothing the second time (one Event per transition)."""
    m = machine(status={"host": "a1", "region": "ams"})
    pod = pod_of(run(m))
    scenarios = [dict(pod=pod), dict(pod=pod, host=HostHealth("a1", False, "2026-11-23T11:59:00Z")),
                 dict(pod=pod), dict(pod=pod_of(run(m), restart_count=1, last_exit=Exit(1, False, "Error"))),
                 dict(pod=pod, host=None), dict(pod=pod)]
    for kw in scenarios:
        run(m, **kw)
        again = run(m, **kw)
        assert again.events == [], f"{kw}: {again.events}"
