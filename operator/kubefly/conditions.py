"""Kubernetes-style status conditions, as pure functions over plain dicts."""

from __future__ import annotations

from datetime import datetime, timezone


def now_rfc3339() -> str:
    return rfc3339(datetime.now(timezone.utc))


def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(t: str | None) -> datetime | None:
    return datetime.fromisoformat(t.replace("Z", "+00:00")) if t else None


def is_ready(obj: dict | None) -> bool:
    """Whether an object (a Node, a Pod) reports condition Ready True; False for None."""
    return bool(obj) and any(c.get("type") == "Ready" and c.get("status") == "True"
                             for c in (obj.get("status") or {}).get("conditions") or [])


def set_condition(
    conditions: list[dict] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
    now: str | None = None,
) -> list[dict]:
    """Return conditions with `type_` set; lastTransitionTime moves only when status changes."""
    if isinstance(status, bool):
        status = "True" if status else "False"
    now = now or now_rfc3339()
    out: list[dict] = []
    found = False
    for cond in conditions or []:
        if cond.get("type") != type_:
            out.append(cond)
            continue
        found = True
        transition = cond.get("lastTransitionTime") if cond.get("status") == status else now
        out.append(_condition(type_, status, reason, message, generation, transition or now))
    if not found:
        out.append(_condition(type_, status, reason, message, generation, now))
    return out


def get_condition(conditions: list[dict] | None, type_: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def _condition(type_: str, status: str, reason: str, message: str, generation: int | None, when: str) -> dict:
    cond = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": when,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond
