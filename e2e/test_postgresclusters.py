"""PostgresCluster on the local control plane: Volumes on distinct hosts, Machines,
Services, credentials, truthful status (nothing runs in kwok, so member health
is unreachable and says so), scaling (a scale up takes a retired Volume back),
switchover refused with a reason, and deletion that keeps the data."""

from __future__ import annotations

import base64
import subprocess
import uuid

import pytest

from kubefly.conditions import get_condition

pytestmark = pytest.mark.usefixtures("operator")


@pytest.fixture
def region(kube):
    """A region of its own with four simulated hosts, removed afterwards."""
    name = f"pg{uuid.uuid4().hex[:6]}"
    hosts = [f"{name}-h{i}" for i in range(4)]
    for h in hosts[:3]:
        kube.cluster.add_host(h, name)
    yield name, hosts
    for h in hosts:
        kube.kubectl("delete", "node", h, "--ignore-not-found", "--wait=false", check=False)


def cluster(namespace, name, region, **spec):
    return {"apiVersion": "kubefly.dev/v1alpha1", "kind": "PostgresCluster",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"app": "db", "region": region, "members": 3, "volumeSizeGb": 1, "synchronous": True, **spec}}


def status(obj):
    return (obj or {}).get("status") or {}


def names(kube, namespace, kind, selector):
    out = kube.kubectl("-n", namespace, "get", kind, "-l", selector, "-o", "jsonpath={.items[*].metadata.name}").stdout
    return sorted(out.split())


