"""Pure builders of a Volume's PersistentVolume and PersistentVolumeClaim.

The PV is a directory on the host's disk (`hostPath`, DirectoryOrCreate: the
kubelet makes it at the first mount, as Fly's host makes a machine's volume;
a `local` PV would need someone to create it beforehand) with required node
affinity to the one host placement chose. PV and PVC name each other
(`claimRef` and `volumeName`), so the persistent-volume controller binds them
at once and exactly, whatever the StorageClass's WaitForFirstConsumer says;
the scheduler then sends any pod using the claim to that host. Reclaim policy
is Retain: deleting the PV leaves the directory; the Volume's delete handler
wipes it with a pod on the host (kubefly.volumes.wipe, docs/volumes.md).
"""

from __future__ import annotations

from kubefly import API_VERSION
from kubefly.labels import APP, HOST, MANAGED_BY, MANAGED_BY_VALUE, REGION, VOLUME

STORAGE_CLASS = "kubefly-local"
HOST_ROOT = "/var/lib/kubefly/volumes"
HOSTNAME_LABEL = "kubernetes.io/hostname"
NAMESPACE_LABEL = "kubefly.dev/namespace"


def claim_name(volume: str) -> str:
    return f"vol-{volume}"


def pv_name(namespace: str, volume: str, uid: str) -> str:
    # PVs are cluster-wide: the uid keeps "a-b"/"c" and "a"/"b-c" apart, and a
    # Volume re-created under an old name never meets its predecessor's PV.
    return f"kubefly-{namespace}-{volume}-{uid.replace('-', '')[:10]}"


def host_path(namespace: str, volume: str, uid: str) -> str:
    # Each Volume object has a directory of its own: a Volume re-created under an
    # old name (another app, or a re-created namespace: another organisation) never
    # finds a predecessor's data. Namespace and Volume names have no dots, so no
    # path of the layout before the uid (`<ns>/<volume>`, still in use on the PVs
    # of Volumes made then) can equal one of these.
    return f"{HOST_ROOT}/{namespace}/{volume}.{uid}"


def path_of_pv(pv: dict) -> str | None:
    """The host directory a PV is, as recorded on it (the one truth for Volumes of any age)."""
    return (((pv.get("spec") or {}).get("hostPath") or {}).get("path")) or None


def quantity(size_gb: int) -> str:
    return f"{size_gb}Gi"


def _labels(namespace: str, volume: str, app: str, region: str, host: str) -> dict[str, str]:
    return {
        MANAGED_BY: MANAGED_BY_VALUE,
        APP: app,
        VOLUME: volume,
        NAMESPACE_LABEL: namespace,
        REGION: region,
        HOST: host,
    }


def owner_reference(body: dict) -> dict:
    # No blockOwnerDeletion: it would need update rights on volumes/finalizers,
    # and the Volume's own finalizer already orders the deletion.
    meta = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": body.get("kind", "Volume"), "name": meta["name"], "uid": meta["uid"], "controller": True}


def build_pv(*, namespace: str, volume: str, uid: str, app: str, region: str, host: str, size_gb: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": pv_name(namespace, volume, uid),
            "labels": _labels(namespace, volume, app, region, host),
            "annotations": {"kubefly.dev/volume-uid": uid},
        },
        "spec": {
            "capacity": {"storage": quantity(size_gb)},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "volumeMode": "Filesystem",
            "hostPath": {"path": host_path(namespace, volume, uid), "type": "DirectoryOrCreate"},
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": namespace, "name": claim_name(volume)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": [host]}]}]
                }
            },
        },
    }


def build_pvc(*, body: dict, pv: str, host: str, size_gb: int) -> dict:
    meta, spec = body["metadata"], body["spec"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": _labels(meta["namespace"], meta["name"], spec["app"], spec["region"], host),
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": STORAGE_CLASS,
            "volumeMode": "Filesystem",
            "volumeName": pv,
            "resources": {"requests": {"storage": quantity(size_gb)}},
        },
    }


def host_of_pv(pv: dict) -> str | None:
    """The host a PV is pinned to, read back from its node affinity."""
    terms = (((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}).get("nodeSelectorTerms") or []
    for term in terms:
        for expr in term.get("matchExpressions") or []:
            if expr.get("key") == HOSTNAME_LABEL and expr.get("operator") == "In" and len(expr.get("values") or []) == 1:
                return expr["values"][0]
    return None


def growth_patch(size_gb: int) -> tuple[dict, dict]:
    """Merge patches that extend the PV and the claim to size_gb (a host directory grows in place)."""
    return (
        {"spec": {"capacity": {"storage": quantity(size_gb)}}},
        {"spec": {"resources": {"requests": {"storage": quantity(size_gb)}}}},
    )
