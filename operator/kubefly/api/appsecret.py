"""AppSecret: sealed values that kubefly turns into a Secret next to the app's machines.

Only sealed (encrypted for the cluster) values are stored here; the plaintext
never is. Status reports names and digests, never values.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator

from kubefly.api.common import (
    AGE,
    ApiModel,
    AppName,
    CrdInfo,
    PrinterColumn,
    Resource,
    StatusModel,
    cel,
    immutable,
    keys_matching,
    validations,
)

KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# Standard base64 with padding, as the sealing code writes it.
SEALED_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
MAX_KEYS = 128
SealedValue = Annotated[str, StringConstraints(max_length=65536, pattern=SEALED_PATTERN)]

KEYS_RULE = cel(
    f"self.all(k, size(k) <= 255 && k.matches('{KEY_PATTERN}'))",
    f"spec.data keys must be environment variable names ({KEY_PATTERN}, at most 255 characters): rename the key",
)


class AppSecretSpec(ApiModel):
    app: AppName = Field(json_schema_extra=immutable("spec.app", "create the AppSecret in the other app"))
    data: dict[str, SealedValue] = Field(
        max_length=MAX_KEYS,
        description="KEY -> sealed value (base64). Seal with `kubefly secrets set`.",
        json_schema_extra=validations(KEYS_RULE),
    )
    stage: bool = Field(default=False, description="Store only: machines get the values when next updated or created.")

    @field_validator("data")
    @classmethod
    def _env_var_keys(cls, data: dict[str, str]) -> dict[str, str]:
        return keys_matching(data, KEY_PATTERN, KEYS_RULE)


class Rollout(ApiModel):
    """A roll of the app's started machines onto new values, kept here so a restarted operator resumes it."""

    digest: str = Field(max_length=64, description="The AppSecret digest being rolled out.")
    machine: str | None = Field(default=None, max_length=63, description="The machine being replaced now, if any.")
    from_instance_id: str | None = Field(default=None, description="That machine's instance before the roll.")


class AppSecretStatus(StatusModel):
    keys: list[str] = Field(default_factory=list, max_length=MAX_KEYS)
    digest: str | None = Field(default=None, description="Digest of the whole set of keys and values.")
    key_digests: dict[str, str] = Field(default_factory=dict, max_length=MAX_KEYS)
    secret_name: str | None = Field(default=None, description="The Secret that holds the values for the machines.")
    rollout: Rollout | None = Field(default=None, description="Present while machines are being rolled one at a time.")


class AppSecret(Resource):
    crd = CrdInfo(
        plural="appsecrets",
        short_names=("asec",),
        columns=(
            PrinterColumn("App", ".spec.app"),
            PrinterColumn("Keys", ".status.keys"),
            PrinterColumn("Digest", ".status.digest"),
            AGE,
        ),
    )

    kind: Literal["AppSecret"] = "AppSecret"
    spec: AppSecretSpec
    status: AppSecretStatus | None = None
