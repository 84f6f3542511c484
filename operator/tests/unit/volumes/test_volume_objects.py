from kubefly.volumes.objects import (
    STORAGE_CLASS,
    build_pv,
    build_pvc,
    claim_name,
    growth_patch,
    host_of_pv,
    host_path,
    path_of_pv,
    pv_name,
)
from kubefly.volumes.redundancy import Sibling, verdict

BODY = {
    "apiVersion": "kubefly.dev/v1alpha1", "kind": "Volume",
    "metadata": {"name": "data", "namespace": "org", "uid": "1234abcd-0000-1111-2222-333344445555"},
    "spec": {"app": "web", "region": "ams", "sizeGb": 3},
}


def test_pv_is_a_host_directory_pinned_prebound_and_retained():
    pv = build_pv(namespace="org", volume="data", uid=BODY["metadata"]["uid"], app="web", region="ams", host="h1", size_gb=3)
    assert pv["metadata"]["name"] == pv_name("org", "data", BODY["metadata"]["uid"])
    spec = pv["spec"]
    # The kubelet creates the directory at the first mount; nobody has to beforehand.
    # The directory is this object's own: its uid is in the path.
    path = f"/var/lib/kubefly/volumes/org/data.{BODY['metadata']['uid']}"
    assert spec["hostPath"] == {"path": path, "type": "DirectoryOrCreate"}
    assert path_of_pv(pv) == path
    assert spec["storageClassName"] == STORAGE_CLASS == "kubefly-local"
    assert spec["persistentVolumeReclaimPolicy"] == "Retain"
    assert spec["capacity"] == {"storage": "3Gi"}
    assert spec["claimRef"]["namespace"] == "org" and spec["claimRef"]["name"] == claim_name("data")
    assert host_of_pv(pv) == "h1"


def test_pvc_names_its_pv_and_is_owned_by_the_volume():
    pvc = build_pvc(body=BODY, pv="pv-x", host="h1", size_gb=3)
    assert pvc["metadata"]["name"] == "vol-data" and pvc["metadata"]["namespace"] == "org"
    assert pvc["spec"]["volumeName"] == "pv-x"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "3Gi"
    owner = pvc["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "Volume" and owner["uid"] == BODY["metadata"]["uid"] and "blockOwnerDeletion" not in owner


def test_pv_names_are_distinct_where_namespace_and_name_concatenate_alike():
    assert pv_name("a-b", "c", "u1") != pv_name("a", "b-c", "u2")
    assert pv_name("org", "data", "u1") == pv_name("org", "data", "u1")


def test_a_volume_recreated_under_an_old_name_gets_a_directory_no_earlier_volume_had():
    first, second = host_path("org", "data", "uid-1"), host_path("org", "data", "uid-2")
    assert first != second
    # Volumes made before the uid was in the path use <root>/<ns>/<volume>; names have no dots, so never equal.
    assert "/var/lib/kubefly/volumes/org/data" not in (first, second)


def test_host_of_foreign_pv_is_unknown():
    assert host_of_pv({"spec": {}}) is None and path_of_pv({"spec": {"local": {"path": "/x"}}}) is None


def test_growth_patches_both_objects():
    pv_patch, pvc_patch = growth_patch(7)
    assert pv_patch["spec"]["capacity"]["storage"] == "7Gi"
    assert pvc_patch["spec"]["resources"]["requests"]["storage"] == "7Gi"


def test_single_volume_in_region_is_not_redundant():
    me = Sibling("a", "web", "ams")
    alone = verdict(me, [me, Sibling("b", "web", "iad"), Sibling("c", "db", "ams")])
    assert not alone.redundant and alone.reason == "SingleVolumeInRegion" and "region ams" in alone.message
    paired = verdict(me, [me, Sibling("b", "web", "ams")])
    assert paired.redundant and paired.reason == "MultipleVolumesInRegion"
    leaving = verdict(me, [me, Sibling("b", "web", "ams", deleting=True)])
    assert not leaving.redundant
