"""`kubefly proxy`: the ingress proxy (edge and host roles in one process)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from kubefly import logs, metrics
from kubefly.proxy import config as config_mod
from kubefly.proxy import http1, server, starters
from kubefly.proxy.proxy import Proxy, log

# Hops go to the IP each host's agent advertises; hosts join and leave rarely.
MEMBERS_INTERVAL_S = 2.0


def _addr(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


@click.command("proxy")
@click.option("--listen", default="0.0.0.0:8080", show_default=True,
              help="Where clients connect (an edge host); `none`: no clients, only hops to this host's instances.")
@click.option("--hop-listen", default="0.0.0.0:4281", show_default=True, help="Where other hosts' proxies reach instances on this host.")
@click.option("--metrics-listen", default="0.0.0.0:9091", show_default=True, help="Prometheus /metrics.")
@click.option("--hop-token-file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The platform's hop token (the chart mounts the operator's Secret kubefly-hop-token): edges send "
                   "it on every hop, and this host refuses hops without it.")
@click.option("--agent", "agent_url", default="http://127.0.0.1:7947", show_default=True, help="The local host agent's API.")
@click.option("--static", "static_file", type=click.Path(path_type=Path, exists=True), help="Read instance rows from this JSON file instead of an agent (standalone: benchmarks, development).")
@click.option("--self-host", default="local", show_default=True, help="With --static: this host's name.")
@click.option("--self-region", default="local", show_default=True, help="With --static: this host's region.")
@click.option("--config", "config_file", type=click.Path(path_type=Path, exists=True), help="YAML settings (kubefly.proxy.config.Config); re-read on SIGHUP.")
@click.option("--domain", help="Platform domain: apps answer at <app>.<domain> and <app>.<org>.<domain>.")
@click.option("--starter", "starter_spec", default="kube", show_default=True, help="Autostart/autostop: kube, command:<cmd> or none.")
@click.option("--drain-timeout", default=30.0, show_default=True, help="Seconds in-flight requests get to finish on SIGTERM.")
@click.option("--log-level", default="INFO", show_default=True)
def proxy_command(
    listen, hop_listen, metrics_listen, hop_token_file, agent_url, static_file, self_host, self_region, config_file,
    domain, starter_spec, drain_timeout, log_level,
):
    """Route HTTP requests to app instances, using only the local replica."""
    import uvloop

    logs.configure(log_level, component="proxy")
    overrides: dict = {}
    if domain:
        overrides["domain"] = domain
    if hop_token_file is not None:
        token = hop_token_file.read_text().strip()
        if not token:
            raise click.BadParameter(f"{hop_token_file} is empty", param_hint="--hop-token-file")
        overrides["hop_token"] = token
    cfg = config_mod.load(config_file, overrides)
    maddr, mport = _addr(metrics_listen)
    metrics.serve(mport, maddr)
    uvloop.run(
        _run(cfg, config_file, overrides, None if listen == "none" else _addr(listen), _addr(hop_listen), agent_url, static_file,
             self_host, self_region, starter_spec, drain_timeout)
    )


async def _run(cfg, config_file, overrides, listen, hop_listen, agent_url, static_file,
               self_host, self_region, starter_spec, drain_timeout):
    client = None
    if static_file is not None:
        from kubefly.proxy.replica import StaticReplica

        replica = StaticReplica(static_file, self_host, self_region)
        report_load = None
    else:
        from kubefly.gossip.client import ReplicaClient

        # The hop token also proves the load reports come from this host's proxy.
        client = ReplicaClient(agent_url, members_interval=MEMBERS_INTERVAL_S, load_token=cfg.hop_token)
        await client.start()
        replica, report_load = client.replica, client.report_load
    proxy = Proxy(replica, cfg, starter=starters.from_spec(starter_spec), report_load=report_load, hop_port=hop_listen[1])
    conns: set = set()
    timeouts = server.Timeouts(header=cfg.header_timeout_s, idle=cfg.idle_timeout_s)
    limits = http1.Limits()
    # A host that is not an edge still runs a proxy: edges hop to it for the instances on its host.
    servers = [await server.serve(proxy.host, *hop_listen, limits=limits, timeouts=timeouts, registry=conns)]
    if listen is not None:
        servers.append(await server.serve(proxy.edge, *listen, limits=limits, timeouts=timeouts, registry=conns))
    background = [asyncio.create_task(proxy.report_loads()), asyncio.create_task(proxy.autostop_loop())]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def reload() -> None:
        try:
            proxy.config = config_mod.load(config_file, overrides)
            if static_file is not None:
                replica.reload()
            log().info("reloaded", config=str(config_file or ""))
        except Exception as exc:  # a bad file keeps the running config
            log().error("reload failed", error=str(exc))

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    log().info("proxy ready", listen=f"{listen[0]}:{listen[1]}" if listen else "none", hop=f"{hop_listen[0]}:{hop_listen[1]}",
             host=replica.self_host, region=replica.self_region, domain=cfg.domain)
    await stop.wait()

    # Graceful: stop accepting, let in-flight requests finish, close idle keep-alives.
    log().info("draining", connections=len(conns))
    for srv in servers:
        srv.close()
    for conn in list(conns):
        conn.drain_idle()
    try:
        async with asyncio.timeout(drain_timeout):
            while conns:
                await asyncio.sleep(0.05)
                for conn in list(conns):
                    conn.drain_idle()
    except TimeoutError:
        log().warning("drain timeout: closing", connections=len(conns))
    for task in background:
        task.cancel()
    proxy.pool.close()
    if client is not None:
        await client.close()
    log().info("stopped")
