"""The bundled object store's TLS: a certificate for its Service's DNS names, signed by a CA made for it.

pgBackRest 2.45 reaches S3 only over HTTPS and matches its endpoint's host against DNS-type
subject alternative names only, so the certificate names the Service in every form a pod
may dial. The CA's key is thrown away once the certificate is signed: nothing else can be
issued under it, so trusting ca.crt trusts this one certificate. Made once and never
changed (like the other platform Secrets), so both are valid for ten years.
"""

from __future__ import annotations

from datetime import datetime

from kubefly.admission import tls

LIFETIME = tls.CA_LIFETIME
CA_NAME = "kubefly object store CA"


def service_names(service: str, namespace: str) -> list[str]:
    """The DNS names of a Service: short, namespaced, .svc and fully qualified."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def secret_data(service: str, namespace: str, now: datetime) -> dict[str, str]:
    """The Secret's keys ca.crt, tls.crt and tls.key (PEM text); no ca.key."""
    bundle = tls.issue(service_names(service, namespace), now, ca_name=CA_NAME, lifetime=LIFETIME)
    return {"ca.crt": bundle.ca_crt.decode(), "tls.crt": bundle.tls_crt.decode(), "tls.key": bundle.tls_key.decode()}
