"""The Volume admission check: a new Volume's fork or restore source must exist and fit it."""

from __future__ import annotations

from kubefly.admission.volume import response, review, source_of
from kubefly.api.volume import Volume

NS = "org-a"


def volume(name="copy", **spec) -> Volume:
    return Volume.model_validate({"apiVersion": "kubefly.dev/v1alpha1", "kind": "Volume",
                                  "metadata": {"name": name, "namespace": NS},
                                  "spec": {"app": "web", "region": "ams", "sizeGb": 2, **spec}})


def stored(name="db", **spec) -> dict:
    """A source Volume as the API returns it (status and all)."""
    return {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Volume",
            "metadata": {"name": name, "namespace": NS, "uid": "u1", "resourceVersion": "7"},
            "spec": {"app": "web", "region": "ams", "sizeGb": 2, **spec},
            "status": {"host": "h1", "conditions": []}}


def snapshot(name="snap", phase="Succeeded", **status) -> dict:
    st = {"phase": phase, "volumeUid": "u1", "repository": "volumes/org-a/db.u1", "snapshotId": "abc",
          "takenAt": "2026-12-01T12:00:00Z", "app": "web", "region": "ams", "sizeGb": 2, "host": "h1", **status}
    if phase != "Succeeded":
        st = {"phase": phase, **status}
    return {"metadata": {"name": name, "namespace": NS}, "spec": {"volume": "db"}, "status": st}


def test_a_volume_without_a_source_is_not_looked_at():
    v = volume()
    assert source_of(v) is None
    assert review(v, NS, None).allowed


def test_a_fork_of_the_same_apps_volume_in_its_region_with_room_is_allowed():
    assert review(volume(forkFrom="db"), NS, stored()).allowed
    assert review(volume(forkFrom="db", sizeGb=5), NS, stored()).allowed


def test_a_fork_of_a_missing_volume_names_the_field_and_the_namespace():
    v = volume(forkFrom="db")
    assert (source_of(v).plural, source_of(v).name) == ("volumes", "db")
    verdict = review(v, NS, None)
    assert not verdict.allowed and verdict.field == "spec.forkFrom"
    assert verdict.message.startswith("spec.forkFrom: there is no Volume db in namespace org-a")


def test_a_fork_of_another_apps_or_regions_volume_is_refused_by_the_shared_rule():
    other_app = review(volume(forkFrom="db"), NS, stored(app="billing"))
    assert not other_app.allowed and other_app.reason == "OtherApp"
    assert other_app.message.startswith("spec.forkFrom: volume db belongs to app billing, not web")
    other_region = review(volume(forkFrom="db"), NS, stored(region="iad"))
    assert not other_region.allowed and other_region.reason == "OtherRegion"
    assert other_region.message.startswith("spec.forkFrom: volume db is in region iad, not ams")


def test_a_fork_smaller_than_its_source_names_spec_size_gb():
    verdict = review(volume(forkFrom="db", sizeGb=1), NS, stored(sizeGb=3))
    assert not verdict.allowed and verdict.field == "spec.sizeGb"
    assert verdict.message.startswith("spec.sizeGb 1 is smaller than volume db's 3 GB")
    assert "at least 3" in verdict.message


def test_a_restore_from_a_missing_or_failed_snapshot_is_refused():
    missing = review(volume(restoreFrom="snap"), NS, None)
    assert not missing.allowed and missing.field == "spec.restoreFrom"
    assert missing.message == "spec.restoreFrom: there is no Snapshot snap in namespace org-a"
    failed = review(volume(restoreFrom="snap"), NS, snapshot(phase="Failed", message="restic exit 1"))
    assert not failed.allowed and "snapshot snap failed (restic exit 1)" in failed.message


def test_a_restore_from_a_snapshot_still_being_taken_is_allowed_with_a_warning():
    for phase in ("Pending", "Running"):
        verdict = review(volume(restoreFrom="snap"), NS, snapshot(phase=phase))
        assert verdict.allowed and "still being taken" in verdict.warnings[0]
    assert review(volume(restoreFrom="snap"), NS, {"metadata": {"name": "snap"}, "spec": {"volume": "db"}}).allowed


def test_a_restore_from_a_stored_copy_is_checked_against_what_the_copy_records():
    assert review(volume(restoreFrom="snap"), NS, snapshot()).allowed
    assert review(volume(restoreFrom="snap"), NS, snapshot(app="db")).message.startswith(
        "spec.restoreFrom: snapshot snap belongs to app db, not web")
    assert review(volume(restoreFrom="snap"), NS, snapshot(region="syd")).reason == "OtherRegion"
    small = review(volume(restoreFrom="snap", sizeGb=1), NS, snapshot(sizeGb=4))
    assert small.field == "spec.sizeGb" and small.message.startswith("spec.sizeGb 1 is smaller than snapshot snap's 4 GB")


def test_the_answer_is_an_admission_review_with_the_field_in_its_causes():
    denied = response("uid-1", review(volume(forkFrom="db"), NS, None), "copy")
    assert denied["apiVersion"] == "admission.k8s.io/v1" and denied["kind"] == "AdmissionReview"
    r = denied["response"]
    assert r["uid"] == "uid-1" and r["allowed"] is False
    assert r["status"]["code"] == 422 and r["status"]["message"].startswith("spec.forkFrom:")
    details = r["status"]["details"]
    assert (details["kind"], details["name"]) == ("Volume", "copy")
    # kubectl prints "<field>: <message>": the message does not name the field twice.
    assert details["causes"][0]["field"] == "spec.forkFrom"
    assert details["causes"][0]["message"].startswith("there is no Volume db in namespace org-a")
    small = response("u", review(volume(forkFrom="db", sizeGb=1), NS, stored(sizeGb=3)))["response"]["status"]
    assert small["details"]["causes"][0] == {"type": "FieldValueInvalid", "field": "spec.sizeGb",
                                             "message": small["message"].removeprefix("spec.sizeGb ")}
    allowed = response("uid-2", review(volume(), NS, None))["response"]
    assert allowed == {"uid": "uid-2", "allowed": True}
    warned = response("uid-3", review(volume(restoreFrom="snap"), NS, snapshot(phase="Pending")))["response"]
    assert warned["allowed"] and warned["warnings"]
