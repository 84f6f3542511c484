"""Continuous WAL archiving by real members (postgres + repmgr + pgBackRest) into the real S3
server over TLS: the primary creates the stanza and archives; after a failover the new
primary archives on into the same archive, on its new timeline."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time

import psycopg
import pytest

from kubefly.postgres import pgbackrest as pb
from kubefly.postgres.repmgr import Layout
from pg_component_helpers import wait_for

pytestmark = pytest.mark.component


@pytest.fixture
def archived_cluster(make_cluster, object_store):
    if shutil.which("pgbackrest") is None:
        pytest.fail("pgbackrest is required (make os-deps)", pytrace=False)
    cluster = f"arch-{secrets.token_hex(3)}"
    env = {"KUBEFLY_PG_ARCHIVE_ENDPOINT": object_store.https_endpoint,
           "KUBEFLY_PG_ARCHIVE_BUCKET": object_store.bucket,
           "KUBEFLY_PG_ARCHIVE_PATH": "/postgres/component",
           "KUBEFLY_PG_CLUSTER": cluster,
           "KUBEFLY_PG_ARCHIVE_ACCESS_KEY_ID": object_store.access_key,
           "KUBEFLY_PG_ARCHIVE_SECRET_KEY": object_store.secret_key,
           "KUBEFLY_PG_ARCHIVE_CA_FILE": object_store.ca_file}
    return make_cluster(members=3, member_env=env), cluster, object_store


def _archive(c, name: str) -> dict:
    return (c.health(name) or {}).get("archive") or {}


def _switch(c, name: str) -> str:
    """Closes the current segment on `name` (the primary) and returns its file name."""
    with psycopg.connect(c.member_dsn(name), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (id serial PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t (v) SELECT md5(g::text) FROM generate_series(1, 1000) g")
        return conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]


def _info(c, name: str, cluster: str, store) -> pb.StanzaInfo:
    """What pgBackRest itself reads back from the store, with the member's own configuration."""
    member = pb.Member(cluster, Layout(c.member(name).data_dir), c.member(name).pg_port, Layout(c.member(name).data_dir).run)
    env = dict(os.environ, PGBACKREST_REPO1_S3_KEY=store.access_key, PGBACKREST_REPO1_S3_KEY_SECRET=store.secret_key)
    argv = pb.info(member)
    argv.insert(1, "--log-level-file=off")  # no root-owned log among the member's files
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    (stanza,) = pb.parse_info(out.stdout)
    return stanza


def test_primary_archives_and_the_new_primary_carries_on_after_failover(archived_cluster):
    c, cluster, store = archived_cluster
    primary = c.wait_healthy(60)
    wait_for(lambda: _archive(c, primary).get("stanza") == "ready", 90, f"stanza ready on {primary}")
    report = _archive(c, primary)
    assert report["path"].startswith(f"/postgres/component/{cluster}/"), report
    system_id = report["path"].rsplit("/", 1)[1]
    assert system_id.isdigit(), report

    segment = _switch(c, primary)
    wait_for(lambda: (_archive(c, primary).get("last_archived_wal") or "") >= segment, 60,
             f"{segment} archived by {primary}")
    report = _archive(c, primary)
    assert report["failed_count"] == 0 or report["last_archived_age_s"] <= (report["last_failed_age_s"] or 1e9), report
    standby = next(m.name for m in c.members if m.name != primary)
    assert _archive(c, standby).get("path") == report["path"]  # every member names the same archive
    assert "last_archived_wal" not in _archive(c, standby)  # a standby archives nothing
    info = _info(c, primary, cluster, store)
    assert info.wal_max >= segment, info

    # Failover: the new primary archives its timeline into the same archive.
    c.kill(primary)
    survivors = [m.name for m in c.members if m.name != primary]
    new = c.wait_healthy(90, members=survivors)
    wait_for(lambda: _archive(c, new).get("stanza") == "ready", 90, f"stanza ready on {new}")
    segment2 = _switch(c, new)
    assert int(segment2[:8], 16) > int(segment[:8], 16), (segment, segment2)  # a new timeline
    wait_for(lambda: (_archive(c, new).get("last_archived_wal") or "") >= segment2, 60, f"{segment2} archived by {new}")
    assert _archive(c, new)["path"] == report["path"]
    info = _info(c, new, cluster, store)
    assert info.wal_max >= segment2, info
    assert json.dumps(c.health(new)).count(store.secret_key) == 0  # the key never shows on /health


def _post_backup(c, name: str, body: dict) -> tuple[int, dict | str]:
    return c.admin_post(name, "/backup", body)


