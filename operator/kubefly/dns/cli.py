"""`kubefly dns`: the host's `.internal` resolver, beside its agent."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
from pathlib import Path

import click

from kubefly import logs


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host.strip("[]") or "127.0.0.1", int(port))


@click.command("dns")
@click.option("--agent", "agent_url", default="http://127.0.0.1:7947", show_default=True, help="The local agent's API.")
@click.option("--listen", default="127.0.0.1:5353", show_default=True, help="UDP and TCP address:port.")
@click.option("--org", default=None, envvar="KUBEFLY_DNS_ORG",
              help="The organisation (namespace) whose apps this resolver names; all orgs when unset.")
@click.option("--ttl", default=5, show_default=True, type=click.IntRange(0, 5))
@click.option("--forward", default=None,
              help="host:port of a resolver for names outside .internal (else REFUSED); "
                   "'resolv.conf': the first nameserver of /etc/resolv.conf (the cluster DNS in a pod).")
@click.option("--allow-source", "allow", multiple=True, callback=lambda ctx, param, value: _networks(value),
              help="An address or CIDR that may ask though it is no machine of this host (a host process); "
                   "repeatable. Every other non-machine source is REFUSED.")
@click.option("--metrics-port", default=0, help="Serve /metrics on this port (0: off).")
@click.option("--log-level", default="INFO", show_default=True)
def dns_command(agent_url, listen, org, ttl, forward, allow, metrics_port, log_level):
    """Answer <app>.internal and friends from the local replica."""
    logs.configure(log_level, component="dns")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if metrics_port:
        from kubefly import metrics

        metrics.serve(metrics_port, addr="127.0.0.1")
    if forward == "resolv.conf":
        forward = _resolv_conf_nameserver(Path("/etc/resolv.conf"))
    asyncio.run(_run(agent_url, _hostport(listen), org, ttl, _hostport(forward) if forward else None, allow))


def _networks(values: tuple[str, ...]) -> tuple[str, ...]:
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise click.BadParameter(f"{v!r} is not an address or CIDR (e.g. 10.0.0.5 or 172.18.0.0/16)",
                                     param_hint="--allow-source") from None
    return values


def _resolv_conf_nameserver(path: Path) -> str:
    """host:53 of the first `nameserver` line of a resolv.conf."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}; give --forward HOST:PORT instead",
                                 param_hint="--forward") from exc
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            host = fields[1].split("%")[0]
            return f"[{host}]:53" if ":" in host else f"{host}:53"
    raise click.BadParameter(f"{path} names no nameserver; give --forward HOST:PORT instead", param_hint="--forward")


async def _run(agent_url, listen, org, ttl, forward, allow) -> None:
    from kubefly.dns.server import DnsServer
    from kubefly.gossip.client import ReplicaClient

    log = logs.get("kubefly.dns.cli")
    client = ReplicaClient(agent_url)
    await client.start()
    server = DnsServer(client.replica, org, ttl=ttl, forward=forward, allow=allow)
    await server.start(*listen)
    log.info("dns ready", listen=f"{listen[0]}:{listen[1]}", org=org or "*", forward=forward and f"{forward[0]}:{forward[1]}",
             allow=list(allow))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    await client.close()
