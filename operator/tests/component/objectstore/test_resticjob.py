"""The snapshot pods' job (kubefly.volumes.resticjob) run for real: restic 0.14 against the
SeaweedFS S3 server, and the kernel's cgroup freezer holding a writer still for the
consistent pass. What kind adds (pods, hostPath, the operator) is in e2e/kind/test_kind_snapshots.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest


def job(store, repo: str, *args: str, timeout: float = 120) -> dict:
    env = {**os.environ, "RESTIC_REPOSITORY": f"s3:{store.endpoint}/{store.bucket}/{repo}", "RESTIC_PASSWORD": "test-key",
           "AWS_ACCESS_KEY_ID": store.access_key, "AWS_SECRET_ACCESS_KEY": store.secret_key}
    report = Path(f"/tmp/kubefly-resticjob-{uuid.uuid4().hex}.json")
    try:
        proc = subprocess.run([sys.executable, "-m", "kubefly.volumes.resticjob", "--report", str(report), *args],
                              env=env, capture_output=True, text=True, timeout=timeout)
        result = json.loads(report.read_text())
    finally:
        report.unlink(missing_ok=True)
    assert proc.returncode == (1 if "error" in result else 0), proc.stderr
    return result


def tree(root: Path) -> dict[str, tuple[bytes, int, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode, p.stat().st_uid)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_copy_restores_byte_for_byte_elsewhere_the_next_is_incremental_and_forget_removes_one(object_store, tmp_path):
    repo = f"volumes/ns/data.{uuid.uuid4().hex}"
    src = tmp_path / "src"
    (src / "db").mkdir(parents=True)
    (src / "db" / "big").write_bytes(os.urandom(8 << 20))
    (src / "note").write_text("hello")
    os.chmod(src / "note", 0o640)
    first = job(object_store, repo, "backup", str(src), "--host-id", "vol-uid", "--tag", "snapshot=a")
    assert first["consistency"] == "stopped" and first["bytes"] >= 8 << 20 and first["addedBytes"] >= 8 << 20

    (src / "small").write_bytes(os.urandom(64 << 10))
    second = job(object_store, repo, "backup", str(src), "--host-id", "vol-uid", "--tag", "snapshot=b")
    assert second["addedBytes"] < 1 << 20, "only the new file is new to the repository"

    out = tmp_path / "restored"
    restored = job(object_store, repo, "restore", str(out), "--snapshot", first["snapshotId"])
    assert restored["bytes"] == (8 << 20) + 5
    want = tree(src)
    del want["small"]
    assert tree(out) == want

    job(object_store, repo, "forget", "--snapshot", second["snapshotId"])
    failed = job(object_store, repo, "restore", str(tmp_path / "gone"), "--snapshot", second["snapshotId"])
    assert "restic restore failed" in failed["error"]
    again = job(object_store, repo, "restore", str(tmp_path / "again"), "--snapshot", first["snapshotId"])
    assert again["bytes"] == restored["bytes"], "forgetting one copy keeps the other whole"


def test_an_empty_volume_is_a_copy_too_and_restores_empty_with_its_owner_and_mode(object_store, tmp_path):
    repo = f"volumes/ns/data.{uuid.uuid4().hex}"
    src = tmp_path / "empty"
    src.mkdir()
    os.chmod(src, 0o750)
    os.chown(src, 1000, 1000)
    taken = job(object_store, repo, "backup", str(src), "--host-id", "u", "--tag", "snapshot=a")
    assert taken["snapshotId"] and taken["files"] == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale").write_text("from an earlier, failed attempt")
    restored = job(object_store, repo, "restore", str(out), "--snapshot", taken["snapshotId"])
    assert restored["bytes"] == 0 and list(out.iterdir()) == []
    assert (out.stat().st_mode & 0o7777, out.stat().st_uid, out.stat().st_gid) == (0o750, 1000, 1000)


def test_a_wrong_key_is_an_error_not_a_silent_empty_copy(object_store, tmp_path):
    repo = f"volumes/ns/data.{uuid.uuid4().hex}"
    (tmp_path / "f").write_text("x")
    job(object_store, repo, "backup", str(tmp_path), "--host-id", "u", "--tag", "snapshot=a")
    failed = job(object_store._replace(secret_key="wrong"), repo, "backup", str(tmp_path), "--host-id", "u", "--tag", "snapshot=b")
    assert "error" in failed


WRITER = """
import os, sys, time
d = sys.argv[1]
i = 0
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    i += 1
    for name in ("a", "b"):  # a first, then b: any one instant has b == a or b == a - 1
        with open(os.path.join(d, "." + name), "w") as f:
            f.write(str(i))
        os.replace(os.path.join(d, "." + name), os.path.join(d, name))
