"""Migrating a running Machine with its volume on kind, as a user does it: `kubefly machine move`
with HTTP traffic through the edge proxy's mapped port the whole time.

The data (1 MiB and its checksum, written in the Machine) arrives on another ams host; the
Machine keeps its name and gets a new instance there; its event log says `migrated`; the old
host's directory is wiped; and the requests that failed fall in one short window, the machine's
downtime for the last copy (measured in bench-volumes as migrate_downtime_s).
"""

from __future__ import annotations

import subprocess
import threading
import time

from .kindlib import KindCluster
from .test_kind_appsecrets import cond
from .test_kind_drain import cli
from .test_kind_machines import DOMAIN
from .test_kind_snapshots import CHECKSUM, machine_with_data
from .test_kind_volumes import get


def directory_on(host: str, namespace: str, uid: str) -> bool:
    """Whether the volume's directory exists on that host (a kind node is a container)."""
    out = subprocess.run(["docker", "exec", host, "ls", f"/var/lib/kubefly/volumes/{namespace}"],
                         capture_output=True, text=True, timeout=30)
    return any(entry.endswith(f".{uid}") for entry in out.stdout.split())


def test_a_running_machine_migrates_with_its_volume_under_traffic_keeping_its_name_and_data(
        kind: KindCluster, namespace: str):
    host, digest = machine_with_data(kind, namespace, "migweb-1", "migweb", "migvol")
    before = get(kind, namespace, "machine", "migweb-1")
    vol = get(kind, namespace, "volume", "migvol")
    where = f"migweb.{namespace}.{DOMAIN}"
    kind.wait_for(f"{where} routed", lambda: kind.ask(where) == 200, timeout=120)

    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            results.append((time.monotonic(), kind.ask(where, timeout=2)))
            time.sleep(0.05)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        out = cli(kind, "machine", "move", "migweb-1", "-n", namespace, "--timeout", "150s", check=False)
        time.sleep(2)
    finally:
        stop.set()
        sender.join()
    print(f"[kind] machine move:\n{out.stdout}{out.stderr}")
    assert out.returncode == 0, out.stderr
    assert "copying to host" in out.stdout and "what changed" in out.stdout, "each phase is shown"

    after = get(kind, namespace, "machine", "migweb-1")
    assert after["status"]["host"] != host and after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["status"]["instanceId"] != before["status"]["instanceId"]
    assert ("migrate", "migrated") in [(e["type"], e["status"]) for e in after["status"]["events"]]
    assert kind.kubectl("-n", namespace, "exec", "migweb-1", "-c", "machine", "--", "/opt/kubefly/bin/python", "-c",
                        CHECKSUM).stdout.strip() == digest
    moved = get(kind, namespace, "volume", "migvol")
    assert moved["status"]["host"] == after["status"]["host"] and not moved["status"].get("migration")
    assert cond(moved, "Migrated")["status"] == "True" and cond(moved, "Ready")["status"] == "True"
    record = moved["status"]["lastMigration"]
    assert (record["source"], record["target"]) == (host, after["status"]["host"])
    assert not directory_on(host, namespace, vol["metadata"]["uid"]), "the old host's copy is wiped"
    assert directory_on(after["status"]["host"], namespace, vol["metadata"]["uid"])

    failed = [t for t, code in results if code != 200]
    window = (max(failed) - min(failed)) if failed else 0.0
    print(f"[kind] {len(results)} requests, {len(failed)} failed within {window:.1f} s; "
          f"volume-side downtime {record.get('downtimeSeconds')} s")
    assert results and results[-1][1] == 200, "it answers on its new host"
    # One gap (the stop for the last copy), not failures spread over the whole migration.
    assert window < 60, window
