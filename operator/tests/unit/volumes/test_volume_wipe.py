"""The wipe of a deleted Volume's directory: the pod, its script (run for real on a temporary root), the verdict."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from kubefly.volumes import wipe
from kubefly.volumes.objects import HOST_ROOT, host_path

UID = "1234abcd-0000-1111-2222-333344445555"
PATH = host_path("org", "data", UID)
NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)


def pod(phase=None, age_s=0, **status):
    created = (NOW - timedelta(seconds=age_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    p = wipe.build_pod(home_namespace="kubefly-system", namespace="org", volume="data", uid=UID, host="h1", path=PATH, image="kubefly:test")
    p["metadata"]["creationTimestamp"] = created
    p["status"] = {**({"phase": phase} if phase else {}), **status}
    return p


def node(ready=True):
    return {"metadata": {"name": "h1"}, "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "Unknown"}]}}


# ---- which paths may be wiped ------------------------------------------------


@pytest.mark.parametrize("path,rel", [
    (PATH, f"org/data.{UID}"),
    (f"{HOST_ROOT}/org/data", "org/data"),  # a Volume made before the uid was in the path
])
def test_a_volume_directory_two_levels_below_the_root_may_be_wiped(path, rel):
    assert wipe.relative_dir(path) == rel


@pytest.mark.parametrize("path", [
    HOST_ROOT, f"{HOST_ROOT}/org", f"{HOST_ROOT}/org/", f"{HOST_ROOT}/org/data/deeper", f"{HOST_ROOT}/org/..",
    f"{HOST_ROOT}/../etc", f"{HOST_ROOT}-evil/org/data", "/etc/passwd", "/", f"{HOST_ROOT}//data",
])
def test_anything_else_is_never_wiped(path):
    assert wipe.relative_dir(path) is None
    with pytest.raises(ValueError):
        wipe.build_pod(home_namespace="k", namespace="org", volume="data", uid=UID, host="h1", path=path, image="i")


# ---- the pod -----------------------------------------------------------------


def test_the_wipe_pod_runs_on_the_volumes_host_with_the_root_and_nothing_more():
    p = pod()
    spec, (c,) = p["spec"], p["spec"]["containers"]
    assert p["metadata"]["namespace"] == "kubefly-system" and p["metadata"]["name"] == f"volume-wipe-{UID}"
    assert spec["nodeName"] == "h1" and spec["restartPolicy"] == "Never"
    assert spec["volumes"] == [{"name": "volumes", "hostPath": {"path": HOST_ROOT, "type": "DirectoryOrCreate"}}]
    assert c["image"] == "kubefly:test" and c["command"][-2:] == [wipe.MOUNT, f"org/data.{UID}"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["DAC_OVERRIDE", "FOWNER"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert spec["automountServiceAccountToken"] is False
    # Never evicted from a NotReady host: it waits there for the host to return.
    assert spec["tolerations"] == [{"operator": "Exists"}]
    # Not an instance: the host agents turn managed-by=kubefly pods into routable instances.
    assert "app.kubernetes.io/managed-by" not in p["metadata"]["labels"]
    assert p["metadata"]["annotations"][wipe.UID_ANNOTATION] == UID


# ---- the script, run for real ------------------------------------------------


def run_script(root, rel):
    return subprocess.run([sys.executable, "-c", wipe.SCRIPT, str(root), rel], capture_output=True, text=True)


def test_the_script_removes_exactly_that_directory_whatever_is_inside(tmp_path):
    root, outside = tmp_path / "volumes", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not the volume's")
    target = root / "org" / f"data.{UID}"
    (target / "pgdata" / "base").mkdir(parents=True)
    (target / "pgdata" / "base" / "1").write_text("rows")
    (target / "escape").symlink_to(outside)  # a link in the volume is removed, never followed
    sibling = root / "org" / "data"  # another Volume's directory (the old layout): untouched
    sibling.mkdir()
    (sibling / "f").write_text("x")
    proc = run_script(root, f"org/data.{UID}")
    assert proc.returncode == 0, proc.stderr
    assert not target.exists()
    assert (outside / "keep").read_text() == "not the volume's" and (sibling / "f").exists()
    # Again: the directory is already gone, which is success (a retried wipe).
    again = run_script(root, f"org/data.{UID}")
    assert again.returncode == 0 and "not on this host" in again.stdout


@pytest.mark.parametrize("rel", ["../outside", "org/..", "org", "org/data/deeper", "/abs/x", "./x", "link/x"])
def test_the_script_refuses_anything_outside_one_volume_directory(tmp_path, rel):
    root, outside = tmp_path / "volumes", tmp_path / "outside"
    (outside / "x").mkdir(parents=True)
    (root / "org" / "data" / "deeper").mkdir(parents=True)
    (root / "link").symlink_to(outside)  # a namespace directory that leads out of the root
    proc = run_script(root, rel)
    assert proc.returncode != 0 and "refused" in proc.stderr
    assert (outside / "x").is_dir() and (root / "org" / "data" / "deeper").is_dir()


# ---- the verdict -------------------------------------------------------------


def test_a_finished_wipe_lets_the_finalizer_go():
    v = wipe.verdict(pod=pod("Succeeded"), node=node(), path=PATH, now=NOW)
    assert v.outcome == "wiped" and PATH in v.message


def test_a_failed_wipe_holds_the_deletion_and_says_why():
    failed = pod("Failed", containerStatuses=[{"state": {"terminated": {"reason": "Error", "message": "refused: 'x'"}}}])
    v = wipe.verdict(pod=failed, node=node(), path=PATH, now=NOW)
    assert v.outcome == "failed" and v.reason == "WipeFailed" and "refused: 'x'" in v.message and "kubectl logs" in v.message


def test_a_wipe_on_its_way_is_waited_for():
    v = wipe.verdict(pod=pod("Pending", age_s=5), node=node(), path=PATH, now=NOW)
    assert v.outcome == "waiting" and "Ready" in v.message
    v = wipe.verdict(pod=pod("Pending", age_s=5), node=node(ready=False), path=PATH, now=NOW)
    assert v.outcome == "waiting" and "NotReady" in v.message


def test_a_notready_host_keeps_the_data_until_it_returns_and_the_volume_goes():
    v = wipe.verdict(pod=pod("Pending", age_s=wipe.WAIT_SECONDS + 1), node=node(ready=False), path=PATH, now=NOW)
    assert v.outcome == "left" and v.reason == "DataLeftOnHost"
    assert "until it returns" in v.message and "waits there" in v.message and PATH in v.message


def test_a_host_gone_from_the_cluster_keeps_the_data_for_good_and_says_so_at_once():
    v = wipe.verdict(pod=pod("Pending", age_s=0), node=None, path=PATH, now=NOW)
    assert v.outcome == "left" and "gone from the cluster" in v.message and "by hand" in v.message


def test_a_wipe_stuck_on_a_ready_host_is_bounded_too_and_names_the_pods_state():
    stuck = pod("Pending", age_s=wipe.WAIT_SECONDS + 1,
                containerStatuses=[{"state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}])
    v = wipe.verdict(pod=stuck, node=node(), path=PATH, now=NOW)
    assert v.outcome == "left" and "ErrImagePull" in v.message
