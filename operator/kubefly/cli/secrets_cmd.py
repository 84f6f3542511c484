"""`kubefly secrets`: seal values for the cluster, as an AppSecret manifest.

    kubefly secrets seal --app web -n my-org DATABASE_URL=postgres://... | kubectl apply -f -

The organisation (namespace) is chosen as kubectl chooses it: `-n`, else the
namespace of the kubeconfig's current context, else `default`. The seal binds
it, so the line on stderr says which one was used.

Values are encrypted on this machine with the cluster's public key (from the
ConfigMap the operator publishes, or `--public-key FILE`); only the operator
can open them. Nothing here sends a value anywhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import click
import yaml
from pydantic import ValidationError

from kubefly import API_VERSION
from kubefly.api.appsecret import KEY_PATTERN, AppSecret
from kubefly.secrets import keystore, sealing


@click.group("secrets")
def secrets_group() -> None:
    """Seal app secrets for this cluster."""


def _pairs(assignments: tuple[str, ...], env_file: Path | None) -> dict[str, str]:
    values: dict[str, str] = {}
    if env_file is not None:
        for number, line in enumerate(env_file.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise click.BadParameter(f"line {number} is not KEY=VALUE", param_hint="--from-env-file")
            key, value = line.split("=", 1)
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key.strip().removeprefix("export ").strip()] = value
    for item in assignments:
        if "=" not in item:
            raise click.BadParameter(f"{item.split('=')[0]!r} is not KEY=VALUE", param_hint="KEY=VALUE")
        key, value = item.split("=", 1)
        values[key] = value
    for key in values:
        if not re.fullmatch(KEY_PATTERN, key) or len(key) > 255:
            raise click.BadParameter(f"{key!r} is not an environment variable name ({KEY_PATTERN})", param_hint="KEY")
    if not values:
        raise click.UsageError("nothing to seal: give KEY=VALUE arguments or --from-env-file")
    return values


def _public_key(public_key_file: Path | None, home_namespace: str, context: str | None):
    if public_key_file is not None:
        try:
            return sealing.load_public(public_key_file.read_text())
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--public-key") from exc
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    if context:  # the context the namespace came from, as kubectl would use it
        config.load_kube_config(config_file=_kubeconfig(), context=context)
    else:
        config.load_config()
    try:
        return keystore.fetch_public(client.CoreV1Api(), home_namespace)
    except ApiException as exc:
        raise click.ClickException(
            f"cannot read ConfigMap {home_namespace}/{keystore.NAME} ({exc.status} {exc.reason}): "
            "is the operator running? Or pass --public-key FILE"
        ) from exc


def _kubeconfig() -> str:
    # Read now: the client reads KUBECONFIG once, at import.
    return os.environ.get("KUBECONFIG") or "~/.kube/config"


def _kubeconfig_files(paths: str) -> list[tuple[Path, dict]]:
    files = []
    for path in filter(None, paths.split(os.pathsep)):
        file = Path(path).expanduser()
        if not file.is_file():
            continue
        try:
            doc = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise click.ClickException(f"cannot read kubeconfig {file}: {exc}") from exc
        if isinstance(doc, dict):
            files.append((file, doc))
    return files


def _namespace(explicit: str | None) -> tuple[str, str, str | None]:
    """(namespace, where it came from, kubeconfig context), as kubectl picks the namespace:
    -n, else the current context's, else default.

    A path list merges as kubectl merges it: the first file to set current-context, or
    to define a context of a name, wins (the client's own merge lets the last
    current-context win)."""
    files = _kubeconfig_files(_kubeconfig())
    context = next((doc["current-context"] for _, doc in files if doc.get("current-context")), None)
    if explicit:
        return explicit, "from -n", context
    if context is None:
        return "default", "no kubeconfig context found", None
    defined = (c for _, doc in files for c in doc.get("contexts") or [] if c.get("name") == context)
    found = next(defined, None)
    if found is None:
        raise click.ClickException(f"the kubeconfig's current context {context!r} is not defined in {_kubeconfig()}")
    if (found.get("context") or {}).get("namespace"):
        return found["context"]["namespace"], f"the namespace of kubeconfig context {context!r}", context
    return "default", f"kubeconfig context {context!r} names no namespace", context


@secrets_group.command("seal")
@click.argument("assignments", nargs=-1, metavar="KEY=VALUE...")
@click.option("--app", required=True, help="The app whose machines get the values.")
@click.option("--name", help="The AppSecret's name (default: the app's name).")
@click.option("-n", "--namespace", help="The organisation (namespace) the values are sealed for "
              "[default: the kubeconfig's current context's namespace, else default].")
@click.option("--from-env-file", "env_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read KEY=VALUE lines from a file (# comments allowed).")
@click.option("--stage", is_flag=True, help="Store only: machines get the values at their next update.")
@click.option("--public-key", "public_key_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The cluster's public key (the ConfigMap's publicKey), instead of asking the cluster.")
@click.option("--home-namespace", envvar="KUBEFLY_NAMESPACE", default="kubefly-system", show_default=True,
              help="Where the operator publishes its public key.")
def seal_command(assignments, app, name, namespace, env_file, stage, public_key_file, home_namespace):
    """Print an AppSecret manifest with KEY=VALUE pairs sealed for the cluster."""
    values = _pairs(assignments, env_file)
    namespace, source, context = _namespace(namespace)
    public = _public_key(public_key_file, home_namespace, context)
    manifest = {
        "apiVersion": API_VERSION,
        "kind": "AppSecret",
        "metadata": {"name": name or app, "namespace": namespace},
        "spec": {
            "app": app,
            "data": {k: sealing.seal(public, namespace=namespace, app=app, key=k, value=v) for k, v in sorted(values.items())},
            **({"stage": True} if stage else {}),
        },
    }
    try:
        AppSecret.model_validate(manifest)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise click.ClickException(f"the AppSecret would be invalid: {problems}") from exc
    # On stderr, so the manifest on stdout still pipes into kubectl apply.
    click.echo(f"sealed for namespace {namespace} ({source}): it opens only there; -n seals for another", err=True)
    click.echo(yaml.safe_dump(manifest, sort_keys=False), nl=False)
