"""Emptying a host (`kubefly host drain`): which of its Machines move now, which wait, which cannot.

A pure function of the host's Machines, their apps' other Machines and the
region's room. A Machine without a volume moves (kubefly.machines.lifecycle:
stopped on the host, started as a new instance on another host of its region).
An app never loses its last routable Machine to the drain: one Machine of an
app moves at a time, and a Machine whose app has others waits until one of
them is routable. A Machine is asked to move only when the region
has room for it now; else the drain says what is short. A Machine with a
volume is asked the same way and migrates with it (kubefly.volumes.migration:
copied while running, stopped, the delta copied, started on the new host);
the Volume's Migrated condition says why when it cannot. A Postgres standby
migrates the same way. A Postgres primary first hands over: the drain asks
its PostgresCluster for a planned switchover to a ready standby on another
host (spec.switchoverTo), and once it is a standby it migrates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kubefly import labels
from kubefly.conditions import get_condition
from kubefly.placement.machines import Host, Placed, Request, guest_requests, place
from kubefly.volumes.migration import CONDITION as MIGRATED
from kubefly.volumes.migration import Migration

POSTGRES_CLUSTER_LABEL = f"{labels.PREFIX}/pg-cluster"


@dataclass(frozen=True)
class MachineView:
    namespace: str
    name: str
    app: str
    region: str
    host: str | None
    ready: bool  # routable: Ready True
    volume: str | None
    postgres_cluster: str | None
    moving_from: str | None  # labels.MOVE_FROM
    cpu_millis: int
    memory_mib: int
    volume_migration: str | None = None  # its Volume's status.migration, described
    volume_blocked: str | None = None  # why its Volume's requested migration is not under way
    postgres_primary: bool = False  # its PostgresCluster's status.primary
    postgres_switchover: str | None = None  # the cluster's spec.switchoverTo while not yet its primary

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def app_key(self) -> tuple[str, str]:
        return self.namespace, self.app

    @classmethod
    def of(cls, machine: dict, volumes: dict[tuple[str, str], dict] | None = None,
           clusters: dict[tuple[str, str], dict] | None = None) -> "MachineView":
        """`volumes`, `clusters`: (namespace, name) -> Volume, PostgresCluster: migrations and primaries."""
        meta, spec, status = machine["metadata"], machine.get("spec") or {}, machine.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        mounts = spec.get("mounts") or []
        cpu, mem = guest_requests(spec.get("guest"))
        volume = mounts[0]["volume"] if mounts else None
        migration, blocked = None, None
        if volume and volumes and (v := volumes.get((meta["namespace"], volume))) is not None:
            migration, blocked = _migration_of(v)
        pg = (meta.get("labels") or {}).get(POSTGRES_CLUSTER_LABEL)
        cluster = (clusters or {}).get((meta["namespace"], pg)) if pg else None
        primary = ((cluster or {}).get("status") or {}).get("primary")
        wanted = ((cluster or {}).get("spec") or {}).get("switchoverTo")
        return cls(namespace=meta["namespace"], name=meta["name"], app=spec.get("app", ""),
                   region=spec.get("region", ""), host=status.get("host"), ready=ready, volume=volume,
                   postgres_cluster=pg, moving_from=(meta.get("annotations") or {}).get(labels.MOVE_FROM),
                   cpu_millis=cpu, memory_mib=mem, volume_migration=migration, volume_blocked=blocked,
                   postgres_primary=primary == meta["name"],
                   postgres_switchover=wanted if wanted and wanted != primary else None)


def _migration_of(volume: dict) -> tuple[str | None, str | None]:
    """(what the Volume's migration is doing, why a requested one is not under way)."""
    status = volume.get("status") or {}
    if (m := Migration.of(status)) is not None:
        return m.describe(), None
    asked = (volume["metadata"].get("annotations") or {}).get(labels.MIGRATE_FROM)
    cond = get_condition(status.get("conditions"), MIGRATED)
    if asked and cond and cond.get("status") == "False":
        return None, cond.get("message")
    return None, None


@dataclass(frozen=True)
class Step:
    machine: tuple[str, str]
    state: Literal["move", "switchover", "moving", "waiting", "blocked"]
    reason: str
    message: str
    switchover_to: str | None = None  # state switchover: the standby to make the primary


@dataclass
class DrainPlan:
    host: str
    steps: list[Step] = field(default_factory=list)

    def of(self, state: str) -> list[Step]:
        return [s for s in self.steps if s.state == state]

    @property
    def done(self) -> bool:
        """Nothing of the drain is left on the host (moves under way count until the new instance is routable)."""
        return not self.steps

    @property
    def stuck(self) -> bool:
        """Only blocked steps remain: waiting longer changes nothing until the user acts."""
        return bool(self.steps) and all(s.state == "blocked" for s in self.steps)

    def summary(self) -> dict:
        """The Node annotation's value (labels.DRAIN), without the time (the caller stamps it)."""
        counts = {state: len(self.of(state)) for state in ("move", "switchover", "moving", "waiting", "blocked")}
        state = "drained" if self.done else "blocked" if self.stuck else "draining"
        return {"state": state, "machinesLeft": len(self.steps), **counts,
                "blocked": [f"{ns}/{name}: {s.message}" for s in self.of("blocked") for ns, name in [s.machine]][:20]}


def _primary(m: MachineView, host: str, members: list[MachineView]) -> Step:
    """The primary leaves only as a standby: a switchover to a ready member elsewhere comes first."""
    c = m.postgres_cluster
    if m.postgres_switchover:
        return Step(m.key, "moving", "Switchover", f"primary of PostgresCluster {c}: switching over to "
                                                   f"{m.postgres_switchover} before it moves")
    standbys = sorted(o.name for o in members if o.postgres_cluster == c and o.key != m.key and o.ready
                      and o.host and o.host != host)
    if not standbys:
        return Step(m.key, "blocked", "NoStandbyElsewhere",
                    f"primary of PostgresCluster {c}: no ready standby on another host to hand over to; "
                    f"it moves once one is (add a member, or wait for one to be ready)")
    return Step(m.key, "switchover", "Switchover", f"primary of PostgresCluster {c}: asking for a planned "
                                                   f"switchover to {standbys[0]}", switchover_to=standbys[0])


def plan(host: str, machines: list[MachineView], hosts: list[Host], placed: list[Placed]) -> DrainPlan:
    """The next round of a drain of `host`: every Machine on it (or moving off it) gets one step."""
    out = DrainPlan(host)
    by_app: dict[tuple[str, str], list[MachineView]] = {}
    for m in machines:
        by_app.setdefault(m.app_key, []).append(m)
    # A move is under way until its new instance is routable on another host.
    in_flight = {m.app_key for m in machines if m.moving_from == host and (m.host == host or not m.ready)}
    in_flight |= {m.app_key for m in machines if m.postgres_switchover}  # a cluster hands over before any member moves
    reserved = list(placed)
    for m in sorted(machines, key=lambda m: m.key):
        if m.moving_from == host and m.host != host and not m.ready:
            where = f"on host {m.host}" if m.host else "waiting for a host"
            out.steps.append(Step(m.key, "moving", "Starting", f"moved off {host}: starting {where}"))
            continue
        if m.host != host:
            continue
        if m.postgres_cluster and m.postgres_primary and m.moving_from != host:
            out.steps.append(step := _primary(m, host, by_app[m.app_key]))
            if step.state != "blocked":
                in_flight.add(m.app_key)
            continue
        if m.moving_from == host and m.volume:
            if m.volume_blocked:
                out.steps.append(Step(m.key, "blocked", "MigrationBlocked", f"volume {m.volume}: {m.volume_blocked}"))
            else:
                out.steps.append(Step(m.key, "moving", "Migrating",
                                      f"with volume {m.volume}: {m.volume_migration or 'migration requested'}"))
            continue
        if m.moving_from == host:
            out.steps.append(Step(m.key, "moving", "Stopping", f"stopping on host {host}"))
            continue
        others = [o for o in by_app[m.app_key] if o.key != m.key]
        if m.app_key in in_flight:
            out.steps.append(Step(m.key, "waiting", "OneAtATime",
                                  f"app {m.app} moves one machine at a time: waiting for the one under way to be routable"))
            continue
        # Another routable machine of the app serves while this one moves (one at a time, above).
        if m.ready and others and not any(o.ready for o in others):
            out.steps.append(Step(m.key, "waiting", "LastRoutable",
                                  f"app {m.app} has no other routable machine: waiting for one, so the app is never "
                                  f"without one"))
            continue
        decision = place(Request(m.key, f"{m.namespace}/{m.app}", m.region, m.cpu_millis, m.memory_mib, avoid_host=host),
                         hosts, reserved)
        if not decision.ok:
            out.steps.append(Step(m.key, "blocked", decision.reason, decision.message))
            continue
        # Its room elsewhere is taken for the rest of this round, as the placement will take it.
        reserved.append(Placed(m.key, f"{m.namespace}/{m.app}", decision.host, m.cpu_millis, m.memory_mib))
        in_flight.add(m.app_key)
        out.steps.append(Step(m.key, "move", "Placed", f"migrating with volume {m.volume}" if m.volume
                              else f"moving to host {decision.host}"))
    return out
