"""Reconcile-time validation: the last of the three places a bad spec is caught.

The CRD schema and its CEL rules refuse almost everything at the API server;
what reaches the operator is checked once more against the pydantic models
(the same source the schema came from), so nothing is built from a spec the
models reject, and the user sees why in a condition.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from kubefly.conditions import set_condition


@dataclass(frozen=True)
class Acceptance:
    ok: bool
    message: str

    def conditions(self, body) -> list[dict]:
        status = body.get("status") or {}
        return set_condition(
            status.get("conditions"),
            "Accepted",
            self.ok,
            "SpecValid" if self.ok else "InvalidSpec",
            self.message,
            body.get("metadata", {}).get("generation"),
        )


def check(resource: type[BaseModel], body) -> Acceptance:
    """Validate the whole object; name every offending field and what is wrong with it."""
    try:
        resource.model_validate({k: body[k] for k in ("apiVersion", "metadata", "spec") if k in body})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(object)'}: {err['msg']}" for err in exc.errors()
        )
        return Acceptance(False, problems)
    return Acceptance(True, "spec is valid")
