import pytest

from kubefly import topology


def test_repo_kind_config_names_three_regions_and_kind_node_names():
    topo = topology.load()
    assert topo.cluster == "kubefly"
    assert [h.name for h in topo.hosts] == [
        "kubefly-control-plane", "kubefly-worker", "kubefly-worker2", "kubefly-worker3",
        "kubefly-worker4", "kubefly-worker5",
    ]
    assert topo.regions == ["ams", "iad", "syd"]
    assert all(h.region for h in topo.workers)
    # A three-member PostgresCluster needs three hosts in one region.
    assert [h.name for h in topo.workers if h.region == "ams"] == ["kubefly-worker", "kubefly-worker4", "kubefly-worker5"]


def test_names_follow_kind_numbering_per_role():
    topo = topology.parse({
        "kind": "Cluster", "name": "x",
        "nodes": [{"role": "control-plane"}, {"role": "control-plane"}, {"role": "worker"}],
    })
    assert [h.name for h in topo.hosts] == ["x-control-plane", "x-control-plane2", "x-worker"]


def test_unknown_role_is_refused_with_its_index():
    with pytest.raises(ValueError, match=r"nodes\[1\]\.role"):
        topology.parse({"kind": "Cluster", "nodes": [{"role": "worker"}, {"role": "edge"}]})
