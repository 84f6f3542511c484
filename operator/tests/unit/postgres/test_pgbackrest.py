import json
import shlex
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from kubefly.postgres import pgbackrest as pb
from kubefly.postgres.repmgr import Layout

SECRET = "s3cr3t-Key/+value"


def repo(**kw) -> pb.Repository:
    base = dict(endpoint="https://store.kubefly-system.svc:8443", bucket="kubefly", access_key_id="AKIDEXAMPLE",
                secret_key_env="STORE_SECRET")
    return pb.Repository(**{**base, **kw})


MEMBER = pb.Member(cluster="orders-db", layout=Layout(Path("/var/lib/kubefly/pg")), pg_port=5432,
                   socket_dir=Path("/var/lib/kubefly/pg/run"))


def conf_of(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert current is not None
            assert key not in current, f"{key} twice"
            current[key] = value
    return sections


def test_the_conf_names_the_stanza_after_the_cluster_and_points_at_its_own_path_in_the_bucket():
    conf = conf_of(pb.render_conf(repo(), MEMBER))
    assert set(conf) == {"global", "orders-db"}
    g = conf["global"]
    assert g["repo1-type"] == "s3"
    assert g["repo1-s3-endpoint"] == "store.kubefly-system.svc"
    assert g["repo1-storage-port"] == "8443"
    assert g["repo1-s3-bucket"] == "kubefly"
    assert g["repo1-s3-uri-style"] == "path"
    assert g["repo1-path"] == "/postgres/orders-db"
    assert g["repo1-storage-verify-tls"] == "y"
    assert "repo1-storage-ca-file" not in g
    assert g["repo1-retention-full"] == "2" and g["repo1-retention-full-type"] == "count"
    assert g["archive-async"] == "y"
    assert g["spool-path"] == "/var/lib/kubefly/pg/pgbackrest/spool"
    assert g["process-max"] == "2"
    assert conf["orders-db"] == {"pg1-path": "/var/lib/kubefly/pg/pgdata", "pg1-port": "5432",
                                 "pg1-socket-path": "/var/lib/kubefly/pg/run"}


def test_pgbackrest_files_live_beside_pgdata_not_inside_it():
    for d in MEMBER.directories():
        assert MEMBER.layout.pgdata not in (d, *d.parents)
        assert MEMBER.layout.root in d.parents
    conf = conf_of(pb.render_conf(repo(), MEMBER))["global"]
    for key in ("spool-path", "log-path", "lock-path"):
        assert Path(conf[key]) in MEMBER.directories()


def test_two_clusters_never_share_an_archive_path():
    other = pb.Member(cluster="orders-db-2", layout=MEMBER.layout, pg_port=5432, socket_dir=MEMBER.socket_dir)
    paths = {conf_of(pb.render_conf(repo(), m))["global"]["repo1-path"] for m in (MEMBER, other)}
    assert len(paths) == 2
    prefixed = conf_of(pb.render_conf(repo(path_prefix="/org-a/pg/"), MEMBER))["global"]
    assert prefixed["repo1-path"] == "/org-a/pg/orders-db"


def test_tls_options_a_private_ca_and_retention_and_process_max_are_rendered():
    conf = conf_of(pb.render_conf(repo(ca_file=Path("/etc/kubefly/ca.pem"), verify_tls=False, retention_full=7),
                                  MEMBER, process_max=1))["global"]
    assert conf["repo1-storage-ca-file"] == "/etc/kubefly/ca.pem"
    assert conf["repo1-storage-verify-tls"] == "n"
    assert conf["repo1-retention-full"] == "7"
    assert conf["process-max"] == "1"
    default_port = conf_of(pb.render_conf(repo(endpoint="https://s3.example.com"), MEMBER))["global"]
    assert default_port["repo1-storage-port"] == "443"


def test_no_secret_in_the_conf_or_any_argv_and_the_environment_carries_them():
    r = repo()
    env = pb.environment(r, {"STORE_SECRET": SECRET})
    assert env == {"PGBACKREST_REPO1_S3_KEY": "AKIDEXAMPLE", "PGBACKREST_REPO1_S3_KEY_SECRET": SECRET}
    texts = [pb.render_conf(r, MEMBER), pb.archive_command(MEMBER),
             *(" ".join(a) for a in (pb.stanza_create(MEMBER), pb.backup(MEMBER), pb.info(MEMBER), pb.check(MEMBER),
                                     pb.restore(MEMBER, "immediate")))]
    for text in texts:
        assert SECRET not in text and "AKIDEXAMPLE" not in text
        assert "s3-key" not in text


def test_the_secret_comes_from_a_file_or_a_variable_and_empty_is_an_error(tmp_path):
    f = tmp_path / "secret"
    f.write_text(SECRET + "\n")
    assert pb.environment(repo(secret_key_env=None, secret_key_file=f), {})[pb.SECRET_ENV] == SECRET
    with pytest.raises(ValueError, match="empty"):
        pb.environment(repo(), {})
    with pytest.raises(ValueError, match="exactly one"):
        repo(secret_key_file=f)
    with pytest.raises(ValueError, match="exactly one"):
        repo(secret_key_env=None)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8333", "127.0.0.1:8333", "https://", "https://h:99999",
                                      "https://h/bucket", "https://user@h"])
