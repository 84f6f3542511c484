"""The `kubefly` command: one entry point, a subcommand per process.

Subcommands load lazily so `kubefly dns` does not import Kopf and
`kubefly operator` does not import the proxy.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command or group
SUBCOMMANDS = {
    "operator": "kubefly.cli.operator_cmd:operator_command",
    "agent": "kubefly.gossip.cli:agent_command",
    "dns": "kubefly.dns.cli:dns_command",
    "proxy": "kubefly.proxy.cli:proxy_command",
    "postgres": "kubefly.postgres.cli:postgres_group",
    "secrets": "kubefly.cli.secrets_cmd:secrets_group",
    "host": "kubefly.cli.host_cmd:host_group",
    "machine": "kubefly.cli.machine_cmd:machine_group",
    "crds": "kubefly.api.crdgen:crds_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in SUBCOMMANDS if self._load(name) is not None)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a subcommand whose own module is absent is hidden; a missing
            # third-party dependency inside it is a real error.
            if exc.name == module_name:
                return None
            raise
        return getattr(module, attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="kubefly")
def cli() -> None:
    """kubefly: Machines, Volumes, AppSecrets and Postgres on any Kubernetes cluster."""
