"""The test platform's machine starter, run by the proxy as `starter.py SPEC start|stop ORG MACHINE`.

Starting a machine means what it means on a host: a real app process starts,
and the machine's row (the agent's machine file) says started, so the
instance appears in the real agent's replica. Stopping reverses both.
SPEC is a JSON file: {machine_id: {"file": machine file, "port": N, "pidfile": path}}.

With "pod": path in the entry, the machine file is a Machine object and the
starter does what the operator does with one: it sets `spec.state`, writes
(or removes) the machine's Pod beside it, and the Machine's `status.state`;
the agent makes the rows from those, exactly as from the Kubernetes API.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def write_state(path: Path, state: str) -> None:
    doc = json.loads(path.read_text())
    doc["state"] = state
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def pod_of(machine: dict, host: str, port: int) -> dict:
    """The Pod the operator would run for the Machine, Running and Ready at 127.0.0.1."""
    from kubefly import labels
    from kubefly.machines.pod import services_annotation

    meta, spec = machine["metadata"], machine["spec"]
    return {
        "kind": "Pod",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"] + "-pod",
                     "labels": {labels.APP: spec["app"], labels.MACHINE: meta["name"], labels.REGION: spec["region"],
                                labels.MANAGED_BY: labels.MANAGED_BY_VALUE},
                     "annotations": {labels.INSTANCE_ID: machine["status"]["instanceId"],
                                     labels.SERVICES: services_annotation(spec["services"]),
                                     labels.CHECKS: json.dumps(spec.get("checks") or [])}},
        "spec": {"nodeName": host},
        "status": {"phase": "Running", "podIP": "127.0.0.1",
                   "conditions": [{"type": "ContainersReady", "status": "True"}]},
    }


def set_machine(spec: dict, desired: str, state: str) -> None:
    path = Path(spec["file"])
    doc = json.loads(path.read_text())
    doc["spec"]["state"] = desired
    doc["status"]["state"] = state
    write_json(path, doc)
    if state == "started":
        write_json(Path(spec["pod"]), pod_of(doc, doc["status"]["host"], spec["port"]))
    else:
        Path(spec["pod"]).unlink(missing_ok=True)


def main() -> int:
    spec_file, action, _org, machine = sys.argv[1:5]
    spec = json.loads(Path(spec_file).read_text())[machine]
    pidfile = Path(spec["pidfile"])
    if action == "start":
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubefly.proxy.testapp", "--host", "127.0.0.1", "--port", str(spec["port"]),
             "--machine-id", machine],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        pidfile.write_text(str(proc.pid))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", spec["port"]), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            return 1
        if "pod" in spec:
            set_machine(spec, "started", "started")
        else:
            write_state(Path(spec["file"]), "started")
        return 0
    if action == "stop":
        if "pod" in spec:
            set_machine(spec, "stopped", "stopped")
        else:
            write_state(Path(spec["file"]), "stopped")
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
            pidfile.unlink()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
