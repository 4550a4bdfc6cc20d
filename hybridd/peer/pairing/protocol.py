"""The pairing exchange: a window's one-time code, SPAKE2 on it, then key confirmation bound to both certificates.

Pure but for the store a success is committed to: `PairingServer` (SPAKE2 side B) takes a message's bytes and `now`
and returns the answer's bytes, or raises the PeerError to answer instead; the joining side (SPAKE2 A, `client.py`)
uses the same transcript and confirmations.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spake2 import SPAKE2_B

from hybridd.peer.errors import BadPairingMessage, PairingBusy, PairingError
from hybridd.peer.identity import Identity, same_fingerprint
from hybridd.peer.pairing import fields
from hybridd.peer.pairing.store import PairedPeer, PairingStore

log = logging.getLogger("hybridd.peer.pairing")

CODE_DIGITS = 8
WINDOW_TTL_S = 120.0
MAX_FAILURES = 3
# A start whose finish never came is abandoned after this long (and counts as a failed attempt).
EXCHANGE_TTL_S = 15.0
ID_A = b"hybridd-pair-desktop"
ID_B = b"hybridd-pair-peer"
TRANSCRIPT_LABEL = b"hybridd-pair-v1"
CONFIRM_A = b"hybridd-pair-confirm-A"
CONFIRM_B = b"hybridd-pair-confirm-B"
START_PATH = "/hybridd/v1/pair/start"
FINISH_PATH = "/hybridd/v1/pair/finish"
SPAKE2_MSG_BYTES = 33  # side byte + an Ed25519 group element
CONFIRMATION_BYTES = 32
SESSION_BYTES = 16
# One message for every refusal, so that a stranger on the LAN cannot tell a closed window from a wrong code.
REFUSED = "pairing refused: no pairing window is open, it has closed, or the code is wrong"


# ---------------------------------------------------------------- the window: pure, time is an argument


@dataclass
class PairingWindow:
    """An open pairing window: one code, closed by one success, MAX_FAILURES failures or ttl_s seconds."""

    code: str
    opened_at: float
    ttl_s: float = WINDOW_TTL_S
    failures: int = 0
    done: bool = False

    def accepts(self, now: float) -> bool:
        """Whether an attempt at `now` may use this window (a clock that stepped back closes it: fail closed)."""
        return not self.done and self.failures < MAX_FAILURES and 0 <= now - self.opened_at < self.ttl_s

    def record_failure(self) -> None:
        """Count a failed attempt (a wrong code, or a start that never finished)."""
        self.failures += 1

    def record_success(self) -> None:
        """Close the window for good: a code pairs exactly once."""
        self.done = True


def new_code() -> str:
    """A fresh one-time code: CODE_DIGITS random digits."""
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def open_window(now: float, code: str | None = None, ttl_s: float = WINDOW_TTL_S) -> PairingWindow:
    """A new window opened at `now`, with `code` or a fresh random one."""
    return PairingWindow(code=normalize_code(code) if code is not None else new_code(), opened_at=now, ttl_s=ttl_s)


def normalize_code(code: str) -> str:
    """The code's digits ("1234 5678" and "1234-5678" are fine); PairingError if it is not CODE_DIGITS digits."""
    digits = code.replace(" ", "").replace("-", "")
    if len(digits) != CODE_DIGITS or not digits.isascii() or not digits.isdigit():
        raise PairingError(f"a pairing code is {CODE_DIGITS} digits, as printed by `hybridd pair` on the peer")
    return digits


# ---------------------------------------------------------------- the exchange's cryptography: pure


@dataclass(frozen=True)
class Party:
    """One side of a pairing as the transcript sees it."""

    name: str
    role: str
    node_id: str


def transcript(msg_a: bytes, msg_b: bytes, joiner: Party, owner: Party) -> bytes:
    """Everything both sides must agree on, length-prefixed so no two different exchanges encode alike."""
    parts = (msg_a, msg_b, joiner.node_id.encode(), owner.node_id.encode(), joiner.name.encode(),
             owner.name.encode(), joiner.role.encode(), owner.role.encode())
    return TRANSCRIPT_LABEL + b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def confirmation(key: bytes, label: bytes, transcript_bytes: bytes) -> bytes:
    """HMAC-SHA256(key, label || transcript): proves knowledge of the SPAKE2 key for this transcript."""
    return hmac.new(key, label + transcript_bytes, hashlib.sha256).digest()


# ---------------------------------------------------------------- the window owner's side (SPAKE2 B)


@dataclass
class _Exchange:
    """A start that awaits its finish."""

    session: str
    started_at: float
    key: bytes
    transcript: bytes
    joiner: PairedPeer


