"""Routing decisions: which instance first, which never."""

from __future__ import annotations

import random

import pytest

from kubefly.instances import CheckStatus, Instance, InstanceState, Service
from kubefly.proxy import routing


def inst(mid, *, region="ams", host="h1", soft=4, hard=8, state="started", check="passing", autostart=True,
         autostop="stop", minimum=0, address="10.0.0.1"):
    return Instance(
        org="o", app="web", machine_id=mid, instance_id=mid + "-i", region=region, host=host, address=address,
        state=InstanceState(state), check_status=CheckStatus(check),
        services=[Service(internal_port=8080, ports=[80], http_ports=[80], soft_limit=soft, hard_limit=hard, autostart=autostart,
                          autostop=autostop, min_machines_running=minimum)],
    )


RTT = {"h1": 0.0, "h2": 0.001, "far": 0.080, "farther": 0.150}


def order(instances, loads=None, region="ams", seed=1, **kw):
    loads = loads or {}
    return [c.instance.machine_id for c in routing.order(
        routing.candidates(instances), region=region, load=lambda c: loads.get(c.instance.machine_id, 0),
        rtt=RTT.get, rng=random.Random(seed), **kw)]


def test_bands():
    svc = Service(internal_port=1, soft_limit=2, hard_limit=4)
    assert [routing.band(n, svc) for n in range(6)] == [0, 0, 1, 1, 2, 2]
    assert routing.band(10**6, Service(internal_port=1, soft_limit=2)) is routing.Band.soft  # no hard limit: never full


def with_services(mid, *services, state="started"):
    return Instance(org="o", app="db", machine_id=mid, instance_id=mid + "-i", region="ams", host="h1",
                    address="10.0.0.1", state=InstanceState(state), check_status=CheckStatus.passing,
                    services=list(services))


def test_only_a_service_with_a_public_http_port_is_routable():
    private = Service(internal_port=5432)  # a Postgres member: no public port
    tls_only = Service(internal_port=6000, ports=[6000])  # public, but not for the HTTP proxy
    http = Service(internal_port=8080, ports=[443], http_ports=[443])
    web = Service(internal_port=8081, ports=[80], http_ports=[80])
    assert routing.http_service(with_services("m", private)) is None
    assert routing.http_service(with_services("m", private, tls_only)) is None
    assert routing.http_service(with_services("m", private, http)) is http  # never the first one by default
    assert routing.http_service(with_services("m", http, web)) is web  # port 80 first
    assert routing.candidates([with_services("pg", private), with_services("app", private, http)])[0].key == ("o", "app")
    assert len(routing.candidates([with_services("pg", private)])) == 0
    # A stopped private machine is never autostarted by a request either.
    assert routing.autostart_candidate([with_services("pg", private, state="stopped")], region="ams", rtt=RTT.get) is None


def test_least_loaded_first_then_closest():
    got = order([inst("a", host="h2"), inst("b"), inst("c")], {"a": 1, "b": 2, "c": 1})
    assert got == ["c", "a", "b"]  # c and a tie on load; c is on this host (closer)


def test_full_and_unroutable_are_left_out():
    instances = [inst("full"), inst("sick", check="failing"), inst("stopped", state="stopped"),
                 inst("noaddr", address=""), inst("ok")]
    assert order(instances, {"full": 8}) == ["ok"]


def test_soft_band_only_after_every_instance_under_soft():
    assert order([inst("busy"), inst("idle")], {"busy": 4, "idle": 3}) == ["idle", "busy"]
    # Between soft and hard the instance is still used when all are over soft.
    assert order([inst("busy"), inst("busier")], {"busy": 4, "busier": 6}) == ["busy", "busier"]


def test_cross_region_only_after_every_local_instance():
    instances = [inst("local-soft"), inst("remote-idle", region="iad", host="far")]
    # Soft limits never push traffic across regions: the local instance over soft goes first.
    assert order(instances, {"local-soft": 7}) == ["local-soft", "remote-idle"]
    # A full local instance does.
    assert order(instances, {"local-soft": 8}) == ["remote-idle"]


def test_remote_regions_closest_first():
    instances = [inst("syd", region="syd", host="farther"), inst("iad", region="iad", host="far")]
    assert order(instances, {"iad": 3}) == ["iad", "syd"]


def test_prefer_region_makes_that_region_local():
    instances = [inst("here"), inst("there", region="iad", host="far")]
    assert order(instances, region="iad") == ["there", "here"]


def test_ties_are_broken_at_random():
    firsts = {order([inst("a"), inst("b"), inst("c")], seed=s)[0] for s in range(50)}
    assert firsts == {"a", "b", "c"}


def test_exclude_removes_instances_that_said_full():
    assert order([inst("a"), inst("b")], exclude=frozenset({("o", "a")})) == ["b"]


