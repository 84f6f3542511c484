"""A Volume whose fork or restore source does not fit is refused by `kubectl apply`, naming the field.

The operator's admission webhook (kubefly.admission) looks the source up: the
kube-apiserver of this tier runs on this machine and calls the session
operator at 127.0.0.1 (the chart's operator.webhook.url), over TLS with the
CA the operator made and put in the webhook configuration's caBundle.
"""

from __future__ import annotations

import base64
import json

import pytest
from cryptography import x509

pytestmark = pytest.mark.usefixtures("operator")


def volume(name: str, app: str = "web", size_gb: int = 2, **spec) -> dict:
    return {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Volume", "metadata": {"name": name},
            "spec": {"app": app, "region": "ams", "sizeGb": size_gb, **spec}}


def apply(kube, namespace: str, manifest: dict, *extra: str):
    return kube.kubectl("-n", namespace, "apply", *extra, "-f", "-", input=json.dumps(manifest), check=False)


def wait_for_webhook(kube, namespace: str) -> None:
    """Until the webhook answers (failurePolicy Ignore: before that, a bad fork is let through): a server-side dry run."""
    def refused():
        proc = apply(kube, namespace, volume("probe", forkFrom="no-such-volume"), "--dry-run=server")
        return proc.returncode != 0 and "spec.forkFrom" in proc.stderr
    kube.wait_for("the Volume admission webhook to answer", refused, timeout=60, interval=0.5)


def test_the_webhook_is_registered_with_the_operators_ca(kube, operator):
    cfg = json.loads(kube.kubectl("get", "validatingwebhookconfiguration", f"{kube.release}-volumes", "-o", "json").stdout)
    hook = cfg["webhooks"][0]
    assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] <= 10 and hook["sideEffects"] == "None"
    assert hook["rules"] == [{"apiGroups": ["kubefly.dev"], "apiVersions": ["*"], "operations": ["CREATE"],
                              "resources": ["volumes"], "scope": "Namespaced"}]
    assert hook["clientConfig"]["url"] == f"https://127.0.0.1:{kube.webhook_port}/validate/volumes"

    def ca_bundle():
        return json.loads(kube.kubectl("get", "validatingwebhookconfiguration", f"{kube.release}-volumes", "-o",
                                       "json").stdout)["webhooks"][0]["clientConfig"].get("caBundle")
    bundle = kube.wait_for("the operator to set the caBundle", ca_bundle)
    secret = json.loads(kube.kubectl("-n", kube.release_namespace, "get", "secret", f"{kube.release}-webhook-tls",
                                     "-o", "json").stdout)
    assert secret["data"]["ca.crt"] == bundle
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    assert "127.0.0.1" in [str(ip) for ip in cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)]


def test_kubectl_apply_of_a_fork_that_does_not_fit_fails_naming_the_field(kube, namespace):
    wait_for_webhook(kube, namespace)
    assert apply(kube, namespace, volume("db", app="web", size_gb=3)).returncode == 0

    refusals = {
        "another app's volume": (volume("stolen", app="billing", size_gb=3, forkFrom="db"),
                                 "spec.forkFrom: volume db belongs to app web, not billing"),
        "a volume that does not exist": (volume("ghost", forkFrom="nope"),
                                         f"spec.forkFrom: there is no Volume nope in namespace {namespace}"),
        "a fork smaller than its source": (volume("small", size_gb=1, forkFrom="db"),
                                           "spec.sizeGb: 1 is smaller than volume db's 3 GB: set spec.sizeGb to at least 3"),
        "a snapshot that does not exist": (volume("restored", restoreFrom="nope"),
                                           f"spec.restoreFrom: there is no Snapshot nope in namespace {namespace}"),
    }
    for what, (manifest, message) in refusals.items():
        proc = apply(kube, namespace, manifest)
        assert proc.returncode != 0, f"{what}: kubectl apply succeeded: {proc.stdout}"
        # As the API server's own schema errors read, the field first.
        assert f'The Volume "{manifest["metadata"]["name"]}" is invalid: {message}' in proc.stderr, f"{what}: {proc.stderr}"
    # Nothing was created: only the source is there.
    names = json.loads(kube.kubectl("-n", namespace, "get", "volumes", "-o", "json").stdout)["items"]
    assert [v["metadata"]["name"] for v in names] == ["db"]

    # A fork that fits is admitted (the reconcile then copies the data, or says why it cannot).
    proc = apply(kube, namespace, volume("copy", size_gb=3, forkFrom="db"))
    assert proc.returncode == 0, proc.stderr
    assert kube.get(namespace, "volume", "copy") is not None
