import pytest

from kubefly.placement.volumes import (
    CAPACITY_ANNOTATION,
    Host,
    Placed,
    PlacedVolume,
    Refused,
    VolumeRequest,
    capacity_gb,
    check_growth,
    host_of_node,
    place,
    quantity_bytes,
)

HOSTS = [Host("a1", "ams", 100), Host("a2", "ams", 100), Host("i1", "iad", 100)]


def req(name="data", app="web", region="ams", size=10, ns="org"):
    return VolumeRequest(ns, name, app, region, size)


def test_picks_a_host_in_the_region():
    assert place(req(region="iad"), HOSTS, []) == Placed("i1")


def test_volumes_of_one_app_spread_across_hosts():
    placed = [PlacedVolume("org", "v1", "web", "a1", 10)]
    assert place(req(size=10), HOSTS, placed) == Placed("a2")


def test_spreading_counts_only_the_same_app_in_the_same_organisation():
    # a1 has another app's and another organisation's volume: for spreading it is empty,
    # and with more free space a2 wins only on free space.
    placed = [PlacedVolume("org", "x", "other", "a2", 50), PlacedVolume("org2", "y", "web", "a2", 1)]
    assert place(req(), HOSTS, placed) == Placed("a1")


def test_most_free_space_breaks_ties_then_name():
    assert place(req(), HOSTS, [PlacedVolume("o", "x", "db", "a1", 30)]) == Placed("a2")
    assert place(req(), HOSTS, []) == Placed("a1")


def test_capacity_is_respected_and_refusal_names_region_size_and_best_host():
    placed = [PlacedVolume("o", "x", "db", "a1", 95), PlacedVolume("o", "y", "db", "a2", 93)]
    out = place(req(size=10), HOSTS, placed)
    assert isinstance(out, Refused) and out.reason == "InsufficientCapacity"
    assert "region ams" in out.message and "10 GB" in out.message and "7 GB on a2" in out.message


def test_a_volume_fits_exactly():
    assert place(req(size=90), HOSTS, [PlacedVolume("o", "x", "db", "a1", 10), PlacedVolume("o", "y", "db", "a2", 10)]) == Placed("a1")


def test_unknown_region_and_unready_hosts_are_refused():
    assert place(req(region="syd"), HOSTS, []).reason == "NoHostInRegion"
    down = [Host("a1", "ams", 100, schedulable=False)]
    assert place(req(), down, []).reason == "NoHostInRegion"


def test_replacing_own_placement_is_not_double_counted():
    placed = [PlacedVolume("org", "data", "web", "a1", 100)]
    assert place(req(size=100), [Host("a1", "ams", 100)], placed) == Placed("a1")


def test_growth_checks_the_difference_on_its_own_host():
    me = PlacedVolume("org", "data", "web", "a1", 10)
    others = [me, PlacedVolume("o", "x", "db", "a1", 80)]
    assert check_growth(me, 20, HOSTS, others) is None
    refused = check_growth(me, 21, HOSTS, others)
    assert refused.reason == "InsufficientCapacity" and "a1 has 20 GB free" in refused.message
    assert check_growth(PlacedVolume("org", "data", "web", "gone", 1), 2, HOSTS, []).reason == "HostGone"


@pytest.mark.parametrize(
    "q,expected",
    [("100Gi", 100 * 2**30), ("1G", 10**9), ("1536Mi", 1536 * 2**20), ("12345", 12345), ("1.5Gi", int(1.5 * 2**30))],
)
def test_quantities(q, expected):
    assert quantity_bytes(q) == expected


def test_quantity_garbage_raises():
    with pytest.raises(ValueError):
        quantity_bytes("lots")


def node(name="n", region="ams", storage="100Gi", annotations=None, ready="True", unschedulable=False):
    return {
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/region": region}, "annotations": annotations or {}},
        "spec": {"unschedulable": unschedulable},
        "status": {"allocatable": {"ephemeral-storage": storage}, "conditions": [{"type": "Ready", "status": ready}]},
    }


def test_node_capacity_from_allocatable_or_annotation():
    assert capacity_gb(node(storage="200Gi")) == 200
    assert capacity_gb(node(annotations={CAPACITY_ANNOTATION: "7"})) == 7
    assert capacity_gb(node(annotations={CAPACITY_ANNOTATION: "many"})) == 0
    assert capacity_gb({"metadata": {"name": "x"}, "status": {}}) == 0


def test_node_to_host():
    assert host_of_node(node()) == Host("n", "ams", 100, True)
    assert not host_of_node(node(ready="Unknown")).schedulable
    assert not host_of_node(node(unschedulable=True)).schedulable


def test_a_fork_goes_to_another_host_than_its_source_or_is_refused_naming_it():
    fork = VolumeRequest("org", "copy", "web", "ams", 10, avoid_host="a1")
    assert place(fork, HOSTS, []) == Placed("a2")
    only = [Host("a1", "ams", 100), Host("i1", "iad", 100)]
    refused = place(fork, only, [])
    assert isinstance(refused, Refused) and "other than a1" in refused.message and "requireUniqueHost" in refused.message
