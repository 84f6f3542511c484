"""The object store works with the snapshot tool: Debian bookworm's restic 0.14 (the one
in kubefly's image) keeps a repository in SeaweedFS's S3 and restores it byte for byte."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.component


def restic(store, repo: str, *args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "RESTIC_REPOSITORY": f"s3:{store.endpoint}/{store.bucket}/{repo}",
           "RESTIC_PASSWORD": "test-password", "AWS_ACCESS_KEY_ID": store.access_key,
           "AWS_SECRET_ACCESS_KEY": store.secret_key}
    proc = subprocess.run(["restic", "--no-cache", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"restic {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def test_restic_backs_up_to_the_store_and_restores_the_same_bytes_elsewhere(object_store, tmp_path):
    if shutil.which("restic") is None:
        pytest.fail("restic is required (make os-deps: hack/os-packages.txt)", pytrace=False)
    repo = f"test/{uuid.uuid4().hex}"
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "big").write_bytes(os.urandom(12 << 20))  # several restic packs and filer chunks
    (src / "sub" / "small").write_bytes(b"hello\n")
    (src / "empty").touch()

    restic(object_store, repo, "init")
    restic(object_store, repo, "backup", "--host", "test", ".", cwd=src)  # paths relative to src
    out = tmp_path / "restored"
    restic(object_store, repo, "restore", "latest", "--target", str(out))
    assert same_tree(src, out)
    # The repository really is in the store: restic checks every pack it wrote.
    restic(object_store, repo, "check", "--read-data")
