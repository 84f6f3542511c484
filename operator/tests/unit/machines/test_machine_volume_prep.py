import os
import subprocess
import sys

from kubefly.machines.pod import build_pod
from kubefly.machines.volume_prep import INIT_CONTAINER, VOLUME_GROUP, volume_prep

IMAGE = {"KUBEFLY_IMAGE": "kubefly:test"}


def test_without_kubeflys_image_nothing_is_added():
    assert volume_prep("data", "/data", {}) == {}


def test_the_init_container_prepares_the_apps_mount_as_root_and_the_pod_joins_the_group():
    fields = volume_prep("data", "/srv/db", IMAGE)
    assert fields["securityContext"] == {"fsGroup": VOLUME_GROUP}
    (init,) = fields["initContainers"]
    assert init["name"] == INIT_CONTAINER and init["image"] == "kubefly:test"
    assert init["securityContext"]["runAsUser"] == 0
    assert init["volumeMounts"] == [{"name": "data", "mountPath": "/srv/db"}]
    assert init["command"][-2:] == ["/srv/db", str(VOLUME_GROUP)]


def test_only_a_pod_that_mounts_a_volume_gets_it(monkeypatch):
    monkeypatch.setenv("KUBEFLY_IMAGE", "kubefly:test")
    machine = {"metadata": {"name": "m1", "namespace": "org", "uid": "u1"},
               "spec": {"app": "web", "region": "ams", "image": "app:1", "mounts": [{"volume": "v", "path": "/data"}]}}
    with_volume = build_pod(machine, host="h1", region="ams", instance="i1", secrets=[], claim="vol-v")["spec"]
    assert with_volume["initContainers"][0]["volumeMounts"][0]["mountPath"] == "/data"
    assert with_volume["securityContext"]["fsGroup"] == VOLUME_GROUP
    machine["spec"].pop("mounts")
    bare = build_pod(machine, host="h1", region="ams", instance="i1", secrets=[])["spec"]
    assert "initContainers" not in bare and "securityContext" not in bare


def run_prep(path):
    command = volume_prep("data", str(path), IMAGE)["initContainers"][0]["command"]
    subprocess.run([sys.executable, *command[1:]], check=True)


def test_a_fresh_root_directory_becomes_the_groups_and_a_prepared_one_is_left_alone(tmp_path):
    # As the kubelet leaves it: root's group, 0755 (the test runs as root, as CI does).
    volume = tmp_path / "vol"
    volume.mkdir(mode=0o755)
    os.chown(volume, 0, 0)
    run_prep(volume)
    st = volume.stat()
    assert st.st_gid == VOLUME_GROUP and st.st_mode & 0o7777 == 0o2775
    # The app tightened it: the next start must not undo that.
    volume.chmod(0o2770)
    run_prep(volume)
    assert volume.stat().st_mode & 0o7777 == 0o2770
