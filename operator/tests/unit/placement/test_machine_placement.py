"""The pure placement planner: region, room, spread, volume host, cordons, closed regions."""

from kubefly.placement.machines import Host, Placed, Request, guest_requests, place


def host(name, region="ams", cpu=4000, mem=1024, pods=110, **kw):
    return Host(name, region, cpu, mem, pods, **kw)


def req(name="m1", app="o/web", region="ams", cpu=62, mem=256, **kw):
    return Request(("o", name), app, region, cpu, mem, **kw)


def test_guest_requests_shared_is_a_sixteenth_performance_a_core():
    assert guest_requests({}) == (62, 256)
    assert guest_requests({"cpuKind": "performance", "cpus": 2, "memoryMb": 4096}) == (2000, 4096)


def test_picks_a_host_in_the_region_with_room():
    d = place(req(), [host("a1"), host("i1", region="iad")], [])
    assert d.ok and d.host == "a1"


def test_spreads_machines_of_one_app_across_hosts():
    placed = [Placed(("o", "m0"), "o/web", "a1", 62, 256)]
    assert place(req(), [host("a1"), host("a2", mem=512)], placed).host == "a2"
    # Another app's machine does not count towards the spread: most free memory wins.
    other = [Placed(("o", "x"), "o/api", "a1", 62, 256)]
    assert place(req(), [host("a1", mem=4096), host("a2", mem=512)], other).host == "a1"


def test_room_is_allocatable_minus_placed_and_refusal_names_region_and_shortage():
    placed = [Placed(("o", f"m{i}"), "o/web", "a1", 62, 256) for i in range(10, 14)]
    d = place(req(), [host("a1")], placed)
    assert not d.ok and d.reason == "InsufficientCapacity"
    assert "region ams" in d.message and "memory: 0 MiB free, 256 MiB needed" in d.message
    d = place(req(cpu=8000, mem=256), [host("a1")], [])
    assert d.reason == "InsufficientCapacity" and "cpu: 4000m free, 8000m needed" in d.message


def test_a_machine_is_not_counted_against_itself():
    placed = [Placed(("o", "m1"), "o/web", "a1", 62, 1024)]
    assert place(req(), [host("a1")], placed).host == "a1"


def test_volume_pins_the_host():
    d = place(req(volume="data", volume_host="a2"), [host("a1", mem=9999), host("a2")], [])
    assert d.host == "a2"
    d = place(req(volume="data", volume_host="a2"), [host("a1"), host("a2", mem=128)], [])
    assert d.reason == "InsufficientCapacity" and "volume data's host a2" in d.message
    d = place(req(volume="data", volume_host="gone"), [host("a1")], [])
    assert d.reason == "VolumeHostGone"


def test_cordoned_and_not_ready_hosts_are_skipped():
    hosts = [host("a1", cordoned=True), host("a2", ready=False), host("a3", mem=256)]
    assert place(req(), hosts, []).host == "a3"
    d = place(req(), hosts[:2], [])
    assert d.reason == "HostUnavailable" and "a1 cordoned" in d.message and "a2 NotReady" in d.message


def test_closed_and_unknown_regions_are_refused():
    assert place(req(), [host("a1")], [], closed_regions={"ams"}).reason == "RegionClosed"
    d = place(req(region="nrt"), [host("a1"), host("i1", region="iad")], [])
    assert d.reason == "NoHostsInRegion" and "nrt" in d.message and "ams, iad" in d.message


def test_pod_limit_counts():
    d = place(req(), [host("a1", pods=1)], [Placed(("o", "x"), "o/api", "a1", 0, 0)])
    assert d.reason == "InsufficientCapacity" and "pod limit" in d.message


def test_a_moving_machine_goes_anywhere_in_its_region_but_the_host_it_leaves():
    hosts = [host("a1", mem=4096), host("a2")]
    assert place(req(avoid_host="a1"), hosts, []).host == "a2"
    d = place(req(avoid_host="a1"), [host("a1"), host("i1", region="iad")], [])
    assert not d.ok and d.reason == "NoOtherHost" and "but a1" in d.message
