"""The webhook's TLS: a self-signed CA and a serving certificate signed by it, with `cryptography`.

Every operator replica serves the webhook, so they share one pair, kept in a
Secret in the operator's namespace (admission.server); the CA goes into the
ValidatingWebhookConfiguration's caBundle. The serving certificate names every
host the API server may dial (the Service's DNS names, or 127.0.0.1 for an
operator outside the cluster); a replica that needs a name the stored one
lacks re-issues it with the union, signed by the same CA, so the caBundle
does not change. Kopf's own generator needs certbuilder and oscrypto, which
do not work with OpenSSL 3.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_LIFETIME = timedelta(days=3650)
SERVING_LIFETIME = timedelta(days=365)
# Re-issued this long before it expires (the CA: a new CA, and a new caBundle, too).
RENEW_BEFORE = timedelta(days=30)
KEYS = ("ca.crt", "ca.key", "tls.crt", "tls.key")


@dataclass(frozen=True)
class Bundle:
    """PEM bytes of the CA and the serving pair."""

    ca_crt: bytes
    ca_key: bytes
    tls_crt: bytes
    tls_key: bytes

    @classmethod
    def from_secret(cls, secret: dict | None) -> "Bundle | None":
        data = (secret or {}).get("data") or {}
        if any(not data.get(k) for k in KEYS):
            return None
        try:
            return cls(*(base64.b64decode(data[k]) for k in KEYS))
        except ValueError:
            return None

    def secret_data(self) -> dict[str, str]:
        return {k: base64.b64encode(v).decode() for k, v in zip(KEYS, (self.ca_crt, self.ca_key, self.tls_crt, self.tls_key))}

    @property
    def ca_bundle(self) -> str:
        """The caBundle of a webhook's clientConfig: base64 of the CA's PEM."""
        return base64.b64encode(self.ca_crt).decode()

    def hosts(self) -> list[str]:
        """The names and addresses the serving certificate is valid for."""
        cert = x509.load_pem_x509_certificate(self.tls_crt)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def renewal(bundle: Bundle | None, hosts: list[str], now: datetime) -> str | None:
    """Why `bundle` will not do for serving `hosts` (None: it will)."""
    if bundle is None:
        return "no certificate yet"
    try:
        ca = x509.load_pem_x509_certificate(bundle.ca_crt)
        cert = x509.load_pem_x509_certificate(bundle.tls_crt)
        covered = set(bundle.hosts())
    except ValueError as exc:
        return f"unreadable certificate ({exc})"
    if ca.not_valid_after_utc - now < RENEW_BEFORE:
        return f"the CA expires at {ca.not_valid_after_utc.isoformat()}"
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return f"the serving certificate expires at {cert.not_valid_after_utc.isoformat()}"
    if cert.issuer != ca.subject:
        return "the serving certificate is not the CA's"
    missing = [h for h in hosts if h not in covered]
    if missing:
        return f"the serving certificate does not name {', '.join(missing)}"
    return None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(hosts: list[str], now: datetime, previous: Bundle | None = None, *, ca_name: str = "kubefly admission CA",
          lifetime: timedelta = SERVING_LIFETIME) -> Bundle:
    """A serving certificate for `hosts`, signed by `previous`'s CA while it has long to live, else by a new CA
    named `ca_name`; valid for `lifetime`, and never past the CA."""
    if not hosts:
        raise ValueError("a serving certificate needs at least one host name")
    ca_key = ca = None
    if previous is not None:
        try:
            ca = x509.load_pem_x509_certificate(previous.ca_crt)
            ca_key = serialization.load_pem_private_key(previous.ca_key, password=None)
        except ValueError:
            ca = None
        if ca is not None and ca.not_valid_after_utc - now < RENEW_BEFORE:
            ca = None
    start = now - timedelta(minutes=5)  # clocks of the API server and this host may differ a little
    if ca is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(now + CA_LIFETIME)
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(min(now + lifetime, ca.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(hosts)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Bundle(ca.public_bytes(serialization.Encoding.PEM), _key_pem(ca_key),
                  cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