"""


def _pod_cgroup(pod_uid: str) -> tuple[Path, Path, str]:
    """A pod-like cgroup named as the kubelet's cgroupfs driver names them: (cgroup dir, procs file, parent to remove)."""
    root = Path("/sys/fs/cgroup")
    v2 = (root / "cgroup.controllers").exists()
    base = root if v2 else root / "freezer"
    parent = base / f"kubefly-test-{uuid.uuid4().hex[:8]}"
    try:
        (parent / f"pod{pod_uid}").mkdir(parents=True)
    except OSError as exc:
        pytest.fail(f"cannot make a cgroup here ({exc}): the freezer case needs root on the host (make test runs as root)",
                    pytrace=False)
    cg = parent / f"pod{pod_uid}"
    return cg, cg / ("cgroup.procs" if v2 else "tasks"), str(parent)


def test_the_final_pass_is_taken_with_the_machine_frozen_so_the_copy_is_of_one_instant(object_store, tmp_path):
    repo = f"volumes/ns/data.{uuid.uuid4().hex}"
    pod_uid = str(uuid.uuid4())
    cg, procs, parent = _pod_cgroup(pod_uid)
    data = tmp_path / "data"
    data.mkdir()
    (data / "bulk").write_bytes(os.urandom(4 << 20))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(data)])
    try:
        procs.write_text(str(writer.pid))
        deadline = time.monotonic() + 10
        while not (data / "b").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        result = job(object_store, repo, "backup", str(data), "--host-id", "u", "--tag", "snapshot=a",
                     "--freeze-pod", pod_uid, "--cgroup-root", "/sys/fs/cgroup")
        assert result.get("consistency") == "crash-consistent", result
        assert 0 < result["frozenSeconds"] < 10
        # Thawed after: the writer goes on.
        before = int((data / "a").read_text() or 0)
        time.sleep(0.5)
        assert int((data / "a").read_text() or 0) > before, "the writer was left frozen"
        out = tmp_path / "out"
        job(object_store, repo, "restore", str(out), "--snapshot", result["snapshotId"])
        a, b = int((out / "a").read_text()), int((out / "b").read_text())
        assert a - b in (0, 1), f"a={a} b={b}: the files are from different instants"
    finally:
        writer.kill()
        writer.wait(10)
        for d in (cg, Path(parent)):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def full_tree(root: Path) -> dict[str, tuple]:
    """Every entry below root with what a migration must carry: content or target, owner, mode, and a
    directory's mtime (a file's content and mode stand for it)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", st.st_mode, st.st_uid, st.st_mtime_ns // 1000)
        else:
            out[rel] = ("file", p.read_bytes(), st.st_mode, st.st_uid)
    top = root.stat()
    out["."] = ("dir", top.st_mode, top.st_uid)
    return out


def test_a_delta_restore_brings_a_copy_to_the_next_one_reading_only_what_changed(object_store, tmp_path):
    """A migration's second pass: the target holds copy 1; after it, it equals copy 2 exactly."""
    repo = f"volumes/ns/mig.{uuid.uuid4().hex}"
    src = tmp_path / "mig.uid"
    (src / "pgdata" / "base").mkdir(parents=True)
    (src / "pgdata" / "base" / "big").write_bytes(os.urandom(16 << 20))
    (src / "pgdata" / "wal").write_bytes(b"w1")
    (src / "gone-dir" / "inner").mkdir(parents=True)
    (src / "gone-dir" / "inner" / "f").write_text("x")
    (src / "becomes-dir").write_text("file")
    (src / "odd[1]*?").write_text("glob characters")
    (src / "same").write_bytes(os.urandom(1 << 20))
    first = job(object_store, repo, "backup", str(src), "--host-id", "uid", "--tag", "snapshot=m1")
    target = tmp_path / "target" / "mig.uid"
    job(object_store, repo, "restore", str(target), "--snapshot", first["snapshotId"])

    (src / "pgdata" / "wal").write_bytes(b"w2-longer")
    (src / "pgdata" / "new").write_text("added")
    (src / "fresh" / "deep").mkdir(parents=True)
    (src / "fresh" / "deep" / "f").write_text("new tree")
    import shutil
    shutil.rmtree(src / "gone-dir")
    (src / "becomes-dir").unlink()
    (src / "becomes-dir").mkdir()
    (src / "becomes-dir" / "child").write_text("c")
    (src / "odd[1]*?").write_text("changed glob")
    os.chmod(src / "same", 0o600)
    os.symlink("pgdata/wal", src / "link")
    os.chmod(src, 0o711)
    # The restore starts first and waits for the copy, as a migration's second pass does.
    waiting: dict = {}
    restorer = threading.Thread(target=lambda: waiting.update(job(
        object_store, repo, "restore", str(target), "--wait-for-tag", "snapshot=m2", "--since", first["snapshotId"])))
    restorer.start()
    time.sleep(1)
    second = job(object_store, repo, "backup", str(src), "--host-id", "uid", "--tag", "snapshot=m2")
    restorer.join(timeout=120)
    delta = waiting
    assert delta["snapshotId"].startswith(second["snapshotId"])
    assert delta["delta"] is True and delta["files"] < 10, delta
    assert not (target / ".kubefly-restore").exists()
    assert full_tree(target) == full_tree(src)
