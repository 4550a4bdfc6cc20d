"""The pairing exchange: a window's one-time code, SPAKE2 on it, then key confirmation bound to both certificates.

Pure but for the store a success is committed to and the log: `PairingServer` (SPAKE2 side B) takes a message's
bytes and `now` and returns the answer's bytes, or raises the PeerError to answer instead; the joining side (SPAKE2 A,
`client.py`) uses the same transcript and confirmations.
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

from hybridd.peer.errors import BadPairingMessage, PairingError, PairingThrottled
from hybridd.peer.identity import Identity, same_fingerprint
from hybridd.peer.pairing import fields
from hybridd.peer.pairing.attempts import (
    MAX_EVENTS,
    SOURCE_BURST_S,
    PairingEvent,
    PairingReport,
    StartBounds,
    source_key,
)
from hybridd.peer.pairing.store import PairedPeer, PairingStore

log = logging.getLogger("hybridd.peer.pairing")

CODE_DIGITS = 8
WINDOW_TTL_S = 120.0
MAX_FAILURES = 3
# A start whose finish has not come by then is dropped; it holds nothing and counts against nothing meanwhile. The
# joining side sends its finish one round trip after the start.
EXCHANGE_TTL_S = 5.0
MAX_EXCHANGES = 8
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
    """An open pairing window: one code, closed by one success, MAX_FAILURES wrong codes or ttl_s seconds."""

    code: str
    opened_at: float
    ttl_s: float = WINDOW_TTL_S
    failures: int = 0
    done: bool = False

    def accepts(self, now: float) -> bool:
        """Whether an attempt at `now` may use this window (a clock that stepped back closes it: fail closed)."""
        return not self.done and self.failures < MAX_FAILURES and 0 <= now - self.opened_at < self.ttl_s

    def record_failure(self) -> None:
        """Count a failed attempt: a finished exchange whose code was wrong."""
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


@dataclass(frozen=True)
class _Exchange:
    """A start that awaits its finish."""

    session: str
    started_at: float
    source: str
    key: bytes
    transcript: bytes
    joiner: PairedPeer


class PairingServer:
    """The window owner's state: the open window, the exchanges in flight, what happened, and what a success stores.

    Several exchanges may be in flight (at most MAX_EXCHANGES, the oldest dropped for a new one; one per
    source, a source's new start replacing its old one), and none holds the window: an exchange not finished within
    EXCHANGE_TTL_S is dropped, and the first right code to finish pairs. Only a finished exchange with a wrong code
    counts against the code; starts are bounded per source (attempts.py). Every step records what happened, for
    `hybridd pair` on this node to show.
    """

    def __init__(self, identity: Identity, name: str, role: str, store: PairingStore,
                 clock: Callable[[], float] = time.time,
                 on_paired: Callable[[PairedPeer], None] | None = None) -> None:
        self.identity = identity
        self.me = Party(name=name, role=role, node_id=identity.node_id)
        self.store = store
        self.clock = clock
        self.on_paired = on_paired
        self.window: PairingWindow | None = None
        self.windows_opened = 0
        self._exchanges: list[_Exchange] = []
        self._bounds = StartBounds()
        self._events: list[PairingEvent] = []
        self._events_left_out = 0
        self._outcome: str | None = None

    def open(self, now: float | None = None, code: str | None = None) -> str:
        """Open a fresh window (closing any previous one) and return its one-time code."""
        self.window = open_window(self.clock() if now is None else now, code)
        self.windows_opened += 1
        self._exchanges = []
        self._bounds = StartBounds()
        self._events = []
        self._events_left_out = 0
        self._outcome = None
        return self.window.code

    def close(self, now: float | None = None) -> None:
        """Close the window now."""
        self._close(self.clock() if now is None else now, "closed", "the window was closed on this node")
        self.window = None

    def is_open(self, now: float | None = None) -> bool:
        """Whether a pairing could start now."""
        return self.window is not None and self.window.accepts(self.clock() if now is None else now)

    def report(self, now: float) -> PairingReport:
        """The window as of `now`: open or how it ended, and what happened to it."""
        self._settle(now)
        window = self.window
        is_open = window is not None and window.accepts(now)
        return PairingReport(
            window=self.windows_opened, open=is_open, opened_at=window.opened_at if window else None,
            expires_in_s=max(0.0, window.opened_at + window.ttl_s - now) if window and is_open else 0.0,
            failures=window.failures if window else 0, max_failures=MAX_FAILURES, outcome=self._outcome,
            events=tuple(self._events), events_left_out=self._events_left_out)

    def start(self, frame: bytes, peer_address: str | None, now: float) -> bytes:
        """Answer a start message: SPAKE2 side B; PairingError (403), PairingThrottled (429) or BadPairingMessage."""
        self._settle(now)
        source = peer_address or ""
        try:
            body = fields.read_message(frame)
            msg_a = fields.binary(body.at("msg_a"), SPAKE2_MSG_BYTES)
            joiner = Party(name=fields.name(body.at("name")), role=fields.role(body.at("role")),
                           node_id=fields.node_id(body.at("node_id")))
            cert_pem = fields.certificate(body.at("cert_pem"), joiner.node_id)
            if same_fingerprint(joiner.node_id, self.me.node_id):
                raise BadPairingMessage("a node cannot pair with itself")
        except BadPairingMessage as exc:
            self._note(now, source, "malformed", f"a start that could not be read: {exc.message}")
            raise
        window = self._live_window(now)
        over = self._bounds.refusal(source, now)
        if over is not None:
            self._note(now, source, "throttled", f"a start refused: {over}")
            raise PairingThrottled(f"too many pairing attempts from your address ({over}); "
                                   f"wait {SOURCE_BURST_S:g} s, or ask for a new code if this one keeps failing")
        self._bounds = self._bounds.counted(source, now)
        spake = SPAKE2_B(window.code.encode("ascii"), idA=ID_A, idB=ID_B)
        msg_b = spake.start()
        try:
            key = spake.finish(msg_a)
        except Exception as exc:  # the group code raises assorted errors on a bad point; all mean "malformed"
            self._note(now, source, "malformed", "a start whose msg_a is not a valid SPAKE2 message")
            raise BadPairingMessage("msg_a is not a valid SPAKE2 message") from exc
        self._make_room(source, now)
        exchange = _Exchange(
            session=secrets.token_hex(SESSION_BYTES), started_at=now, source=source, key=key,
            transcript=transcript(msg_a, msg_b, joiner, self.me),
            joiner=PairedPeer(node_id=joiner.node_id, name=joiner.name, role=joiner.role, cert_pem=cert_pem,
                              paired_at=now, address=peer_address))
        self._exchanges.append(exchange)
        self._note(now, source, "started", f"an exchange, from a node that calls itself {joiner.name!r} "
                                           f"({joiner.role})")
        return _frame({"session": exchange.session, "msg_b": fields.encode(msg_b), "name": self.me.name,
                       "role": self.me.role, "node_id": self.me.node_id})

    def finish(self, frame: bytes, now: float, peer_address: str | None = None) -> bytes:
        """Answer a finish message: check A's confirmation, store A, answer with ours; PairingError if it fails."""
        self._settle(now)
        source = peer_address or ""
        try:
            body = fields.read_message(frame)
            session = body.at("session").text(max_chars=2 * SESSION_BYTES).encode()
            confirmation_a = fields.binary(body.at("confirmation_a"), CONFIRMATION_BYTES)
        except BadPairingMessage as exc:
            self._note(now, source, "malformed", f"a finish that could not be read: {exc.message}")
            raise
        window = self._live_window(now)
        exchange = next((e for e in self._exchanges if hmac.compare_digest(e.session.encode(), session)), None)
        if exchange is None:
            self._note(now, source, "unknown_session", "a finish for no exchange in flight (expired, replaced or "
                                                       "never started): refused, not counted")
            raise PairingError(REFUSED)
        self._exchanges.remove(exchange)
        if not hmac.compare_digest(confirmation(exchange.key, CONFIRM_A, exchange.transcript), confirmation_a):
            window.record_failure()
            self._note(now, source, "wrong_code", f"the confirmation failed (a wrong code, or a machine in the "
                                                  f"middle): attempt {window.failures} of {MAX_FAILURES}")
            if not window.accepts(now):
                self._close(now, "failed", f"the window closed after {MAX_FAILURES} wrong attempts; the code no "
                                           "longer works")
            raise PairingError(REFUSED)
        self.store.add(exchange.joiner)  # first: if the disk refuses, the window stays open for another try
        window.record_success()
        joiner = exchange.joiner
        self._note(now, source, "paired", f"paired with {joiner.name!r} ({joiner.role}, node id {joiner.node_id[:16]})")
        self._close(now, "paired", "the window closed: the code is used")
        if self.on_paired is not None:
            self.on_paired(joiner)
        return _frame({"confirmation_b": fields.encode(confirmation(exchange.key, CONFIRM_B, exchange.transcript)),
                       "cert_pem": self.identity.cert_pem.decode("ascii")})

    def _live_window(self, now: float) -> PairingWindow:
        if self.window is None or not self.window.accepts(now):
            raise PairingError(REFUSED)
        return self.window

    def _settle(self, now: float) -> None:
        """Drop the exchanges whose time is up, then close the window if its own time is."""
        for exchange in [e for e in self._exchanges if not now - e.started_at < EXCHANGE_TTL_S]:
            self._exchanges.remove(exchange)
            self._note(max(exchange.started_at, min(now, exchange.started_at + EXCHANGE_TTL_S)), exchange.source,
                       "expired", f"its exchange was not finished within {EXCHANGE_TTL_S:g} s: dropped, "
                                  "not counted against the code")
        window = self.window
        if window is not None and self._outcome is None and not window.accepts(now):
            ends = window.opened_at + window.ttl_s
            self._close(ends if now >= ends else now, "expired", f"the window closed: its {window.ttl_s:g} s are up"
                        if now >= ends else "the window closed: this node's clock stepped back")

    def _make_room(self, source: str, now: float) -> None:
        """Room for a new exchange from `source`: its own earlier one goes, and the oldest when all are taken."""
        key = source_key(source)
        for exchange in [e for e in self._exchanges if source_key(e.source) == key]:
            self._exchanges.remove(exchange)
            self._note(now, exchange.source, "dropped", "its exchange was replaced by a newer start from the same "
                                                        "address")
        while len(self._exchanges) >= MAX_EXCHANGES:
            oldest = self._exchanges.pop(0)
            self._note(now, oldest.source, "dropped", f"its exchange made room for a newer one ({MAX_EXCHANGES} "
                                                      "were in flight)")

    def _close(self, now: float, outcome: str, detail: str) -> None:
        if self.window is None or self._outcome is not None:
            return
        self._note(now, "", "closed", detail)
        self._outcome = outcome
        self._exchanges = []

    def _note(self, at: float, source: str, kind: str, detail: str) -> None:
        """Record what happened to the open window (and log it once, here, where it is decided)."""
        if self.window is None or self._outcome is not None:
            return  # no window, or one that has closed: its record is complete
        log.log(_LOG_LEVELS.get(kind, logging.INFO), "pairing: %s%s: %s", f"{source} " if source else "", kind,
                detail)
        if len(self._events) >= MAX_EVENTS and kind != "closed":
            self._events_left_out += 1
            return
        self._events.append(PairingEvent(at=at, source=source, kind=kind, detail=detail))


# What a LAN can send without limit is logged at debug: the record (bounded) keeps it for `hybridd pair`.
_LOG_LEVELS = {"wrong_code": logging.WARNING, "throttled": logging.DEBUG, "malformed": logging.DEBUG,
               "unknown_session": logging.DEBUG}


def _frame(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer).encode()
