"""This node's identity: an EC P-256 key and a self-signed certificate kept under the state directory.

The node id is the SHA-256 of the DER certificate, so a peer that pinned the certificate pins the id, and the other way
round. The certificate passes OpenSSL's strict verification (SKI, AKI, critical basicConstraints, keyUsage, SAN).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hybridd.peer.errors import StateFileError

IDENTITY_DIR = "identity"
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
VALIDITY = datetime.timedelta(days=3650)
# Clocks on a LAN disagree a little; a certificate born "in the future" would fail on a peer that lags behind.
BACKDATE = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Identity:
    """Our private key and certificate (PEM) and the node id derived from the certificate."""

    key_pem: bytes
    cert_pem: bytes
    node_id: str

    @property
    def cert_der(self) -> bytes:
        """The certificate in DER form (what the node id hashes)."""
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)


def fingerprint(cert_der: bytes) -> str:
    """Lowercase hex SHA-256 of a DER certificate: the node id."""
    return hashlib.sha256(cert_der).hexdigest()


def same_fingerprint(a: str, b: str) -> bool:
    """Whether two fingerprints are equal, compared in constant time."""
    return hmac.compare_digest(a.strip().lower().encode(), b.strip().lower().encode())


def fingerprint_of_pem(cert_pem: bytes) -> str:
    """The fingerprint of a PEM certificate; ValueError when it is not one."""
    return fingerprint(x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER))


def load_or_create_identity(state_dir: Path, name: str) -> Identity:
    """This node's identity from `state_dir/identity/`, made on first start (name becomes the certificate CN)."""
    folder = state_dir / IDENTITY_DIR
    key_path, cert_path = folder / KEY_FILE, folder / CERT_FILE
    if not key_path.exists() and not cert_path.exists():
        _write_new_identity(state_dir, folder, name)
    return _load_identity(folder, key_path, cert_path)


def _load_identity(folder: Path, key_path: Path, cert_path: Path) -> Identity:
    for path in (key_path, cert_path):
        if not path.exists():
            raise StateFileError(f"identity is incomplete: {path} is missing; remove {folder} to make a new identity "
                                 f"(every peer must then pair again)")
    # Tighten permissions that something else loosened: the key is the node's whole trust.
    with contextlib.suppress(OSError):
        folder.chmod(0o700)
        key_path.chmod(0o600)
        cert_path.chmod(0o600)
    key_pem = _read(key_path)
    cert_pem = _read(cert_path)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise StateFileError(f"identity key {key_path} is corrupt: {exc}") from exc
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise StateFileError(f"identity certificate {cert_path} is corrupt: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise StateFileError(f"identity key {key_path} does not belong to the certificate {cert_path}")
    return Identity(key_pem=key_pem, cert_pem=cert_pem,
                    node_id=fingerprint(cert.public_bytes(serialization.Encoding.DER)))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def new_identity(name: str) -> Identity:
    """A fresh key and self-signed certificate in memory (nothing written)."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert = make_self_signed_cert(key, name)
    return Identity(key_pem=key_pem, cert_pem=cert.public_bytes(serialization.Encoding.PEM),
                    node_id=fingerprint(cert.public_bytes(serialization.Encoding.DER)))


def _write_new_identity(state_dir: Path, folder: Path, name: str) -> None:
    identity = new_identity(name)
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Build the folder beside its final place and rename it in one step: a crash never leaves half an identity.
        staging = Path(tempfile.mkdtemp(prefix=".identity-", dir=state_dir))
    except OSError as exc:
        raise StateFileError(f"cannot write the identity to {folder}: {exc.strerror or exc}") from exc
    try:
        for file_name, data in ((KEY_FILE, identity.key_pem), (CERT_FILE, identity.cert_pem)):
            fd = os.open(staging / file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        os.replace(staging, folder)  # replaces an empty leftover folder too
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if (folder / KEY_FILE).exists():
            return  # another process made one first: theirs wins, and the caller loads it
        raise StateFileError(f"cannot write the identity to {folder}: {exc.strerror or exc}") from exc


def make_self_signed_cert(key: ec.EllipticCurvePrivateKey, name: str,
                          now: datetime.datetime | None = None) -> x509.Certificate:
    """A self-signed end-entity certificate for `key` with CN `name` that passes strict X.509 verification."""
    now = now or datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name or "hybridd")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(_dns_label(name))]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def _dns_label(name: str) -> str:
    # The SAN is required by strict verification but never checked (peers pin the certificate, not a host name);
    # a node name like "Ana's desktop" still has to become a valid DNS label.
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "hybridd"
