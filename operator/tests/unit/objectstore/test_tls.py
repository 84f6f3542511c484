"""The bundled store's certificate: every DNS name of its Service, under a CA whose key is gone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509

from kubefly.objectstore import tls


def test_the_certificate_names_the_service_in_every_form_and_the_ca_signed_it():
    now = datetime(2026, 12, 8, tzinfo=UTC)
    data = tls.secret_data("x-kubefly-objectstore", "kubefly-system", now)
    assert sorted(data) == ["ca.crt", "tls.crt", "tls.key"]  # no ca.key: nothing more can be issued
    ca = x509.load_pem_x509_certificate(data["ca.crt"].encode())
    cert = x509.load_pem_x509_certificate(data["tls.crt"].encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # DNS-type names only: pgBackRest 2.45 matches nothing else.
    assert san.get_values_for_type(x509.DNSName) == [
        "x-kubefly-objectstore", "x-kubefly-objectstore.kubefly-system", "x-kubefly-objectstore.kubefly-system.svc",
        "x-kubefly-objectstore.kubefly-system.svc.cluster.local"]
    assert cert.issuer == ca.subject and cert.issuer != cert.subject
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Made once, never renewed: it must outlive any install for years.
    assert cert.not_valid_after_utc - now > timedelta(days=3000)
    assert "PRIVATE KEY" in data["tls.key"]
