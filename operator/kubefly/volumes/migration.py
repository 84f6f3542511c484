"""Moving a Volume and its Machine to another host: the phases and the choice of host.

A migration copies while the machine runs, stops it, copies what changed, and
moves the claim to the new host, where the Machine starts a new instance under
the same name (kubefly.machines.lifecycle follows the Volume's host):

  Copying    a Snapshot of the running volume, restored whole on the target
  Stopping   the Machine stops (it sees the phase on the Volume)
  Syncing    a second Snapshot, now of a stopped machine, restored on the target as the
             difference from the first (kubefly.volumes.resticjob restore --since)
  Switching  claim and PV deleted and made again, pinned to the target
  Cleaning   the source's directory wiped; the Machine starts on the target meanwhile
  Aborting   a copy failed before the switch: the target's partial copy is wiped and
             the Machine starts again on the source, whose data was only ever read

Until Switching the source directory is the truth and is never written, so
any failure before it loses nothing. The copies go through the object store
(the platform's one place for them, and restic's delta is what the downtime
waits on), as Snapshots the user can see; the second one stays as the copy
the migration moved.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone

from kubefly.conditions import parse_rfc3339, rfc3339
from kubefly.placement import machines as machine_placement
from kubefly.placement import volumes as volume_placement

CONDITION = "Migrated"
# The machine may not run while its data is between hosts.
MACHINE_STOPPED = ("Stopping", "Syncing", "Switching")
STOP_WAIT_S = 120


def precise(t: datetime) -> str:
    """RFC 3339 with milliseconds: downtime is counted in them."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Migration:
    """status.migration, as the controller reads and writes it."""

    source: str
    target: str
    phase: str
    started_at: datetime
    stopped_at: datetime | None = None  # when the machine was asked to stop: downtime counts from here
    first_copy: str | None = None
    final_copy: str | None = None
    reason: str | None = None
    source_path: str | None = None  # the directory on the source (a Volume of the layout before uids has another)

    @classmethod
    def of(cls, status: dict) -> "Migration | None":
        m = status.get("migration")
        if not m or not m.get("phase"):
            return None
        return cls(source=m["source"], target=m["target"], phase=m["phase"],
                   started_at=parse_rfc3339(m["startedAt"]), stopped_at=parse_rfc3339(m.get("stoppedAt")),
                   first_copy=m.get("firstCopy"), final_copy=m.get("finalCopy"), reason=m.get("reason"),
                   source_path=m.get("sourcePath"))

    def status(self) -> dict:
        return {"source": self.source, "target": self.target, "phase": self.phase, "startedAt": rfc3339(self.started_at),
                "stoppedAt": precise(self.stopped_at) if self.stopped_at else None, "firstCopy": self.first_copy,
                "finalCopy": self.final_copy, "reason": self.reason, "sourcePath": self.source_path}

    def at(self, phase: str, **changes) -> "Migration":
        return replace(self, phase=phase, **changes)

    def snapshot_name(self, volume: str, copy: int) -> str:
        """One name per migration and pass: a retried step finds its Snapshot."""
        return f"{volume[:30]}-migrate-{self.started_at.strftime('%Y%m%d%H%M%S')}-{copy}"

    def restore_pod_name(self, volume_uid: str, copy: int) -> str:
        return f"volume-migrate-{volume_uid}-{copy}"

    def describe(self) -> str:
        return {
            "Copying": f"copying to host {self.target} while the machine runs",
            "Stopping": "stopping the machine for the last copy",
            "Syncing": f"copying what changed to host {self.target} (machine stopped)",
            "Switching": f"moving the claim to host {self.target}",
            "Cleaning": f"on host {self.target}; wiping the old copy on host {self.source}",
            "Aborting": f"aborted ({self.reason}); wiping the partial copy on host {self.target}",
        }.get(self.phase, self.phase)


@dataclass(frozen=True)
class Target:
    host: str | None
    reason: str
    message: str


def choose_target(*, volume: volume_placement.VolumeRequest, source: str, volume_hosts: list[volume_placement.Host],
                  placed_volumes: list[volume_placement.PlacedVolume], machine: machine_placement.Request | None,
                  machine_hosts: list[machine_placement.Host], placed_machines: list[machine_placement.Placed],
                  wanted: str | None = None) -> Target:
    """A host of the region, not `source`, with disk room for the volume and, when a machine mounts it,
    cpu and memory for that machine; `wanted` narrows the choice to one host."""
    candidates = [h for h in volume_hosts if h.name != source and h.region == volume.region and h.schedulable
                  and (wanted is None or h.name == wanted)]
    if wanted is not None and not candidates:
        return Target(None, "NoSuchHost", f"host {wanted} is not a ready, schedulable host of region {volume.region} "
                                          f"other than {source}")
    if not candidates:
        return Target(None, "NoOtherHost", f"region {volume.region} has no ready, schedulable host but {source}: "
                                           f"add a host to the region (or uncordon one)")
    if machine is not None:
        leaving = replace(machine, avoid_host=source)
        fits = {h.name for h in candidates
                if machine_placement.place(replace(leaving, volume_host=h.name), machine_hosts, placed_machines).ok}
        if not fits:
            why = machine_placement.place(leaving, [h for h in machine_hosts if h.name in {c.name for c in candidates}],
                                          placed_machines)
            message = why.message if not why.ok else f"no host other than {source} takes it"
            return Target(None, why.reason if not why.ok else "NoRoom",
                          f"machine {machine.key[1]} cannot move with its volume: {message}")
        candidates = [h for h in candidates if h.name in fits]
    others = [p for p in placed_volumes if (p.namespace, p.name) != (volume.namespace, volume.name)]
    decision = volume_placement.place(replace(volume, avoid_host=source), candidates, others)
    if isinstance(decision, volume_placement.Refused):
        return Target(None, decision.reason, decision.message)
    return Target(decision.host, "Chosen", f"moving to host {decision.host}")


def downtime_s(m: Migration, switched_at: datetime) -> float | None:
    return round((switched_at - m.stopped_at).total_seconds(), 3) if m.stopped_at else None


def stop_overdue(m: Migration, now: datetime) -> bool:
    """The machine did not stop within STOP_WAIT_S: abort rather than hold its data between hosts."""
    return m.phase == "Stopping" and m.stopped_at is not None and (now - m.stopped_at).total_seconds() > STOP_WAIT_S
