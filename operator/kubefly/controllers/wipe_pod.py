"""The one-shot pod that removes a Volume's directory on a host, run and judged for the Volume
controller (a deleted Volume) and the migration (the copy a move leaves behind)."""

from __future__ import annotations

from datetime import datetime, timezone

from kubefly.controllers.kubeapi import core_path, kube
from kubefly.volumes import wipe


async def run(*, home: str, meta: dict, host: str, path: str, image: str,
              name: str | None = None) -> tuple[wipe.Verdict, str, dict | None]:
    """Create the wipe pod (or find the one an earlier pass made) and judge it.

    Returns the verdict, the pod's API path (the caller deletes it once it is done with it) and
    the host's Node (None when the host is gone). `path` must have passed wipe.relative_dir."""
    wanted = wipe.build_pod(home_namespace=home, namespace=meta["namespace"], volume=meta["name"], uid=meta["uid"],
                            host=host, path=path, image=image, name=name)
    pod = await kube().create_or_get(core_path(home, "pods"), wanted)
    node = await kube().get(core_path(None, "nodes", host), missing_ok=True)
    verdict = wipe.verdict(pod=pod or wanted, node=node, path=path, now=datetime.now(timezone.utc))
    return verdict, core_path(home, "pods", wanted["metadata"]["name"]), node