def test_a_cluster_becomes_members_on_distinct_hosts_services_and_credentials(kube, namespace, region, operator):
    region, hosts = region
    kube.apply(cluster(namespace, "pg", region))
    sel = "kubefly.dev/pg-cluster=pg"

    def placed():
        vols = [kube.get(namespace, "volume", f"pg-{i}") for i in range(3)]
        return all(status(v).get("host") for v in vols) and vols
    vols = kube.wait_for("three member volumes placed", placed, timeout=60)
    assert len({status(v)["host"] for v in vols}) == 3, "every member on its own host"
    assert {status(v)["host"] for v in vols} <= set(hosts)
    owner = kube.get(namespace, "postgrescluster", "pg")["metadata"]["uid"]
    assert all(v["metadata"]["ownerReferences"][0]["uid"] == owner for v in vols)

    def machines_started():
        ms = [kube.get(namespace, "machine", f"pg-{i}") for i in range(3)]
        return all(status(m).get("state") == "started" for m in ms) and ms
    ms = kube.wait_for("three member machines started", machines_started, timeout=90)
    for i, (m, v) in enumerate(zip(ms, vols)):
        assert status(m)["host"] == status(v)["host"], "a member runs on its volume's host"
        env = m["spec"]["env"]
        assert env["KUBEFLY_PG_NAME"] == f"pg-{i}" and env["KUBEFLY_PG_HOST"] == f"pg-{i}.{namespace}.svc"
        assert len(env["KUBEFLY_PG_PEERS"].split()) == 2
        pod = kube.get(namespace, "pod", f"pg-{i}")
        assert pod["spec"]["nodeName"] == status(v)["host"]

    # Services: role selectors and one headless Service per member for stable peer names.
    primary, replicas = kube.get(namespace, "service", "pg-primary"), kube.get(namespace, "service", "pg-replicas")
    assert primary["spec"]["selector"]["kubefly.dev/pg-role"] == "primary"
    assert replicas["spec"]["selector"]["kubefly.dev/pg-role"] == "standby"
    member_svc = kube.get(namespace, "service", "pg-1")
    assert member_svc["spec"]["clusterIP"] == "None" and member_svc["spec"]["selector"] == {"kubefly.dev/machine": "pg-1"}

    # Credentials: generated, owned, handed to the members through a sealed AppSecret, never logged.
    secret = kube.wait_for("credentials", lambda: kube.get(namespace, "secret", "pg-credentials"))
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert values["username"] == "postgres" and len(values["password"]) >= 32 and values["password"] != values["repmgr-password"]
    assert secret["metadata"]["ownerReferences"][0]["uid"] == owner
    appsecret = kube.get(namespace, "appsecret", "pg-credentials")
    assert sorted(appsecret["spec"]["data"]) == ["KUBEFLY_PG_ADMIN_TOKEN", "KUBEFLY_PG_REPMGR_PASSWORD", "KUBEFLY_PG_SUPERUSER_PASSWORD"]
    assert values["password"] not in str(appsecret["spec"]["data"])
    assert all(m["spec"]["secrets"] == ["pg-credentials"] for m in ms)

    # Status tells the truth: the machines run, but no member's health port answers in kwok.
    def reported():
        s = status(kube.get(namespace, "postgrescluster", "pg"))
        return len(s.get("members") or []) == 3 and get_condition(s.get("conditions"), "Ready") and s
    s = kube.wait_for("status with members", reported, timeout=60)
    assert s["phase"] == "Provisioning" and s.get("primary") is None and s["readyMembers"] == 0
    assert {m["name"]: m["role"] for m in s["members"]} == {"pg-0": "unknown", "pg-1": "unknown", "pg-2": "unknown"}
    assert {m["host"] for m in s["members"]} == {status(v)["host"] for v in vols}
    ready = get_condition(s["conditions"], "Ready")
    assert ready["status"] == "False" and ready["reason"] == "MemberHealthUnreachable"
    assert "member health unreachable" in ready["message"] and "pg-0" in ready["message"]
    # This platform has no object store: the cluster says it has no archive, hence no backups.
    archiving = get_condition(s["conditions"], "ContinuousArchiving")
    assert archiving["status"] == "False" and archiving["reason"] == "NoObjectStore", archiving
    assert "objectStore" in archiving["message"]
    table = kube.kubectl("-n", namespace, "get", "pgc", "pg").stdout
    assert table.split("\n")[0].split() == ["NAME", "MEMBERS", "READY", "PRIMARY", "PHASE", "AGE"]
    # No primary: the Primary column is blank.
    assert table.split("\n")[1].split()[:4] == ["pg", "3", "0", "Provisioning"]
    assert not names(kube, namespace, "pod", "kubefly.dev/pg-role=primary"), "no pod labelled primary without a report"

    # Switchover: refused for a non-member, and attempted but failing truthfully for a member.
    kube.kubectl("-n", namespace, "patch", "pgc", "pg", "--type=merge", "-p", '{"spec":{"switchoverTo":"pg-9"}}')
    sw = kube.wait_for("switchover refused", lambda: get_condition(status(kube.get(namespace, "pgc", "pg")).get("conditions"), "Switchover"))
    assert sw["status"] == "False" and sw["reason"] == "UnknownMember" and "pg-9" in sw["message"]
    kube.kubectl("-n", namespace, "patch", "pgc", "pg", "--type=merge", "-p", '{"spec":{"switchoverTo":"pg-1"}}')
    sw = kube.wait_for("switchover not possible", lambda: (c := get_condition(status(kube.get(namespace, "pgc", "pg")).get("conditions"), "Switchover")) and c["reason"] != "UnknownMember" and c)
    assert sw["status"] == "False" and sw["reason"] == "NoPrimary" and "pg-1" in sw["message"]
    kube.kubectl("-n", namespace, "patch", "pgc", "pg", "--type=json", "-p", '[{"op":"remove","path":"/spec/switchoverTo"}]')

    # Scale up: a fourth host, a fourth member on it, and every member learns its new peer.
    kube.cluster.add_host(hosts[3], region)
    kube.kubectl("-n", namespace, "patch", "pgc", "pg", "--type=merge", "-p", '{"spec":{"members":4}}')
    v3 = kube.wait_for("pg-3 placed", lambda: (v := kube.get(namespace, "volume", "pg-3")) and status(v).get("host") and v, timeout=60)
    assert status(v3)["host"] not in {status(v)["host"] for v in vols}
    kube.wait_for("every member's peers include pg-3", lambda: all(
        "pg-3=" in ((kube.get(namespace, "machine", f"pg-{i}") or {}).get("spec", {}).get("env", {}).get("KUBEFLY_PG_PEERS", ""))
        for i in range(3)), timeout=120)
    assert kube.get(namespace, "service", "pg-3") is not None

    # Scale down to 2: the highest-numbered members go (no primary is known to protect); under
    # keepVolumes (the default) their Volumes stay, labelled retired.
    kube.kubectl("-n", namespace, "patch", "pgc", "pg", "--type=merge", "-p", '{"spec":{"members":2}}')
    kube.wait_for("pg-2 and pg-3 removed", lambda: names(kube, namespace, "machines", sel) == ["pg-0", "pg-1"]
                  and kube.get(namespace, "service", "pg-3") is None, timeout=120)
    pgretired = "kubefly.dev/pg-retired"
    assert names(kube, namespace, "volumes", f"{sel},{pgretired}=true") == ["pg-2", "pg-3"]
    assert names(kube, namespace, "volumes", sel) == ["pg-0", "pg-1", "pg-2", "pg-3"]
    assert not any(kube.get(namespace, "volume", f"pg-{i}")["metadata"].get("deletionTimestamp") for i in (2, 3))

    # Scale up to 3: the lowest-numbered retired Volume on a free host comes back under its number
    # (its data rejoins), unlabelled, instead of a new Volume; pg-3 stays retired.
    kube.kubectl("-n", namespace, "patch", "pgc", "pg", "--type=merge", "-p", '{"spec":{"members":3}}')
    m2 = kube.wait_for("pg-2 back on its Volume", lambda: (m := kube.get(namespace, "machine", "pg-2"))
                       and status(m).get("state") == "started" and m, timeout=90)
    assert status(m2)["host"] == status(vols[2])["host"], "the member runs where its kept data is"
    assert m2["spec"]["mounts"][0]["volume"] == "pg-2" and m2["spec"]["env"]["KUBEFLY_PG_NODE_ID"] == "3"
    assert pgretired not in kube.get(namespace, "volume", "pg-2")["metadata"]["labels"]
    assert names(kube, namespace, "volumes", f"{sel},{pgretired}=true") == ["pg-3"]
    assert names(kube, namespace, "volumes", sel) == ["pg-0", "pg-1", "pg-2", "pg-3"], "no new Volume"

    # Delete: keepVolumes (the default) keeps the data and the credentials that open it.
    kube.kubectl("-n", namespace, "delete", "pgc", "pg", "--wait=true", "--timeout=60s")
    kube.wait_for("member machines gone", lambda: not names(kube, namespace, "machines", sel), timeout=60)
    kept = [kube.get(namespace, "volume", f"pg-{i}") for i in range(4)]
    assert all(v is not None and not v["metadata"].get("deletionTimestamp") for v in kept)
    assert all(not v["metadata"].get("ownerReferences") for v in kept)
    assert kube.get(namespace, "secret", "pg-credentials") is not None
    kube.wait_for("services gone", lambda: not names(kube, namespace, "services", sel), timeout=60)

    assert values["password"] not in operator.logs() and values["admin-token"] not in operator.logs()


