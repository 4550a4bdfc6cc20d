"""A pairing message's fields, read from untrusted JSON: names, roles, node ids, base64 and certificates.

Each reader takes the `Reader` of one field, so the failure names it and is the reader's error: BadPairingMessage for
a message from the LAN, StateFileError for an entry of the pairings file.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from hybridd.peer.errors import BadPairingMessage
from hybridd.peer.identity import fingerprint_of_pem, same_fingerprint
from hybridd.validate import JSON, Reader

ROLES = ("desktop", "peer")
MAX_NAME_CHARS = 64
MAX_CERT_CHARS = 8192
MAX_MESSAGE_BYTES = 16384
NODE_ID_CHARS = 64  # hex of a SHA-256


def read_message(frame: bytes) -> Reader:
    """A pairing message (a JSON object of at most MAX_MESSAGE_BYTES) to read fields from."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise BadPairingMessage(f"a pairing message is at most {MAX_MESSAGE_BYTES} bytes")
    try:
        body: Any = json.loads(frame)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nesting past the stack
        raise BadPairingMessage("the body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise BadPairingMessage("the body must be a JSON object")
    return Reader(body, BadPairingMessage, JSON)


def encode(data: bytes) -> str:
    """Bytes as a message carries them: base64."""
    return base64.b64encode(data).decode("ascii")


def name(field: Reader) -> str:
    """A node's name: printable text of at most MAX_NAME_CHARS characters."""
    return field.text(max_chars=MAX_NAME_CHARS, printable=True)


def role(field: Reader) -> str:
    """A node's role: one of ROLES."""
    return field.choice(ROLES)


def node_id(field: Reader) -> str:
    """A node id: the SHA-256 of its certificate, in lowercase hex."""
    value = field.text(max_chars=NODE_ID_CHARS)
    if len(value) != NODE_ID_CHARS or any(c not in "0123456789abcdef" for c in value):
        raise field.fail(f"must be {NODE_ID_CHARS} lowercase hex digits (SHA-256 of the certificate)")
    return value


def binary(field: Reader, size: int) -> bytes:
    """Exactly `size` bytes, in base64."""
    text = field.text(max_chars=4 * size)
    try:
        value = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise field.fail("must be base64") from exc
    if len(value) != size:
        raise field.fail(f"must decode to {size} bytes")
    return value


def certificate(field: Reader, fingerprint: str) -> bytes:
    """A PEM certificate whose fingerprint is `fingerprint` (a node id)."""
    pem = field.text(max_chars=MAX_CERT_CHARS).encode("utf-8")
    try:
        seen = fingerprint_of_pem(pem)
    except ValueError as exc:
        raise field.fail("is not a PEM certificate") from exc
    if not same_fingerprint(seen, fingerprint):
        raise field.fail(f"is not the certificate with fingerprint {fingerprint[:16]}…")
    return pem
