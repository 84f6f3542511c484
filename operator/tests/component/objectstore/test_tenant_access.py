"""Per-tenant keys and the bundled store's certificate, with real pgBackRest 2.45 against the
real store (the shared `object_store` fixture, run by the image's entry point): a tenant's key
works under its own prefix only, a grant and a revoke take effect without restarting weed, and
the certificate kubefly.objectstore.tls makes verifies with repo1-storage-ca-file."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest

from kubefly.objectstore import access
from kubefly.objectstore import tls as store_tls
from kubefly.ports import free_port
from kubefly.postgres import pgbackrest as pb
from kubefly.postgres.repmgr import Layout

pytestmark = pytest.mark.component

SECRET_ENV = "KUBEFLY_TEST_S3_SECRET"
RELOAD_WITHIN_S = 15  # the entry point polls every 2 s; weed reloads in well under one


class Client:
    """pgBackRest's repo-* commands as one tenant: its key, the store's https endpoint and CA."""

    def __init__(self, root: Path, endpoint: str, ca_file: str, bucket: str, keys: access.TenantKeys,
                 namespace: str, cluster: str, wrap: tuple[str, ...] = ()) -> None:
        """wrap: argv that runs pgBackRest (the certificate test's own /etc/hosts)."""
        self.repo = pb.Repository(endpoint=endpoint, bucket=bucket, access_key_id=keys.access_key_id,
                                  secret_key_env=SECRET_ENV, ca_file=Path(ca_file), path_prefix=f"/postgres/{namespace}")
        member = pb.Member(cluster=cluster, layout=Layout(root), pg_port=5432, socket_dir=root)
        for d in member.directories():
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        member.config.write_text(pb.render_conf(self.repo, member))
        self.argv = [*wrap, pb.PGBACKREST, f"--config={member.config}"]
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(root),
                    **pb.environment(self.repo, {SECRET_ENV: keys.secret_access_key})}

    def run(self, command: str, *args: str, data: bytes | None = None, path: str | None = None
            ) -> subprocess.CompletedProcess:
        """`path`: another repo1-path (another tenant's prefix), given on the command line."""
        over = [f"--repo1-path={path}"] if path else []
        return subprocess.run([*self.argv, *over, command, *args], env=self.env, input=data, capture_output=True,
                              timeout=120)

    def ok(self, command: str, *args: str, **kw) -> bytes:
        done = self.run(command, *args, **kw)
        assert done.returncode == 0, (command, args, done.stdout[-2000:], done.stderr[-2000:])
        return done.stdout

    def refused(self, command: str, *args: str, **kw) -> bool:
        """The store does not know the key (InvalidAccessKeyId) or refuses it (AccessDenied)."""
        done = self.run(command, *args, **kw)
        out = done.stdout + done.stderr
        return done.returncode != 0 and (b"InvalidAccessKeyId" in out or b"AccessDenied" in out)

    def denied(self, command: str, *args: str, **kw) -> None:
        """Refused as not allowed, the key itself valid: AccessDenied, or a bare 403 to a HEAD (no body)."""
        done = self.run(command, *args, **kw)
        out = (done.stdout + done.stderr).decode(errors="replace")
        head_refused = "403 (Forbidden)" in out and "\n       HEAD " in out
        assert done.returncode != 0 and ("AccessDenied" in out or head_refused), (command, args, out[-2000:])


