"""Make a Machine's volume writable by its app, whatever user the app runs as.

The kubelet creates a new Volume's host directory (hostPath, DirectoryOrCreate)
as root, mode 0755, and hostPath ignores the pod's fsGroup. So a pod that mounts
a volume gets fsGroup VOLUME_GROUP (a supplementary group of every process in
it) and an init container on kubefly's own image that, on a directory still
root's group, hands it to that group, group-writable and setgid (files made in
it stay the group's). A directory already handed over is left as the app set it.
The operator learns its image from KUBEFLY_IMAGE (set by the chart); unset (an
operator run outside the chart), the directory stays root's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

IMAGE_ENV = "KUBEFLY_IMAGE"
VOLUME_GROUP = 7946
INIT_CONTAINER = "volume-prep"
# Runs in kubefly's image, which always has its own Python (no shell assumed).
_PREP = (
    "import os, sys\n"
    "path, group = sys.argv[1], int(sys.argv[2])\n"
    "if os.stat(path).st_gid == 0:\n"
    "    os.chown(path, -1, group)\n"
    "    os.chmod(path, 0o2775)\n"
)


def volume_prep(volume_name: str, mount_path: str, environ: Mapping[str, str] = os.environ) -> dict:
    """The pod spec fields that let the app write the volume mounted at `mount_path`; {} without an image."""
    image = environ.get(IMAGE_ENV, "")
    if not image:
        return {}
    return {
        "securityContext": {"fsGroup": VOLUME_GROUP},
        "initContainers": [
            {
                "name": INIT_CONTAINER,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/opt/kubefly/bin/python", "-c", _PREP, mount_path, str(VOLUME_GROUP)],
                "securityContext": {"runAsUser": 0, "runAsGroup": 0},
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
                "volumeMounts": [{"name": volume_name, "mountPath": mount_path}],
            }
        ],
    }
