"""A Postgres member's whole pgBackRest life with a tenant key of the bundled store's kind
(kubefly.objectstore.access): confined to `postgres/<namespace>/<cluster>/*`, over TLS, against
real Postgres 15 and the real store. The members of test_pgbackrest_pitr, with another key."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from kubefly.objectstore import access
from kubefly.postgres import pgbackrest as pb
from pg_component_helpers import wait_for
import test_pgbackrest_pitr as pitr
from test_pgbackrest_pitr import PGBACKREST_BIN, Node, _own, archiving_node

pytestmark = pytest.mark.component
workdir = pitr.workdir  # its fixture, here too


def test_a_tenant_key_archives_backs_up_expires_and_restores_under_its_prefix_alone(object_store, workdir):
    if PGBACKREST_BIN is None:
        pytest.fail("pgbackrest is not installed (hack/os-packages.txt)", pytrace=False)
    root, nodes = workdir
    namespace, cluster = f"org-{secrets.token_hex(3)}", "orders-db"
    keys = access.new_keys()
    tenant = access.Tenant(f"pg-{namespace}-{cluster}", keys.access_key_id, keys.secret_access_key,
                           (f"postgres/{namespace}/{cluster}",))
    object_store.install([tenant])
    secret = root / "s3-secret"
    secret.write_text(keys.secret_access_key)
    secret.chmod(0o600)
    _own(secret)
    # The layout the caller uses: repo1-path is postgres/<namespace>/<cluster>, the tenant's prefix.
    repo = pb.Repository(endpoint=object_store.https_endpoint, bucket=object_store.bucket,
                         access_key_id=keys.access_key_id, secret_key_file=secret,
                         ca_file=Path(object_store.ca_file), path_prefix=f"/postgres/{namespace}")
    source = archiving_node(root / "source", repo, cluster, nodes)
    try:
        source.start()
        # The store reloads s3.json within seconds (docs/objectstore.md); until then the key is unknown.
        wait_for(lambda: _succeeds(source, pb.stanza_create(source.member)), 20, "stanza-create with the tenant key")
        source.run(pb.check(source.member), timeout=120)  # archive-push of a segment, through archive_command
        for _ in range(3):  # retention_full 2: the third expires the first, deleting under the prefix
            source.run(pb.backup(source.member, "full"), timeout=240)
        with source.connect() as conn:
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
            conn.execute("INSERT INTO orders SELECT generate_series(1, 50)")
            conn.execute("SELECT pg_switch_wal()")
        time.sleep(0.5)
        source.run(pb.backup(source.member, "full"), timeout=240)
        stanza = source.info()
        assert stanza.status_code == 0 and len(stanza.backups) == 2, stanza
    except BaseException:
        print(source.log_tail())
        raise
    source.stop()

    restored = Node(root / "restored", repo, cluster)
    nodes.append(restored)
    restored.layout.pgdata.mkdir(mode=0o700)
    _own(restored.layout.pgdata)
    try:
        restored.run(pb.restore(restored.member, "immediate"), timeout=240)
        restored.start("-c archive_mode=off")
        with restored.connect() as conn:
            wait_for(lambda: not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0], 60, "promotion")
            assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 50
    except BaseException:
        print(restored.log_tail())
        raise


def _succeeds(node: Node, argv: list[str]) -> bool:
    try:
        node.run(argv)
    except AssertionError:
        return False
    return True