class PairingServer:
    """The window owner's state: the open window, the one exchange in flight, and what a success stores."""

    def __init__(self, identity: Identity, name: str, role: str, store: PairingStore,
                 clock: Callable[[], float] = time.time,
                 on_paired: Callable[[PairedPeer], None] | None = None) -> None:
        self.identity = identity
        self.me = Party(name=name, role=role, node_id=identity.node_id)
        self.store = store
        self.clock = clock
        self.on_paired = on_paired
        self.window: PairingWindow | None = None
        self._exchange: _Exchange | None = None

    def open(self, now: float | None = None, code: str | None = None) -> str:
        """Open a fresh window (closing any previous one) and return its one-time code."""
        self.window = open_window(self.clock() if now is None else now, code)
        self._exchange = None
        return self.window.code

    def close(self) -> None:
        """Close the window now."""
        self.window = None
        self._exchange = None

    def is_open(self, now: float | None = None) -> bool:
        """Whether a pairing could start now."""
        return self.window is not None and self.window.accepts(self.clock() if now is None else now)

    def start(self, frame: bytes, peer_address: str | None, now: float) -> bytes:
        """Answer a start message: SPAKE2 side B; PairingError (403), PairingBusy (409) or BadPairingMessage (400)."""
        body = fields.read_message(frame)
        msg_a = fields.binary(body.at("msg_a"), SPAKE2_MSG_BYTES)
        joiner = Party(name=fields.name(body.at("name")), role=fields.role(body.at("role")),
                       node_id=fields.node_id(body.at("node_id")))
        cert_pem = fields.certificate(body.at("cert_pem"), joiner.node_id)
        if same_fingerprint(joiner.node_id, self.me.node_id):
            raise BadPairingMessage("a node cannot pair with itself")
        window = self._live_window(now)
        if self._exchange is not None:
            if now - self._exchange.started_at < EXCHANGE_TTL_S:
                raise PairingBusy("another pairing is in progress; try again in a few seconds")
            log.warning("pairing: an exchange was started and never finished; counted as a failed attempt")
            self._exchange = None
            window.record_failure()
            window = self._live_window(now)
        spake = SPAKE2_B(window.code.encode("ascii"), idA=ID_A, idB=ID_B)
        msg_b = spake.start()
        try:
            key = spake.finish(msg_a)
        except Exception as exc:  # the group code raises assorted errors on a bad point; all mean "malformed"
            raise BadPairingMessage("msg_a is not a valid SPAKE2 message") from exc
        self._exchange = _Exchange(
            session=secrets.token_hex(SESSION_BYTES), started_at=now, key=key,
            transcript=transcript(msg_a, msg_b, joiner, self.me),
            joiner=PairedPeer(node_id=joiner.node_id, name=joiner.name, role=joiner.role, cert_pem=cert_pem,
                              paired_at=now, address=peer_address))
        return _frame({"session": self._exchange.session, "msg_b": fields.encode(msg_b), "name": self.me.name,
                       "role": self.me.role, "node_id": self.me.node_id})

    def finish(self, frame: bytes, now: float) -> bytes:
        """Answer a finish message: check A's confirmation, store A, answer with ours; PairingError if it fails."""
        body = fields.read_message(frame)
        session = body.at("session").text(max_chars=2 * SESSION_BYTES)
        confirmation_a = fields.binary(body.at("confirmation_a"), CONFIRMATION_BYTES)
        exchange, window = self._exchange, self._live_window(now)
        if exchange is None or not hmac.compare_digest(exchange.session, session):
            raise PairingError(REFUSED)
        self._exchange = None
        if not hmac.compare_digest(confirmation(exchange.key, CONFIRM_A, exchange.transcript), confirmation_a):
            window.record_failure()
            log.warning("pairing: a confirmation failed (wrong code, or a machine in the middle); %d of %d attempts "
                        "used", window.failures, MAX_FAILURES)
            raise PairingError(REFUSED)
        self.store.add(exchange.joiner)  # first: if the disk refuses, the window stays open for another try
        window.record_success()
        log.info("paired with %s %r (node id %s)", exchange.joiner.role, exchange.joiner.name,
                 exchange.joiner.node_id[:16])
        if self.on_paired is not None:
            self.on_paired(exchange.joiner)
        return _frame({"confirmation_b": fields.encode(confirmation(exchange.key, CONFIRM_B, exchange.transcript)),
                       "cert_pem": self.identity.cert_pem.decode("ascii")})

    def _live_window(self, now: float) -> PairingWindow:
        if self.window is None or not self.window.accepts(now):
            self._exchange = None
            raise PairingError(REFUSED)
        return self.window


def _frame(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer).encode()
