"""The machine state machine and pod builder, as pure functions."""

import json
from datetime import datetime, timedelta, timezone

from kubefly import labels
from kubefly.conditions import get_condition, set_condition
from kubefly.machines.lifecycle import (
    POD_REFUSED,
    Exit,
    HostHealth,
    PodView,
    VolumeView,
    World,
    pod_refused_message,
    pod_view,
    reconcile,
)
from kubefly.machines.pod import CHECKS_GATE, ROUTED_GATE, SECRETS_DIGEST, SecretRef, build_pod, spec_digest
from kubefly.placement.machines import Decision
from kubefly.platform import Maintenance, PlatformSettings

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
HOST = HostHealth("a1", True, None)


def machine(status=None, generation=1, annotations=None, **spec):
    return {
        "apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine",
        "metadata": {"name": "m1", "namespace": "o", "uid": "u1", "generation": generation,
                     "annotations": annotations or {}},
        "spec": {"app": "web", "region": "ams", "image": "nginx", **spec},
        "status": status or {},
    }


def world(m, **kw):
    kw.setdefault("host", HOST)
    kw.setdefault("secrets", [])
    return World(m, True, "spec is valid", NOW, **kw)


def cond(plan, type_):
    return get_condition(plan.status["conditions"], type_)


def run(m, **kw):
    """Apply a plan's status to the machine, as the controller does."""
    plan = reconcile(world(m, **kw))
    m["status"] = {**m["status"], **plan.status}
    return plan


def pod_of(plan, **kw) -> PodView:
    p = plan.create_pod
    base = dict(name="m1", instance=p["metadata"]["annotations"][labels.INSTANCE_ID],
                spec_digest=p["metadata"]["annotations"]["kubefly.dev/spec-digest"],
                secrets_digest=p["metadata"]["annotations"][SECRETS_DIGEST], phase="Running", deleting=False,
                ready=True, running=True, restart_count=0, last_exit=None, waiting_reason=None, unschedulable=None,
                ip="10.0.0.5")
    return PodView(**{**base, **kw})


def test_placement_then_pod_in_one_pass():
    m = machine()
    plan = run(m, decision=Decision("a1", "Placed", "placed on a1"))
    assert plan.status["host"] == "a1" and plan.status["state"] == "starting"
    assert plan.create_pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchFields"][0]["values"] == ["a1"]
    assert plan.status["version"] == 1 and plan.status["instanceId"]
    assert [e["type"] for e in plan.status["events"]] == ["launch", "start"]
    # One Kubernetes Event for placed-and-starting; later starts say Starting.
    assert [reason for _, reason, _ in plan.events] == ["Placed"] and "starting instance" in plan.events[0][2]


def test_no_room_fails_with_the_reason_and_creates_nothing_then_stays_failed():
    m = machine()
    d = Decision(None, "InsufficientCapacity", "no room in region ams: memory short")
    plan = run(m, decision=d)
    assert plan.status["state"] == "failed" and plan.create_pod is None
    assert cond(plan, "Placed")["reason"] == "InsufficientCapacity"
    assert ("Warning", "InsufficientCapacity", d.message) in plan.events
    again = reconcile(world(m, decision=Decision("a1", "Placed", "ok")))
    assert again.create_pod is None and again.placement is None  # final until the spec changes
    m["metadata"]["generation"] = 2
    assert reconcile(world(m, decision=Decision("a1", "Placed", "ok"))).create_pod is not None


def test_a_refused_pod_is_final_for_the_spec_then_a_changed_spec_tries_again():
    m = machine()
    plan = run(m, decision=Decision("a1", "Placed", "placed on a1"))
    assert plan.create_pod is not None
    # What the controller writes when the API server answers the create with 403/422.
    message = pod_refused_message(403, 'pods "m1" is forbidden: exceeded quota: pods')
    m["status"]["state"] = "failed"
    m["status"]["conditions"] = set_condition(m["status"]["conditions"], "Ready", False, POD_REFUSED, message, 1)
    again = run(m)
    assert again.create_pod is None and m["status"]["state"] == "failed"
    assert cond(again, "Ready")["reason"] == POD_REFUSED and "exceeded quota" in cond(again, "Ready")["message"]
    m["metadata"]["generation"] = 2
    assert run(m).create_pod is not None