@pytest.fixture
def workdir():
    root = Path(tempfile.mkdtemp(prefix="kubefly-tenants-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _until(check, what: str) -> float:
    """Seconds until `check()` held, polled; fails past RELOAD_WITHIN_S."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > RELOAD_WITHIN_S:
            pytest.fail(f"{what}: not within {RELOAD_WITHIN_S} s")
        time.sleep(0.2)
    return time.monotonic() - start


def _tenant(namespace: str, cluster: str, read_only: tuple[str, ...] = ()) -> access.Tenant:
    keys = access.new_keys()
    return access.Tenant(f"pg-{namespace}-{cluster}", keys.access_key_id, keys.secret_access_key,
                         (f"postgres/{namespace}/{cluster}",), read_only)


def test_tenant_keys_reach_their_own_prefix_only_and_follow_grants_and_revokes(object_store, workdir):
    if shutil.which(pb.PGBACKREST) is None:
        pytest.fail("pgbackrest is not installed (hack/os-packages.txt)", pytrace=False)
    run = secrets.token_hex(3)
    # Namespaces and clusters of the longest names Kubernetes allows: the identity names still hold.
    ns_a, ns_b = f"org-a-{run}".ljust(63, "x"), f"org-b-{run}"
    a, b = _tenant(ns_a, "orders-db".ljust(63, "y")), _tenant(ns_b, "web-db")
    reader = _tenant(ns_b, "restored-db", read_only=a.read_write)
    endpoint, ca = object_store.https_endpoint, object_store.ca_file

    def client(t: access.Tenant, name: str) -> Client:
        namespace, cluster = t.read_write[0].split("/")[1:]
        return Client(workdir / name, endpoint, ca, object_store.bucket, t.keys, namespace, cluster)

    ca_, cb, cr = client(a, "a"), client(b, "b"), client(reader, "reader")
    path_a, path_b = f"/{a.read_write[0]}", f"/{b.read_write[0]}"

    object_store.install([a, b])
    # A grant takes effect once the running store has reloaded s3.json: measured from the swap.
    # (pgBackRest's repo-ls first HEADs the path itself, the key `postgres/<ns>/<cluster>`, which is
    # outside `prefix/*`: hence always a path below it.)
    granted_after = _until(lambda: ca_.run("repo-ls", "archive").returncode == 0, "tenant a's grant")
    cb.ok("repo-ls", "archive")

    # Own prefix: write (one part and, past pgBackRest's 5 MiB chunk, a multipart upload), list, read.
    small, large = b"one segment\n", os.urandom(6 * 1024 * 1024 + 17)
    ca_.ok("repo-put", "archive/small", data=small)
    ca_.ok("repo-put", "archive/large", data=large)
    assert ca_.ok("repo-get", "archive/small") == small
    assert ca_.ok("repo-get", "archive/large") == large
    assert b"large" in ca_.ok("repo-ls", "--recurse", "archive")
    cb.ok("repo-put", "archive/mine", data=b"b's\n")

    # Another tenant's prefix: not read, not listed, not written, not deleted.
    cb.denied("repo-get", "archive/small", path=path_a)
    cb.denied("repo-ls", "archive", path=path_a)
    cb.denied("repo-put", "archive/small", data=b"overwritten\n", path=path_a)
    cb.denied("repo-rm", "archive/small", path=path_a)
    ca_.denied("repo-get", "archive/mine", path=path_b)
    # ListObjects itself (repo-ls stops at the HEAD before it): only with a prefix inside the tenant's.
    assert _list(object_store, a.keys, f"{a.read_write[0]}/") == 200
    for prefix in (f"{b.read_write[0]}/", b.read_write[0], f"postgres/{ns_b}/", "postgres/", ""):
        assert _list(object_store, a.keys, prefix) == 403, prefix
    assert ca_.ok("repo-get", "archive/small") == small

    # Deleting under its own prefix is allowed.
    cb.ok("repo-rm", "archive/mine")
    assert b"mine" not in cb.ok("repo-ls", "--recurse", "archive")

    # A read-only grant on a's prefix (restoring from another cluster): reads and lists, never writes.
    object_store.install([a, b, reader])
    read_after = _until(lambda: cr.run("repo-get", "archive/small", path=path_a).returncode == 0, "the reader's grant")
    assert cr.ok("repo-get", "archive/large", path=path_a) == large
    assert b"small" in cr.ok("repo-ls", "--recurse", "archive", path=path_a)
    cr.denied("repo-put", "archive/evil", data=b"x", path=path_a)
    cr.denied("repo-rm", "archive/small", path=path_a)
    cr.ok("repo-put", "own", data=b"its own prefix\n")

    # Revoked (a tombstone in s3.json: weed keeps an identity merely gone from the file): a's key stops
    # working; the others' go on.
    object_store.install([b, reader], revoked=(a.name,))
    # (A GET: a refused HEAD has no body to tell why.)
    revoked_after = _until(lambda: ca_.refused("repo-get", "archive/small"), "tenant a's revoke")
    assert ca_.run("repo-ls", "archive").returncode != 0
    assert cr.ok("repo-get", "archive/small", path=path_a) == small
    print(f"\ngrant effective {granted_after:.1f} s, read-only grant {read_after:.1f} s, "
          f"revoke {revoked_after:.1f} s after s3.json changed")


def _list(object_store, keys: access.TenantKeys, prefix: str) -> int:
    """ListObjectsV2 over HTTPS with curl's SigV4: the HTTP status."""
    query = f"list-type=2&prefix={quote(prefix, safe='')}" if prefix else "list-type=2"
    done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", object_store.ca_file,
                           "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{keys.access_key_id}:{keys.secret_access_key}",
                           f"{object_store.https_endpoint}/{object_store.bucket}?{query}"],
                          capture_output=True, text=True, timeout=30)
    return int(done.stdout or 0)


