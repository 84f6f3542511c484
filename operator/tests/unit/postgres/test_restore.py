"""spec.restore resolved against the source's PostgresBackups; the Restored condition."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from kubefly.api.postgresbackup import PostgresBackup
from kubefly.api.postgrescluster import PostgresCluster
from kubefly.postgres import restore as R
from kubefly.postgres import status as S

NOW = datetime(2026, 12, 8, 12, 0, tzinfo=timezone.utc)
PATH = "/postgres/org/src/7412345678901234567"


def cluster(**restore):
    return PostgresCluster.model_validate({"metadata": {"name": "new", "namespace": "org"},
                                           "spec": {"app": "db", "region": "ams", "restore": {"from": "src", **restore}}})


def backup(label, finished, *, of="src", phase="Completed", lsn_stop="0/5000000"):
    return PostgresBackup.model_validate({
        "metadata": {"name": label.lower(), "namespace": "org", "uid": label},
        "spec": {"cluster": of},
        "status": {"phase": phase, "label": label, "archivePath": PATH, "finishedAt": finished.isoformat(),
                   "lsnStop": lsn_stop}})


B1 = backup("20261201-000000F", NOW - timedelta(days=7), lsn_stop="0/3000000")
B2 = backup("20261205-000000F", NOW - timedelta(days=3), lsn_stop="0/9000000")
OTHER = backup("20261207-000000F", NOW - timedelta(days=1), of="elsewhere")


def test_a_time_target_starts_from_the_newest_backup_that_ended_before_it():
    got = R.resolve(cluster(targetTime=(NOW - timedelta(days=4)).isoformat()), [B1, B2, OTHER], now=NOW)
    assert (got.from_, got.backup, got.type, got.archive_path) == ("src", B1.status.label, "time", PATH)
    assert got.target == "2026-12-04 12:00:00.000000+00"
    member = R.from_status(got)
    assert (member.cluster, member.system_id, member.backup_set) == ("src", "7412345678901234567", B1.status.label)
    assert R.resolve(cluster(targetTime=(NOW - timedelta(hours=1)).isoformat()), [B1, B2], now=NOW).backup == B2.status.label


def test_latest_lsn_and_name_targets():
    assert R.resolve(cluster(latest=True), [B1, B2], now=NOW).type == "default"
    got = R.resolve(cluster(targetLSN="0/6000000"), [B1, B2], now=NOW)
    assert (got.type, got.target, got.backup) == ("lsn", "0/6000000", B1.status.label)
    assert R.resolve(cluster(targetName="before-migration"), [B1, B2], now=NOW).target == "before-migration"


@pytest.mark.parametrize("restore, backups, reason, words", [
    ({"targetTime": (NOW + timedelta(minutes=1)).isoformat()}, [B1], "TargetOutsideWindow", "spec.restore.targetTime"),
    ({"targetTime": (NOW - timedelta(days=8)).isoformat()}, [B1, B2], "TargetOutsideWindow", "before the recovery window"),
    # Within the backup's stop second: pgBackRest could not honour it.
    ({"targetTime": (NOW - timedelta(days=7)).isoformat()}, [B1], "TargetOutsideWindow", "earliest time"),
    ({"latest": True}, [OTHER], "NoBackup", "spec.restore.from: src has no completed PostgresBackup"),
    ({"latest": True}, [backup("20261201-000000F", NOW, phase="Failed")], "NoBackup", "back it up first"),
    ({"latest": True, "backup": "20260101-000000F"}, [B1], "NoBackup", "spec.restore.backup"),
    ({"targetLSN": "0/1000000"}, [B1], "TargetOutsideWindow", "spec.restore.targetLSN"),
])
def test_targets_outside_what_the_backups_cover_are_refused_naming_the_field(restore, backups, reason, words):
    got = R.resolve(cluster(**restore), backups, now=NOW)
    assert isinstance(got, R.Refusal) and got.reason == reason and words in got.message, got


def test_a_cluster_never_restores_from_itself_and_needs_one_target():
    c = PostgresCluster.model_validate({"metadata": {"name": "src", "namespace": "org"},
                                        "spec": {"app": "db", "region": "ams", "restore": {"from": "src", "latest": True}}})
    assert R.resolve(c, [B1], now=NOW).reason == "InvalidRestore"
    for bad in ({}, {"latest": True, "targetName": "x"}, {"latest": False}):
        with pytest.raises(ValidationError, match="exactly one target"):
            cluster(**bad)


def test_restored_condition_follows_the_bootstrap_member():
    assert S.restored(("NoBackup", "none"), None, None, {})[1:] == (False, "NoBackup", "none")
    assert S.restored(None, "src's backup X", None, {})[2] == "Restoring"
    going = S.restored(None, "x", None, {"new-0": {"state": "recovering", "from": "src", "replay_lsn": "0/5"}})
    assert going[2] == "Restoring" and "replayed to 0/5" in going[3]
    failed = S.restored(None, "x", None, {"new-0": {"state": "failed", "from": "src", "error": "CommandFailed: exit 75"}})
    assert failed[2] == "RestoreFailed" and "exit 75" in failed[3]
    assert S.restored(None, "x", "new-0", {})[1:3] == (True, "Restored")
