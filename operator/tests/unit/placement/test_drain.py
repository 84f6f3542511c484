"""The drain planner: what moves off a host now, what waits for its app, what cannot move and why."""

from kubefly import labels
from kubefly.placement.drain import MachineView, plan
from kubefly.placement.machines import Host, Placed


def host(name, region="ams", mem=1024):
    return Host(name, region, 4000, mem, 110)


def m(name, app="web", on="a1", ready=True, volume=None, pg=None, moving=None, mem=256):
    return MachineView("o", name, app, "ams", on, ready, volume, pg, moving, 62, mem)


def placed(*ms):
    return [Placed(x.key, f"o/{x.app}", x.host, x.cpu_millis, x.memory_mib) for x in ms if x.host]


def states(p):
    return {s.machine[1]: (s.state, s.reason) for s in p.steps}


HOSTS = [host("a1"), host("a2"), host("a3")]


def test_stateless_machines_of_different_apps_move_at_once_one_per_app():
    ms = [m("w1"), m("w2"), m("api1", app="api"), m("w3", on="a2")]
    p = plan("a1", ms, HOSTS, placed(*ms))
    assert states(p) == {"w1": ("move", "Placed"), "w2": ("waiting", "OneAtATime"), "api1": ("move", "Placed")}
    assert not p.done and p.summary()["state"] == "draining" and p.summary()["machinesLeft"] == 3


def test_the_next_machine_of_an_app_moves_once_the_first_is_routable_elsewhere():
    first = [m("w1", moving="a1", on="a2", ready=False), m("w2")]
    assert states(plan("a1", first, HOSTS, placed(*first)))["w2"] == ("waiting", "OneAtATime")
    assert states(plan("a1", first, HOSTS, placed(*first)))["w1"] == ("moving", "Starting")
    routable = [m("w1", moving="a1", on="a2", ready=True), m("w2")]
    p = plan("a1", routable, HOSTS, placed(*routable))
    assert states(p) == {"w2": ("move", "Placed")}, "a moved, routable machine is done"


def test_an_app_with_all_its_machines_on_the_host_moves_them_one_by_one_the_rest_serving():
    ms = [m("w1"), m("w2")]
    assert states(plan("a1", ms, HOSTS, placed(*ms))) == {"w1": ("move", "Placed"), "w2": ("waiting", "OneAtATime")}


def test_an_app_whose_other_machines_are_not_routable_keeps_this_one_until_one_is():
    ms = [m("w1"), m("w2", on="a2", ready=False)]
    assert states(plan("a1", ms, HOSTS, placed(*ms)))["w1"] == ("waiting", "LastRoutable")
    # A single-machine app cannot avoid a gap: it moves (as on Fly).
    solo = [m("solo", app="one")]
    assert states(plan("a1", solo, HOSTS, placed(*solo)))["solo"] == ("move", "Placed")
    # A machine that is not routable anyway moves at once.
    down = [m("w1", ready=False), m("w2", on="a2", ready=False)]
    assert states(plan("a1", down, HOSTS, placed(*down)))["w1"] == ("move", "Placed")


def test_volume_machines_and_postgres_standbys_migrate():
    ms = [m("v1", volume="data"), m("pg-1", app="db", volume="pg-1", pg="pg")]
    p = plan("a1", ms, HOSTS, placed(*ms))
    assert states(p) == {"v1": ("move", "Placed"), "pg-1": ("move", "Placed")}
    assert "volume data" in next(s.message for s in p.steps if s.machine[1] == "v1")


def pg(name, on, ready=True, primary=False, switchover=None):
    return MachineView("o", name, "db", "ams", on, ready, name, "pg", None, 62, 256, postgres_primary=primary,
                       postgres_switchover=switchover)


def test_a_postgres_primary_hands_over_to_a_ready_standby_elsewhere_before_it_moves():
    ms = [pg("pg-0", "a1", primary=True), pg("pg-1", "a2"), pg("pg-2", "a3", ready=False)]
    p = plan("a1", ms, HOSTS, placed(*ms))
    (step,) = p.steps
    assert (step.state, step.reason, step.switchover_to) == ("switchover", "Switchover", "pg-1")
    assert not p.stuck
    asked = [pg("pg-0", "a1", primary=True, switchover="pg-1"), pg("pg-1", "a2"), pg("pg-2", "a3")]
    assert states(plan("a1", asked, HOSTS, placed(*asked))) == {"pg-0": ("moving", "Switchover")}
    # Handed over: now a standby, it migrates with its volume.
    handed = [pg("pg-0", "a1"), pg("pg-1", "a2", primary=True), pg("pg-2", "a3")]
    assert states(plan("a1", handed, HOSTS, placed(*handed))) == {"pg-0": ("move", "Placed")}


