"""`kubefly host drain` on kind, as a platform operator runs it, with traffic through the proxy.

A two-machine app answers through the edge proxy's mapped port the whole time;
its machine on the drained host moves to another ams host (a new instance, the
same name) and no request fails. A machine with a volume on that host migrates
with its data (test_kind_migrate.py has the single migration under traffic),
and the drain ends with the host empty. A PostgresCluster's primary hands over
to its standby before it migrates, and no acknowledged write is lost.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time

from kubefly import labels

from .kindlib import KindCluster
from .test_kind_appsecrets import KUBEFLY, settled
from .test_kind_machines import DOMAIN, machine
from .test_kind_postgres import HEALTHY_WITHIN_S, cluster_status, sql
from .test_kind_snapshots import CHECKSUM, machine_with_data
from .test_kind_volumes import get, in_machine


def cli(kind: KindCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(KUBEFLY), *args], capture_output=True, text=True, timeout=240, check=check,
                          env={**os.environ, "KUBECONFIG": str(kind.kubeconfig)})


def ams_hosts(kind: KindCluster) -> list[str]:
    out = kind.kubectl("get", "nodes", "-l", "topology.kubernetes.io/region=ams", "-o", "jsonpath={.items[*].metadata.name}")
    return out.stdout.split()


def test_drain_moves_a_machine_of_a_two_machine_app_without_a_failed_request_and_migrates_a_volume_machine(
        kind: KindCluster, namespace: str):
    host, digest = machine_with_data(kind, namespace, "drainvol-1", "drainvol", "drainvol")
    others = [h for h in ams_hosts(kind) if h != host]
    app, names = "drainweb", ("drainweb-1", "drainweb-2")
    specs = []
    for name in names:
        spec = machine(kind, name, "ams")
        spec["spec"]["app"] = app
        specs.append(spec)
    try:
        # drainweb-1 on the volume machine's host (the others cordoned), drainweb-2 elsewhere.
        for h in others:
            cli(kind, "host", "cordon", h)
        kind.apply(specs[0], namespace)
        first = kind.wait_for("drainweb-1 started", lambda: settled(m := get(kind, namespace, "machine", names[0]) or {}) and m,
                              timeout=180)
        assert first["status"]["host"] == host
        for h in others:
            cli(kind, "host", "uncordon", h)
        cli(kind, "host", "cordon", host)
        kind.apply(specs[1], namespace)
        kind.wait_for("drainweb-2 started", lambda: settled(get(kind, namespace, "machine", names[1]) or {}), timeout=180)

        where = f"{app}.{namespace}.{DOMAIN}"
        kind.wait_for(f"{where} routed", lambda: kind.ask(where) == 200, timeout=120)
        results: list[int] = []
        stop = threading.Event()

        def traffic():
            while not stop.is_set():
                results.append(kind.ask(where))
                time.sleep(0.05)

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            out = cli(kind, "host", "drain", host, "--deadline", "150s", check=False)
            # The moved machine keeps serving after the drain, too.
            time.sleep(2)
        finally:
            stop.set()
            sender.join()
        print(f"[kind] drain of {host}:\n{out.stdout}{out.stderr}")
        failed = [code for code in results if code != 200]
        print(f"[kind] {len(results)} requests through the proxy during the drain, {len(failed)} failed")
        assert out.returncode == 0, out.stderr
        assert f"{namespace}/drainweb-1: moved to host" in out.stdout
        assert f"{namespace}/drainvol-1: moved to host" in out.stdout
        moved = get(kind, namespace, "machine", names[0])
        assert settled(moved) and moved["status"]["host"] != host
        assert moved["status"]["instanceId"] != first["status"]["instanceId"]
        assert ("move", "moved") in [(e["type"], e["status"]) for e in moved["status"]["events"]]
        assert not failed, f"{len(failed)} of {len(results)} requests failed: {sorted(set(failed))}"
        migrated = get(kind, namespace, "machine", "drainvol-1")
        assert settled(migrated) and migrated["status"]["host"] != host
        assert ("migrate", "migrated") in [(e["type"], e["status"]) for e in migrated["status"]["events"]]
        assert in_machine(kind, namespace, "drainvol-1", CHECKSUM) == digest, "its data moved with it"
        node = json.loads(kind.kubectl("get", "node", host, "-o", "json").stdout)
        state = json.loads(node["metadata"]["annotations"][labels.DRAIN])
        assert state["state"] == "drained" and state["moved"] >= 2  # (other cases' machines on the host move too)
    finally:
        for h in (host, *others):
            cli(kind, "host", "uncordon", h, check=False)


def test_drain_of_a_postgres_primarys_host_hands_over_first_then_migrates_the_member_and_loses_no_write(
        kind: KindCluster, namespace: str):
    """The primary is asked for a planned switchover to the standby (on another host), and only then,
    a standby itself, migrates with its data; every acknowledged write is there afterwards."""
    kind.apply({"apiVersion": "kubefly.dev/v1alpha1", "kind": "PostgresCluster", "metadata": {"name": "pg"},
                "spec": {"app": "drainpg", "region": "ams", "members": 2, "volumeSizeGb": 1}}, namespace)

    def two_ready():
        s = cluster_status(kind, namespace)
        members = s.get("members") or []
        return s if s.get("phase") == "Healthy" and len(members) == 2 and all(m["ready"] for m in members) \
            and s.get("primary") else None

    s = kind.wait_for("PostgresCluster pg Healthy with two ready members", two_ready, timeout=HEALTHY_WITHIN_S, interval=2)
    old = s["primary"]
    standby = next(m["name"] for m in s["members"] if m["name"] != old)
    host = get(kind, namespace, "machine", old)["status"]["host"]
    secret = kind.wait_for("pg-credentials", lambda: get(kind, namespace, "secret", "pg-credentials"))
    uri = base64.b64decode(secret["data"]["uri"]).decode()
    kind.wait_for("the first write through pg-primary", lambda: sql(
        kind, namespace, standby, uri, "CREATE TABLE IF NOT EXISTS ledger (id int PRIMARY KEY)").returncode == 0,
        timeout=60, interval=0.5)

    acknowledged: list[int] = []
    stop = threading.Event()

    def writes():
        n = 0
        while not stop.is_set():
            n += 1
            if sql(kind, namespace, standby, uri, f"INSERT INTO ledger VALUES ({n})", timeout=30).returncode == 0:
                acknowledged.append(n)
            time.sleep(0.2)

    writer = threading.Thread(target=writes, daemon=True)
    writer.start()
    try:
        out = cli(kind, "host", "drain", host, "--deadline", "200s", check=False)
    finally:
        stop.set()
        writer.join()
        cli(kind, "host", "uncordon", host, check=False)
    print(f"[kind] drain of the primary's host {host}:\n{out.stdout}{out.stderr}")
    assert out.returncode == 0, out.stderr
    assert f"{namespace}/{old}: switchover" in out.stdout and f"{namespace}/{old}: moved to host" in out.stdout
    s = kind.wait_for("both members ready again", two_ready, timeout=180, interval=2)
    assert s["primary"] == standby, "the standby took over before the old primary stopped"
    moved = get(kind, namespace, "machine", old)
    assert moved["status"]["host"] != host
    assert ("migrate", "migrated") in [(e["type"], e["status"]) for e in moved["status"]["events"]]
    pgc = get(kind, namespace, "postgrescluster", "pg")
    assert not pgc["spec"].get("switchoverTo") and labels.DRAIN_SWITCHOVER not in pgc["metadata"].get("annotations", {})
    rows = sql(kind, namespace, standby, uri, "SELECT string_agg(id::text, ',' ORDER BY id) FROM ledger")
    have = {int(x) for x in rows.stdout.strip().split(",") if x}
    print(f"[kind] {len(acknowledged)} writes acknowledged during the drain")
    assert acknowledged and set(acknowledged) <= have, f"lost: {sorted(set(acknowledged) - have)[:20]}"
