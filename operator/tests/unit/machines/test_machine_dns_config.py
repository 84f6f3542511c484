from __future__ import annotations

import pytest

from kubefly.machines.dns_config import pod_dns


def test_without_kubefly_dns_machines_keep_the_cluster_resolver():
    assert pod_dns("acme", {}) == {}


def test_machines_ask_their_hosts_dns_and_keep_the_cluster_search_path():
    got = pod_dns("acme", {"KUBEFLY_MACHINE_DNS": "10.96.12.34", "KUBEFLY_CLUSTER_DOMAIN": "corp.example"})
    assert got == {
        "dnsPolicy": "None",
        "dnsConfig": {
            "nameservers": ["10.96.12.34"],
            "searches": ["acme.svc.corp.example", "svc.corp.example", "corp.example"],
            "options": [{"name": "ndots", "value": "5"}],
        },
    }
    assert pod_dns("acme", {"KUBEFLY_MACHINE_DNS": "fd00::a"})["dnsConfig"]["searches"][-1] == "cluster.local"


def test_an_unexpanded_service_link_is_named_with_the_fix():
    # What Kubernetes leaves when the Service did not exist as the operator pod started.
    with pytest.raises(ValueError, match=r"KUBEFLY_MACHINE_DNS=.*rollout restart"):
        pod_dns("acme", {"KUBEFLY_MACHINE_DNS": "$(KUBEFLY_DNS_SERVICE_HOST)"})