class _TlsRelay(threading.Thread):
    """TLS on a loopback port with a given certificate, in front of the store's plain S3 port: a stand-in
    for the pod's TLS port that serves kubefly.objectstore.tls's certificate."""

    def __init__(self, cert: Path, key: Path, target: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.target = target
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            tls_conn = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            conn.close()
            return
        upstream = socket.create_connection(self.target)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(upstream, tls_conn), daemon=True).start()
        pump(tls_conn, upstream)

    def close(self) -> None:
        self.listener.close()


def test_the_store_certificate_verifies_for_its_service_names_with_the_ca_alone(object_store, workdir):
    if shutil.which(pb.PGBACKREST) is None:
        pytest.fail("pgbackrest is not installed (hack/os-packages.txt)", pytrace=False)
    # pgBackRest checks the certificate against the host it connects to, so the Service's names must
    # resolve here: to 127.0.0.1, in an /etc/hosts of pgBackRest's own mount namespace.
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("needs root and unshare(1) (util-linux) to give pgBackRest an /etc/hosts naming the Service",
                    pytrace=False)
    service, namespace = "x-kubefly-objectstore", "kubefly-system"
    names = store_tls.service_names(service, namespace)
    data = store_tls.secret_data(service, namespace, datetime.now(UTC))
    for name, text in data.items():
        (workdir / name).write_text(text)
    hosts = workdir / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {' '.join(names)}\n")
    wrap = ("unshare", "--mount", "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$@"', "pgbackrest")
    plain = object_store.endpoint.removeprefix("http://").split(":")
    relay = _TlsRelay(workdir / "tls.crt", workdir / "tls.key", (plain[0], int(plain[1])))
    relay.start()
    admin = access.TenantKeys(object_store.access_key, object_store.secret_key)
    try:
        for host in names:
            # The endpoint is the Service's name, as in a member's pgbackrest.conf; trusted: ca.crt alone.
            c = Client(workdir / host, f"https://{host}:{relay.port}", str(workdir / "ca.crt"), object_store.bucket,
                       admin, "tls-check", f"c{secrets.token_hex(3)}", wrap)
            c.ok("repo-put", "probe", data=b"over TLS\n")
            assert c.ok("repo-get", "probe") == b"over TLS\n", host
        # Another CA does not certify it, nor does the certificate name another host: verification is on.
        other = Client(workdir / "other", f"https://{names[2]}:{relay.port}", object_store.ca_file,
                       object_store.bucket, admin, "tls-check", "other", wrap)
        # (pgBackRest retries a failed connection until io-timeout, by default 60 s.)
        done = other.run("repo-get", "--io-timeout=1", "probe")
        assert done.returncode != 0 and b"unable to verify certificate" in done.stdout + done.stderr, done
        elsewhere = Client(workdir / "elsewhere", f"https://localhost:{relay.port}", str(workdir / "ca.crt"),
                           object_store.bucket, admin, "tls-check", "elsewhere", wrap)
        done = elsewhere.run("repo-get", "--io-timeout=1", "probe")
        assert done.returncode != 0 and b"unable to find hostname" in done.stdout + done.stderr, done
    finally:
        relay.close()