def test_an_endpoint_pgbackrest_cannot_use_is_refused(endpoint):
    with pytest.raises(ValueError, match="endpoint"):
        repo(endpoint=endpoint)


def test_bad_repository_and_member_values_are_refused():
    with pytest.raises(ValueError, match="bucket"):
        repo(bucket="")
    with pytest.raises(ValueError, match="path_prefix"):
        repo(path_prefix="relative")
    with pytest.raises(ValueError, match="retention_full"):
        repo(retention_full=0)
    with pytest.raises(ValueError, match="cluster"):
        pb.Member(cluster="Orders DB", layout=MEMBER.layout, pg_port=1, socket_dir=Path("/run"))
    with pytest.raises(ValueError, match="process_max"):
        pb.render_conf(repo(), MEMBER, process_max=0)


def test_argv_of_each_command():
    base = ["pgbackrest", "--config=/var/lib/kubefly/pg/pgbackrest/pgbackrest.conf", "--stanza=orders-db"]
    assert pb.stanza_create(MEMBER) == [*base, "stanza-create"]
    assert pb.backup(MEMBER) == [*base, "--type=full", "backup"]
    assert pb.backup(MEMBER, "incr") == [*base, "--type=incr", "backup"]
    assert pb.info(MEMBER) == [*base, "--output=json", "info"]
    with pytest.raises(ValueError):
        pb.backup(MEMBER, "differential")


def test_archive_command_is_a_shell_line_ending_in_the_segment_placeholder():
    spaced = pb.Member(cluster="a", layout=Layout(Path("/data/my volume")), pg_port=5432, socket_dir=Path("/run"))
    line = pb.archive_command(spaced)
    assert line.endswith(" archive-push %p")
    assert shlex.split(line) == ["pgbackrest", "--config=/data/my volume/pgbackrest/pgbackrest.conf", "--stanza=a",
                                 "archive-push", "%p"]


def test_restore_argv_by_target_kind():
    base = pb.stanza_create(MEMBER)[:-1]
    assert pb.restore(MEMBER, "time", "2026-12-07 22:50:01.5+00") == [
        *base, "--type=time", "--target=2026-12-07 22:50:01.5+00", "--target-action=promote", "restore"]
    assert pb.restore(MEMBER, "lsn", "0/3000060", target_action="pause") == [
        *base, "--type=lsn", "--target=0/3000060", "--target-action=pause", "restore"]
    assert pb.restore(MEMBER, "name", "before-migration")[-3] == "--target=before-migration"
    assert pb.restore(MEMBER, "immediate", backup_set="20261207-224800F") == [
        *base, "--type=immediate", "--target-action=promote", "--set=20261207-224800F", "restore"]


@pytest.mark.parametrize("kind,target,match", [
    ("immediate", "x", "takes no target"), ("time", None, "needs a target"), ("lsn", "3000060", "LSN"),
    ("time", "yesterday", "timestamp"), ("time", "2026-12-07 22:50:01", "time zone"), ("latest", None, "restore type"),
])
def test_bad_restore_targets_are_refused(kind, target, match):
    with pytest.raises(ValueError, match=match):
        pb.restore(MEMBER, kind, target)


def test_format_time_is_utc_with_microseconds_and_refuses_a_naive_time():
    at = datetime(2026, 12, 7, 23, 50, 1, 250000, tzinfo=timezone(timedelta(hours=1)))
    assert pb.format_time(at) == "2026-12-07 22:50:01.250000+00"
    pb.restore(MEMBER, "time", pb.format_time(at))
    with pytest.raises(ValueError, match="naive"):
        pb.format_time(datetime(2026, 1, 1))


