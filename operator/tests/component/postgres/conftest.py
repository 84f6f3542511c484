"""Three real members (Debian postgres + repmgr) and the endpoint as processes; every one stopped at teardown."""

import os
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from kubefly.postgres.localcluster import LocalCluster
from pg_component_helpers import Writer

pytestmark = pytest.mark.component

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def make_cluster():
    if not (PG_BIN / "repmgrd").exists():
        pytest.fail("postgresql-15 and postgresql-15-repmgr are required (make os-deps)")
    clusters = []

    def make(**kw) -> LocalCluster:
        root = Path(tempfile.mkdtemp(prefix="kubefly-pg-"))
        cluster = LocalCluster(root, **kw)
        clusters.append(cluster)
        cluster.start(timeout=120)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()
        if not os.environ.get("KUBEFLY_KEEP_CLUSTER"):  # keep the members' logs for a post-mortem
            shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture
def writer_for():
    writers = []

    def start(cluster: LocalCluster) -> Writer:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS writes (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
        w = Writer(cluster.dsn())
        writers.append(w)
        w.start()
        return w

    yield start
    for w in writers:
        w.stop.set()
        w.join(10)
