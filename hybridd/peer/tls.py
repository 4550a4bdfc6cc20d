"""TLS contexts for the LAN: each side presents its own self-signed certificate and trusts only pinned ones.

Peers change addresses, so host names are never checked; the pinned certificate (its fingerprint is the node id) is
the identity. The only unverified connection is the pairing one, whose server certificate SPAKE2 confirms afterwards.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hybridd.peer.errors import UntrustedPeer
from hybridd.peer.identity import Identity, fingerprint, same_fingerprint

TLSSource = asyncio.BaseTransport | ssl.SSLObject | ssl.SSLSocket | None


def server_context(identity: Identity, trusted_cert_pems: Sequence[bytes]) -> ssl.SSLContext:
    """The LAN listener's context: presents our cert; a client cert is optional but must be a paired peer's."""
    context = _base_context(ssl.PROTOCOL_TLS_SERVER)
    _present(context, identity)
    # Optional, not required: an unpaired desktop connects without a certificate, and may only pair.
    # A certificate that is presented must chain to one of exactly these, or the handshake fails.
    context.verify_mode = ssl.CERT_OPTIONAL
    if trusted_cert_pems:
        context.load_verify_locations(cadata="".join(pem.decode("ascii") for pem in trusted_cert_pems))
    return context


def client_context(identity: Identity | None, peer_cert_pem: bytes | None) -> ssl.SSLContext:
    """A context to reach one peer: pinned to `peer_cert_pem` (None: pairing only, unverified); `identity`: mutual."""
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # addresses change; the pinned certificate is the identity
    if peer_cert_pem is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=peer_cert_pem.decode("ascii"))
    if identity is not None:
        _present(context, identity)
    return context


def peer_fingerprint(source: TLSSource) -> str | None:
    """Fingerprint of the certificate the other side presented, from a transport or SSL object; None if none."""
    if source is None:
        return None
    # uvloop's transports are not asyncio.BaseTransport subclasses, so tell the SSL objects apart instead.
    ssl_object = source if isinstance(source, ssl.SSLObject | ssl.SSLSocket) else source.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return fingerprint(der) if der else None


def require_pinned(source: TLSSource, node_id: str) -> str:
    """The peer's fingerprint, after checking in constant time that it is `node_id`; UntrustedPeer otherwise."""
    seen = peer_fingerprint(source)
    if seen is None or not same_fingerprint(seen, node_id):
        raise UntrustedPeer("the other side did not present the pinned certificate")
    return seen


def observe_handshakes(context: ssl.SSLContext) -> list[str]:
    """Make each TLS handshake done with `context` append the server's fingerprint to the returned list.

    aiohttp releases a connection as soon as a small body has arrived, so `response.connection` is often None by the
    time a caller looks; this sees every connection the context ever carried instead.
    """
    seen: list[str] = []

    class _ObservedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()  # raises SSLWantReadError until the handshake is complete
            der = self.getpeercert(binary_form=True)
            if der:
                seen.append(fingerprint(der))

    context.sslobject_class = _ObservedSSLObject
    return seen


def _base_context(protocol: ssl._SSLMethod) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # What Python 3.13 turns on by default; set here so every Python checks our certificates the same way.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def _present(context: ssl.SSLContext, identity: Identity) -> None:
    """Load our certificate and key; ssl reads them only from a path, so hand it one that lives in memory."""
    bundle = identity.cert_pem + identity.key_pem
    if hasattr(os, "memfd_create"):
        # An anonymous in-memory file: the private key never lands in a temporary directory on disk.
        fd = os.memfd_create("hybridd-identity", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as out:
                out.write(bundle)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="hybridd-tls-") as folder:
        path = Path(folder) / "identity.pem"
        path.write_bytes(bundle)
        path.chmod(0o600)
        context.load_cert_chain(path)