INFO = [{
    "name": "orders-db",
    "archive": [
        {"database": {"id": 1, "repo-key": 1}, "id": "15-1", "max": "000000010000000000000004",
         "min": "000000010000000000000001"},
        {"database": {"id": 2, "repo-key": 1}, "id": "15-2", "max": "000000020000000000000009",
         "min": "000000020000000000000007"},
    ],
    "backup": [
        {"archive": {"start": "000000020000000000000008", "stop": "000000020000000000000008"},
         "info": {"delta": 4096, "repository": {"delta": 1024, "size": 1024}, "size": 23000000},
         "label": "20261207-230000F_20261207-231000I", "lsn": {"start": "0/8000028", "stop": "0/8000100"},
         "timestamp": {"start": 1796684400, "stop": 1796684405}, "type": "incr"},
        {"archive": {"start": "000000020000000000000007", "stop": "000000020000000000000007"},
         "info": {"delta": 23000000, "repository": {"delta": 3000000, "size": 3000000}, "size": 23000000},
         "label": "20261207-230000F", "lsn": {"start": "0/7000028", "stop": "0/7000138"},
         "timestamp": {"start": 1796684000, "stop": 1796684012}, "type": "full"},
    ],
    "db": [{"id": 1, "repo-key": 1, "system-id": 1, "version": "15"},
           {"id": 2, "repo-key": 1, "system-id": 2, "version": "15"}],
    "status": {"code": 0, "lock": {"backup": {"held": False}}, "message": "ok"},
}, {
    "name": "empty", "archive": [], "backup": [], "db": [],
    "status": {"code": 2, "message": "no valid backups"},
}]


def test_info_json_parses_into_backups_oldest_first_with_times_sizes_and_wal_range():
    orders, empty = pb.parse_info(json.dumps(INFO))
    assert (orders.name, orders.status_code, orders.status_message) == ("orders-db", 0, "ok")
    full, incr = orders.backups
    assert full == pb.BackupInfo(
        label="20261207-230000F", type="full",
        started=datetime.fromtimestamp(1796684000, UTC), finished=datetime.fromtimestamp(1796684012, UTC),
        size_bytes=23000000, repo_size_bytes=3000000,
        wal_start="000000020000000000000007", wal_stop="000000020000000000000007",
        lsn_start="0/7000028", lsn_stop="0/7000138")
    assert incr.type == "incr" and incr.repo_size_bytes == 1024 and incr.started.tzinfo is UTC
    # the WAL range of the current database, not of one from before a stanza-upgrade
    assert (orders.wal_min, orders.wal_max) == ("000000020000000000000007", "000000020000000000000009")
    assert (empty.status_code, empty.backups, empty.wal_min, empty.wal_max) == (2, (), "", "")


def test_a_lineage_archives_under_its_system_identifier():
    repo = pb.Repository(endpoint="https://s3.example:8443", bucket="b", access_key_id="k", secret_key_env="S",
                         path_prefix="/postgres/org")
    member = pb.Member("pg", Layout(Path("/data")), 5432, Path("/data/run"), system_id="7412345678901234567")
    assert "repo1-path=/postgres/org/pg/7412345678901234567\n" in pb.render_conf(repo, member)
    assert repo.path_for("pg") == "/postgres/org/pg"
    with pytest.raises(ValueError, match="system identifier"):
        pb.Member("pg", Layout(Path("/data")), 5432, Path("/data/run"), system_id="../x")


def test_info_after_a_warning_on_the_same_stream_still_parses():
    text = 'WARN: something about the repo\n[{"name": "pg", "status": {"code": 2, "message": "no valid backups"}}]\n'
    (stanza,) = pb.parse_info(text)
    assert stanza.name == "pg" and stanza.status_code == 2 and stanza.backups == ()


def test_a_backup_may_carry_the_recovery_window_it_expires_by():
    member = pb.Member("pg", Layout(Path("/data")), 5432, Path("/data/run"))
    assert pb.backup(member, "full", retention_full=14)[-2:] == ["--repo1-retention-full=14", "backup"]
    assert "--repo1-retention-full" not in " ".join(pb.backup(member, "incr"))
    with pytest.raises(ValueError):
        pb.backup(member, "full", retention_full=0)
