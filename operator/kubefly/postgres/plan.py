"""What a PostgresCluster becomes: a pure planner over a snapshot of its children.

spec + observed Volumes, Machines, Services and hosts -> the Volumes, Machines,
Services and credentials to create, the Machine specs to roll (one at a time),
the members to remove, and the conditions that say what is waited for.

Members are numbered: member n is Volume `<cluster>-n` + Machine `<cluster>-n`
(repmgr node_id n+1) + headless Service `<cluster>-n`, whose DNS name is the
member's stable address (peers never store pod IPs, which change). A number
goes to a new member only once every object of the member it named is gone; a
retired member's kept Volume brings its own number back (`reusable`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from kubefly import API_VERSION, labels
from kubefly.postgres.pgbackrest import RestoreFrom

CLUSTER_LABEL = f"{labels.PREFIX}/pg-cluster"
MEMBER_LABEL = f"{labels.PREFIX}/pg-member"
ROLE_LABEL = f"{labels.PREFIX}/pg-role"
# Digest of the Machine spec the planner wrote: a defaulted spec read back never matches ours literally.
SPEC_DIGEST = f"{labels.PREFIX}/pg-spec-digest"
# On the kept Volume of a member that left the cluster (deletePolicy keepVolumes): no longer a member,
# and its number goes to no other member while the Volume exists; a re-created member may take it
# back (`reusable`), number and data both.
RETIRED_LABEL = f"{labels.PREFIX}/pg-retired"

PG_PORT = 5432
HEALTH_PORT = 5500
DATA_PATH = "/data"
# Keys of the credentials Secret; the AppSecret the members read uses the member's env names.
SECRET_KEYS = ("username", "password", "repmgr-password", "admin-token")
MEMBER_ENV_SECRETS = {
    "KUBEFLY_PG_SUPERUSER_PASSWORD": "password",
    "KUBEFLY_PG_REPMGR_PASSWORD": "repmgr-password",
    "KUBEFLY_PG_ADMIN_TOKEN": "admin-token",
}
SUPERUSER = "postgres"


@dataclass(frozen=True)
class Cluster:
    namespace: str
    name: str
    uid: str
    spec: Mapping  # camelCase, as stored (defaults applied by the API server)
    generation: int | None = None


@dataclass(frozen=True)
class Member:
    """What exists of member `index`: its Volume and Machine bodies, when present."""

    index: int
    volume: dict | None = None
    machine: dict | None = None

    @property
    def deleting(self) -> bool:
        return any(o is not None and o["metadata"].get("deletionTimestamp") for o in (self.volume, self.machine))

    @property
    def retired(self) -> bool:
        return self.volume is not None and RETIRED_LABEL in (self.volume["metadata"].get("labels") or {})

    @property
    def host(self) -> str | None:
        for obj in (self.machine, self.volume):
            if obj is not None and (obj.get("status") or {}).get("host"):
                return obj["status"]["host"]
        return None

    @property
    def state(self) -> str | None:
        return ((self.machine or {}).get("status") or {}).get("state")


@dataclass(frozen=True)
class Archive:
    """Where the members archive WAL (pgBackRest over HTTPS) and the key they do it with."""

    endpoint: str  # https://host[:port]
    bucket: str
    region: str
    access_key_id: str  # the cluster's own key, scoped to its archive; its secret is in the archive AppSecret
    ca_pem: str | None = None  # the store's CA (the bundled store); None: the system's trust


@dataclass(frozen=True)
class Host:
    name: str
    region: str | None
    schedulable: bool


@dataclass(frozen=True)
class Condition:
    type: str
    ok: bool
    reason: str
    message: str


@dataclass
class Plan:
    create_volumes: list[dict] = field(default_factory=list)
    create_machines: list[dict] = field(default_factory=list)
    # (machine name, desired spec, digest): at most one per pass, so members restart one at a time.
    update_machine: tuple[str, dict, str] | None = None
    grow_volumes: list[tuple[str, int]] = field(default_factory=list)
    adopt: list[tuple[str, str]] = field(default_factory=list)  # (plural, name) missing our ownerReference
    remove_members: list[str] = field(default_factory=list)  # Machine + Service of these
    # Volumes of removed members: kept and labelled retired (deletePolicy keepVolumes), or deleted.
    retire_volumes: list[str] = field(default_factory=list)
    delete_volumes: list[str] = field(default_factory=list)
    # Retired Volumes a re-created member takes back: they lose the retired label before its Machine is made.
    reuse_volumes: list[str] = field(default_factory=list)
    services: list[dict] = field(default_factory=list)
    members: list[str] = field(default_factory=list)  # the member names the cluster is made of after this pass
    conditions: list[Condition] = field(default_factory=list)


def member_name(cluster: str, index: int) -> str:
    return f"{cluster}-{index}"


def member_address(c: Cluster, index: int) -> str:
    # `<svc>.<ns>.svc` resolves through the pod's search path whatever the cluster domain is.
    return f"{member_name(c.name, index)}.{c.namespace}.svc"


def credentials_name(cluster: str) -> str:
    return f"{cluster}-credentials"


def archive_secret_name(cluster: str) -> str:
    return f"{cluster}-archive"


def archive_prefix(namespace: str) -> str:
    """Key prefix of a namespace's archives: a cluster's is <prefix>/<cluster>/<system identifier>."""
    return f"/postgres/{namespace}"


def owner(c: Cluster, *, controller: bool = True) -> dict:
    return {"apiVersion": API_VERSION, "kind": "PostgresCluster", "name": c.name, "uid": c.uid,
            "controller": controller, "blockOwnerDeletion": True}


def owned_by(obj: dict, c: Cluster) -> bool:
    return any(ref.get("uid") == c.uid for ref in obj["metadata"].get("ownerReferences") or [])


def object_meta(c: Cluster, name: str, index: int | None = None) -> dict:
    lbl = {CLUSTER_LABEL: c.name, labels.APP: c.spec["app"], labels.MANAGED_BY: labels.MANAGED_BY_VALUE}
    if index is not None:
        lbl[MEMBER_LABEL] = str(index)
    return {"name": name, "namespace": c.namespace, "labels": lbl, "ownerReferences": [owner(c)]}


# ---- the objects -------------------------------------------------------------


def build_volume(c: Cluster, index: int) -> dict:
    return {
        "apiVersion": API_VERSION, "kind": "Volume", "metadata": object_meta(c, member_name(c.name, index), index),
        "spec": {"app": c.spec["app"], "region": c.spec["region"], "sizeGb": c.spec.get("volumeSizeGb", 10)},
    }


def machine_spec(c: Cluster, index: int, members: Iterable[int], image: str, archive: Archive | None = None,
                 restore: RestoreFrom | None = None) -> dict:
    peers = " ".join(
        f"{member_name(c.name, i)}={member_address(c, i)}:{PG_PORT}:{HEALTH_PORT}" for i in sorted(members) if i != index
    )
    env = {
        "KUBEFLY_PG_NAME": member_name(c.name, index),
        "KUBEFLY_PG_NODE_ID": str(index + 1),  # repmgr node ids start at 1
        "KUBEFLY_PG_REGION": c.spec["region"],
        "KUBEFLY_PG_HOST": member_address(c, index),
        "KUBEFLY_PG_PEERS": peers,
        "KUBEFLY_PG_SYNCHRONOUS": "true" if c.spec.get("synchronous") else "false",
        # Member 0 may initdb, and only when every member is empty (decide.boot_action).
        "KUBEFLY_PG_BOOTSTRAP": "true" if index == 0 else "false",
    }
    secrets = [credentials_name(c.name)]
    if archive is not None:
        env.update({
            "KUBEFLY_PG_CLUSTER": c.name,
            "KUBEFLY_PG_ARCHIVE_ENDPOINT": archive.endpoint,
            "KUBEFLY_PG_ARCHIVE_BUCKET": archive.bucket,
            "KUBEFLY_PG_ARCHIVE_REGION": archive.region or "us-east-1",
            "KUBEFLY_PG_ARCHIVE_PATH": archive_prefix(c.namespace),
            "KUBEFLY_PG_ARCHIVE_ACCESS_KEY_ID": archive.access_key_id,
        })
        if archive.ca_pem:
            env["KUBEFLY_PG_ARCHIVE_CA"] = archive.ca_pem
        secrets.append(archive_secret_name(c.name))
        if restore is not None and index == 0:
            # The bootstrap member's first data is the source's, not initdb's.
            env.update({"KUBEFLY_PG_RESTORE_FROM": restore.cluster, "KUBEFLY_PG_RESTORE_SYSTEM_ID": restore.system_id,
                        "KUBEFLY_PG_RESTORE_TYPE": restore.type})
            if restore.target is not None:
                env["KUBEFLY_PG_RESTORE_TARGET"] = restore.target
            if restore.backup_set is not None:
                env["KUBEFLY_PG_RESTORE_SET"] = restore.backup_set
    return {
        "app": c.spec["app"],
        "region": c.spec["region"],
        "image": image,
        "guest": dict(c.spec.get("guest") or {}),
        "env": env,
        "secrets": secrets,
        # No public ports: 5432 is for the app's own machines over the private network.
        "services": [{"internalPort": PG_PORT, "protocol": "tcp"}],
        "checks": [{"name": "member", "type": "http", "port": HEALTH_PORT, "path": "/health",
                    "intervalSeconds": 5, "timeoutSeconds": 2}],
        "mounts": [{"volume": member_name(c.name, index), "path": DATA_PATH}],
        "restart": {"policy": "always"},
        # The member's fast shutdown on SIGTERM; long enough for a checkpoint.
        "stop": {"signal": "SIGTERM", "timeoutSeconds": 60},
    }


def spec_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_machine(c: Cluster, index: int, members: Iterable[int], image: str, archive: Archive | None = None,
                  restore: RestoreFrom | None = None) -> dict:
    spec = machine_spec(c, index, members, image, archive, restore)
    meta = object_meta(c, member_name(c.name, index), index)
    meta["annotations"] = {SPEC_DIGEST: spec_digest(spec)}
    return {"apiVersion": API_VERSION, "kind": "Machine", "metadata": meta, "spec": spec}


def _service(c: Cluster, name: str, selector: dict, *, headless: bool, index: int | None = None) -> dict:
    spec: dict = {
        "selector": selector,
        "ports": [{"name": "postgres", "port": PG_PORT, "targetPort": PG_PORT, "protocol": "TCP"},
                  {"name": "health", "port": HEALTH_PORT, "targetPort": HEALTH_PORT, "protocol": "TCP"}],
    }
    if headless:
        # Peers must resolve a member while it is still cloning, before it is ready.
        spec.update(clusterIP="None", publishNotReadyAddresses=True)
    return {"apiVersion": "v1", "kind": "Service", "metadata": object_meta(c, name, index), "spec": spec}


def build_services(c: Cluster, members: Iterable[int]) -> list[dict]:
    role = {labels.APP: c.spec["app"], CLUSTER_LABEL: c.name}
    out = [
        _service(c, f"{c.name}-primary", {**role, ROLE_LABEL: "primary"}, headless=False),
        _service(c, f"{c.name}-replicas", {**role, ROLE_LABEL: "standby"}, headless=False),
    ]
    for i in sorted(members):
        out.append(_service(c, member_name(c.name, i), {labels.MACHINE: member_name(c.name, i)}, headless=True, index=i))
    return out


def build_credentials(c: Cluster, values: Mapping[str, str]) -> dict:
    """The credentials Secret; `values` are generated by the caller (this module draws no randomness)."""
    meta = object_meta(c, credentials_name(c.name))
    host = f"{c.name}-primary.{c.namespace}.svc"
    data = {**values, "host": host, "port": str(PG_PORT),
            "uri": f"postgres://{values['username']}:{values['password']}@{host}:{PG_PORT}/postgres"}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta, "stringData": data}


# ---- the plan ----------------------------------------------------------------


def _host_lost_since(m: Member) -> datetime | None:
    for cond in ((m.machine or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "HostReady" and cond.get("status") == "False" and cond.get("reason") == "HostGone":
            return datetime.fromisoformat(cond["lastTransitionTime"].replace("Z", "+00:00"))
    return None


def _healthy(m: Member) -> bool:
    conds = ((m.machine or {}).get("status") or {}).get("conditions") or []
    host_ok = any(c.get("type") == "HostReady" and c.get("status") == "True" for c in conds)
    return m.state == "started" and host_ok


def reusable(members: Iterable[Member], free_hosts: set[str]) -> list[Member]:
    """Retired members whose Volume can come back, lowest number first, at most one per host.

    A Volume is local to its host, so it comes back only where a member may run: its host is
    in `free_hosts` (schedulable, in the cluster's region, hosting no member). Its Machine
    must be gone and the Volume not being deleted. The member keeps its number, so its data
    is a repmgr node the cluster already knows, and rejoins by rewind or clones over.
    """
    out, hosts = [], set()
    for m in sorted(members, key=lambda m: m.index):
        if m.retired and m.machine is None and not m.deleting and m.host in free_hosts and m.host not in hosts:
            out.append(m)
            hosts.add(m.host)
    return out


def plan(
    c: Cluster,
    observed: Iterable[Member],
    hosts: Iterable[Host],
    *,
    image: str,
    primary: str | None,
    now: datetime,
    host_loss_grace_s: float,
    existing_services: Iterable[str] = (),
    archive: Archive | None = None,
    restore: RestoreFrom | None = None,
) -> Plan:
    """`primary`: the member the latest health reports chose (status.py), or None when nobody is known.
    `archive`: where WAL goes; None: nowhere (the members run with archive_mode off).
    `restore`: spec.restore as resolved (restore.py); member 0 starts from it."""
    p = Plan()
    members = {m.index: m for m in observed}
    desired = int(c.spec.get("members", 3))
    region = c.spec["region"]
    keep_volumes = c.spec.get("deletePolicy", "keepVolumes") == "keepVolumes"
    active = {i: m for i, m in members.items() if not m.deleting and not m.retired}
    # A retired member's Machine whose deletion did not go through yet.
    for i, m in sorted(members.items()):
        if m.retired and m.machine is not None and not m.deleting:
            p.remove_members.append(member_name(c.name, i))

    def remove(i: int) -> None:
        """Member i leaves: its Machine and Service go; its Volume only if the policy says so."""
        name = member_name(c.name, i)
        p.remove_members.append(name)
        if members[i].volume is not None:
            (p.retire_volumes if keep_volumes else p.delete_volumes).append(name)

    # Members on a host that is gone for good are replaced, once the cluster runs without them.
    lost = {i for i, m in active.items()
            if (since := _host_lost_since(m)) is not None and (now - since).total_seconds() >= host_loss_grace_s}
    if lost:
        survivors = [m for i, m in active.items() if i not in lost]
        names = ", ".join(member_name(c.name, i) for i in sorted(lost))
        why = None
        if primary is None or primary in {member_name(c.name, i) for i in lost}:
            why = "no primary among the other members yet (repmgr must fail over first)"
        elif not all(_healthy(m) for m in survivors):
            why = "another member is not started on a Ready host"
        if why:
            p.conditions.append(Condition("MembersReplaced", False, "WaitingForHealthyCluster",
                                          f"{names} lost their host; replacement waits: {why}"))
            lost = set()
        else:
            for i in sorted(lost):
                remove(i)
            p.conditions.append(Condition("MembersReplaced", True, "HostGone",
                                          f"{names} lost their host; re-cloned on another host"))
    current = {i: m for i, m in active.items() if i not in lost}

    # Scale down: the highest-numbered members, never the primary.
    if len(current) > desired:
        keep_primary = {i for i in current if member_name(c.name, i) == primary}
        for i in sorted(set(current) - keep_primary, reverse=True)[: len(current) - desired]:
            remove(i)
            del current[i]

    # Scale up (or replace): every member on its own host, all new members or none.
    if len(current) < desired:
        need = desired - len(current)
        region_hosts = {h.name for h in hosts if h.region == region and h.schedulable}
        taken = {m.host for m in current.values() if m.host}
        unplaced = sum(1 for m in current.values() if not m.host)
        room = len(region_hosts - taken) - unplaced
        if room < need:
            p.conditions.append(Condition(
                "HostsAvailable", False, "NotEnoughHosts",
                f"region {region} has {len(region_hosts)} schedulable hosts, {len(region_hosts - taken)} without a member; "
                f"{need} more member(s) need a host each (every member on a distinct host): "
                f"add hosts to {region} or lower spec.members"))
        else:
            p.conditions.append(Condition("HostsAvailable", True, "Enough",
                                          f"region {region} has a distinct host for each of {desired} members"))
            # Kept data first: a retired Volume on a free host comes back under its number.
            for m in reusable(members.values(), region_hosts - taken)[:need]:
                current[m.index] = m
                p.reuse_volumes.append(member_name(c.name, m.index))
                need -= 1
            used = set(members)  # deleting, lost and retired numbers too, until their objects are gone
            fresh = []
            n = 0
            while len(fresh) < need:
                if n not in used:
                    fresh.append(n)
                n += 1
            for i in fresh:
                current[i] = Member(i)
    else:
        p.conditions.append(Condition("HostsAvailable", True, "Enough",
                                      f"region {region} has a distinct host for each of {desired} members"))

    final = sorted(current)
    p.members = [member_name(c.name, i) for i in final]
    size = int(c.spec.get("volumeSizeGb", 10))
    rolls: list[tuple[int, str, dict, str]] = []
    for i in final:
        m = current[i]
        if m.volume is None:
            p.create_volumes.append(build_volume(c, i))
        else:
            if not owned_by(m.volume, c):
                p.adopt.append(("volumes", m.volume["metadata"]["name"]))
            if (m.volume.get("spec") or {}).get("sizeGb", 0) < size:
                p.grow_volumes.append((m.volume["metadata"]["name"], size))
        if m.machine is None:
            p.create_machines.append(build_machine(c, i, final, image, archive, restore))
            continue
        spec = machine_spec(c, i, final, image, archive, restore)
        digest = spec_digest(spec)
        if (m.machine["metadata"].get("annotations") or {}).get(SPEC_DIGEST) != digest:
            # Standbys first, the primary last, so at most one failover-free restart at a time.
            rolls.append((1 if member_name(c.name, i) == primary else 0, m.machine["metadata"]["name"], spec, digest))

    # Roll only while every other member is up: one member down at a time.
    if rolls and not p.create_machines and all(_healthy(current[i]) for i in final if current[i].machine):
        _, name, spec, digest = min(rolls)
        p.update_machine = (name, spec, digest)
    if rolls:
        p.conditions.append(Condition("MembersUpToDate", False, "Rolling",
                                      f"{len(rolls)} member(s) to restart with a new spec, one at a time"))
    else:
        p.conditions.append(Condition("MembersUpToDate", True, "UpToDate", "every member runs the current spec"))

    p.services = build_services(c, final)
    # Per-member Services of members no longer in the cluster.
    wanted = {s["metadata"]["name"] for s in p.services}
    prefix = f"{c.name}-"
    for name in existing_services:
        if name.startswith(prefix) and name[len(prefix):].isdigit() and name not in wanted and name not in p.remove_members:
            p.remove_members.append(name)
    return p