def test_desired_stopped_only_creates_then_start_is_immediate():
    m = machine(state="stopped")
    plan = run(m, decision=Decision("a1", "Placed", "ok"))
    assert plan.status["state"] == "created" and plan.create_pod is None
    m["spec"]["state"], m["metadata"]["generation"] = "started", 2
    plan = run(m)
    assert plan.create_pod is not None and plan.status["state"] == "starting"
    assert [reason for _, reason, _ in plan.events] == ["Starting"]


def test_applied_stopped_reads_created_until_it_has_run_then_stopped_and_stopped_holds_for_both():
    # Fly's words: created = never started; stopped = it ran and was stopped (or exited).
    m = machine(state="stopped")
    plan = run(m, decision=Decision("a1", "Placed", "ok"))
    assert plan.status["state"] == "created"
    assert (cond(plan, "Stopped")["status"], cond(plan, "Stopped")["reason"]) == ("True", "NeverStarted")
    m["spec"]["state"], m["metadata"]["generation"] = "started", 2
    started = run(m)
    assert cond(started, "Stopped")["status"] == "False" and cond(started, "Stopped")["reason"] == "Starting"
    assert cond(run(m, pod=pod_of(started)), "Stopped")["reason"] == "Started"
    m["spec"]["state"], m["metadata"]["generation"] = "stopped", 3
    stopping = run(m, pod=pod_of(started))
    assert stopping.status["state"] == "stopping" and cond(stopping, "Stopped")["status"] == "False"
    plan = run(m)  # the pod is gone
    assert plan.status["state"] == "stopped"
    assert (cond(plan, "Stopped")["status"], cond(plan, "Stopped")["reason"]) == ("True", "Stopped")


def test_running_ready_pod_is_started_and_ready_and_checks_gate_ready_only():
    m = machine(status={"host": "a1", "region": "ams"})
    p = run(m)
    plan = run(m, pod=pod_of(p))
    assert plan.status["state"] == "started" and cond(plan, "Ready")["status"] == "True"
    plan = run(m, pod=pod_of(p, ready=False))
    assert plan.status["state"] == "started" and cond(plan, "Ready")["reason"] == "ChecksFailing"
    assert plan.delete_pod_grace is None


def test_spec_change_replaces_on_same_host_with_new_version():
    m = machine(status={"host": "a1", "region": "ams"}, stop={"timeoutSeconds": 30})
    first = run(m)
    pod = pod_of(first)
    run(m, pod=pod)
    m["spec"]["image"], m["metadata"]["generation"] = "nginx:2", 2
    plan = run(m, pod=pod)
    assert plan.status["state"] == "replacing" and plan.delete_pod_grace == 30
    assert plan.status["version"] == 2 and plan.status["instanceId"] != pod.instance
    plan = run(m)  # old pod gone
    assert plan.create_pod["metadata"]["annotations"][labels.INSTANCE_ID] == m["status"]["instanceId"]
    assert plan.create_pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchFields"][0]["values"] == ["a1"]
    assert m["status"]["version"] == 2


def test_secrets_annotation_rolls_the_pod_once():
    refs = [SecretRef("s1", "s1-secret", "d1")]
    m = machine(status={"host": "a1", "region": "ams"})
    pod = pod_of(run(m, secrets=refs))
    run(m, pod=pod, secrets=refs)
    m["metadata"]["annotations"][SECRETS_DIGEST] = "d2"
    plan = run(m, pod=pod, secrets=refs)
    assert plan.status["state"] == "replacing" and plan.status["rolledSecretsDigest"] == "d2"
    # Even if the new pod's digest differs from the annotation, it is not replaced again and again.
    new = pod_of(run(m, secrets=refs))
    assert run(m, pod=new, secrets=refs).delete_pod_grace is None


def test_maintenance_holds_changes_to_started_machines_and_lifting_resumes():
    m = machine(status={"host": "a1", "region": "ams"})
    pod = pod_of(run(m))
    run(m, pod=pod)
    m["spec"]["image"], m["metadata"]["generation"] = "nginx:2", 2
    until = NOW + timedelta(hours=1)
    held = run(m, pod=pod, platform=PlatformSettings(Maintenance("kernel upgrade", until)))
    assert held.delete_pod_grace is None and m["status"]["state"] == "started"
    c = cond(held, "Held")
    assert c["status"] == "True" and c["reason"] == "PlatformMaintenance"
    assert "kernel upgrade" in c["message"] and "2026-11-23T13:00:00Z" in c["message"]
    lifted = run(m, pod=pod)
    assert lifted.delete_pod_grace is not None and cond(lifted, "Held")["status"] == "False"


