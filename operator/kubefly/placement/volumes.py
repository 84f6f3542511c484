"""Where a Volume lives: a pure choice of host from a snapshot of the cluster.

A host's volume capacity is the node annotation `kubefly.dev/volume-capacity-gb`
when an operator sets one, else the node's allocatable ephemeral-storage (the
disk kubelet reports; kubefly's local volumes are directories on that disk).
Free capacity is that minus the sizes of every Volume already pinned to the
host, in every organisation. Among the hosts of the region with room, the one
holding the fewest volumes of the same app wins (Fly places an app's volumes on
separate hardware), then the one with the most free space, then by name, so
the same snapshot always gives the same answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from kubefly.labels import NODE_REGION, PREFIX

CAPACITY_ANNOTATION = f"{PREFIX}/volume-capacity-gb"
GIB = 2**30

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")
_FACTORS = {
    None: 1, "m": 0.001, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


@dataclass(frozen=True)
class Host:
    name: str
    region: str | None
    capacity_gb: int
    schedulable: bool = True


@dataclass(frozen=True)
class PlacedVolume:
    namespace: str
    name: str
    app: str
    host: str
    size_gb: int

    @classmethod
    def of_volume(cls, volume: dict) -> "PlacedVolume | None":
        """A Volume object as placement counts it; None while it has no host."""
        host = (volume.get("status") or {}).get("host")
        if not host:
            return None
        meta, spec = volume["metadata"], volume.get("spec") or {}
        return cls(meta["namespace"], meta["name"], spec.get("app", ""), host, spec.get("sizeGb", 1))


@dataclass(frozen=True)
class VolumeRequest:
    namespace: str
    name: str
    app: str
    region: str
    size_gb: int
    # A fork's source host, with require_unique_host: the copy goes to other hardware.
    avoid_host: str | None = None


@dataclass(frozen=True)
class Placed:
    host: str


@dataclass(frozen=True)
class Refused:
    reason: str  # CamelCase, for a condition
    message: str


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes resource quantity ("100Gi", "5e9" is not used by kubelet) in bytes."""
    match = _QUANTITY.match(quantity.strip())
    if not match:
        raise ValueError(f"not a resource quantity: {quantity!r}")
    return int(float(match.group(1)) * _FACTORS[match.group(2)])


def capacity_gb(node: dict) -> int:
    annotations = node.get("metadata", {}).get("annotations") or {}
    if CAPACITY_ANNOTATION in annotations:
        try:
            return max(0, int(annotations[CAPACITY_ANNOTATION]))
        except ValueError:
            return 0  # an unreadable override must not be taken as "unlimited"
    storage = (node.get("status", {}).get("allocatable") or {}).get("ephemeral-storage")
    return quantity_bytes(storage) // GIB if storage else 0


def host_of_node(node: dict) -> Host:
    meta = node.get("metadata", {})
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in node.get("status", {}).get("conditions") or []
    )
    cordoned = bool(node.get("spec", {}).get("unschedulable"))
    return Host(
        name=meta["name"],
        region=(meta.get("labels") or {}).get(NODE_REGION),
        capacity_gb=capacity_gb(node),
        schedulable=ready and not cordoned,
    )


def free_gb(host: Host, placed: Iterable[PlacedVolume], *, ignore: tuple[str, str] | None = None) -> int:
    used = sum(v.size_gb for v in placed if v.host == host.name and (v.namespace, v.name) != ignore)
    return host.capacity_gb - used


def place(request: VolumeRequest, hosts: Iterable[Host], placed: Iterable[PlacedVolume]) -> Placed | Refused:
    placed = [v for v in placed if (v.namespace, v.name) != (request.namespace, request.name)]
    in_region = [h for h in hosts if h.region == request.region and h.schedulable and h.name != request.avoid_host]
    if not in_region:
        other = f" other than {request.avoid_host} (the source's host; spec.requireUniqueHost)" if request.avoid_host else ""
        return Refused("NoHostInRegion", f"no ready, schedulable host in region {request.region}{other}")
    free = {h.name: free_gb(h, placed) for h in in_region}
    fitting = [h for h in in_region if free[h.name] >= request.size_gb]
    if not fitting:
        best = max(in_region, key=lambda h: (free[h.name], h.name))
        return Refused(
            "InsufficientCapacity",
            f"no host in region {request.region} has {request.size_gb} GB free for a volume "
            f"(most free: {max(free[best.name], 0)} GB on {best.name})",
        )

    def siblings(host: Host) -> int:
        return sum(1 for v in placed if v.host == host.name and v.namespace == request.namespace and v.app == request.app)

    chosen = min(fitting, key=lambda h: (siblings(h), -free[h.name], h.name))
    return Placed(chosen.name)


def check_growth(
    volume: PlacedVolume, new_size_gb: int, hosts: Iterable[Host], placed: Iterable[PlacedVolume]
) -> Refused | None:
    """A volume grows in place on its host; refuse when the host has no room for the difference."""
    host = next((h for h in hosts if h.name == volume.host), None)
    if host is None:
        return Refused("HostGone", f"host {volume.host} no longer exists; the volume cannot be extended there")
    free = free_gb(host, placed, ignore=(volume.namespace, volume.name))
    if free < new_size_gb:
        return Refused(
            "InsufficientCapacity",
            f"host {volume.host} has {max(free, 0)} GB free for this volume, {new_size_gb} GB asked: "
            "fork the volume to a host with room",
        )
    return None