def test_a_backup_asked_of_the_primary_runs_in_the_background_and_reports_its_wal_range(archived_cluster):
    c, cluster, store = archived_cluster
    primary = c.wait_healthy(60)
    wait_for(lambda: _archive(c, primary).get("stanza") == "ready", 90, f"stanza ready on {primary}")
    standby = next(m.name for m in c.members if m.name != primary)
    code, text = _post_backup(c, standby, {"id": "b1", "type": "full"})
    assert code == 409 and "primary" in text  # a standby takes no backup request
    for bad in ({"id": "b1", "type": "weekly"}, {"id": "b1", "retention_days": 0}, {"type": "full"}):
        code, text = _post_backup(c, primary, bad)
        assert code == 400, (bad, text)

    code, run = _post_backup(c, primary, {"id": "b1", "type": "full", "retention_days": 2})
    assert code == 202 and run["id"] == "b1" and run["state"] == "running", run
    assert _post_backup(c, primary, {"id": "b1", "type": "full"})[0] == 202  # asked again: the same run
    code, text = _post_backup(c, primary, {"id": "b2", "type": "full"})
    assert code == 409 and "b1" in text  # one at a time
    done = wait_for(lambda: (b := _archive(c, primary).get("backup")) and b["state"] != "running" and b, 180,
                    "backup b1 finished")
    assert done["state"] == "completed", done
    assert done["label"].endswith("F") and done["size_bytes"] > 10_000_000, done  # a whole database, full
    assert done["wal_start"] and done["wal_stop"] >= done["wal_start"], done
    (info_backup,) = _info(c, primary, cluster, store).backups
    assert info_backup.label == done["label"]


def test_a_new_cluster_restored_to_a_time_has_exactly_the_rows_before_it_and_archives_apart(
        make_cluster, archived_cluster):
    src, cluster, store = archived_cluster
    primary = src.wait_healthy(60)
    wait_for(lambda: _archive(src, primary).get("stanza") == "ready", 90, f"stanza ready on {primary}")
    assert _post_backup(src, primary, {"id": "base", "type": "full"})[0] == 202
    wait_for(lambda: ((_archive(src, primary).get("backup") or {}).get("state") == "completed"), 180, "base backup")
    with psycopg.connect(src.member_dsn(primary), autocommit=True) as conn:
        conn.execute("CREATE TABLE ledger (id int PRIMARY KEY, sum text)")
        conn.execute("INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(1, 500) g")
        time.sleep(1.5)  # past the backup's whole-second stop time
        target = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        time.sleep(0.2)
        conn.execute("INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(501, 900) g")
        conn.execute("SELECT pg_switch_wal()")
        before = conn.execute("SELECT count(*), md5(string_agg(sum, '' ORDER BY id)) FROM ledger WHERE id <= 500").fetchone()
    segment = wait_for(lambda: _archive(src, primary).get("last_archived_wal"), 60, "the rows' WAL archived")
    source_path = _archive(src, primary)["path"]

    restored = f"rst-{secrets.token_hex(3)}"
    env = {**src.member_env, "KUBEFLY_PG_CLUSTER": restored,
           "KUBEFLY_PG_RESTORE_FROM": cluster, "KUBEFLY_PG_RESTORE_SYSTEM_ID": source_path.rsplit("/", 1)[1],
           "KUBEFLY_PG_RESTORE_TYPE": "time", "KUBEFLY_PG_RESTORE_TARGET": pb.format_time(target)}
    new = make_cluster(members=2, member_env=env)
    new_primary = new.wait_healthy(240)
    assert (new.health(new_primary)["restore"] or {}).get("state") == "done", new.health(new_primary)
    with psycopg.connect(new.member_dsn(new_primary), autocommit=True) as conn:
        got = conn.execute("SELECT count(*), md5(string_agg(sum, '' ORDER BY id)) FROM ledger").fetchone()
        assert got == before, (got, before)  # every row before the target, none after
        # It is its own cluster now: its own passwords (this connection), no recovery settings left...
        assert conn.execute("SELECT setting FROM pg_settings WHERE name = 'restore_command'").fetchone() == ("",)
    m = new.member(new_primary)
    with psycopg.connect(new.dsn(host=m.client_host, port=m.pg_port, dbname="repmgr"), autocommit=True) as conn:
        # ...and its own repmgr nodes only.
        nodes = conn.execute("SELECT node_id, node_name FROM repmgr.nodes ORDER BY node_id").fetchall()
        assert nodes == [(1, "a"), (2, "b")], nodes
    wait_for(lambda: _archive(new, new_primary).get("stanza") == "ready", 90, "the restored cluster's own stanza")
    assert _archive(new, new_primary)["path"] == f"/postgres/component/{restored}/{source_path.rsplit('/', 1)[1]}"
    # The source's archive was only read: it still ends where it did.
    assert _info(src, primary, cluster, store).wal_max >= segment
    assert _archive(src, primary)["path"] == source_path
