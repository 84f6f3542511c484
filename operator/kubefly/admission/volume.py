"""Whether a new Volume's source fits it: the pure check behind the Volume admission webhook.

A Volume created with spec.forkFrom or spec.restoreFrom copies another object's
data, which CEL cannot look at. The webhook looks the source up and asks
`review`; the same rule (kubefly.volumes.snapshots.check_source) holds the
reconcile with condition Restored, for whatever the webhook did not see (it
fails open: docs/volumes.md, "Admission").

Only a create needs it: the CRD makes spec.app, spec.region, spec.forkFrom and
spec.restoreFrom immutable and lets spec.sizeGb only grow (api/volume.py), so
no update can make a fitting source unfit.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubefly.api.volume import Volume
from kubefly.volumes.snapshots import StoredCopy, check_source


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str = ""
    field: str = ""  # the field at fault, for the API server's status details
    reason: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def detail(self) -> str:
        """The message without the field it starts with: kubectl prints `<field>: <detail>`."""
        return self.message.removeprefix(f"{self.field}: ").removeprefix(f"{self.field} ")


ALLOWED = Verdict(True)


@dataclass(frozen=True)
class Source:
    """What the webhook must read: the kind (plural) and name of the new Volume's source, and the field naming it."""

    plural: str  # "volumes" or "snapshots"
    name: str
    field: str


def source_of(volume: Volume) -> Source | None:
    spec = volume.spec
    if spec.fork_from:
        return Source("volumes", spec.fork_from, "spec.forkFrom")
    if spec.restore_from:
        return Source("snapshots", spec.restore_from, "spec.restoreFrom")
    return None


def _refused(field_: str, refusal) -> Verdict:
    # check_source's TooSmall message starts with the field at fault (spec.sizeGb) already.
    if refusal.reason == "TooSmall":
        return Verdict(False, refusal.message, "spec.sizeGb", refusal.reason)
    return Verdict(False, f"{field_}: {refusal.message}", field_, refusal.reason)


def review(volume: Volume, namespace: str, source: dict | None) -> Verdict:
    """The verdict on creating `volume` in `namespace`, given its source as read from the API (None: not there).

    `source` is the Volume named by spec.forkFrom or the Snapshot named by spec.restoreFrom."""
    wanted = source_of(volume)
    if wanted is None:
        return ALLOWED
    spec = volume.spec
    if wanted.plural == "volumes":
        if source is None:
            return Verdict(False, f"spec.forkFrom: there is no Volume {wanted.name} in namespace {namespace}: "
                                  f"fork an existing volume of app {spec.app}", wanted.field, "SourceNotFound")
        fork = Volume.model_validate({k: source[k] for k in ("apiVersion", "metadata", "spec") if k in source})
        refusal = check_source(app=spec.app, region=spec.region, size_gb=spec.size_gb, source_app=fork.spec.app,
                               source_region=fork.spec.region, source_size_gb=fork.spec.size_gb,
                               what=f"volume {wanted.name}")
        return _refused(wanted.field, refusal) if refusal else ALLOWED
    if source is None:
        return Verdict(False, f"spec.restoreFrom: there is no Snapshot {wanted.name} in namespace {namespace}",
                       wanted.field, "SnapshotNotFound")
    status = source.get("status") or {}
    copy = StoredCopy.of(source)
    if copy is None:
        if status.get("phase") == "Failed":
            return Verdict(False, f"spec.restoreFrom: snapshot {wanted.name} failed ({status.get('message')}): "
                                  f"nothing to restore; create the Volume from another snapshot", wanted.field,
                           "SnapshotFailed")
        # Still being taken: the reconcile waits for it and checks it then.
        return Verdict(True, warnings=(f"spec.restoreFrom: snapshot {wanted.name} is still being taken; the Volume "
                                       f"waits for it (and is checked against it then: condition Restored)",))
    refusal = check_source(app=spec.app, region=spec.region, size_gb=spec.size_gb, source_app=copy.app,
                           source_region=copy.region, source_size_gb=copy.size_gb, what=f"snapshot {wanted.name}")
    return _refused(wanted.field, refusal) if refusal else ALLOWED


def response(uid: str, verdict: Verdict, name: str = "") -> dict:
    """The AdmissionReview (admission.k8s.io/v1) answering request `uid` about Volume `name`.

    A refusal is an Invalid status with the field as its cause, as the API server's own
    schema errors are: kubectl prints `The Volume "<name>" is invalid: <field>: <detail>`."""
    answer: dict = {"uid": uid, "allowed": verdict.allowed}
    if verdict.warnings:
        answer["warnings"] = list(verdict.warnings)
    if not verdict.allowed:
        answer["status"] = {
            "code": 422, "reason": "Invalid", "message": verdict.message,
            "details": {"group": "kubefly.dev", "kind": "Volume", "name": name,
                        "causes": [{"type": "FieldValueInvalid", "field": verdict.field, "message": verdict.detail}]},
        }
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": answer}
