"""The joining side of a pairing (SPAKE2 side A): `hybridd pair <peer> <code>` on the desktop, over HTTPS."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiohttp
from spake2 import SPAKE2_A
from yarl import URL

from hybridd.peer.errors import BadPairingMessage, LinkError, PairingError, PairingThrottled
from hybridd.peer.identity import Identity, same_fingerprint
from hybridd.peer.pairing import fields
from hybridd.peer.pairing.protocol import (
    CONFIRM_A,
    CONFIRM_B,
    CONFIRMATION_BYTES,
    FINISH_PATH,
    ID_A,
    ID_B,
    SESSION_BYTES,
    SPAKE2_MSG_BYTES,
    START_PATH,
    Party,
    confirmation,
    normalize_code,
    transcript,
)
from hybridd.peer.pairing.store import PairedPeer, PairingStore
from hybridd.peer.tls import client_context, observe_handshakes

log = logging.getLogger("hybridd.peer.pairing")

MIDDLE = ("the TLS certificate we saw is not the peer's own: something is in the middle of the connection; "
          "nothing was stored")


async def pair_with(base_url: str, code: str, identity: Identity, name: str, role: str, store: PairingStore,
                    http: aiohttp.ClientSession | None = None, clock: Callable[[], float] = time.time) -> PairedPeer:
    """Pair with the node at `base_url` (https://host:port) using its one-time code; store and return it."""
    url = URL(base_url)
    if url.scheme != "https" or not url.host:
        raise PairingError(f"pair with an https:// address of the peer's LAN listener, not {base_url!r}")
    digits = normalize_code(code)
    if role not in fields.ROLES:
        raise PairingError(f"role must be one of: {', '.join(fields.ROLES)}")
    me = Party(name=name, role=role, node_id=identity.node_id)
    # Unverified on purpose: we have nothing to pin yet. Every handshake is observed, and the server certificate
    # goes into the transcript, which the peer only confirms if it is its own.
    tls = client_context(identity=None, peer_cert_pem=None)
    server_fingerprints = observe_handshakes(tls)
    session = http or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    try:
        spake = SPAKE2_A(digits.encode("ascii"), idA=ID_A, idB=ID_B)
        msg_a = spake.start()
        started = fields.read_message(await _post(session, url.join(URL(START_PATH)), tls, {
            "msg_a": fields.encode(msg_a), "name": me.name, "role": me.role, "node_id": me.node_id,
            "cert_pem": identity.cert_pem.decode("ascii")}))
        msg_b = fields.binary(started.at("msg_b"), SPAKE2_MSG_BYTES)
        owner = Party(name=fields.name(started.at("name")), role=fields.role(started.at("role")),
                      node_id=fields.node_id(started.at("node_id")))
        seen = _one_fingerprint(server_fingerprints)
        try:
            key = spake.finish(msg_b)
        except Exception as exc:  # assorted errors from the group code; all mean "malformed"
            raise PairingError("the peer sent an invalid SPAKE2 message") from exc
        # The transcript holds the certificate we saw, not the one the peer claims: in the middle, they differ,
        # and the peer, which uses its own, refuses our confirmation (and counts a failed attempt).
        in_the_middle = not same_fingerprint(owner.node_id, seen)
        transcript_bytes = transcript(msg_a, msg_b, me, replace(owner, node_id=seen))
        try:
            finished = fields.read_message(await _post(session, url.join(URL(FINISH_PATH)), tls, {
                "session": started.at("session").text(max_chars=2 * SESSION_BYTES),
                "confirmation_a": fields.encode(confirmation(key, CONFIRM_A, transcript_bytes))}))
        except PairingError as exc:
            if in_the_middle:
                raise PairingError(MIDDLE) from exc
            raise
        confirmation_b = fields.binary(finished.at("confirmation_b"), CONFIRMATION_BYTES)
        if not hmac.compare_digest(confirmation(key, CONFIRM_B, transcript_bytes), confirmation_b):
            raise PairingError("the peer's confirmation is wrong: it does not know the code; nothing was stored")
        cert_pem = fields.certificate(finished.at("cert_pem"), seen)
        if in_the_middle or not same_fingerprint(_one_fingerprint(server_fingerprints), seen):
            raise PairingError(MIDDLE)
    except BadPairingMessage as exc:
        raise PairingError(f"the peer answered with a malformed message: {exc.message}") from exc
    finally:
        if http is None:
            await session.close()
    peer = PairedPeer(node_id=owner.node_id, name=owner.name, role=owner.role, cert_pem=cert_pem,
                      paired_at=clock(), address=url.host, port=url.port)
    store.add(peer)
    log.info("paired with %s %r at %s (node id %s)", peer.role, peer.name, url.host, peer.node_id[:16])
    return peer


def _one_fingerprint(seen: list[str]) -> str:
    """The server certificate of every connection so far, which must be one and the same."""
    if not seen or any(not same_fingerprint(f, seen[0]) for f in seen):
        raise PairingError("the peer's TLS certificate changed between connections; nothing was stored")
    return seen[0]


async def _post(session: aiohttp.ClientSession, url: URL, tls: Any, body: dict[str, Any]) -> bytes:
    """The peer's answer to one message: its bytes when it accepts; PairingError (PairingThrottled) with its reason."""
    try:
        async with session.post(url, json=body, ssl=tls) as response:
            raw = await response.read()
            status = response.status
    except aiohttp.ClientError as exc:
        raise LinkError(f"cannot reach the peer at {url.origin()}: {exc}") from exc
    except TimeoutError as exc:
        raise LinkError(f"the peer at {url.origin()} did not answer in time") from exc
    if status != 200:
        message = _envelope_message(raw) or f"HTTP {status}"
        raise (PairingThrottled if status == 429 else PairingError)(f"the peer refused: {message}")
    return raw


def _envelope_message(raw: bytes) -> str | None:
    try:
        answer = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    error = answer.get("error") if isinstance(answer, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message[:300] if isinstance(message, str) else None
