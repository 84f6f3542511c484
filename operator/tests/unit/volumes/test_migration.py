"""Choosing where a Volume and its Machine migrate to, and the migration record it keeps."""

from datetime import datetime, timedelta, timezone

from kubefly.placement import machines as mp
from kubefly.placement import volumes as vp
from kubefly.volumes.migration import Migration, choose_target, downtime_s, stop_overdue

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=timezone.utc)
VOLUME = vp.VolumeRequest("o", "data", "web", "ams", 10)
MACHINE = mp.Request(("o", "m1"), "o/web", "ams", 62, 512)


def vhosts(*names, capacity=100):
    return [vp.Host(n, "ams", capacity) for n in names]


def mhosts(*names, mem=1024):
    return [mp.Host(n, "ams", 4000, mem, 110) for n in names]


def pick(**kw):
    args = dict(volume=VOLUME, source="a1", volume_hosts=vhosts("a1", "a2", "a3"),
                placed_volumes=[vp.PlacedVolume("o", "data", "web", "a1", 10)], machine=MACHINE,
                machine_hosts=mhosts("a1", "a2", "a3"), placed_machines=[mp.Placed(("o", "m1"), "o/web", "a1", 62, 512)])
    return choose_target(**{**args, **kw})


def test_the_target_is_another_host_with_disk_for_the_volume_and_room_for_its_machine():
    assert pick().host in ("a2", "a3")
    full_disk = [vp.PlacedVolume("o", "big", "api", "a2", 95)]
    assert pick(placed_volumes=full_disk).host == "a3"
    busy = [mp.Placed(("o", "x"), "o/api", "a3", 62, 900)]
    no_disk_no_room = pick(placed_volumes=full_disk, placed_machines=busy)
    assert no_disk_no_room.host is None and no_disk_no_room.reason == "InsufficientCapacity"
    everywhere_busy = pick(placed_machines=busy + [mp.Placed(("o", "y"), "o/api", "a2", 62, 900)])
    assert everywhere_busy.host is None and "machine m1 cannot move with its volume" in everywhere_busy.message
    assert "memory" in everywhere_busy.message


def test_a_volume_without_a_machine_needs_only_disk_and_a_wanted_host_narrows_the_choice():
    assert pick(machine=None, volume_hosts=vhosts("a1", "a2")).host == "a2"
    assert pick(wanted="a3").host == "a3"
    assert pick(wanted="a1").reason == "NoSuchHost"


def test_no_other_host_in_the_region_is_refused_with_the_reason():
    refused = pick(volume_hosts=vhosts("a1"), machine_hosts=mhosts("a1"))
    assert refused.host is None and refused.reason == "NoOtherHost" and "add a host" in refused.message
    cordoned = pick(volume_hosts=[vp.Host("a1", "ams", 100), vp.Host("a2", "ams", 100, schedulable=False)],
                    machine=None)
    assert cordoned.host is None and "ams" in cordoned.message


def test_the_record_round_trips_through_status_and_counts_downtime_from_the_stop():
    m = Migration(source="a1", target="a2", phase="Copying", started_at=T0)
    stopped = m.at("Stopping", first_copy="abc", stopped_at=T0 + timedelta(seconds=30, milliseconds=250))
    back = Migration.of({"migration": stopped.status()})
    assert back == stopped
    assert downtime_s(back, T0 + timedelta(seconds=34)) == 3.75
    assert not stop_overdue(back, T0 + timedelta(seconds=60)) and stop_overdue(back, T0 + timedelta(seconds=200))
    assert m.snapshot_name("data", 1) != m.snapshot_name("data", 2)
    assert Migration.of({}) is None
