"""A Machine's resolver: its host's `kubefly dns` when the chart runs one.

The chart's dns Service (internalTrafficPolicy: Local) reaches the `kubefly dns`
on the pod's own host, which answers `.internal` from the host's replica and
forwards every other name to the cluster DNS; the search path and ndots of
Kubernetes' ClusterFirst are kept, so cluster names resolve as in any pod.
The operator learns the Service's address from its environment
(KUBEFLY_MACHINE_DNS, set by the chart); unset, Machines keep ClusterFirst.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping

NAMESERVER_ENV = "KUBEFLY_MACHINE_DNS"
CLUSTER_DOMAIN_ENV = "KUBEFLY_CLUSTER_DOMAIN"


def pod_dns(namespace: str, environ: Mapping[str, str] = os.environ) -> dict:
    """The pod spec fields that give a Machine in `namespace` its resolver; {} without kubefly dns."""
    nameserver = environ.get(NAMESERVER_ENV, "")
    if not nameserver:
        return {}
    try:
        ipaddress.ip_address(nameserver)
    except ValueError:
        raise ValueError(
            f"{NAMESERVER_ENV}={nameserver!r} is not an IP address; it must be the kubefly dns Service's "
            "ClusterIP. The chart sets it from the Service link Kubernetes adds to pods created after the "
            "Service: restart the operator (kubectl rollout restart deployment/<release>-operator)"
        ) from None
    domain = environ.get(CLUSTER_DOMAIN_ENV) or "cluster.local"
    return {
        "dnsPolicy": "None",
        "dnsConfig": {
            "nameservers": [nameserver],
            "searches": [f"{namespace}.svc.{domain}", f"svc.{domain}", domain],
            "options": [{"name": "ndots", "value": "5"}],
        },
    }