def test_fewer_hosts_than_members_creates_nothing_and_says_why(kube, namespace, region):
    region, _ = region
    kube.apply(cluster(namespace, "big", region, members=5))
    cond = kube.wait_for("NotEnoughHosts", lambda: get_condition(status(kube.get(namespace, "pgc", "big")).get("conditions"), "HostsAvailable"), timeout=30)
    assert cond["status"] == "False" and cond["reason"] == "NotEnoughHosts" and f"region {region} has 3 schedulable hosts" in cond["message"]
    assert not names(kube, namespace, "volumes", "kubefly.dev/pg-cluster=big")


def test_invalid_spec_is_refused_by_the_api_server(kube, namespace):
    proc = kube.kubectl("apply", "-f", "-", check=False, input=__import__("json").dumps(
        cluster(namespace, "bad", "iad", members=1, synchronous=True)))
    assert proc.returncode != 0 and "spec.synchronous needs a standby" in proc.stderr
    with pytest.raises(subprocess.CalledProcessError):
        kube.apply(cluster(namespace, "bad", "iad", members=9))


def backup(namespace, name, cluster_name, **spec):
    return {"apiVersion": "kubefly.dev/v1alpha1", "kind": "PostgresBackup",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"cluster": cluster_name, **spec}}


def test_a_backup_of_no_cluster_fails_naming_the_field_and_a_bad_one_is_refused(kube, namespace, region):
    kube.apply(backup(namespace, "nothing", "ghost"))
    s = kube.wait_for("the backup fails", lambda: status(kube.get(namespace, "pgb", "nothing")).get("phase") == "Failed"
                      and status(kube.get(namespace, "pgb", "nothing")), timeout=30)
    assert s["message"].startswith("spec.cluster: there is no PostgresCluster ghost"), s
    proc = kube.kubectl("apply", "-f", "-", check=False,
                        input=__import__("json").dumps(backup(namespace, "weekly", "pg", type="weekly")))
    assert proc.returncode != 0 and "spec.type" in proc.stderr, proc.stderr
    proc = kube.kubectl("apply", "-f", "-", check=False, input=__import__("json").dumps(
        cluster(namespace, "pgw", "iad", backups={"recoveryWindowDays": 0})))
    assert proc.returncode != 0 and "recoveryWindowDays" in proc.stderr, proc.stderr

    # A cluster that cannot archive (no object store here) keeps its backup Pending, saying why.
    region, _ = region
    kube.apply(cluster(namespace, "pg", region))
    kube.apply(backup(namespace, "first", "pg"))
    # (Until the cluster's first status, the backup only knows that its archive is not set up yet.)
    s = kube.wait_for("the backup waits, saying why", lambda: "objectStore" in (
        st := status(kube.get(namespace, "pgb", "first"))).get("message", "") and st, timeout=60)
    assert s["phase"] == "Pending" and s["message"].startswith("waiting for pg to archive WAL: "), s
    table = kube.kubectl("-n", namespace, "get", "pgb", "first").stdout
    assert table.split("\n")[0].split() == ["NAME", "CLUSTER", "TYPE", "PHASE", "MEMBER", "BYTES", "FINISHED", "AGE"]


