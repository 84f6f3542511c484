"""Snapshot planning: schedules, fork sources, refusals, and the pods that run restic."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from kubefly.volumes import snapshots
from kubefly.volumes.snapshots import ObjectStore, StoredCopy

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
STORE = ObjectStore(endpoint="http://store:8333", bucket="kubefly", credentials_secret="creds")


def copy(name: str, uid: str, taken: datetime, **kw) -> StoredCopy:
    fields = dict(name=name, volume="data", volume_uid=uid, app="web", region="ams", size_gb=1,
                  repository=f"volumes/ns/data.{uid}", snapshot_id="abc", taken_at=taken, host="h1")
    return StoredCopy(**{**fields, **kw})


def test_store_is_read_from_the_chart_environment_and_absent_without_an_endpoint():
    assert ObjectStore.from_env({}) is None
    s = ObjectStore.from_env({"KUBEFLY_OBJECT_STORE_ENDPOINT": "http://s3:8333/", "KUBEFLY_OBJECT_STORE_BUNDLED": "true"})
    assert (s.endpoint, s.bucket, s.credentials_secret, s.bundled) == ("http://s3:8333", "kubefly", "kubefly-objectstore-credentials", True)
    assert s.url(snapshots.repository("ns", "data", "u1")) == "s3:http://s3:8333/kubefly/volumes/ns/data.u1"


def test_a_postgres_member_reaches_the_bundled_store_over_its_tls_port_and_an_external_one_as_it_is():
    bundled = ObjectStore.from_env({
        "KUBEFLY_OBJECT_STORE_ENDPOINT": "http://x-kubefly-objectstore.ks.svc:8333", "KUBEFLY_OBJECT_STORE_BUNDLED": "true",
        "KUBEFLY_OBJECT_STORE_SERVICE": "x-kubefly-objectstore",
        "KUBEFLY_OBJECT_STORE_HTTPS_ENDPOINT": "https://x-kubefly-objectstore.ks.svc:8443",
        "KUBEFLY_OBJECT_STORE_CA_SECRET": "kubefly-objectstore-tls"})
    assert (bundled.https_endpoint, bundled.ca_secret, bundled.service) == (
        "https://x-kubefly-objectstore.ks.svc:8443", "kubefly-objectstore-tls", "x-kubefly-objectstore")
    external = ObjectStore.from_env({"KUBEFLY_OBJECT_STORE_ENDPOINT": "https://s3.example.com",
                                     "KUBEFLY_OBJECT_STORE_CA_SECRET": "ignored", "KUBEFLY_OBJECT_STORE_SERVICE": "ignored"})
    assert (external.https_endpoint, external.ca_secret, external.service) == ("https://s3.example.com", None, "")
    plain = ObjectStore.from_env({"KUBEFLY_OBJECT_STORE_ENDPOINT": "http://minio.local:9000"})
    assert (plain.https_endpoint, plain.ca_secret) == (None, None)


def test_a_scheduled_snapshot_is_due_one_interval_after_the_last_or_after_placement():
    assert snapshots.due_slot(interval_hours=24, last=None, placed=T0, now=T0 + timedelta(hours=23)) is None
    assert snapshots.due_slot(interval_hours=24, last=None, placed=T0, now=T0 + timedelta(hours=24)) == T0 + timedelta(hours=24)
    last = T0 + timedelta(hours=5)
    assert snapshots.due_slot(interval_hours=1, last=last, placed=T0, now=last + timedelta(minutes=59)) is None
    assert snapshots.due_slot(interval_hours=1, last=last, placed=T0, now=last + timedelta(minutes=61)) == last + timedelta(hours=1)


def test_a_missed_slot_is_taken_once_and_the_schedule_counts_from_then():
    slot = T0 + timedelta(hours=24)
    assert snapshots.slot_taken(slot=slot, now=slot + timedelta(minutes=1), interval_hours=24) == slot
    late = slot + timedelta(days=3)
    assert snapshots.slot_taken(slot=slot, now=late, interval_hours=24) == late


def test_scheduled_names_are_one_per_slot_and_dns_labels():
    name = snapshots.scheduled_name("v" * 63, T0)
    assert name == "v" * 49 + "-202612011200" and len(name) <= 63


def test_a_fork_of_a_volume_whose_host_is_up_takes_a_fresh_copy():
    assert snapshots.plan_fork(source="data", source_uid="u1", source_host_ready=True, copies=[]).kind == "fresh"


def test_a_fork_of_a_volume_whose_host_is_down_restores_its_newest_stored_copy():
    copies = [copy("old", "u1", T0), copy("new", "u1", T0 + timedelta(hours=1)),
              copy("predecessor", "u0", T0 + timedelta(hours=2))]  # a deleted Volume of the same name: not its data
    plan = snapshots.plan_fork(source="data", source_uid="u1", source_host_ready=False, copies=copies)
    assert plan.kind == "stored" and plan.copy.name == "new"


def test_a_fork_with_no_copy_while_its_host_is_down_is_refused_saying_why():
    plan = snapshots.plan_fork(source="data", source_uid="u1", source_host_ready=False, copies=[copy("x", "u0", T0)])
    assert plan.kind == "refused" and plan.refusal.reason == "NoSnapshot" and "host is down" in plan.refusal.message


def test_a_restore_stays_in_its_app_and_region_and_never_shrinks():
    ok = dict(app="web", region="ams", size_gb=2, source_app="web", source_region="ams", source_size_gb=2, what="volume data")
    assert snapshots.check_source(**ok) is None
    assert snapshots.check_source(**{**ok, "source_app": "db"}).reason == "OtherApp"
    assert snapshots.check_source(**{**ok, "source_region": "iad"}).reason == "OtherRegion"
    small = snapshots.check_source(**{**ok, "size_gb": 1})
    assert small.reason == "TooSmall" and "spec.sizeGb to at least 2" in small.message


def test_stored_copy_needs_a_finished_snapshot():
    snap = {"metadata": {"name": "s"}, "spec": {"volume": "data"},
            "status": {"phase": "Succeeded", "volumeUid": "u1", "repository": "r", "snapshotId": "id",
                       "takenAt": "2026-12-01T12:00:00Z", "app": "web", "region": "ams", "sizeGb": 3, "host": "h1"}}
    c = StoredCopy.of(snap)
    assert (c.volume_uid, c.size_gb, c.taken_at) == ("u1", 3, T0)
    assert StoredCopy.of({**snap, "status": {**snap["status"], "phase": "Running"}}) is None


def test_snapshot_pod_reads_the_volume_only_and_freezes_a_running_machine():
    pod = snapshots.build_snapshot_pod(home="kubefly-system", store=STORE, image="kubefly:1", snapshot="s1", snapshot_uid="su",
                                       namespace="ns", volume="data", volume_uid="vu", host="h1",
                                       path="/var/lib/kubefly/volumes/ns/data.vu", machine_pod_uid="pu")
    spec = pod["spec"]
    c = spec["containers"][0]
    assert spec["nodeName"] == "h1" and pod["metadata"]["namespace"] == "kubefly-system"
    assert {m["mountPath"]: m["readOnly"] for m in c["volumeMounts"] if m["name"] != "tmp"} == {"/volume": True, "/host-cgroup": False}
    assert c["command"][-4:] == ["--freeze-pod", "pu", "--cgroup-root", "/host-cgroup"]
    env = {e["name"]: e for e in c["env"]}
    assert env["RESTIC_REPOSITORY"]["value"] == "s3:http://store:8333/kubefly/volumes/ns/data.vu"
    assert env["RESTIC_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == snapshots.KEY_SECRET
    assert spec["automountServiceAccountToken"] is False and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    stopped = snapshots.build_snapshot_pod(home="h", store=STORE, image="i", snapshot="s1", snapshot_uid="su", namespace="ns",
                                           volume="data", volume_uid="vu", host="h1", path="/p", machine_pod_uid=None)
    assert "--freeze-pod" not in stopped["spec"]["containers"][0]["command"]
    assert [v["name"] for v in stopped["spec"]["volumes"]] == ["tmp", "volume"]


def test_job_outcome_reads_the_termination_message():
    def pod(phase, message=""):
        return {"status": {"phase": phase, "containerStatuses": [{"state": {"terminated": {"message": message}}}]}}
    assert snapshots.outcome(pod("Succeeded", '{"snapshotId":"a","bytes":5}')).result == {"snapshotId": "a", "bytes": 5}
    failed = snapshots.outcome(pod("Failed", '{"error":"restic backup failed (exit 1): no such host"}'))
    assert failed.state == "failed" and "no such host" in failed.message
    assert snapshots.outcome({"status": {"phase": "Pending"}}).state == "running"