def test_restart_policy_maps_to_the_pod_and_stop_timeout_to_grace():
    for policy, expected in (("no", "Never"), ("always", "Always"), ("on-failure", "OnFailure")):
        pod = build_pod(machine(restart={"policy": policy}, stop={"timeoutSeconds": 42}),
                        host="a1", region="ams", instance="i", secrets=[])
        assert pod["spec"]["restartPolicy"] == expected
        assert pod["spec"]["terminationGracePeriodSeconds"] == 42


def test_stop_signal_is_sent_to_pid_1_by_a_prestop_hook_unless_it_is_the_runtimes_sigterm():
    def lifecycle(**stop):
        pod = build_pod(machine(stop=stop), host="a1", region="ams", instance="i", secrets=[])
        return pod["spec"]["terminationGracePeriodSeconds"], pod["spec"]["containers"][0].get("lifecycle")

    # Fly's default, SIGINT, for a spec as the CRD defaults it and as written here without stop.
    assert lifecycle() == (5, {"preStop": {"exec": {"command": ["/bin/sh", "-c", "kill -s INT 1 && exec sleep 5"]}}})
    grace, hook = lifecycle(signal="SIGQUIT", timeoutSeconds=30)
    assert grace == 30 and hook["preStop"]["exec"]["command"][-1] == "kill -s QUIT 1 && exec sleep 30"
    assert lifecycle(signal="SIGTERM", timeoutSeconds=12) == (12, None)


def test_on_failure_gives_up_after_max_retries_and_stays_stopped():
    m = machine(status={"host": "a1", "region": "ams"}, restart={"policy": "on-failure", "maxRetries": 2})
    pod = pod_of(run(m))
    run(m, pod=pod)
    oom = Exit(137, True, "OOMKilled")
    plan = run(m, pod=pod_of(run(m), restart_count=2, last_exit=oom))
    assert m["status"]["state"] == "started" and plan.status["events"][-2]["oomKilled"] is True
    plan = run(m, pod=pod_of(run(m), restart_count=3, last_exit=Exit(1, False, "Error"), running=False))
    assert m["status"]["state"] == "stopped" and cond(plan, "Ready")["reason"] == "RestartLimitExceeded"
    assert plan.delete_pod_grace == 0 and "maxRetries=2" in cond(plan, "Ready")["message"]
    assert run(m).create_pod is None  # stays stopped under this spec
    m["metadata"]["generation"] = 2
    assert run(m).create_pod is not None


def test_policy_no_exit_stops_with_exit_code():
    m = machine(status={"host": "a1", "region": "ams"}, restart={"policy": "no"})
    pod = pod_of(run(m))
    plan = run(m, pod=PodView(**{**pod.__dict__, "phase": "Failed", "running": False,
                                  "last_exit": Exit(3, False, "Error")}))
    assert m["status"]["state"] == "stopped" and plan.status["events"][-1]["exitCode"] == 3
    assert run(m).create_pod is None


def test_lost_host_is_reported_with_remedy_and_volume_machine_not_moved():
    vol = VolumeView("data", "web", "ams", "a1", "data-claim", "m1", "5")
    m = machine(status={"host": "a1", "region": "ams"}, mounts=[{"volume": "data", "path": "/data"}])
    plan = run(m, host=HostHealth("a1", False, "2026-11-23T11:59:00Z"), volume=vol)
    c = cond(plan, "HostReady")
    assert c["reason"] == "HostNotReady" and "runs again, with its data, when the host is back" in c["message"]
    assert "spec.forkFrom: data" in c["message"], "the remedy that works: a fork from the stored snapshot"
    assert plan.create_pod is None and m["status"]["host"] == "a1"
    assert cond(run(m, host=None, volume=vol), "HostReady")["reason"] == "HostGone"


