"""The webhook's certificate: made with `cryptography`, shared through a Secret, re-issued when it will not do."""

from __future__ import annotations

import asyncio
import ssl
from datetime import datetime, timedelta, timezone

from cryptography import x509

from kubefly.admission import tls
from kubefly.admission.server import AdmissionWebhook

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
SVC = ["kubefly-operator-webhook.kubefly-system.svc", "kubefly-operator-webhook.kubefly-system.svc.cluster.local"]


def test_a_fresh_pair_names_every_host_and_round_trips_through_secret_data():
    b = tls.issue([*SVC, "127.0.0.1"], NOW)
    assert sorted(b.hosts()) == sorted([*SVC, "127.0.0.1"])
    again = tls.Bundle.from_secret({"data": b.secret_data()})
    assert again == b
    assert tls.renewal(again, SVC, NOW) is None
    ca = x509.load_pem_x509_certificate(b.ca_crt)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert x509.load_pem_x509_certificate(b.tls_crt).issuer == ca.subject


def test_what_will_not_do_says_why():
    b = tls.issue(SVC, NOW)
    assert tls.renewal(None, SVC, NOW) == "no certificate yet"
    assert tls.Bundle.from_secret({"data": {"tls.crt": "eA=="}}) is None
    assert "does not name 127.0.0.1" in tls.renewal(b, [*SVC, "127.0.0.1"], NOW)
    assert "serving certificate expires" in tls.renewal(b, SVC, NOW + tls.SERVING_LIFETIME - timedelta(days=1))


def test_a_reissue_keeps_the_ca_so_the_ca_bundle_stays():
    first = tls.issue(SVC, NOW)
    second = tls.issue([*SVC, "127.0.0.1"], NOW + timedelta(days=1), first)
    assert second.ca_crt == first.ca_crt and second.ca_bundle == first.ca_bundle
    assert second.tls_crt != first.tls_crt and "127.0.0.1" in second.hosts()
    # A CA about to expire is replaced, and the serving certificate with it.
    late = NOW + tls.CA_LIFETIME - timedelta(days=2)
    third = tls.issue(SVC, late, first)
    assert third.ca_crt != first.ca_crt and tls.renewal(third, SVC, late) is None


async def test_the_server_context_loads_the_pair_from_memory_and_a_client_trusting_the_ca_connects():
    bundle = tls.issue(["localhost", "127.0.0.1"], datetime.now(timezone.utc))
    hook = AdmissionWebhook(port=0, namespace="ns", secret="s", config=None, hosts=["127.0.0.1"])
    hook._use(bundle)

    async def answer(reader, writer):
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=hook._ctx)
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context(cadata=bundle.ca_crt.decode())
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        writer.close()
        # Another CA is not trusted.
        stranger = ssl.create_default_context(cadata=tls.issue(["127.0.0.1"], datetime.now(timezone.utc)).ca_crt.decode())
        try:
            await asyncio.open_connection("127.0.0.1", port, ssl=stranger)
            raise AssertionError("a client trusting another CA connected")
        except ssl.SSLCertVerificationError:
            pass