def test_leastload_ranks_a_sample_then_the_rest():
    instances = [inst(f"m{i:02}") for i in range(40)]
    loads = {f"m{i:02}": 1 + i % 3 for i in range(40)}
    loads["m17"] = 0
    got = order(instances, loads, strategy=routing.LEASTLOAD, sample=5)
    assert sorted(got) == sorted(i.machine_id for i in instances)  # every instance is still reachable on retry
    head = got[:5]
    assert [loads[m] for m in head] == sorted(loads[m] for m in head)
    hits = sum(order(instances, loads, strategy=routing.LEASTLOAD, sample=5, seed=s)[0] == "m17" for s in range(200))
    assert 0 < hits < 200  # in the sample sometimes, not always (it is a sample)


def test_autostart_prefers_own_region_then_closest():
    instances = [inst("far", region="syd", host="farther", state="stopped"),
                 inst("near", region="iad", host="far", state="stopped"),
                 inst("noauto", state="stopped", autostart=False),
                 inst("running")]
    assert routing.autostart_candidate(instances, region="ams", rtt=RTT.get).machine_id == "near"
    instances.append(inst("home", state="stopped"))
    assert routing.autostart_candidate(instances, region="ams", rtt=RTT.get).machine_id == "home"
    assert routing.autostart_candidate([inst("x")], region="ams", rtt=RTT.get) is None


def test_autostart_takes_a_never_booted_machine_but_not_one_starting_or_failed():
    # Rows of Machines without a pod (sources.machine_to_local): never routable, only candidates.
    created = inst("new", state="created", address="")
    assert not created.routable and routing.candidates([created]) == []
    assert routing.autostart_candidate([created], region="ams", rtt=RTT.get) is created
    for state in ("starting", "failed", "stopping"):
        assert routing.autostart_candidate([inst("m", state=state, address="")], region="ams", rtt=RTT.get) is None


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ({"a": 0, "b": 0, "c": 0}, ["a"]),  # one per region per pass
        ({"a": 1, "b": 0, "c": 0}, ["b"]),  # only idle ones
        ({"a": 5, "b": 5, "c": 0}, []),  # busy ones plus one spare are kept
    ],
)
def test_autostop_one_idle_per_region(loads, expected):
    instances = [inst("a"), inst("b"), inst("c")]
    got = routing.autostop_victims(instances, lambda i: loads[i.machine_id])
    assert [v.machine_id for v in got] == expected


def test_autostop_per_region_and_minimum():
    instances = [inst("a"), inst("b"), inst("x", region="iad"), inst("y", region="iad")]
    got = routing.autostop_victims(instances, lambda i: 0)
    assert sorted(v.machine_id for v in got) == ["a", "x"]
    kept = [inst(m, minimum=3) for m in ("a", "b")] + [inst(m, region="iad", minimum=3) for m in ("x", "y")]
    assert [v.machine_id for v in routing.autostop_victims(kept, lambda i: 0)] == ["a"]
    assert routing.autostop_victims([inst("solo", minimum=1)], lambda i: 0) == []
    assert [v.machine_id for v in routing.autostop_victims([inst("solo")], lambda i: 0)] == ["solo"]
    assert routing.autostop_victims([inst("a", autostop="off"), inst("b", autostop="off")], lambda i: 0) == []


def test_pick_is_the_head_of_order():
    """pick() finds order()'s first candidate (same band, load, RTT) in one pass."""
    rng = random.Random(7)
    hosts = list(RTT)
    for trial in range(300):
        instances = [inst(f"m{i}", region=rng.choice(["ams", "fra"]), host=rng.choice(hosts),
                          soft=rng.randint(1, 3), hard=rng.choice([None, 4]),
                          check=rng.choice(["passing", "passing", "failing"])) for i in range(rng.randint(0, 7))]
        loads = {i.machine_id: rng.randint(0, 5) for i in instances}
        load = lambda c: loads[c.instance.machine_id]  # noqa: E731
        exclude = {i.key for i in instances if rng.random() < 0.2}
        cands = routing.candidates(instances)
        ranked = routing.order(cands, region="ams", load=load, rtt=RTT.get, rng=random.Random(trial), exclude=exclude)
        best, under_soft = routing.pick(cands, region="ams", load=load, rtt=RTT.get, rng=random.Random(trial),
                                        exclude=exclude)
        assert under_soft == (not routing.all_above_soft(ranked))
        if not ranked:
            assert best is None
            continue
        head = ranked[0]
        same = lambda c: (c.instance.region == "ams", c.band, c.load, c.rtt)  # noqa: E731
        assert same(best) == same(head)


def test_pick_breaks_ties_uniformly():
    instances = [inst(m) for m in "abcd"]
    rng = random.Random(3)
    seen = {}
    for _ in range(4000):
        best, _ = routing.pick(routing.candidates(instances), region="ams", load=lambda c: 0, rtt=RTT.get, rng=rng)
        seen[best.instance.machine_id] = seen.get(best.instance.machine_id, 0) + 1
    assert set(seen) == set("abcd") and min(seen.values()) > 800  # about 1000 each