def test_volume_waits_claims_and_refuses_other_machines_volume():
    m = machine(mounts=[{"volume": "data", "path": "/data"}])
    plan = reconcile(world(m, volume=VolumeView("data", "web", "ams", None, None, None, "1")))
    assert cond(plan, "Placed")["reason"] == "WaitingForVolume" and plan.create_pod is None
    vol = VolumeView("data", "web", "ams", "a2", "data-claim", None, "2")
    plan = reconcile(world(m, volume=vol, decision=Decision("a2", "Placed", "ok")))
    assert plan.attach_volume == vol and plan.status["host"] == "a2"
    assert plan.create_pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "data-claim"
    taken = VolumeView("data", "web", "ams", "a2", "data-claim", "other", "3")
    plan = reconcile(world(m, volume=taken))
    assert plan.status["state"] == "failed" and cond(plan, "Placed")["reason"] == "VolumeAttached"
    assert "other" in cond(plan, "Placed")["message"]
    foreign = VolumeView("data", "api", "ams", "a2", "c", None, "3")
    plan = reconcile(world(m, volume=foreign))
    assert cond(plan, "Placed")["reason"] == "VolumeMismatch" and "spec.mounts[0].volume" in cond(plan, "Placed")["message"]


def test_missing_secrets_wait_without_a_pod():
    m = machine(status={"host": "a1", "region": "ams"})
    plan = reconcile(world(m, secrets=None, secrets_missing="spec.secrets: waiting for AppSecret(s) db"))
    assert plan.create_pod is None and cond(plan, "SecretsReady")["reason"] == "WaitingForSecrets"


def test_invalid_spec_is_refused_and_nothing_created():
    plan = reconcile(World(machine(), False, "spec.guest.memoryMb: must be a multiple of 256", NOW))
    assert plan.status["state"] == "failed" and plan.create_pod is None
    assert "spec.guest.memoryMb" in cond(plan, "Accepted")["message"]


