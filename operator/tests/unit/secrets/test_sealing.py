import base64

import pytest

from kubefly.api.appsecret import AppSecretSpec
from kubefly.secrets import sealing
from kubefly.secrets.digest import combined_digest, digest_key, set_digest, value_digest

KEY = sealing.generate()
PUB = KEY.public_key()
WHERE = {"namespace": "org", "app": "web", "key": "DB_URL"}


def test_round_trip_and_fresh_ciphertext_each_time():
    a = sealing.seal(PUB, value="postgres://u:p@db/x", **WHERE)
    b = sealing.seal(PUB, value="postgres://u:p@db/x", **WHERE)
    assert a != b
    assert sealing.unseal(KEY, a, **WHERE) == "postgres://u:p@db/x"
    assert "postgres" not in a


def test_sealed_values_pass_the_crd_pattern():
    sealed = sealing.seal(PUB, value="v" * 1000, **WHERE)
    AppSecretSpec(app="web", data={"DB_URL": sealed})


@pytest.mark.parametrize("moved", [{"namespace": "other"}, {"app": "api"}, {"key": "OTHER"}])
def test_a_value_moved_to_another_organisation_app_or_key_does_not_open(moved):
    sealed = sealing.seal(PUB, value="s3cret", **WHERE)
    with pytest.raises(sealing.UnsealError) as err:
        sealing.unseal(KEY, sealed, **{**WHERE, **moved})
    assert "s3cret" not in str(err.value)


def test_another_clusters_key_is_named_as_such():
    other = sealing.generate()
    sealed = sealing.seal(other.public_key(), value="x", **WHERE)
    with pytest.raises(sealing.UnsealError, match="another cluster key"):
        sealing.unseal(KEY, sealed, **WHERE)


def test_tampering_and_garbage_are_refused():
    blob = bytearray(base64.b64decode(sealing.seal(PUB, value="x", **WHERE)))
    blob[-1] ^= 1
    with pytest.raises(sealing.UnsealError):
        sealing.unseal(KEY, base64.b64encode(bytes(blob)).decode(), **WHERE)
    with pytest.raises(sealing.UnsealError, match="format"):
        sealing.unseal(KEY, base64.b64encode(b"short").decode(), **WHERE)
    with pytest.raises(sealing.UnsealError, match="base64"):
        sealing.unseal(KEY, "!!!", **WHERE)


def test_public_key_text_round_trip():
    assert sealing.public_bytes(sealing.load_public(sealing.encode_public(PUB))) == sealing.public_bytes(PUB)
    with pytest.raises(ValueError):
        sealing.load_public("bm90IGEga2V5")


def test_private_key_round_trip():
    assert sealing.public_bytes(sealing.load_private(sealing.private_bytes(KEY)).public_key()) == sealing.public_bytes(PUB)


def test_digests_change_with_the_value_and_need_the_cluster_key():
    k = digest_key(sealing.private_bytes(KEY))
    d1 = value_digest(k, org="acme", app="web", name="A", value="one")
    assert d1 == value_digest(k, org="acme", app="web", name="A", value="one")
    assert d1 != value_digest(k, org="acme", app="web", name="A", value="two")
    assert d1 != value_digest(k, org="acme", app="api", name="A", value="one")
    # Another organisation's app of the same name with the same value: a different digest.
    assert d1 != value_digest(k, org="globex", app="web", name="A", value="one")
    other = digest_key(sealing.private_bytes(sealing.generate()))
    assert d1 != value_digest(other, org="acme", app="web", name="A", value="one")
    assert len(d1) == 16


def test_set_digest_covers_keys_and_values():
    assert set_digest({"A": "1", "B": "2"}) == set_digest({"B": "2", "A": "1"})
    assert set_digest({"A": "1"}) != set_digest({"A": "1", "B": "2"})
    assert set_digest({"A": "1"}) != set_digest({"A": "3"})


def test_combined_digest_joins_digests_in_appsecret_name_order():
    assert combined_digest([("zeta", "d2"), ("alpha", "d1")]) == "d1,d2"
    assert combined_digest([]) == ""