def test_a_restore_that_cannot_be_creates_nothing_and_says_why(kube, namespace, region):
    region, _ = region
    kube.apply(cluster(namespace, "pitr", region, restore={"from": "gone", "latest": True}))
    cond = kube.wait_for("Restored False", lambda: get_condition(
        status(kube.get(namespace, "pgc", "pitr")).get("conditions"), "Restored"), timeout=30)
    # No object store here: nothing to restore from, and nothing is made.
    assert cond["status"] == "False" and cond["reason"] == "NoObjectStore", cond
    assert cond["message"].startswith("spec.restore reads the object store"), cond
    assert not names(kube, namespace, "volumes", "kubefly.dev/pg-cluster=pitr")
    proc = kube.kubectl("apply", "-f", "-", check=False, input=__import__("json").dumps(
        cluster(namespace, "two", region, restore={"from": "gone", "latest": True, "targetName": "x"})))
    assert proc.returncode != 0 and "exactly one target" in proc.stderr, proc.stderr
    proc = kube.kubectl("patch", "pgc", "pitr", "-n", namespace, "--type=merge", "-p",
                        '{"spec": {"restore": {"from": "other", "latest": true}}}', check=False)
    assert proc.returncode != 0 and "spec.restore is immutable" in proc.stderr, proc.stderr