def test_pod_shape():
    m = machine(env={"A": "1"}, guest={"cpuKind": "shared", "cpus": 2, "memoryMb": 512},
                services=[{"internalPort": 8080, "ports": [{"port": 80}]}],
                checks=[{"name": "alive", "type": "http", "port": 8080, "path": "/health"}])
    pod = build_pod(m, host="a1", region="ams", instance="abc", secrets=[SecretRef("b", "b-s", "d2"), SecretRef("a", "a-s", "d1")])
    c = pod["spec"]["containers"][0]
    assert c["resources"]["requests"] == {"cpu": "124m", "memory": "512Mi"}
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "512Mi"}
    assert {"name": "A", "value": "1"} in c["env"]
    assert c["envFrom"] == [{"secretRef": {"name": "a-s"}}, {"secretRef": {"name": "b-s"}}]
    assert c["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    # Every check gates readiness through the agent-written condition; no probe restarts or hides it.
    assert pod["spec"]["readinessGates"] == [{"conditionType": CHECKS_GATE}]
    assert "readinessProbe" not in c and "livenessProbe" not in c
    md = pod["metadata"]
    assert md["labels"][labels.APP] == "web" and md["labels"][labels.HOST] == "a1" and md["labels"][labels.REGION] == "ams"
    assert md["annotations"][SECRETS_DIGEST] == "d1,d2"
    assert '"internal_port":8080' in md["annotations"][labels.SERVICES]
    assert md["ownerReferences"][0]["controller"] is True
    assert spec_digest(m["spec"]) == spec_digest({**m["spec"], "state": "stopped"})


def test_pod_annotation_names_the_http_ports_the_edge_may_serve():
    services = [{"internalPort": 5432}, {"internalPort": 6000, "ports": [{"port": 6000}]},
                {"internalPort": 8080, "ports": [{"port": 80, "handlers": ["http"]}, {"port": 443, "handlers": ["tls", "http"]}]}]
    pod = build_pod(machine(services=services), host="a1", region="ams", instance="abc", secrets=[])
    rows = json.loads(pod["metadata"]["annotations"][labels.SERVICES])
    assert [(r["ports"], r["http_ports"]) for r in rows] == [([], []), ([6000], []), ([80, 443], [80, 443])]


def test_pod_view_reads_exit_and_oom():
    v = pod_view({"metadata": {"name": "m1", "annotations": {labels.INSTANCE_ID: "i"}},
                  "status": {"phase": "Running", "podIP": "10.0.0.1", "containerStatuses": [
                      {"name": "machine", "restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                       "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}})
    assert v.restart_count == 2 and v.last_exit == Exit(137, True, "OOMKilled") and not v.running
    assert v.waiting_reason == "CrashLoopBackOff" and v.instance == "i"


def test_a_machine_without_checks_has_no_readiness_gate():
    pod = build_pod(machine(), host="a1", region="ams", instance="abc", secrets=[])
    assert "readinessGates" not in pod["spec"] and "readinessProbe" not in pod["spec"]["containers"][0]


def test_with_host_agents_a_machine_is_ready_only_once_its_agent_published_it():
    """Ready means routable: the pod's routed gate, which the host agent passes after publishing the row.
    A machine with checks keeps the checks gate alone (the agent writes it after publishing the verdict)."""
    m = machine(status={"host": "a1", "region": "ams"})
    plan = run(m, agents=True)
    assert plan.create_pod["spec"]["readinessGates"] == [{"conditionType": ROUTED_GATE}]
    checked = build_pod(machine(checks=[{"name": "a", "type": "tcp", "port": 80}]), host="a1", region="ams",
                        instance="abc", secrets=[], routed_gate=True)
    assert checked["spec"]["readinessGates"] == [{"conditionType": CHECKS_GATE}]
    pod = {"metadata": {"name": "m1"}, "spec": {"readinessGates": [{"conditionType": ROUTED_GATE}]},
           "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                      "containerStatuses": [{"name": "machine", "state": {"running": {}}}]}}
    v = pod_view(pod)
    assert not v.ready and v.unpublished  # kwok-like: Ready written without the gate
    waiting = run(m, agents=True, pod=pod_of(plan, ready=False, unpublished=True))
    ready = cond(waiting, "Ready")
    assert waiting.status["state"] == "started" and (ready["status"], ready["reason"]) == ("False", "Publishing")
    pod["status"]["conditions"].append({"type": ROUTED_GATE, "status": "True"})
    assert pod_view(pod).ready
    assert cond(run(m, agents=True, pod=pod_of(plan)), "Ready")["status"] == "True"


def test_a_lost_hosts_routed_pods_lose_the_gate_so_they_are_not_ready_before_their_agent_is_back():
    """The kubelet keeps a gate's last value: a host that comes back would count its machines Ready
    with their containers, before its restarting agent has published them."""
    m = machine(status={"host": "a1", "region": "ams"})
    plan = run(m, agents=True)
    routed = pod_of(plan, routed=True)
    assert not run(m, agents=True, pod=routed).pod_conditions
    lost = run(m, agents=True, pod=routed, host=HostHealth("a1", False, "2026-11-23T11:59:00Z", "dead"))
    assert [(c["type"], c["status"], c["reason"]) for c in lost.pod_conditions] == [(ROUTED_GATE, "False", "HostLost")]
    assert cond(lost, "Ready")["reason"] == "HostNotReady"
    # Only the API side lost sight of it (its agent is alive in gossip): nothing to undo.
    assert not run(m, agents=True, pod=routed, host=HostHealth("a1", False, "2026-11-23T11:59:00Z", "alive")).pod_conditions
    assert not run(m, agents=True, pod=pod_of(plan, ready=False, unpublished=True),
                   host=HostHealth("a1", False, "2026-11-23T11:59:00Z", "dead")).pod_conditions


def _gated_pod(*conditions, gated=True):
    return {"metadata": {"name": "m1"},
            "spec": {"readinessGates": [{"conditionType": CHECKS_GATE}]} if gated else {},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}, *conditions],
                       "containerStatuses": [{"name": "machine", "state": {"running": {}}}]}}


def test_pod_view_reads_the_checks_gate_not_only_ready():
    # kwok (and a kubelet between syncs) may say Ready while the agent says a check fails.
    failing = {"type": CHECKS_GATE, "status": "False", "message": "failing: db (tcp 5432)"}
    v = pod_view(_gated_pod(failing))
    assert not v.ready and v.checks_failing == "failing: db (tcp 5432)"
    v = pod_view(_gated_pod())
    assert not v.ready and "no check result" in v.checks_failing
    v = pod_view(_gated_pod({"type": CHECKS_GATE, "status": "True"}))
    assert v.ready and v.checks_failing is None
    # A pod without the gate (no checks) is ready as Kubernetes says.
    assert pod_view(_gated_pod(failing, gated=False)).ready


def test_failing_checks_gate_readiness_and_never_restart_the_machine():
    m = machine(checks=[{"name": "a", "type": "tcp", "port": 80}, {"name": "b", "type": "tcp", "port": 81}])
    plan = run(m, decision=Decision("a1", "Placed", "ok"))
    running = pod_of(plan)
    run(m, pod=running)
    assert m["status"]["state"] == "started" and cond(reconcile(world(m, pod=running)), "Ready")["status"] == "True"
    sick = pod_of(plan, ready=False, checks_failing="failing: b (tcp 81)")
    plan = run(m, pod=sick)
    ready = cond(plan, "Ready")
    assert m["status"]["state"] == "started" and ready["status"] == "False" and ready["reason"] == "ChecksFailing"
    assert "failing: b (tcp 81)" in ready["message"]
    assert plan.delete_pod_grace is None and plan.create_pod is None  # checks never restart the machine
    assert cond(run(m, pod=running), "Ready")["status"] == "True"


# ---- a drain moves a machine off its host -------------------------------------------------


def started_on_a1():
    m = machine()
    plan = run(m, decision=Decision("a1", "Placed", "placed on a1"))
    run(m, pod=pod_of(plan))
    assert m["status"]["state"] == "started"
    return m, pod_of(plan)


def test_a_machine_asked_off_its_host_stops_there_then_starts_a_new_instance_elsewhere():
    m, pod = started_on_a1()
    first = m["status"]["instanceId"]
    m["metadata"]["annotations"][labels.MOVE_FROM] = "a1"
    stopping = run(m, pod=pod)
    assert stopping.delete_pod_grace == 5 and stopping.create_pod is None
    assert m["status"]["state"] == "replacing" and cond(stopping, "Ready")["reason"] == "Moving"
    assert m["status"]["host"] == "a1", "it holds its host until its pod there is gone"
    # The stop is under way: nothing more is asked.
    assert run(m, pod=PodView(**{**pod.__dict__, "deleting": True})).delete_pod_grace is None
    # Gone from a1: placed on a2 and started there, same name, a new instance.
    moved = run(m, pod=None, host=HostHealth("a2", True, None), decision=Decision("a2", "Placed", "placed on a2"))
    assert m["status"]["host"] == "a2" and moved.create_pod is not None
    assert moved.create_pod["metadata"]["name"] == "m1"
    assert m["status"]["instanceId"] != first and m["status"]["version"] == 2
    assert m["status"]["state"] == "starting"
    log = [(e["type"], e["status"]) for e in m["status"]["events"]]
    assert ("move", "requested") in log and ("move", "moved") in log
    assert [r for _, r, _ in moved.events] == ["Moved", "Starting"]
    # Elsewhere now: the annotation naming a1 asks nothing more.
    again = run(m, pod=pod_of(moved), host=HostHealth("a2", True, None))
    assert again.delete_pod_grace is None and m["status"]["state"] == "started"


def test_a_move_with_no_room_elsewhere_keeps_the_machine_where_it_is_and_says_why():
    m, pod = started_on_a1()
    m["metadata"]["annotations"][labels.MOVE_FROM] = "a1"
    run(m, pod=pod)
    blocked = run(m, pod=None, decision=Decision(None, "InsufficientCapacity", "no room in region ams: memory short"))
    assert m["status"]["host"] == "a1" and blocked.create_pod is None
    assert cond(blocked, "Ready")["reason"] == "MoveBlocked" and "memory short" in cond(blocked, "Ready")["message"]
    assert [r for _, r, _ in blocked.events] == ["MoveBlocked"]
    assert run(m, pod=None, decision=Decision(None, "InsufficientCapacity", "no room")).events == [], "said once"


def pinned_to(pod: dict) -> list[str]:
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return [v for t in terms for e in t["matchFields"] for v in e["values"]]


def volume_machine_started_on_a1():
    vol = VolumeView("data", "web", "ams", "a1", "c", "m1", "1")
    m = machine(status={"host": "a1", "region": "ams"}, mounts=[{"volume": "data", "path": "/data"}])
    plan = run(m, volume=vol)
    return m, vol, pod_of(plan)


def test_a_volume_machine_asked_off_its_host_asks_its_volume_to_migrate_and_keeps_running():
    m, vol, pod = volume_machine_started_on_a1()
    run(m, pod=pod, volume=vol)
    m["metadata"]["annotations"][labels.MOVE_FROM] = "a1"
    plan = run(m, pod=pod, volume=vol)
    assert plan.migrate_volume == ("data", "a1") and plan.delete_pod_grace is None
    assert m["status"]["state"] == "started" and m["status"]["host"] == "a1"
    asked = VolumeView(**{**vol.__dict__, "migrate_from": "a1"})
    assert run(m, pod=pod, volume=asked).migrate_volume is None, "asked once"
    copying = VolumeView(**{**asked.__dict__, "migration_phase": "Copying", "migration_target": "a2"})
    assert run(m, pod=pod, volume=copying).delete_pod_grace is None, "it runs while the bulk is copied"
    # The machine's request withdrawn before it stopped (a drain that gave up): so is the volume's.
    del m["metadata"]["annotations"][labels.MOVE_FROM]
    assert run(m, pod=pod, volume=copying).migrate_volume == ("data", None)
    assert run(m, pod=pod, volume=vol).migrate_volume is None


def test_a_migrating_volume_machine_stops_for_the_last_copy_and_starts_where_its_volume_went():
    m, vol, pod = volume_machine_started_on_a1()
    run(m, pod=pod, volume=vol)
    first = m["status"]["instanceId"]
    stopping = VolumeView(**{**vol.__dict__, "migration_phase": "Stopping", "migration_target": "a2",
                             "migrate_from": "a1"})
    plan = run(m, pod=pod, volume=stopping)
    assert plan.delete_pod_grace == 5 and plan.create_pod is None
    assert m["status"]["state"] == "replacing" and cond(plan, "Ready")["reason"] == "Migrating"
    syncing = VolumeView(**{**stopping.__dict__, "migration_phase": "Syncing"})
    assert run(m, pod=None, volume=syncing).create_pod is None, "never started while its data is between hosts"
    moved = VolumeView(**{**syncing.__dict__, "host": "a2", "migration_phase": "Cleaning"})
    plan = run(m, pod=None, volume=moved, host=HostHealth("a2", True, None))
    assert m["status"]["host"] == "a2" and pinned_to(plan.create_pod) == ["a2"]
    assert plan.create_pod["metadata"]["name"] == "m1" and m["status"]["instanceId"] != first
    assert cond(plan, "Placed")["reason"] == "Migrated"
    log = [(e["type"], e["status"]) for e in m["status"]["events"]]
    assert ("migrate", "stopping") in log and ("migrate", "migrated") in log
    assert "Migrated" in [r for _, r, _ in plan.events]


def test_an_aborted_migration_starts_the_machine_again_on_its_old_host():
    m, vol, pod = volume_machine_started_on_a1()
    run(m, pod=pod, volume=vol)
    stopping = VolumeView(**{**vol.__dict__, "migration_phase": "Stopping", "migration_target": "a2"})
    run(m, pod=pod, volume=stopping)
    aborting = VolumeView(**{**stopping.__dict__, "migration_phase": "Aborting"})
    plan = run(m, pod=None, volume=aborting)
    assert m["status"]["host"] == "a1" and pinned_to(plan.create_pod) == ["a1"]


def test_no_host_accepting_machines_yet_is_not_final_the_machine_is_placed_when_one_is():
    m = machine()
    plan = run(m, decision=Decision(None, "HostUnavailable", "no host in region ams accepts machines now: a1 NotReady"))
    assert m["status"]["state"] == "failed" and cond(plan, "Placed")["reason"] == "HostUnavailable"
    placed = run(m, decision=Decision("a1", "Placed", "placed on a1 in region ams"))
    assert m["status"]["host"] == "a1" and placed.create_pod is not None
    full = machine()
    run(full, decision=Decision(None, "InsufficientCapacity", "no room"))
    assert run(full, decision=Decision("a1", "Placed", "placed")).create_pod is None, "no room is final for the spec"
