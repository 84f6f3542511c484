"""What a PostgresBackup does next, and the schedule of a cluster's backups."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from kubefly.api.postgresbackup import PostgresBackup
from kubefly.api.postgrescluster import PostgresCluster
from kubefly.postgres import backups as B

NOW = datetime(2026, 12, 8, 12, 0, tzinfo=timezone.utc)


def cluster(*, archiving="True", primary="pg-0", **backups):
    cond = {"type": "ContinuousArchiving", "status": archiving, "reason": "Archiving" if archiving == "True" else "NoObjectStore",
            "message": "pg-0 archives WAL" if archiving == "True" else "the platform has no object store",
            "lastTransitionTime": "2026-12-08T00:00:00Z"}
    return PostgresCluster.model_validate({
        "metadata": {"name": "pg", "namespace": "org"},
        "spec": {"app": "db", "region": "ams", **({"backups": backups} if backups else {})},
        "status": {"primary": primary, "conditions": [cond]}})


def backup(**status):
    return PostgresBackup.model_validate({"metadata": {"name": "b", "namespace": "org", "uid": "u1"},
                                          "spec": {"cluster": "pg"}, "status": status or None})


def test_a_new_backup_starts_on_the_primary_once_the_cluster_archives():
    assert B.step(backup(), cluster(), None, now=NOW) == B.Step("start", member="pg-0")
    waiting = B.step(backup(), cluster(archiving="False"), None, now=NOW)
    assert waiting.action == "wait" and waiting.status["phase"] == "Pending"
    assert "no object store" in waiting.status["message"]
    assert B.step(backup(), cluster(primary=None), None, now=NOW).status["message"] == "waiting for a primary in pg"


def test_a_backup_of_no_cluster_fails_naming_the_field():
    s = B.step(backup(), None, None, now=NOW)
    assert s.status["phase"] == "Failed" and s.status["message"].startswith("spec.cluster: there is no PostgresCluster pg")


def test_a_running_backup_follows_its_member_to_the_end():
    running = backup(phase="Running", member="pg-1", startedAt="2026-12-08T11:59:00Z")
    assert B.step(running, cluster(), {"id": "u1", "state": "running"}, now=NOW).action == "wait"
    assert B.step(running, cluster(), None, now=NOW).status["message"].endswith("does not answer now")
    done = B.step(running, cluster(), {"id": "u1", "state": "completed", "label": "20261208-115900F",
                                       "size_bytes": 31_000_000, "wal_start": "A", "wal_stop": "B",
                                       "backup_started": "2026-12-08T11:59:00Z", "backup_finished": "2026-12-08T11:59:30Z"},
                  now=NOW)
    assert done.status["phase"] == "Completed" and done.status["label"] == "20261208-115900F"
    assert done.status["sizeBytes"] == 31_000_000 and done.status["walStop"] == "B"
    failed = B.step(running, cluster(), {"id": "u1", "state": "failed", "error": "CommandFailed: exited 56"}, now=NOW)
    assert failed.status["phase"] == "Failed" and "exited 56" in failed.status["message"]
    # The member answers but knows another run (it restarted): this one is lost.
    assert B.step(running, cluster(), {"id": "other", "state": "running"}, now=NOW).status["phase"] == "Failed"
    # Silent for longer than any backup may run: given up.
    old = backup(phase="Running", member="pg-1", startedAt="2026-12-07T00:00:00Z")
    assert B.step(old, cluster(), None, now=NOW).status["phase"] == "Failed"
    assert B.step(backup(phase="Completed"), cluster(), None, now=NOW) == B.Step("none")


def test_scheduled_backups_come_every_interval_and_never_two_at_once():
    c = cluster(intervalHours=24)
    assert B.due(c, [], now=NOW, archiving=True) == "pg-20261208-120000"
    assert B.due(c, [], now=NOW, archiving=False) is None
    assert B.due(cluster(scheduled=False), [], now=NOW, archiving=True) is None
    recent = B.Scheduled("pg-a", NOW - timedelta(hours=23), "Completed")
    assert B.due(c, [recent], now=NOW, archiving=True) is None
    assert B.due(c, [B.Scheduled("pg-a", NOW - timedelta(hours=25), "Completed")], now=NOW, archiving=True)
    assert B.due(c, [B.Scheduled("pg-a", NOW - timedelta(hours=25), "Running")], now=NOW, archiving=True) is None
    long = PostgresCluster.model_validate({**c.model_dump(by_alias=True), "metadata": {"name": "x" * 63}})
    assert len(B.due(long, [], now=NOW, archiving=True)) == 63


def test_records_past_the_recovery_window_go_but_the_newest_completed_stays():
    c = cluster(intervalHours=24, recoveryWindowDays=7)
    old = [B.Scheduled(f"pg-{i}", NOW - timedelta(days=i), "Completed") for i in (10, 9, 3)]
    assert B.expired(c, old, now=NOW) == ["pg-10", "pg-9"]
    only_old = [B.Scheduled("pg-10", NOW - timedelta(days=10), "Completed"),
                B.Scheduled("pg-9", NOW - timedelta(days=9), "Failed")]
    assert B.expired(c, only_old, now=NOW) == ["pg-9"]
