"""The test platform's machine starter, run by the proxy as `starter.py SPEC start|stop ORG MACHINE`.

Starting a machine means what it means on a host: a real app process starts,
and the machine's row (the agent's machine file) says started, so the
instance appears in the real agent's replica. Stopping reverses both.
SPEC is a JSON file: {machine_id: {"file": machine file, "port": N, "pidfile": path}}.
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
        write_state(Path(spec["file"]), "started")
        return 0
    if action == "stop":
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
