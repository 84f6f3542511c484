"""Wiping a deleted Volume's directory: a one-shot pod on its host, and the verdict on it.

Nothing of a Volume outlives it: once its claim and PV are deleted, the Volume's
delete handler runs a pod pinned (`nodeName`) to the Volume's host, on kubefly's
own image, that removes exactly that Volume's directory under the volume root.
The pod has the volume root as a hostPath, runs as root with only the two
capabilities removing another user's files needs, no service-account token and
a read-only root filesystem; its script refuses any path that is not one
directory `<namespace>/<volume directory>` below the root (no `..`, no symlink
out). It lives in the operator's own namespace, never in an organisation's.

The finalizer waits for it, bounded (WAIT_SECONDS): a host that is NotReady
keeps the data until it returns, and the pod, tolerating every taint, waits
there and wipes it then; a host gone from the cluster keeps it for good. In
both cases the Volume is deleted anyway with a Warning saying where the data
is: a user deleting a Volume expects it gone, and no other Volume can ever
mount that directory (each Volume's is its own, see objects.host_path). A wipe
that fails on a Ready host keeps the finalizer and says why: that is a fault
for the platform team, not data to leave behind silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kubefly.conditions import is_ready
from kubefly.labels import HOST, VOLUME
from kubefly.volumes.objects import HOST_ROOT, NAMESPACE_LABEL

ROLE = "kubefly.dev/role"
ROLE_VALUE = "volume-wipe"
UID_ANNOTATION = "kubefly.dev/volume-uid"
PATH_ANNOTATION = "kubefly.dev/path"
MOUNT = "/volumes"
WAIT_SECONDS = 60
# Runs in kubefly's image, which always has its own Python (no shell assumed).
# shutil.rmtree works on directory file descriptors, so a symlink inside the
# volume is removed, never followed.
SCRIPT = (
    "import os, shutil, sys\n"
    "root, rel = sys.argv[1], sys.argv[2]\n"
    "parts = rel.split('/')\n"
    "if len(parts) != 2 or any(p in ('', '.', '..') for p in parts):\n"
    "    sys.exit(f'refused: {rel!r} is not <namespace>/<volume directory> below the volume root')\n"
    "parent = os.path.join(root, parts[0])\n"
    "if os.path.realpath(parent) != os.path.join(os.path.realpath(root), parts[0]):\n"
    "    sys.exit(f'refused: {parts[0]!r} leads outside the volume root')\n"
    "target = os.path.join(parent, parts[1])\n"
    "if os.path.islink(target) or os.path.isfile(target):\n"
    "    os.unlink(target)\n"
    "elif os.path.isdir(target):\n"
    "    shutil.rmtree(target)\n"
    "else:\n"
    "    print(f'{rel} is not on this host (never mounted, or already wiped)')\n"
    "    sys.exit(0)\n"
    "print(f'wiped {rel}')\n"
)


def pod_name(uid: str) -> str:
    return f"volume-wipe-{uid}"


def relative_dir(path: str) -> str | None:
    """`<namespace>/<directory>` of a Volume's host path; None for anything but one directory two levels below the root."""
    prefix = HOST_ROOT + "/"
    if not path.startswith(prefix):
        return None
    parts = path[len(prefix):].split("/")
    if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
        return None
    return "/".join(parts)


def build_pod(*, home_namespace: str, namespace: str, volume: str, uid: str, host: str, path: str, image: str,
              name: str | None = None) -> dict:
    """The wipe pod for the Volume namespace/volume (uid) whose data is `path` on `host`; `path` passed relative_dir.
    `name`: another than the deletion's (a migration wipes the copy it left)."""
    rel = relative_dir(path)
    if rel is None:
        raise ValueError(f"{path} is not a volume directory under {HOST_ROOT}")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name or pod_name(uid),
            "namespace": home_namespace,
            # Not app.kubernetes.io/managed-by=kubefly: the host agents make instances of those pods.
            "labels": {ROLE: ROLE_VALUE, VOLUME: volume, NAMESPACE_LABEL: namespace, HOST: host},
            "annotations": {UID_ANNOTATION: uid, PATH_ANNOTATION: path},
        },
        "spec": {
            "nodeName": host,
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            # It must run on that host whatever the host's taints, and never be evicted
            # from a NotReady host: it waits there to wipe when the host returns.
            "tolerations": [{"operator": "Exists"}],
            "activeDeadlineSeconds": 3600,
            "containers": [
                {
                    "name": "wipe",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["/opt/kubefly/bin/python", "-c", SCRIPT, MOUNT, rel],
                    "securityContext": {
                        # Root for the app's files of any owner and mode, with nothing else.
                        "runAsUser": 0,
                        "runAsGroup": 0,
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"], "add": ["DAC_OVERRIDE", "FOWNER"]},
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "volumeMounts": [{"name": "volumes", "mountPath": MOUNT}],
                }
            ],
            "volumes": [{"name": "volumes", "hostPath": {"path": HOST_ROOT, "type": "DirectoryOrCreate"}}],
        },
    }


@dataclass(frozen=True)
class Verdict:
    """What the delete handler does next. outcome: wiped | waiting | failed | left (data stays on the host)."""

    outcome: str
    reason: str
    message: str


def _pod_state(pod: dict) -> str:
    """The pod's phase and, when a container waits or ended, why (ErrImagePull, the script's message)."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        detail = state.get("waiting") or state.get("terminated") or {}
        why = " ".join(x for x in (detail.get("reason"), (detail.get("message") or "").strip()) if x)
        if why:
            return f"{phase} ({why})"
    return f"{phase} ({status['reason']})" if status.get("reason") else phase


def verdict(*, pod: dict, node: dict | None, path: str, now: datetime) -> Verdict:
    """Judge the wipe pod of a deleted Volume whose data is `path` on the pod's host (`node`, None if gone)."""
    meta = pod["metadata"]
    host, where = pod["spec"]["nodeName"], f"{meta['namespace']}/{meta['name']}"
    phase = (pod.get("status") or {}).get("phase")
    if phase == "Succeeded":
        return Verdict("wiped", "DataWiped", f"the directory {path} on host {host} was wiped")
    if phase == "Failed":
        return Verdict("failed", "WipeFailed", f"the wipe pod {where} on host {host} failed: {_pod_state(pod)}; "
                       f"deletion waits and the wipe is retried (kubectl logs -n {meta['namespace']} {meta['name']})")
    if node is None:
        return Verdict("left", "DataLeftOnHost", f"host {host} is gone from the cluster: the directory {path} stays on "
                       f"that machine's disk (no other Volume can mount it); if the host rejoins, remove it there by hand")
    created = datetime.fromisoformat(meta["creationTimestamp"].replace("Z", "+00:00"))
    waited = (now - created).total_seconds()
    if waited < WAIT_SECONDS:
        state = "Ready" if is_ready(node) else "NotReady"
        return Verdict("waiting", "WipingData", f"waiting for the wipe pod {where} on host {host} ({state}) to remove "
                       f"{path}: {_pod_state(pod)}")
    if not is_ready(node):
        return Verdict("left", "DataLeftOnHost", f"host {host} is NotReady: the directory {path} stays on it until it "
                       f"returns; the wipe pod {where} waits there and removes it then (no other Volume can mount it)")
    return Verdict("left", "DataLeftOnHost", f"the wipe pod {where} on host {host} did not finish within "
                   f"{WAIT_SECONDS} s: {_pod_state(pod)}; the directory {path} stays until it does")
