"""`kubefly operator`: the Kopf operator process."""

from __future__ import annotations

import random

import click

from kubefly import logs, metrics


@click.command("operator")
@click.option("--namespace", "namespaces", multiple=True, help="Watch only these namespaces (organisations); default: all.")
@click.option("--metrics-port", default=9090, show_default=True, help="Port of Prometheus /metrics.")
@click.option("--health-port", default=8080, show_default=True, help="Port of /healthz.")
@click.option("--peering", default="kubefly", show_default=True, help="ClusterKopfPeering name shared by replicas.")
@click.option("--standalone", is_flag=True, help="No peering: for a single local process without the chart.")
@click.option(
    "--priority",
    type=int,
    default=None,
    help="Peering priority; the highest runs, others stand by. Default: random, because equal priorities freeze all replicas.",
)
@click.option(
    "--home-namespace",
    envvar="KUBEFLY_NAMESPACE",
    default="kubefly-system",
    show_default=True,
    help="The operator's own namespace: the sealing key Secret and its public ConfigMap live there.",
)
@click.option("--log-level", default="INFO", show_default=True)
def operator_command(namespaces, metrics_port, health_port, peering, standalone, priority, home_namespace, log_level):
    """Run the kubefly operator (Kopf)."""
    import kopf
    import uvloop

    import kubefly.controllers.main  # noqa: F401  (importing it registers every handler)

    logs.configure(log_level, component="operator")
    metrics.serve(metrics_port)
    kopf.run(
        loop=uvloop.new_event_loop(),
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        standalone=standalone,
        peering_name=None if standalone else peering,
        priority=priority if priority is not None else random.randint(1, 2**31 - 1),
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
        memo=kopf.Memo(home_namespace=home_namespace),
    )
