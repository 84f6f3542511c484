"""A PostgresCluster on kind: three members in real pods on real volumes, one per
ams worker; the primary's pod is killed, repmgr promotes a standby, writes
resume through the primary Service, and the killed member rejoins as a standby."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from datetime import datetime

import pytest

from .kindlib import KindCluster
from .test_kind_volumes import get

MEMBERS = ["pg-0", "pg-1", "pg-2"]
# A cold cluster: member 0 runs initdb, the others clone it, each pod a fresh start.
HEALTHY_WITHIN_S = 300
# The cluster's store key works once the store has reloaded its identities (the kubelet's refresh
# of the mounted Secret, up to about 90 s); the primary retries stanza-create every 15 s until then.
ARCHIVING_WITHIN_S = 240
# The same wait for the restored cluster's key (read access to the source's archive), then a restore
# retried every minute until the key works, the replay and the promotion.
RESTORED_WITHIN_S = 480


def cluster_status(kind: KindCluster, namespace: str) -> dict:
    return (get(kind, namespace, "postgrescluster", "pg") or {}).get("status") or {}


def healthy(kind: KindCluster, namespace: str, *, not_primary: str | None = None):
    """The status once all three members are ready with one primary (other than `not_primary`)."""
    s = cluster_status(kind, namespace)
    members = s.get("members") or []
    if s.get("phase") != "Healthy" or len(members) != 3 or not all(m["ready"] for m in members):
        return None
    return s if s.get("primary") and s["primary"] != not_primary else None


def primary_pods(kind: KindCluster, namespace: str) -> list[str]:
    return kind.kubectl("-n", namespace, "get", "pods", "-l", "kubefly.dev/pg-cluster=pg,kubefly.dev/pg-role=primary",
                        "-o", "jsonpath={.items[*].metadata.name}").stdout.split()


def archiving(kind: KindCluster, namespace: str, *, primary: str | None = None) -> dict | None:
    """The ContinuousArchiving condition once True (on `primary`, if named)."""
    cond = next((c for c in cluster_status(kind, namespace).get("conditions") or []
                 if c["type"] == "ContinuousArchiving"), None)
    if cond is None or cond["status"] != "True":
        return None
    return cond if primary is None or cond["message"].startswith(f"{primary} ") else None


def sql(kind: KindCluster, namespace: str, pod: str, uri: str, statement: str, timeout: float = 15) -> subprocess.CompletedProcess:
    """`statement` through the primary Service, by psql inside member `pod` (the image has the client).

    A refusal is an answer (the caller retries); a psql still waiting after `timeout` is a client left
    hanging on a connect or a commit, which a failover or a stop must never do."""
    try:
        return kind.kubectl("-n", namespace, "exec", pod, "-c", "machine", "--", "psql", uri, "-XAtq",
                            "-v", "ON_ERROR_STOP=1", "-c", statement, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"psql through pg-primary hung for {timeout:.0f}s (a hang, not a refusal): {statement}",
                    pytrace=False)


def test_postgres_cluster_fails_over_when_the_primary_pod_is_killed(kind: KindCluster, namespace: str):
    ams = sorted(n["metadata"]["name"] for n in json.loads(kind.kubectl(
        "get", "nodes", "-l", "topology.kubernetes.io/region=ams", "-o", "json").stdout)["items"])
    assert len(ams) == 3, f"kind-config.yaml gives ams three workers; the cluster has {ams}"
    kind.apply({"apiVersion": "kubefly.dev/v1alpha1", "kind": "PostgresCluster", "metadata": {"name": "pg"},
                "spec": {"app": "db", "region": "ams", "members": 3, "volumeSizeGb": 1, "synchronous": True}}, namespace)
    s = kind.wait_for("PostgresCluster pg Healthy with three ready members",
                      lambda: healthy(kind, namespace), timeout=HEALTHY_WITHIN_S, interval=2)

    # One member per ams worker, each pod on its volume's host, the data on that worker's disk.
    hosts = {}
    for name in MEMBERS:
        pod, vol = get(kind, namespace, "pod", name), get(kind, namespace, "volume", name)
        assert pod["spec"]["nodeName"] == vol["status"]["host"], f"{name} runs on its volume's host"
        hosts[name] = pod["spec"]["nodeName"]
        pv = json.loads(kind.kubectl("get", "pv", vol["status"]["persistentVolume"], "-o", "json").stdout)["spec"]
        on_disk = subprocess.run(["docker", "exec", hosts[name], "test", "-f", f"{pv['hostPath']['path']}/pgdata/PG_VERSION"],
                                 capture_output=True)
        assert on_disk.returncode == 0, f"{name}'s pgdata is on {hosts[name]}'s disk"
    assert sorted(hosts.values()) == ams, "every member on its own ams worker"
    old = s["primary"]
    assert primary_pods(kind, namespace) == [old], "exactly the primary's pod is behind the primary Service"

    secret = kind.wait_for("pg-credentials", lambda: get(kind, namespace, "secret", "pg-credentials"))
    uri = base64.b64decode(secret["data"]["uri"]).decode()
    client = next(m for m in MEMBERS if m != old)
    # The primary's label reaches every kube-proxy through its EndpointSlice a moment after the status;
    # until then the Service's address is unreachable (kind's nodes refuse what kube-proxy did not rewrite).
    def first_write():
        p = sql(kind, namespace, client, uri, "CREATE TABLE IF NOT EXISTS ledger (id int PRIMARY KEY); INSERT INTO ledger VALUES (1)")
        if p.returncode != 0 and "unreachable" not in p.stderr:
            pytest.fail(f"the first write through pg-primary failed: {p.stderr}", pytrace=False)
        return p.returncode == 0
    kind.wait_for("the first write through pg-primary", first_write, timeout=30, interval=0.5)

    # WAL goes to the bundled object store, under the cluster's own key, and a backup taken on
    # demand completes with its WAL range (the schedule's first backup may run first: one at a time).
    waited = time.monotonic()
    try:
        cond = kind.wait_for("ContinuousArchiving True", lambda: archiving(kind, namespace), timeout=ARCHIVING_WITHIN_S,
                             interval=2)
    except Exception:
        print(json.dumps([c for c in cluster_status(kind, namespace).get("conditions") or []
                          if c["type"] == "ContinuousArchiving"]))
        raise
    path = cluster_status(kind, namespace)["archivePath"]
    assert path.startswith(f"/postgres/{namespace}/pg/") and path.rsplit("/", 1)[1].isdigit(), path
    print(f"\n[kind] ContinuousArchiving True {time.monotonic() - waited:.0f}s after Healthy: {cond['message']}")
    kind.apply({"apiVersion": "kubefly.dev/v1alpha1", "kind": "PostgresBackup", "metadata": {"name": "first"},
                "spec": {"cluster": "pg"}}, namespace)
    done = kind.wait_for("PostgresBackup first finished", lambda: (
        b := (get(kind, namespace, "postgresbackup", "first") or {}).get("status") or {}).get("phase") in ("Completed", "Failed")
        and b, timeout=300, interval=2)
    assert done["phase"] == "Completed", done
    assert done["member"] == old and done["label"].endswith("F") and done["sizeBytes"] > 10_000_000, done
    assert done["walStart"] <= done["walStop"] and done["archivePath"] == path, done
    scheduled = kind.kubectl("-n", namespace, "get", "pgb", "-l", "kubefly.dev/scheduled=true,kubefly.dev/pg-cluster=pg",
                             "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
    assert len(scheduled) == 1, f"spec.backups made its first backup as the cluster began to archive: {scheduled}"
    archived = sql(kind, namespace, client, uri, "SELECT pg_switch_wal() IS NOT NULL; "
                                                "SELECT archived_count FROM pg_stat_archiver")
    assert archived.returncode == 0 and int(archived.stdout.split()[-1]) > 0, archived.stdout + archived.stderr

    # Point-in-time recovery into a new cluster: rows with known checksums, a time noted, more rows;
    # the new cluster has exactly the rows before that time, and the source's archive is only read.
    def one(statement: str) -> str:
        r = sql(kind, namespace, client, uri, statement, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()
    one("CREATE TABLE audit (id int PRIMARY KEY, sum text); "
        "INSERT INTO audit SELECT g, md5(g::text) FROM generate_series(1, 1000) g")
    time.sleep(1.2)  # each statement commits on its own: the target falls between the two inserts
    target = datetime.fromisoformat(one("SELECT clock_timestamp()")).isoformat()
    time.sleep(0.3)
    one("INSERT INTO audit SELECT g, md5(g::text) FROM generate_series(1001, 2000) g")
    expected = one("SELECT md5(string_agg(sum, '' ORDER BY id)) FROM audit WHERE id <= 1000")
    segment = one("SELECT pg_walfile_name(pg_switch_wal())")
    kind.wait_for(f"{segment} archived", lambda: (r := sql(
        kind, namespace, client, uri, "SELECT last_archived_wal FROM pg_stat_archiver")).returncode == 0
        and r.stdout.strip() >= segment, timeout=60, interval=1)
    started = time.monotonic()
    kind.apply({"apiVersion": "kubefly.dev/v1alpha1", "kind": "PostgresCluster", "metadata": {"name": "pitr"},
                "spec": {"app": "db", "region": "ams", "members": 1, "volumeSizeGb": 1,
                         "backups": {"scheduled": False},
                         "restore": {"from": "pg", "targetTime": target}}}, namespace)
    restored = kind.wait_for("PostgresCluster pitr Healthy and Restored", lambda: (
        st := (get(kind, namespace, "postgrescluster", "pitr") or {}).get("status") or {}).get("phase") == "Healthy"
        and any(c["type"] == "Restored" and c["status"] == "True" for c in st.get("conditions") or []) and st,
        timeout=RESTORED_WITHIN_S, interval=2)
    print(f"[kind] pitr restored to {target} and Healthy {time.monotonic() - started:.1f}s after it was applied")
    assert restored["restore"]["from"] == "pg" and restored["restore"]["backup"].endswith("F"), restored["restore"]
    assert restored["restore"]["archivePath"] == path and restored["archivePath"] != path
    pitr_secret = kind.wait_for("pitr-credentials", lambda: get(kind, namespace, "secret", "pitr-credentials"))
    pitr_uri = base64.b64decode(pitr_secret["data"]["uri"]).decode()
    # (Its primary's label reaches kube-proxy a moment after the status, as for pg's first write.)
    got = kind.wait_for("the restored rows through pitr-primary", lambda: (g := sql(
        kind, namespace, client, pitr_uri, "SELECT count(*), md5(string_agg(sum, '' ORDER BY id)) FROM audit"
    )).returncode == 0 and g, timeout=30, interval=0.5)
    assert got.stdout.strip() == f"1000|{expected}", got.stdout + got.stderr
    # The source's own archive goes on: it still archives, from the same place.
    kind.wait_for("pg still archives", lambda: archiving(kind, namespace), timeout=60, interval=2)
    assert cluster_status(kind, namespace)["archivePath"] == path

    # Kill the primary's pod: SIGKILL to its member container's first process, by containerd on
    # its worker (postgres and repmgrd die with it). The kubelet restarts the container in place
    # within a second or two, and a primary back that fast, before any standby promoted, rightly
    # stays the primary; so it is killed again whenever it is back, until a standby is promoted
    # (the kubelet's crash back-off soon keeps it down for 10 s). A force-deleted pod instead
    # would let the operator start a second member on the same data directory before the
    # kubelet had killed the first.
    killed, kills = time.monotonic(), 0
    while not (promoted := [m["name"] for m in cluster_status(kind, namespace).get("members") or []
                            if m["role"] == "primary" and m["name"] != old]):
        assert time.monotonic() - killed < 120, f"no standby promoted within 120 s of killing {old} ({kills} kills)"
        state = next(c for c in get(kind, namespace, "pod", old)["status"]["containerStatuses"] if c["name"] == "machine")
        if "running" in state["state"]:
            kill = subprocess.run(["docker", "exec", hosts[old], "ctr", "-n", "k8s.io", "tasks", "kill", "--signal", "SIGKILL",
                                   state["containerID"].removeprefix("containerd://")], capture_output=True, text=True)
            kills += kill.returncode == 0
        time.sleep(0.5)
    print(f"\n[kind] {promoted[0]} promoted {time.monotonic() - killed:.1f}s after {old} was first killed ({kills} kills)")
    # The client may be the standby that gets promoted: it keeps its pod, so it can still run psql.
    kind.wait_for("a write through pg-primary after the kill",
                  lambda: sql(kind, namespace, client, uri, "INSERT INTO ledger VALUES (2) ON CONFLICT DO NOTHING").returncode == 0,
                  timeout=120, interval=0.5)
    print(f"[kind] writes through pg-primary again {time.monotonic() - killed:.1f}s after the primary's pod was killed")

    s = kind.wait_for("a new primary and all three members ready again (the killed one rejoined)",
                      lambda: healthy(kind, namespace, not_primary=old), timeout=240, interval=2)
    new = s["primary"]
    assert s["lastFailover"]["from"] == old and s["lastFailover"]["to"] == new
    assert primary_pods(kind, namespace) == [new]
    member = {m["name"]: m for m in s["members"]}
    assert member[old]["role"] == "standby", f"the killed member is back as a standby: {member[old]}"
    assert member[new]["timeline"] > 1, "the promotion began a new timeline"
    # The new primary archives on, into the same archive.
    kind.wait_for(f"ContinuousArchiving True on {new}", lambda: archiving(kind, namespace, primary=new), timeout=120,
                  interval=2)
    assert cluster_status(kind, namespace)["archivePath"] == path
    # The commits from before and after the failover are both on the new primary (a retried insert
    # whose first acknowledgement was lost in the failover finds its row there and adds nothing).
    rows = sql(kind, namespace, client, uri, "SELECT string_agg(id::text, ',' ORDER BY id) FROM ledger")
    assert rows.returncode == 0 and rows.stdout.strip() == "1,2", rows.stdout + rows.stderr
    # The killed member came back in its own pod, on its own host and volume.
    pod = get(kind, namespace, "pod", old)
    assert pod["spec"]["nodeName"] == hosts[old]
    assert next(c for c in pod["status"]["containerStatuses"] if c["name"] == "machine")["restartCount"] >= 1

    # Delete the new primary's pod (a drain or an eviction): on SIGTERM the member says it is not
    # writable (clients are refused, never held), hands over to its most advanced standby, stops, and
    # its next pod (same host and volume) rejoins as a standby. Writes resume within seconds.
    uid = get(kind, namespace, "pod", new)["metadata"]["uid"]
    old_ip = get(kind, namespace, "pod", new)["status"]["podIP"]
    client = next(m for m in MEMBERS if m != new)
    last_on_old = deleted = time.monotonic()
    kind.kubectl("-n", namespace, "delete", "pod", new, "--wait=false")

    def written_elsewhere():
        """A write through pg-primary taken by another member than the one whose pod is going."""
        nonlocal last_on_old
        p = sql(kind, namespace, client, uri, "INSERT INTO ledger VALUES (3) ON CONFLICT DO NOTHING; "
                                              "SELECT host(inet_server_addr())")
        if p.returncode == 0 and p.stdout.strip() == old_ip:
            last_on_old = time.monotonic()
            return False
        return p.returncode == 0
    kind.wait_for("a write through pg-primary on another member after the pod's deletion", written_elsewhere,
                  timeout=120, interval=0.2)
    print(f"[kind] write gap {time.monotonic() - last_on_old:.1f}s when {new}'s pod was deleted (last write on it "
          f"{last_on_old - deleted:.1f}s after the delete, next on another member {time.monotonic() - deleted:.1f}s after)")
    s = kind.wait_for(f"all three members ready again, {new} a standby", lambda: healthy(kind, namespace, not_primary=new),
                      timeout=240, interval=2)
    assert s["lastFailover"]["from"] == new, s["lastFailover"]
    print(f"[kind] {s['lastFailover']['reason']}")
    pod = get(kind, namespace, "pod", new)
    assert pod["metadata"]["uid"] != uid and pod["spec"]["nodeName"] == hosts[new], "a new pod on the member's own host"
    rows = sql(kind, namespace, client, uri, "SELECT string_agg(id::text, ',' ORDER BY id) FROM ledger")
    assert rows.returncode == 0 and rows.stdout.strip() == "1,2,3", rows.stdout + rows.stderr
    assert primary_pods(kind, namespace) == [s["primary"]]

    # spec.switchoverTo: the operator asks the named standby to take over (the members' switchover:
    # the primary is demoted cleanly, the target replays its last WAL and is promoted, the others follow).
    old, target = s["primary"], next(m for m in MEMBERS if m != s["primary"])
    asked = time.monotonic()
    kind.kubectl("-n", namespace, "patch", "postgrescluster", "pg", "--type=merge",
                 "-p", json.dumps({"spec": {"switchoverTo": target}}))
    kind.wait_for(f"a write through pg-primary after the switchover to {target}",
                  lambda: cluster_status(kind, namespace).get("primary") == target and sql(
                      kind, namespace, client, uri, "INSERT INTO ledger VALUES (4) ON CONFLICT DO NOTHING").returncode == 0,
                  timeout=120, interval=0.5)
    print(f"[kind] writes through pg-primary on {target} {time.monotonic() - asked:.1f}s after spec.switchoverTo")
    s = kind.wait_for(f"all three members ready again, {target} primary",
                      lambda: (h := healthy(kind, namespace, not_primary=old)) and h["primary"] == target and h,
                      timeout=240, interval=2)
    switchover = next(c for c in s["conditions"] if c["type"] == "Switchover")
    assert switchover["status"] == "True", switchover
    assert primary_pods(kind, namespace) == [target]
    rows = sql(kind, namespace, client, uri, "SELECT string_agg(id::text, ',' ORDER BY id) FROM ledger")
    assert rows.returncode == 0 and rows.stdout.strip() == "1,2,3,4", rows.stdout + rows.stderr
