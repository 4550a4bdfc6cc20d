"""Node identity: made once, kept 0600, reloaded, strict-verification clean; corrupt files are clear errors."""

from __future__ import annotations

import datetime
import hashlib
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hybridd.errors import HybriddError
from hybridd.peer.errors import (
    BadPairingMessage,
    LinkError,
    PairingError,
    PairingThrottled,
    PeerError,
    StateFileError,
    UntrustedPeer,
)
from hybridd.peer.identity import fingerprint, load_or_create_identity, new_identity, same_fingerprint


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_makes_a_key_and_certificate_kept_private(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path / "state", "spark-1")

    folder = tmp_path / "state" / "identity"
    assert mode(folder) == 0o700
    assert mode(folder / "key.pem") == 0o600
    assert mode(folder / "cert.pem") == 0o600
    assert (folder / "cert.pem").read_bytes() == identity.cert_pem
    assert (folder / "key.pem").read_bytes() == identity.key_pem
    assert identity.node_id == hashlib.sha256(identity.cert_der).hexdigest() == fingerprint(identity.cert_der)
    assert len(identity.node_id) == 64 and identity.node_id == identity.node_id.lower()
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["identity"]  # no staging folder left behind


def test_later_starts_reload_the_same_identity(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path, "spark-1")
    again = load_or_create_identity(tmp_path, "renamed-later")  # the name only matters on first start
    assert again == first


def test_loose_permissions_are_tightened_on_load(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, "spark-1")
    (tmp_path / "identity").chmod(0o755)
    (tmp_path / "identity" / "key.pem").chmod(0o644)
    load_or_create_identity(tmp_path, "spark-1")
    assert mode(tmp_path / "identity") == 0o700
    assert mode(tmp_path / "identity" / "key.pem") == 0o600


def test_certificate_has_what_strict_verification_needs(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path, "Ana's desktop")
    cert = x509.load_pem_x509_certificate(identity.cert_pem)

    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "Ana's desktop"
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ana-s-desktop"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3650) <= lifetime <= datetime.timedelta(days=3652)
    assert cert.not_valid_before_utc < datetime.datetime.now(datetime.UTC)


def test_strict_verification_accepts_the_certificate_in_a_real_handshake(tmp_path: Path) -> None:
    """Python 3.13 turns VERIFY_X509_STRICT on by default; set it here explicitly, in plain ssl contexts."""
    server_id = load_or_create_identity(tmp_path / "server", "spark-1")
    client_id = load_or_create_identity(tmp_path / "client", "desktop")

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "server/identity/cert.pem", tmp_path / "server/identity/key.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    server.verify_flags |= ssl.VERIFY_X509_STRICT
    server.load_verify_locations(cadata=client_id.cert_pem.decode())
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(tmp_path / "client/identity/cert.pem", tmp_path / "client/identity/key.pem")
    client.check_hostname = False
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    client.load_verify_locations(cadata=server_id.cert_pem.decode())

    client_side, server_side = handshake_in_memory(client, server)

    assert fingerprint(client_side.getpeercert(binary_form=True) or b"") == server_id.node_id
    assert fingerprint(server_side.getpeercert(binary_form=True) or b"") == client_id.node_id


def handshake_in_memory(client: ssl.SSLContext, server: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a TLS handshake between two contexts over memory BIOs (no sockets); raise what either side raises."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(c_in, c_out, server_side=False)
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        if all(done.values()):
            return client_side, server_side
    raise AssertionError("handshake did not finish")


def test_strict_verification_rejects_another_certificate_with_the_same_name(tmp_path: Path) -> None:
    real = load_or_create_identity(tmp_path / "real", "spark-1")
    impostor = new_identity("spark-1")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*write_pair(tmp_path / "impostor", impostor.cert_pem, impostor.key_pem))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    client.load_verify_locations(cadata=real.cert_pem.decode())

    with pytest.raises(ssl.SSLCertVerificationError):
        handshake_in_memory(client, server)


def write_pair(folder: Path, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    folder.mkdir()
    (folder / "cert.pem").write_bytes(cert_pem)
    (folder / "key.pem").write_bytes(key_pem)
    return folder / "cert.pem", folder / "key.pem"


@pytest.mark.parametrize("file_name", ["key.pem", "cert.pem"])
def test_a_corrupt_file_is_an_error_naming_it(tmp_path: Path, file_name: str) -> None:
    load_or_create_identity(tmp_path, "spark-1")
    broken = tmp_path / "identity" / file_name
    broken.write_bytes(b"-----BEGIN GARBAGE-----\nnot base64\n")

    with pytest.raises(StateFileError) as caught:
        load_or_create_identity(tmp_path, "spark-1")

    assert str(broken) in caught.value.message
    assert "corrupt" in caught.value.message
    assert broken.read_bytes().startswith(b"-----BEGIN GARBAGE")  # never silently replaced: peers pinned it


def test_a_missing_half_is_an_error_not_a_new_identity(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, "spark-1")
    (tmp_path / "identity" / "cert.pem").unlink()
    with pytest.raises(StateFileError, match=r"cert\.pem is missing"):
        load_or_create_identity(tmp_path, "spark-1")


def test_a_key_that_does_not_match_the_certificate_is_an_error(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, "spark-1")
    (tmp_path / "identity" / "key.pem").write_bytes(new_identity("other").key_pem)
    with pytest.raises(StateFileError, match="does not belong to the certificate"):
        load_or_create_identity(tmp_path, "spark-1")


def test_an_empty_leftover_folder_gets_an_identity(tmp_path: Path) -> None:
    (tmp_path / "identity").mkdir()
    identity = load_or_create_identity(tmp_path, "spark-1")
    assert (tmp_path / "identity" / "cert.pem").read_bytes() == identity.cert_pem


def test_new_identity_is_in_memory_and_consistent() -> None:
    identity = new_identity("desktop")
    cert = x509.load_pem_x509_certificate(identity.cert_pem)
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    assert key.public_key() == cert.public_key()
    assert identity.node_id == fingerprint(identity.cert_der)
    assert new_identity("desktop").node_id != identity.node_id


def test_same_fingerprint() -> None:
    a = new_identity("a").node_id
    b = new_identity("b").node_id
    assert same_fingerprint(a, a)
    assert same_fingerprint(a, a.upper())
    assert not same_fingerprint(a, b)
    assert not same_fingerprint(a, a[:-1])
    assert not same_fingerprint(a, "")


def test_error_tree_and_statuses() -> None:
    for error in (StateFileError, PairingError, UntrustedPeer, LinkError):
        assert issubclass(error, PeerError)
    assert issubclass(PeerError, HybriddError)
    assert issubclass(PairingThrottled, PairingError) and issubclass(BadPairingMessage, PairingError)
    assert (PairingError.status, PairingThrottled.status, BadPairingMessage.status) == (403, 429, 400)
    assert (UntrustedPeer.status, LinkError.status, StateFileError.status) == (403, 502, 500)
