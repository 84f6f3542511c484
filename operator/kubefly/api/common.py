"""Shared pieces of the kubefly API: the model base, CEL rules, Guest, Condition.

The pydantic models in this package are the one source of the CRD schemas
(kubefly.api.crdgen turns them into YAML). A rule the API server must enforce
is written next to the field it guards, as a CEL rule in the JSON schema, and,
when it does not need the old object, as a pydantic validator too, so code that
builds objects (the CLI, the operator) fails the same way the API server does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

from kubefly import API_VERSION

# An RFC 1123 label: the names kubefly turns into pod names and label values.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DnsLabel = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]

AppName = Annotated[DnsLabel, Field(description="The app this object belongs to (a DNS label).")]
RegionName = Annotated[DnsLabel, Field(description="Region: the value of a host's topology.kubernetes.io/region label.")]


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry; `message` should name the field and the fix."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def keys_matching(mapping: dict[str, str], pattern: str, rule: dict[str, str]) -> dict[str, str]:
    """The model's side of a CEL rule on a map's keys: each at most 255 characters and
    matching `pattern` whole (re.fullmatch: `$` would also pass a final newline)."""
    if any(len(k) > 255 or not re.fullmatch(pattern, k) for k in mapping):
        raise ValueError(rule["message"])
    return mapping


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """json_schema_extra carrying CEL rules for the node it is attached to."""
    return {"x-kubernetes-validations": list(rules)}


def immutable(path: str, fix: str) -> dict[str, Any]:
    """A transition rule: the field keeps the value it was created with."""
    return validations(cel("self == oldSelf", f"{path} is immutable; {fix}"))


def list_map(*keys: str) -> dict[str, Any]:
    """A list merged item by item on the given keys (which must be unique)."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


class ApiModel(BaseModel):
    """Fly's camelCase names on the wire, snake_case in Python."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        # A typo in a spec is an error, as it is for `kubectl apply` (strict field validation).
        extra="forbid",
    )


class Guest(ApiModel):
    """The VM size: Fly's guest config."""

    cpu_kind: Literal["shared", "performance"] = "shared"
    cpus: int = Field(default=1, ge=1, le=16)
    memory_mb: int = Field(default=256, ge=256, le=131072, multiple_of=256, description="Memory in MiB, a multiple of 256.")


class Condition(ApiModel):
    """A standard Kubernetes condition (meta/v1 Condition)."""

    type: str = Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
    )
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(max_length=32768)
    last_transition_time: datetime
    observed_generation: int | None = Field(default=None, ge=0)


Conditions = Annotated[list[Condition], Field(max_length=16, json_schema_extra=list_map("type"))]


class StatusModel(ApiModel):
    """What every kind's status has: the generation it reflects and its conditions."""

    # Kopf keeps its handler progress in status; unknown fields are kept, not refused.
    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = Field(default=None, ge=0)
    conditions: Conditions = Field(default_factory=list)


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"] = "string"
    description: str = ""
    priority: int = 0


AGE = PrinterColumn("Age", ".metadata.creationTimestamp", "date")


@dataclass(frozen=True)
class CrdInfo:
    """What a CRD needs beyond the schema: names and `kubectl get` columns."""

    plural: str
    short_names: tuple[str, ...]
    columns: tuple[PrinterColumn, ...]
    # The object's name becomes a pod name or label value, so it must be a DNS label.
    label_safe_name: bool = False


# Machine, Volume and PostgresCluster names become pod names and label values.
LABEL_NAME_RULE = cel(
    "size(self.metadata.name) <= 63 && !self.metadata.name.contains('.')",
    # No fieldPath: the CRD schema does not describe metadata, so the API server refuses one.
    "metadata.name must be a DNS label (at most 63 characters, no dots): kubefly uses it as a label value",
)


class Resource(ApiModel):
    """A whole kubefly object; subclasses set `kind`, `spec`, `status` and `crd`."""

    crd: ClassVar[CrdInfo]

    api_version: Literal[API_VERSION] = API_VERSION  # type: ignore[valid-type]
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _name_is_a_label(self):
        name = self.metadata.get("name")
        if self.crd.label_safe_name and name is not None and (len(name) > 63 or "." in name):
            raise ValueError(LABEL_NAME_RULE["message"])
        return self
