"""Where a new Machine runs: a pure choice over a snapshot of the hosts.

A host fits when it is in the machine's region, Ready, not cordoned, and its
allocatable minus the guests already placed there leaves room for this guest.
Among the hosts that fit, the one with the fewest machines of the same app
wins (spread), then the one with the most free memory. A machine that mounts a
volume may only go to the volume's host. The answer is a host or a refusal
whose reason and message say precisely what is short, and where.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from kubefly.conditions import is_ready
from kubefly.labels import NODE_REGION

# Fly's shared vCPU is a 1/16 slice of a core; a performance vCPU is a whole one.
SHARED_CPU_MILLIS = 1000 // 16


def cpu_millis(q: str) -> int:
    """A Kubernetes CPU quantity ("2", "1500m") in millicores."""
    q = str(q)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def memory_mib(q: str) -> int:
    """A Kubernetes memory quantity ("8Gi", "512Mi", bytes) in MiB."""
    q = str(q)
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024, "k": 1000 / 2**20, "M": 10**6 / 2**20, "G": 10**9 / 2**20}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return int(float(q[: -len(suffix)]) * factor)
    return int(int(q) / 2**20)


@dataclass(frozen=True)
class Host:
    name: str
    region: str | None
    cpu_millis: int
    memory_mib: int
    pods: int
    ready: bool = True
    cordoned: bool = False

    @classmethod
    def of_node(cls, node: dict) -> "Host":
        """A Node as placement sees it: cordoned when unschedulable or tainted by anyone but Kubernetes itself."""
        meta, spec, status = node["metadata"], node.get("spec") or {}, node.get("status") or {}
        alloc = status.get("allocatable") or {}
        tainted = any(t.get("effect") in ("NoSchedule", "NoExecute") and not t.get("key", "").startswith("node.kubernetes.io/")
                      for t in spec.get("taints") or [])
        return cls(name=meta["name"], region=(meta.get("labels") or {}).get(NODE_REGION),
                   cpu_millis=cpu_millis(alloc.get("cpu", "0")), memory_mib=memory_mib(alloc.get("memory", "0")),
                   pods=int(alloc.get("pods", "0") or 0), ready=is_ready(node),
                   cordoned=bool(spec.get("unschedulable")) or tainted)


@dataclass(frozen=True)
class Placed:
    """A machine that already holds room on a host (started or not: its room is reserved)."""

    key: tuple[str, str]  # (namespace, name)
    app: str  # namespace-qualified: "<namespace>/<app>"
    host: str
    cpu_millis: int
    memory_mib: int

    @classmethod
    def of_machine(cls, machine: dict) -> "Placed | None":
        """The room a Machine holds: any placed Machine but a failed one."""
        meta, spec, status = machine["metadata"], machine.get("spec") or {}, machine.get("status") or {}
        if not status.get("host") or status.get("state") == "failed":
            return None
        cpu, mem = guest_requests(spec.get("guest"))
        return cls((meta["namespace"], meta["name"]), f"{meta['namespace']}/{spec.get('app')}", status["host"], cpu, mem)


@dataclass(frozen=True)
class Request:
    key: tuple[str, str]
    app: str  # namespace-qualified, as in Placed
    region: str
    cpu_millis: int
    memory_mib: int
    volume: str | None = None  # name of the mounted volume, if any
    volume_host: str | None = None
    avoid_host: str | None = None  # the host a moving machine leaves (a drain)


@dataclass(frozen=True)
class Decision:
    host: str | None
    reason: str
    message: str

    @property
    def ok(self) -> bool:
        return self.host is not None


def guest_requests(guest: dict | None) -> tuple[int, int]:
    """(cpu millicores, memory MiB) a guest reserves; `guest` is the spec's camelCase dict."""
    guest = guest or {}
    cpus = int(guest.get("cpus", 1))
    per_cpu = 1000 if guest.get("cpuKind", "shared") == "performance" else SHARED_CPU_MILLIS
    return cpus * per_cpu, int(guest.get("memoryMb", 256))


def place(request: Request, hosts: Iterable[Host], placed: Iterable[Placed], closed_regions: Iterable[str] = ()) -> Decision:
    hosts = list(hosts)
    if request.region in set(closed_regions):
        return Decision(None, "RegionClosed", f"region {request.region} is closed to new machines; choose another region")
    in_region = [h for h in hosts if h.region == request.region]
    if not in_region:
        known = sorted({h.region for h in hosts if h.region})
        return Decision(None, "NoHostsInRegion", f"no host is in region {request.region}; regions with hosts: {', '.join(known) or 'none'}")
    if request.volume_host is not None:
        in_region = [h for h in in_region if h.name == request.volume_host]
        if not in_region:
            return Decision(
                None, "VolumeHostGone",
                f"volume {request.volume}'s host {request.volume_host} is not a host of region {request.region} any more",
            )

    if request.avoid_host is not None:
        in_region = [h for h in in_region if h.name != request.avoid_host]
        if not in_region:
            return Decision(None, "NoOtherHost", f"region {request.region} has no host but {request.avoid_host}, "
                                                 f"which the machine is leaving: add a host to the region")

    used_cpu: Counter[str] = Counter()
    used_mem: Counter[str] = Counter()
    used_pods: Counter[str] = Counter()
    same_app: Counter[str] = Counter()
    for p in placed:
        if p.key == request.key:
            continue
        used_cpu[p.host] += p.cpu_millis
        used_mem[p.host] += p.memory_mib
        used_pods[p.host] += 1
        if p.app == request.app:
            same_app[p.host] += 1

    usable = [h for h in in_region if h.ready and not h.cordoned]
    if not usable:
        states = ", ".join(f"{h.name} {'cordoned' if h.cordoned else 'NotReady'}" for h in in_region)
        where = f"volume {request.volume}'s host" if request.volume_host else f"no host in region {request.region}"
        return Decision(None, "HostUnavailable", f"{where} accepts machines now: {states}")

    def free(h: Host) -> tuple[int, int, int]:
        return h.cpu_millis - used_cpu[h.name], h.memory_mib - used_mem[h.name], h.pods - used_pods[h.name]

    fits = [h for h in usable if all(f >= need for f, need in zip(free(h), (request.cpu_millis, request.memory_mib, 1)))]
    if fits:
        best = min(fits, key=lambda h: (same_app[h.name], -free(h)[1], -free(h)[0], h.name))
        return Decision(best.name, "Placed", f"placed on {best.name} in region {request.region}")

    # Name what is short on the host that came closest, so the user can size down or go elsewhere.
    closest = max(usable, key=lambda h: (free(h)[1], free(h)[0]))
    cpu, mem, pods = free(closest)
    short = []
    if mem < request.memory_mib:
        short.append(f"memory: {max(mem, 0)} MiB free, {request.memory_mib} MiB needed")
    if cpu < request.cpu_millis:
        short.append(f"cpu: {max(cpu, 0)}m free, {request.cpu_millis}m needed")
    if pods < 1:
        short.append("pods: host is at its pod limit")
    scope = (
        f"volume {request.volume}'s host {closest.name}"
        if request.volume_host
        else f"{len(usable)} usable host(s) in region {request.region}; closest {closest.name}"
    )
    return Decision(None, "InsufficientCapacity", f"no room in region {request.region} ({scope}): {'; '.join(short)}")
