"""The committed CRD YAML is what the models generate, and it is structural."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kubefly import GROUP, VERSION
from kubefly.api import KINDS, Machine
from kubefly.api.crdgen import HEADER, crd, crds_command, rendered

REPO = Path(__file__).resolve().parents[4]
# What a structural schema may not contain (apiextensions v1 rules) or what pydantic leaks.
FORBIDDEN = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "nullable", "const", "title"}


def schema_nodes(node, path="openAPIV3Schema"):
    """Every schema node with its path (not the values of default/enum/rules)."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from schema_nodes(child, f"{path}.{name}")
    if "items" in node:
        yield from schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}{{}}")


def open_api(kind) -> dict:
    return crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("path", sorted(rendered()), ids=str)
def test_committed_yaml_matches_the_models(path):
    committed = REPO / path
    assert committed.exists(), f"{path} missing: run `make crds`"
    assert committed.read_text() == rendered()[path], f"{path} is stale: run `make crds`"


def test_check_command_passes_on_the_repo_and_fails_with_a_diff(tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.chdir(REPO)
    assert runner.invoke(crds_command, ["check"]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(crds_command, ["generate", "--out", "crds"]).exit_code == 0
    target = tmp_path / "crds" / f"volumes.{GROUP}.yaml"
    target.write_text(target.read_text().replace("maximum: 500", "maximum: 600"))
    result = runner.invoke(crds_command, ["check", "--out", "crds"])
    assert result.exit_code != 0
    assert "-                maximum: 600" in result.output and "+                maximum: 500" in result.output


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_schema_is_structural(kind):
    for path, node in schema_nodes(open_api(kind)):
        assert not FORBIDDEN & node.keys(), f"{path} has {FORBIDDEN & node.keys()}"
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert not ("default" in node and node["default"] is None), path


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_collections_are_bounded_and_rules_explained(kind):
    # Bounded lists and maps keep the API server's CEL cost estimates low.
    for path, node in schema_nodes(open_api(kind)):
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path} needs maxItems"
        if isinstance(node.get("additionalProperties"), dict):
            assert "maxProperties" in node, f"{path} needs maxProperties"
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["message"].strip(), f"{path}: rule {rule['rule']} has no message"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_status_keeps_unknown_fields_but_describes_known_ones(kind):
    status = open_api(kind)["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert {"observedGeneration", "conditions"} <= status["properties"].keys()
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    # Everything else is pruned: spec never keeps unknown fields.
    spec_nodes = schema_nodes(open_api(kind)["properties"]["spec"])
    assert not any(n.get("x-kubernetes-preserve-unknown-fields") for _, n in spec_nodes)


NAMES = {
    "Machine": ("machines", ["mach"], ["App", "Region", "State", "Host", "Image", "Age"]),
    "Volume": ("volumes", ["vol"], ["App", "Region", "Size", "Limit", "Host", "Attached", "Migrating", "Age"]),
    "Snapshot": ("snapshots", ["snap"], ["Volume", "Phase", "Host", "Bytes", "Seconds", "Taken", "Expires", "Age"]),
    "AppSecret": ("appsecrets", ["asec"], ["App", "Keys", "Digest", "Age"]),
    "PostgresCluster": ("postgresclusters", ["pgc"], ["Members", "Ready", "Primary", "Phase", "Age"]),
    "PostgresBackup": ("postgresbackups", ["pgb"], ["Cluster", "Type", "Phase", "Member", "Bytes", "Finished", "Age"]),
}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_names_columns_and_subresources(kind):
    doc = crd(kind)
    plural, short, columns = NAMES[kind.__name__]
    names = doc["spec"]["names"]
    assert doc["metadata"]["name"] == f"{plural}.{GROUP}"
    assert (names["plural"], names["shortNames"], names["categories"]) == (plural, short, ["kubefly"])
    assert doc["spec"]["scope"] == "Namespaced"
    (version,) = doc["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == (VERSION, True, True)
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == columns


def test_chart_copy_is_wrapped_and_kept_on_uninstall():
    for path, text in rendered().items():
        if path.parts[0] != "charts":
            continue
        body = text.removeprefix(HEADER)
        assert body.startswith("{{- if .Values.crds.install }}\n") and body.endswith("{{- end }}\n")
        doc = yaml.safe_load(body.split("\n", 1)[1].rsplit("{{- end }}", 1)[0])
        assert doc["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_crd_defaults_are_the_model_defaults():
    spec = open_api(Machine)["properties"]["spec"]["properties"]
    defaults = Machine.model_fields["spec"].annotation.model_validate(
        {"app": "a", "region": "r", "image": "i"}
    ).model_dump(mode="json", exclude_none=True)
    for name in ("guest", "restart", "stop", "state"):
        assert spec[name]["default"] == defaults[name]
    # Empty collections are left out: absent and empty mean the same.
    assert "default" not in spec["env"] and "default" not in spec["mounts"]