def test_a_postgres_primary_with_no_ready_standby_elsewhere_is_blocked_saying_so():
    ms = [pg("pg-0", "a1", primary=True), pg("pg-1", "a1"), pg("pg-2", "a2", ready=False)]
    p = plan("a1", ms, HOSTS, placed(*ms))
    assert states(p)["pg-0"] == ("blocked", "NoStandbyElsewhere")
    assert "PostgresCluster pg" in next(s.message for s in p.steps if s.machine[1] == "pg-0")
    assert states(p)["pg-1"] == ("move", "Placed"), "a standby on the host still migrates meanwhile"


def test_a_migrating_volume_machine_shows_its_volumes_phase_or_why_it_cannot_go():
    under_way = [MachineView("o", "v1", "web", "ams", "a1", False, "data", None, "a1", 62, 256,
                             volume_migration="copying to host a2 while the machine runs"), m("v2", volume="d2")]
    p = plan("a1", under_way, HOSTS, placed(*under_way))
    assert states(p) == {"v1": ("moving", "Migrating"), "v2": ("waiting", "OneAtATime")}
    assert "copying to host a2" in p.steps[0].message
    refused = [MachineView("o", "v1", "web", "ams", "a1", True, "data", None, "a1", 62, 256,
                           volume_blocked="cannot migrate off host a1: no room")]
    p = plan("a1", refused, HOSTS, placed(*refused))
    assert states(p) == {"v1": ("blocked", "MigrationBlocked")} and p.stuck


def test_a_view_reads_its_volumes_migration():
    machine = {"metadata": {"namespace": "o", "name": "v1", "annotations": {labels.MOVE_FROM: "a1"}},
               "spec": {"app": "web", "region": "ams", "mounts": [{"volume": "data", "path": "/data"}]},
               "status": {"host": "a1"}}
    moving = {"metadata": {"name": "data", "annotations": {labels.MIGRATE_FROM: "a1"}},
              "status": {"migration": {"source": "a1", "target": "a2", "phase": "Syncing",
                                       "startedAt": "2026-12-07T10:00:00Z"}}}
    v = MachineView.of(machine, {("o", "data"): moving})
    assert v.volume_migration == "copying what changed to host a2 (machine stopped)" and v.volume_blocked is None
    refused = {"metadata": {"name": "data", "annotations": {labels.MIGRATE_FROM: "a1"}},
               "status": {"conditions": [{"type": "Migrated", "status": "False", "reason": "NoHostInRegion",
                                          "message": "cannot migrate off host a1: no host"}]}}
    v = MachineView.of(machine, {("o", "data"): refused})
    assert v.volume_migration is None and v.volume_blocked == "cannot migrate off host a1: no host"
    done = {"metadata": {"name": "data"}, "status": {"conditions": [{"type": "Migrated", "status": "True"}]}}
    assert MachineView.of(machine, {("o", "data"): done}).volume_blocked is None


def test_no_room_in_the_region_blocks_with_what_is_short_and_room_is_counted_across_one_round():
    ms = [m("big1", app="a", mem=700), m("big2", app="b", mem=700)]
    p = plan("a1", ms, [host("a1"), host("a2")], placed(*ms))
    assert states(p)["big1"] == ("move", "Placed")
    assert states(p)["big2"][0] == "blocked" and states(p)["big2"][1] == "InsufficientCapacity"
    assert "memory" in next(s.message for s in p.steps if s.machine[1] == "big2")
    alone = [m("w1")]
    p = plan("a1", alone, [host("a1"), host("i1", region="iad")], placed(*alone))
    assert states(p)["w1"] == ("blocked", "NoOtherHost")


def test_an_empty_host_is_drained_and_machines_elsewhere_are_not_touched():
    ms = [m("w1", on="a2"), m("w2", on="a3")]
    p = plan("a1", ms, HOSTS, placed(*ms))
    assert p.done and p.summary()["state"] == "drained" and p.summary()["machinesLeft"] == 0


def test_a_view_reads_the_machine_object():
    obj = {"metadata": {"namespace": "o", "name": "pg-1", "labels": {"kubefly.dev/pg-cluster": "pg"},
                        "annotations": {labels.MOVE_FROM: "a1"}},
           "spec": {"app": "db", "region": "ams", "mounts": [{"volume": "pg-1", "path": "/data"}],
                    "guest": {"memoryMb": 512}},
           "status": {"host": "a1", "conditions": [{"type": "Ready", "status": "True"}]}}
    v = MachineView.of(obj)
    assert (v.host, v.ready, v.volume, v.postgres_cluster, v.moving_from, v.memory_mib) == ("a1", True, "pg-1", "pg", "a1", 512)
    cluster = {"metadata": {"name": "pg"}, "spec": {"switchoverTo": "pg-2"}, "status": {"primary": "pg-1"}}
    v = MachineView.of(obj, clusters={("o", "pg"): cluster})
    assert v.postgres_primary and v.postgres_switchover == "pg-2"
    done = {"metadata": {"name": "pg"}, "spec": {"switchoverTo": "pg-1"}, "status": {"primary": "pg-1"}}
    assert MachineView.of(obj, clusters={("o", "pg"): done}).postgres_switchover is None
