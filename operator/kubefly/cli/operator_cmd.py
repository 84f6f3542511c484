"""`kubefly operator`: the Kopf operator process."""

from __future__ import annotations

import os
import socket
import sys
import threading

import click

from kubefly import logs, metrics


@click.command("operator")
@click.option("--namespace", "namespaces", multiple=True, help="Watch only these namespaces (organisations); default: all.")
@click.option("--metrics-port", default=9090, show_default=True, help="Port of Prometheus /metrics.")
@click.option("--health-port", default=8080, show_default=True, help="Port of /healthz.")
@click.option("--lease", default="kubefly-operator", show_default=True,
              help="The leadership Lease (in the home namespace) replicas share; only its holder is active.")
@click.option("--leader-identity", envvar="POD_NAME", default=socket.gethostname(), show_default="$POD_NAME or the hostname",
              help="This replica's name in the Lease; unique per replica, the same across its restarts.")
@click.option("--standalone", is_flag=True, help="No leadership Lease: for a single local process without the chart.")
@click.option(
    "--home-namespace",
    envvar="KUBEFLY_NAMESPACE",
    default="kubefly-system",
    show_default=True,
    help="The operator's own namespace: the sealing key Secret, its public ConfigMap and the Lease live there.",
)
@click.option("--webhook-port", default=9443, show_default=True,
              help="HTTPS port of the Volume admission webhook, served by every replica (leader or not); 0: none.")
@click.option("--webhook-secret", default="kubefly-webhook-tls", show_default=True,
              help="The Secret (home namespace) holding the webhook's CA and certificate, shared by all replicas.")
@click.option("--webhook-config", default="", help="The ValidatingWebhookConfiguration whose caBundle to keep "
              "equal to the webhook's CA (the chart's); empty: none.")
@click.option("--webhook-service", default="", help="The Service in front of the webhook: its DNS names go in the certificate.")
@click.option("--webhook-host", "webhook_hosts", multiple=True,
              help="Another name or IP address the API server dials the webhook at (an operator outside the cluster: 127.0.0.1).")
@click.option("--log-level", default="INFO", show_default=True)
def operator_command(namespaces, metrics_port, health_port, lease, leader_identity, standalone, home_namespace,
                     webhook_port, webhook_secret, webhook_config, webhook_service, webhook_hosts, log_level):
    """Run the kubefly operator (Kopf); with replicas, only the holder of the leadership Lease."""
    import kopf
    import uvloop

    import kubefly.controllers.main  # noqa: F401  (importing it registers every handler)
    from kubefly.volumes.snapshots import ObjectStore

    logs.configure(log_level, component="operator")
    metrics.serve(metrics_port)
    webhook = _start_webhook(webhook_port, home_namespace, webhook_secret, webhook_config, webhook_service, webhook_hosts)
    elector = None
    if not standalone:
        from kubefly.controllers import kubeapi, leadership

        leading = threading.Event()
        elector = leadership.Elector(
            leadership.LeaseAPI(kubeapi.load_config(), home_namespace, lease), leader_identity,
            leadership.Timing(), on_lead=leading.set, on_lost=_restart_as_candidate,
        ).start()
        health = leadership.CandidateHealth(health_port, elector)
        logs.get("kubefly.cli.operator").info("waiting for the leadership lease", lease=f"{home_namespace}/{lease}",
                                              identity=leader_identity)
        leading.wait()
        health.close()
    kopf.run(
        loop=uvloop.new_event_loop(),
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        # The Lease decides who runs; Kopf's own peering would only pause us again behind a dead record.
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
        # Read once here: where Volume snapshots go (the chart's objectStore values; None: nowhere).
        memo=kopf.Memo(home_namespace=home_namespace, object_store=ObjectStore.from_env()),
    )
    if webhook is not None:
        webhook.stop()
    if elector is not None:
        elector.stop()
        try:
            elector.api.release(leader_identity, 2.0)
        except Exception:  # the next leader then waits for the Lease to expire, as after a crash
            pass


def _start_webhook(port, namespace, secret, config, service, hosts):
    """The Volume admission webhook, before the election: every replica answers it (admission/server.py)."""
    if not port:
        return None
    from kubefly.admission.server import AdmissionWebhook

    names = [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"] if service else []
    names = [*names, *hosts] or ["localhost", "127.0.0.1"]
    return AdmissionWebhook(port=port, namespace=namespace, secret=secret, config=config or None, hosts=names).start()


def _restart_as_candidate() -> None:
    """Stop being active at once and for certain: replace the process (exec), caches, daemons and all.

    Stopping Kopf in place would wait for handlers and daemons, and leave state from the old term
    behind; the new process starts as a candidate with fresh watches."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
