"""The PostgresCluster planner: children, distinct hosts, scaling, rolling, host-loss replacement."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from kubefly.postgres import plan as P

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
C = P.Cluster("org", "pg", "uid-1", {"app": "db", "region": "iad", "members": 3, "volumeSizeGb": 10,
                                      "synchronous": True, "guest": {"cpus": 1}}, generation=1)
HOSTS = [P.Host(f"h{i}", "iad", True) for i in range(3)] + [P.Host("far", "syd", True)]
IMAGE = "kubefly/postgres:15"


def run(members=(), hosts=HOSTS, cluster=C, primary=None, services=()):
    return P.plan(cluster, members, hosts, image=IMAGE, primary=primary, now=NOW, host_loss_grace_s=60,
                  existing_services=services)


def started(c, i, host, *, host_gone_for=None, members=None):
    machine = P.build_machine(c, i, members if members is not None else range(c.spec["members"]), IMAGE)
    machine["metadata"]["uid"] = f"m{i}"
    if host_gone_for is None:
        cond = {"type": "HostReady", "status": "True", "reason": "HostReady", "lastTransitionTime": "2025-01-01T00:00:00Z"}
    else:
        t = (NOW - timedelta(seconds=host_gone_for)).strftime("%Y-%m-%dT%H:%M:%SZ")
        cond = {"type": "HostReady", "status": "False", "reason": "HostGone", "lastTransitionTime": t}
    machine["status"] = {"state": "started", "host": host, "conditions": [cond]}
    volume = P.build_volume(c, i)
    volume["status"] = {"host": host}
    return P.Member(i, volume, machine)


def test_a_new_cluster_becomes_three_volumes_machines_and_services_owned_by_it():
    p = run()
    assert [v["metadata"]["name"] for v in p.create_volumes] == ["pg-0", "pg-1", "pg-2"]
    assert [m["metadata"]["name"] for m in p.create_machines] == ["pg-0", "pg-1", "pg-2"]
    for obj in p.create_volumes + p.create_machines + p.services:
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert obj["metadata"]["labels"][P.CLUSTER_LABEL] == "pg"
    assert p.create_volumes[0]["spec"] == {"app": "db", "region": "iad", "sizeGb": 10}
    m1 = p.create_machines[1]["spec"]
    assert m1["mounts"] == [{"volume": "pg-1", "path": "/data"}]
    assert m1["secrets"] == ["pg-credentials"]
    assert m1["env"]["KUBEFLY_PG_PEERS"] == "pg-0=pg-0.org.svc:5432:5500 pg-2=pg-2.org.svc:5432:5500"
    assert m1["env"]["KUBEFLY_PG_HOST"] == "pg-1.org.svc"
    assert m1["env"]["KUBEFLY_PG_NODE_ID"] == "2" and m1["env"]["KUBEFLY_PG_SYNCHRONOUS"] == "true"
    assert [m["spec"]["env"]["KUBEFLY_PG_BOOTSTRAP"] for m in p.create_machines] == ["true", "false", "false"]
    assert not any("PASSWORD" in k for k in m1["env"]), "passwords come from the AppSecret, never the spec"
    assert m1["checks"][0]["port"] == 5500 and m1["checks"][0]["path"] == "/health"


def test_services_select_by_role_and_members_by_machine():
    svcs = {s["metadata"]["name"]: s["spec"] for s in run().services}
    assert svcs["pg-primary"]["selector"] == {"kubefly.dev/app": "db", P.CLUSTER_LABEL: "pg", P.ROLE_LABEL: "primary"}
    assert svcs["pg-replicas"]["selector"][P.ROLE_LABEL] == "standby"
    assert svcs["pg-1"]["selector"] == {"kubefly.dev/machine": "pg-1"}
    assert svcs["pg-1"]["clusterIP"] == "None" and svcs["pg-1"]["publishNotReadyAddresses"] is True
    assert "clusterIP" not in svcs["pg-primary"]


def test_fewer_hosts_than_members_creates_nothing_and_says_so():
    p = run(hosts=HOSTS[:2] + [P.Host("h9", "iad", False)])
    assert not p.create_volumes and not p.create_machines
    cond = next(c for c in p.conditions if c.type == "HostsAvailable")
    assert not cond.ok and cond.reason == "NotEnoughHosts"
    assert "region iad has 2 schedulable hosts" in cond.message and "spec.members" in cond.message


def test_scale_up_adds_the_next_member_on_a_host_without_one_and_rolls_peers_one_at_a_time():
    members = [started(C, i, f"h{i}") for i in range(3)]
    hosts = HOSTS + [P.Host("h3", "iad", True)]
    c4 = P.Cluster("org", "pg", "uid-1", {**C.spec, "members": 4})
    p = run(members, hosts=hosts, cluster=c4, primary="pg-0")
    assert [v["metadata"]["name"] for v in p.create_volumes] == ["pg-3"]
    assert "pg-0=" in p.create_machines[0]["spec"]["env"]["KUBEFLY_PG_PEERS"]
    # The others learn of pg-3 by a restart, which waits until pg-3 exists and runs.
    assert p.update_machine is None
    members.append(started(c4, 3, "h3", members=range(4)))
    p = run(members, hosts=hosts, cluster=c4, primary="pg-0")
    name, spec, digest = p.update_machine
    assert name == "pg-1", "standbys restart first, lowest number first"
    assert "pg-3=pg-3.org.svc" in spec["env"]["KUBEFLY_PG_PEERS"] and digest == P.spec_digest(spec)


def test_the_primary_restarts_last():
    members = [started(C, i, f"h{i}") for i in range(3)]
    spec = {**C.spec, "guest": {"cpus": 2}}
    c = P.Cluster("org", "pg", "uid-1", spec)
    assert run(members, cluster=c, primary="pg-1").update_machine[0] == "pg-0"
    members = [members[0], started(c, 1, "h1"), started(c, 2, "h2")]
    assert run(members, cluster=c, primary="pg-0").update_machine[0] == "pg-0"


def test_no_roll_while_a_member_is_down():
    members = [started(C, i, f"h{i}") for i in range(3)]
    members[2].machine["status"]["state"] = "starting"
    c = P.Cluster("org", "pg", "uid-1", {**C.spec, "guest": {"cpus": 2}})
    p = run(members, cluster=c, primary="pg-0")
    assert p.update_machine is None
    assert next(x for x in p.conditions if x.type == "MembersUpToDate").reason == "Rolling"


def test_scale_down_removes_the_highest_numbered_member_but_never_the_primary():
    members = [started(C, i, f"h{i}") for i in range(3)]
    c1 = P.Cluster("org", "pg", "uid-1", {**C.spec, "members": 2, "synchronous": False})
    assert run(members, cluster=c1, primary="pg-0").remove_members == ["pg-2"]
    assert run(members, cluster=c1, primary="pg-2").remove_members == ["pg-1"]
    p = run(members, cluster=c1, primary="pg-2")
    assert p.members == ["pg-0", "pg-2"] and "pg-1" not in {s["metadata"]["name"] for s in p.services}


def test_scale_down_keeps_the_volume_unless_the_policy_deletes_volumes():
    members = [started(C, i, f"h{i}") for i in range(3)]
    c2 = P.Cluster("org", "pg", "uid-1", {**C.spec, "members": 2})
    p = run(members, cluster=c2, primary="pg-0")
    assert p.remove_members == ["pg-2"]
    assert p.retire_volumes == ["pg-2"] and p.delete_volumes == []
    drop = P.Cluster("org", "pg", "uid-1", {**c2.spec, "deletePolicy": "deleteVolumes"})
    p = run(members, cluster=drop, primary="pg-0")
    assert p.remove_members == ["pg-2"] and p.retire_volumes == [] and p.delete_volumes == ["pg-2"]


def retired(c, i, host):
    """What a scale down or host loss leaves of member i under keepVolumes: its Volume, labelled."""
    volume = started(c, i, host).volume
    volume["metadata"]["labels"][P.RETIRED_LABEL] = "true"
    return P.Member(i, volume)


def test_a_retired_volume_is_no_member_and_its_number_goes_to_no_other_member():
    members = [started(C, i, f"h{i}") for i in range(3)]
    members[2].volume["metadata"]["labels"][P.RETIRED_LABEL] = "true"
    c2 = P.Cluster("org", "pg", "uid-1", {**C.spec, "members": 2})
    # The Machine's deletion did not go through yet: asked again, and the Volume is left alone.
    p = run(members, cluster=c2, primary="pg-0")
    assert p.members == ["pg-0", "pg-1"] and p.remove_members == ["pg-2"]
    assert p.retire_volumes == [] and p.delete_volumes == [] and not p.create_machines
    # ... nor taken back while that Machine exists: a new member under a new number.
    p = run(members, primary="pg-0", hosts=HOSTS + [P.Host("h3", "iad", True)])
    assert p.reuse_volumes == [] and [v["metadata"]["name"] for v in p.create_volumes] == ["pg-3"]
    p = run([*members[:2], retired(C, 2, "h2")], cluster=c2, primary="pg-0")
    assert p.remove_members == [] and not p.create_machines and not p.create_volumes and not p.reuse_volumes
    assert "pg-2" not in {s["metadata"]["name"] for s in p.services}


def test_scale_up_takes_back_a_retired_volume_on_a_free_host_under_its_number():
    members = [started(C, i, f"h{i}") for i in range(2)]
    p = run([*members, retired(C, 2, "h2")], primary="pg-0")
    assert p.reuse_volumes == ["pg-2"] and p.create_volumes == [] and p.adopt == []
    assert p.members == ["pg-0", "pg-1", "pg-2"]
    [machine] = p.create_machines
    assert machine["metadata"]["name"] == "pg-2" and machine["spec"]["mounts"] == [{"volume": "pg-2", "path": "/data"}]
    # Its number, so its data is the repmgr node the cluster knew.
    assert machine["spec"]["env"]["KUBEFLY_PG_NODE_ID"] == "3"
    assert "pg-2" in {s["metadata"]["name"] for s in p.services}


def test_a_kept_volume_of_a_deleted_cluster_is_taken_back_and_adopted():
    kept = retired(C, 1, "h1")
    kept.volume["metadata"]["ownerReferences"] = []
    p = run([started(C, 0, "h0"), kept, started(C, 2, "h2")], primary="pg-0")
    assert p.reuse_volumes == ["pg-1"] and p.adopt == [("volumes", "pg-1")]


@pytest.mark.parametrize(("why", "hosts", "spoil"), [
    ("host not ready", [P.Host("h0", "iad", True), P.Host("h1", "iad", True), P.Host("h2", "iad", False),
                        P.Host("h3", "iad", True)], None),
    ("host left the region", [P.Host("h0", "iad", True), P.Host("h1", "iad", True), P.Host("h2", "syd", True),
                              P.Host("h3", "iad", True)], None),
    ("host gone", [P.Host("h0", "iad", True), P.Host("h1", "iad", True), P.Host("h3", "iad", True)], None),
    ("volume being deleted", None, lambda v: v["metadata"].update(deletionTimestamp="2025-01-01T11:00:00Z")),
    ("volume never placed", None, lambda v: v.pop("status")),
])
def test_a_retired_volume_where_no_member_may_run_stays_retired(why, hosts, spoil):
    old = retired(C, 2, "h2")
    if spoil:
        spoil(old.volume)
    p = run([started(C, 0, "h0"), started(C, 1, "h1"), old], hosts=hosts or HOSTS + [P.Host("h3", "iad", True)],
            primary="pg-0")
    assert p.reuse_volumes == [], why
    assert [v["metadata"]["name"] for v in p.create_volumes] == ["pg-3"] and p.members == ["pg-0", "pg-1", "pg-3"]


def test_a_retired_volume_on_a_members_host_stays_retired():
    # pg-1 was cloned on h2 after pg-2 left it: one member a host, so pg-2's data cannot come back there.
    p = run([started(C, 0, "h0"), started(C, 1, "h2"), retired(C, 2, "h2")],
            hosts=HOSTS + [P.Host("h3", "iad", True)], primary="pg-0")
    assert p.reuse_volumes == [] and [v["metadata"]["name"] for v in p.create_volumes] == ["pg-3"]


def test_retired_volumes_come_back_lowest_number_first_one_per_host():
    hosts = [P.Host(f"h{i}", "iad", True) for i in range(6)]
    c5 = P.Cluster("org", "pg", "uid-1", {**C.spec, "members": 5})
    old = [retired(C, 2, "h2"), retired(C, 3, "h4"), retired(C, 4, "h2"), retired(C, 5, "h3")]
    p = run([started(C, 0, "h0"), started(C, 1, "h1"), *old], hosts=hosts, cluster=c5, primary="pg-0")
    # Three to add: pg-2 (h2) and pg-3 (h4) come back; pg-4 shares h2 with pg-2, so pg-5 (h3) is next.
    assert p.reuse_volumes == ["pg-2", "pg-3", "pg-5"] and p.create_volumes == []
    c4 = P.Cluster("org", "pg", "uid-1", {**C.spec, "members": 4})
    p = run([started(C, 0, "h0"), started(C, 1, "h1"), *old], hosts=hosts, cluster=c4, primary="pg-0")
    assert p.reuse_volumes == ["pg-2", "pg-3"] and p.members == ["pg-0", "pg-1", "pg-2", "pg-3"]
    # More members than retired Volumes that can come back: the rest are new, under new numbers.
    c6 = P.Cluster("org", "pg", "uid-1", {**C.spec, "members": 6})
    p = run([started(C, 0, "h0"), started(C, 1, "h1"), *old], hosts=hosts, cluster=c6, primary="pg-0")
    assert p.reuse_volumes == ["pg-2", "pg-3", "pg-5"] and [v["metadata"]["name"] for v in p.create_volumes] == ["pg-6"]


def test_a_lost_member_is_replaced_by_a_retired_volume_on_a_free_host():
    hosts = [P.Host("h0", "iad", True), P.Host("h2", "iad", True), P.Host("h3", "iad", True)]
    members = [started(C, 0, "h0"), started(C, 1, "h1", host_gone_for=120), started(C, 2, "h2"), retired(C, 3, "h3")]
    p = run(members, hosts=hosts, primary="pg-0")
    assert p.remove_members == ["pg-1"] and p.retire_volumes == ["pg-1"]
    assert p.reuse_volumes == ["pg-3"] and p.create_volumes == [] and p.members == ["pg-0", "pg-2", "pg-3"]
    # The lost member's own Volume comes back once its host is back and a member is wanted there.
    back = hosts + [P.Host("h1", "iad", True)]
    members = [started(C, 0, "h0"), started(C, 2, "h2"), started(C, 3, "h3"), retired(C, 1, "h1")]
    c4 = P.Cluster("org", "pg", "uid-1", {**C.spec, "members": 4})
    assert run(members, hosts=back, cluster=c4, primary="pg-0").reuse_volumes == ["pg-1"]


def test_a_number_is_reused_only_when_its_objects_are_gone():
    members = [started(C, i, f"h{i}") for i in range(2)]
    gone = started(C, 2, "h2")
    gone.volume["metadata"]["deletionTimestamp"] = "2025-01-01T11:00:00Z"
    p = run([*members, gone], hosts=HOSTS + [P.Host("h3", "iad", True)], primary="pg-0")
    assert [v["metadata"]["name"] for v in p.create_volumes] == ["pg-3"]


def test_volumes_grow_with_the_spec_and_foreign_ones_are_adopted():
    members = [started(C, i, f"h{i}") for i in range(3)]
    members[1].volume["metadata"]["ownerReferences"] = []  # kept from a deleted cluster of the same name
    c = P.Cluster("org", "pg", "uid-1", {**C.spec, "volumeSizeGb": 20})
    p = run(members, cluster=c, primary="pg-0")
    assert p.grow_volumes == [("pg-0", 20), ("pg-1", 20), ("pg-2", 20)]
    assert p.adopt == [("volumes", "pg-1")]


def test_a_member_whose_host_is_gone_is_replaced_on_another_host_once_the_others_have_a_primary():
    hosts = [P.Host("h0", "iad", True), P.Host("h2", "iad", True), P.Host("h3", "iad", True)]
    members = [started(C, 0, "h0"), started(C, 1, "h1", host_gone_for=120), started(C, 2, "h2")]
    p = run(members, hosts=hosts, primary="pg-0")
    assert p.remove_members == ["pg-1"] and p.retire_volumes == ["pg-1"]
    assert [v["metadata"]["name"] for v in p.create_volumes] == ["pg-3"]
    assert p.members == ["pg-0", "pg-2", "pg-3"]
    assert "pg-1" not in p.create_machines[0]["spec"]["env"]["KUBEFLY_PG_PEERS"]
    assert next(c for c in p.conditions if c.type == "MembersReplaced").ok


def test_replacement_waits_for_the_grace_a_primary_and_a_free_host():
    hosts = [P.Host("h0", "iad", True), P.Host("h2", "iad", True), P.Host("h3", "iad", True)]
    recent = [started(C, 0, "h0"), started(C, 1, "h1", host_gone_for=10), started(C, 2, "h2")]
    assert run(recent, hosts=hosts, primary="pg-0").remove_members == []
    lost = [started(C, 0, "h0"), started(C, 1, "h1", host_gone_for=120), started(C, 2, "h2")]
    for primary in (None, "pg-1"):
        p = run(lost, hosts=hosts, primary=primary)
        assert p.remove_members == [] and not p.create_volumes
        cond = next(c for c in p.conditions if c.type == "MembersReplaced")
        assert cond.reason == "WaitingForHealthyCluster" and "no primary among the other members" in cond.message
    lost[2].machine["status"]["state"] = "starting"
    assert "not started" in next(c for c in run(lost, hosts=hosts, primary="pg-0").conditions
                                 if c.type == "MembersReplaced").message
    # The old member leaves, but with no free host the replacement waits and says so.
    lost[2].machine["status"]["state"] = "started"
    p = run(lost, hosts=hosts[:2], primary="pg-0")
    assert p.remove_members == ["pg-1"] and not p.create_volumes
    assert next(c for c in p.conditions if c.type == "HostsAvailable").reason == "NotEnoughHosts"


def test_leftover_member_services_are_removed():
    members = [started(C, i, f"h{i}") for i in range(3)]
    p = run(members, primary="pg-0", services=["pg-primary", "pg-replicas", "pg-0", "pg-1", "pg-2", "pg-7", "other-1"])
    assert p.remove_members == ["pg-7"]


def test_credentials_secret_carries_the_given_values_and_a_uri():
    s = P.build_credentials(C, {"username": "postgres", "password": "pw", "repmgr-password": "r", "admin-token": "t"})
    assert s["metadata"]["name"] == "pg-credentials"
    assert s["stringData"]["uri"] == "postgres://postgres:pw@pg-primary.org.svc:5432/postgres"


ARCHIVE = P.Archive(endpoint="https://store.kubefly.svc:8443", bucket="kubefly", region="", access_key_id="AK1",
                    ca_pem="-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")


def test_with_an_archive_every_member_gets_the_store_its_key_id_and_the_sealed_key_secret():
    p = P.plan(C, (), HOSTS, image=IMAGE, primary=None, now=NOW, host_loss_grace_s=60, archive=ARCHIVE)
    for m in p.create_machines:
        spec = m["spec"]
        assert spec["secrets"] == ["pg-credentials", "pg-archive"]
        env = spec["env"]
        assert env["KUBEFLY_PG_ARCHIVE_ENDPOINT"] == "https://store.kubefly.svc:8443"
        assert env["KUBEFLY_PG_ARCHIVE_PATH"] == "/postgres/org"  # the namespace's; the cluster's below it
        assert env["KUBEFLY_PG_CLUSTER"] == "pg" and env["KUBEFLY_PG_ARCHIVE_ACCESS_KEY_ID"] == "AK1"
        assert env["KUBEFLY_PG_ARCHIVE_REGION"] == "us-east-1" and env["KUBEFLY_PG_ARCHIVE_CA"] == ARCHIVE.ca_pem
        assert not any("SECRET" in k for k in env)  # the secret key travels sealed, never in the spec


def test_archiving_turned_on_rolls_the_members_one_at_a_time():
    members = [started(C, i, f"h{i}") for i in range(3)]
    p = P.plan(C, members, HOSTS, image=IMAGE, primary="pg-0", now=NOW, host_loss_grace_s=60, archive=ARCHIVE)
    assert p.update_machine is not None and p.update_machine[0] != "pg-0"  # a standby first
    assert "KUBEFLY_PG_ARCHIVE_ENDPOINT" in p.update_machine[1]["env"]
    assert any(c.type == "MembersUpToDate" and not c.ok for c in p.conditions)


def test_a_restore_is_the_first_members_first_data_only():
    from kubefly.postgres.pgbackrest import RestoreFrom

    restore = RestoreFrom("src", "7412345678901234567", "time", "2026-12-04 12:00:00.000000+00", "20261201-000000F")
    p = P.plan(C, (), HOSTS, image=IMAGE, primary=None, now=NOW, host_loss_grace_s=60, archive=ARCHIVE, restore=restore)
    env0, env1 = p.create_machines[0]["spec"]["env"], p.create_machines[1]["spec"]["env"]
    assert (env0["KUBEFLY_PG_RESTORE_FROM"], env0["KUBEFLY_PG_RESTORE_SYSTEM_ID"]) == ("src", "7412345678901234567")
    assert (env0["KUBEFLY_PG_RESTORE_TYPE"], env0["KUBEFLY_PG_RESTORE_SET"]) == ("time", "20261201-000000F")
    assert env0["KUBEFLY_PG_RESTORE_TARGET"] == "2026-12-04 12:00:00.000000+00"
    assert not any(k.startswith("KUBEFLY_PG_RESTORE") for k in env1)  # the others clone member 0
