"""One-time-code pairing: SPAKE2 on the 8-digit code, then key confirmation bound to both TLS certificates.

The node that opens a window (`hybridd pair` on the Spark) is SPAKE2 side B and serves two routes on its LAN listener;
the joining node (`hybridd pair <peer> <code>` on the desktop) is side A:

    A → B  POST /hybridd/v1/pair/start   {msg_a, name, role, node_id, cert_pem}
    B → A                                {session, msg_b, name, role, node_id}
    A → B  POST /hybridd/v1/pair/finish  {session, confirmation_a}
    B → A                                {confirmation_b, cert_pem}

Bodies are JSON, bytes in base64. Each confirmation is HMAC-SHA256(key, label || transcript), where the transcript
binds both SPAKE2 messages, both certificate fingerprints, names and roles. A uses the server fingerprint it saw in its
own TLS handshake, so a machine in the middle with another certificate makes both confirmations disagree. Nobody stores
anything before checking the other side's confirmation; B's confirmation is only sent once A's has checked out.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from spake2 import SPAKE2_A, SPAKE2_B
from yarl import URL

from hybridd.api.envelope import error_response
from hybridd.peer.errors import (
    BadPairingMessage,
    LinkError,
    PairingBusy,
    PairingError,
    PeerError,
    StateFileError,
    UntrustedPeer,
)
from hybridd.peer.identity import Identity, fingerprint_of_pem, same_fingerprint
from hybridd.peer.tls import TLSSource, client_context, observe_handshakes, peer_fingerprint

log = logging.getLogger("hybridd.peer.pairing")

ROLES = ("desktop", "peer")
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
MAX_NAME_CHARS = 64
MAX_CERT_CHARS = 8192
MAX_BODY_BYTES = 16384
START_PATH = "/hybridd/v1/pair/start"
FINISH_PATH = "/hybridd/v1/pair/finish"
PAIRINGS_FILE = "pairings.json"
STORE_VERSION = 1
# One message for every refusal, so that a stranger on the LAN cannot tell a closed window from a wrong code.
REFUSED = "pairing refused: no pairing window is open, it has closed, or the code is wrong"
MIDDLE = ("the TLS certificate we saw is not the peer's own: something is in the middle of the connection; "
          "nothing was stored")


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
    fields = (msg_a, msg_b, joiner.node_id.encode(), owner.node_id.encode(), joiner.name.encode(),
              owner.name.encode(), joiner.role.encode(), owner.role.encode())
    return TRANSCRIPT_LABEL + b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def confirmation(key: bytes, label: bytes, transcript_bytes: bytes) -> bytes:
    """HMAC-SHA256(key, label || transcript): proves knowledge of the SPAKE2 key for this transcript."""
    return hmac.new(key, label + transcript_bytes, hashlib.sha256).digest()


# ---------------------------------------------------------------- paired peers and their store


@dataclass(frozen=True)
class PairedPeer:
    """A node we paired with: its pinned certificate (node_id is its fingerprint), name, role, last address."""

    node_id: str
    name: str
    role: str
    cert_pem: bytes
    paired_at: float
    address: str | None = None
    port: int | None = None


class PairingStore:
    """The paired peers, persisted to `state_dir/pairings.json` (0600, written atomically on every change)."""

    def __init__(self, path: Path, peers: Iterable[PairedPeer] = ()) -> None:
        self.path = path
        self._peers: dict[str, PairedPeer] = {p.node_id: p for p in peers}

    @classmethod
    def load(cls, state_dir: Path) -> PairingStore:
        """The store in `state_dir` (empty if there is no file yet); StateFileError naming the file if corrupt."""
        path = state_dir / PAIRINGS_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise StateFileError(f"cannot read the pairings file {path}: {exc}") from exc
        return cls(path, _parse_pairings(text, path))

    def all(self) -> list[PairedPeer]:
        """Every paired peer, oldest pairing first."""
        return sorted(self._peers.values(), key=lambda p: p.paired_at)

    def get(self, node_id: str) -> PairedPeer | None:
        """The peer with this node id (compared in constant time), or None."""
        return next((p for p in self._peers.values() if same_fingerprint(p.node_id, node_id)), None)

    def by_name(self, name: str) -> PairedPeer | None:
        """The peer with this name, or None."""
        return next((p for p in self._peers.values() if p.name == name), None)

    def cert_pems(self) -> list[bytes]:
        """The pinned certificates of every paired peer (the LAN listener's trust store)."""
        return [p.cert_pem for p in self.all()]

    def add(self, peer: PairedPeer) -> None:
        """Store a newly paired peer; it replaces an entry with the same node id or the same name (a re-paired
        machine with a new identity), so a name always means one certificate."""
        kept = {k: p for k, p in self._peers.items() if p.node_id != peer.node_id and p.name != peer.name}
        self._commit({**kept, peer.node_id: peer})

    def remove(self, node_id: str) -> bool:
        """Forget a peer; whether it was there."""
        peer = self.get(node_id)
        if peer is None:
            return False
        self._commit({k: p for k, p in self._peers.items() if k != peer.node_id})
        return True

    def update_address(self, node_id: str, address: str | None, port: int | None) -> None:
        """Remember where a paired peer was last seen (discovery); unknown node ids are ignored."""
        peer = self.get(node_id)
        if peer is not None and (peer.address, peer.port) != (address, port):
            self._commit({**self._peers, peer.node_id: replace(peer, address=address, port=port)})

    def _commit(self, peers: dict[str, PairedPeer]) -> None:
        # Write first, then swap the in-memory view: a failed write changes neither.
        entries = [{**asdict(p), "cert_pem": p.cert_pem.decode("ascii")} for p in peers.values()]
        _write_atomically(self.path, json.dumps({"version": STORE_VERSION, "peers": entries}, indent=2) + "\n")
        self._peers = peers


def paired_peer_for(source: TLSSource, store: PairingStore) -> PairedPeer:
    """The paired peer at the other end of a TLS connection (transport or SSL object); UntrustedPeer otherwise.

    Call it per request on the LAN listener: its trust store admits certless clients (to pair) and cannot forget
    a certificate while running, so only this lookup knows that a peer was unpaired a minute ago.
    """
    seen = peer_fingerprint(source)
    peer = store.get(seen) if seen is not None else None
    if peer is None:
        raise UntrustedPeer("this node is not paired with you; run `hybridd pair` first")
    return peer


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp makes it 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except OSError as exc:
        raise StateFileError(f"cannot write the pairings file {path}: {exc.strerror or exc}") from exc


def _parse_pairings(text: str, path: Path) -> list[PairedPeer]:
    def corrupt(why: str) -> StateFileError:
        return StateFileError(f"the pairings file {path} is corrupt ({why}); fix it or remove it and pair again")

    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise corrupt(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != STORE_VERSION or not isinstance(doc.get("peers"), list):
        raise corrupt(f'expected {{"version": {STORE_VERSION}, "peers": [...]}}')
    peers = []
    for index, entry in enumerate(doc["peers"]):
        try:
            peers.append(_parse_entry(entry))
        except (BadPairingMessage, KeyError, TypeError, ValueError) as exc:
            raise corrupt(f"peers[{index}]: {exc}") from exc
    return peers


def _parse_entry(entry: Any) -> PairedPeer:
    if not isinstance(entry, dict):
        raise TypeError("not an object")
    fields = _Fields(entry, "")
    node_id, cert_pem = fields.node_id("node_id"), fields.cert_pem("cert_pem", "node_id")
    paired_at, address, port = entry["paired_at"], entry.get("address"), entry.get("port")
    if not isinstance(paired_at, int | float) or isinstance(paired_at, bool):
        raise TypeError("paired_at must be a number")
    if address is not None and not isinstance(address, str):
        raise TypeError("address must be a string or null")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
        raise TypeError("port must be 1-65535 or null")
    return PairedPeer(node_id=node_id, name=fields.name("name"), role=fields.role("role"), cert_pem=cert_pem,
                      paired_at=float(paired_at), address=address, port=port)


# ---------------------------------------------------------------- message validation (bytes from the LAN)


class _Fields:
    """Typed, bounded access to one JSON object from the wire; every problem is a BadPairingMessage."""

    def __init__(self, body: Mapping[str, Any], where: str) -> None:
        self.body = body
        self.where = where

    def text(self, key: str, limit: int) -> str:
        value = self.body.get(key)
        if not isinstance(value, str) or not value or len(value) > limit:
            raise BadPairingMessage(f"{self.where}{key} must be a non-empty string of at most {limit} characters")
        return value

    def name(self, key: str) -> str:
        value = self.text(key, MAX_NAME_CHARS)
        if not value.isprintable():
            raise BadPairingMessage(f"{self.where}{key} must be printable text")
        return value

    def role(self, key: str) -> str:
        value = self.body.get(key)
        if value not in ROLES:
            raise BadPairingMessage(f"{self.where}{key} must be one of: {', '.join(ROLES)}")
        return str(value)

    def node_id(self, key: str) -> str:
        value = self.text(key, 64)
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise BadPairingMessage(f"{self.where}{key} must be 64 lowercase hex digits (SHA-256 of the certificate)")
        return value

    def binary(self, key: str, size: int) -> bytes:
        text = self.text(key, 4 * size)
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadPairingMessage(f"{self.where}{key} must be base64") from exc
        if len(value) != size:
            raise BadPairingMessage(f"{self.where}{key} must decode to {size} bytes")
        return value

    def cert_pem(self, key: str, node_id_key: str) -> bytes:
        return _certificate(self.text(key, MAX_CERT_CHARS), self.node_id(node_id_key), f"{self.where}{key}")


def _certificate(value: object, node_id: str, where: str) -> bytes:
    """A PEM certificate whose fingerprint is `node_id`; BadPairingMessage otherwise."""
    if not isinstance(value, str) or len(value) > MAX_CERT_CHARS:
        raise BadPairingMessage(f"{where} must be a PEM certificate of at most {MAX_CERT_CHARS} characters")
    pem = value.encode("utf-8")
    try:
        seen = fingerprint_of_pem(pem)
    except ValueError as exc:
        raise BadPairingMessage(f"{where} is not a PEM certificate") from exc
    if not same_fingerprint(seen, node_id):
        raise BadPairingMessage(f"{where} is not the certificate with fingerprint {node_id[:16]}…")
    return pem


SPAKE2_MSG_BYTES = 33  # side byte + an Ed25519 group element
CONFIRMATION_BYTES = 32
SESSION_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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

    def start(self, body: Mapping[str, Any], peer_address: str | None, now: float) -> dict[str, Any]:
        """Handle a start message: SPAKE2 side B; PairingError (403), PairingBusy (409) or BadPairingMessage (400)."""
        fields = _Fields(body, "")
        msg_a = fields.binary("msg_a", SPAKE2_MSG_BYTES)
        joiner = Party(name=fields.name("name"), role=fields.role("role"), node_id=fields.node_id("node_id"))
        cert_pem = fields.cert_pem("cert_pem", "node_id")
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
        return {"session": self._exchange.session, "msg_b": _b64(msg_b), "name": self.me.name, "role": self.me.role,
                "node_id": self.me.node_id}

    def finish(self, body: Mapping[str, Any], now: float) -> dict[str, Any]:
        """Handle a finish message: check A's confirmation, store A, answer with ours; PairingError if it fails."""
        fields = _Fields(body, "")
        session = fields.text("session", 2 * SESSION_BYTES)
        confirmation_a = fields.binary("confirmation_a", CONFIRMATION_BYTES)
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
        return {"confirmation_b": _b64(confirmation(exchange.key, CONFIRM_B, exchange.transcript)),
                "cert_pem": self.identity.cert_pem.decode("ascii")}

    def _live_window(self, now: float) -> PairingWindow:
        if self.window is None or not self.window.accepts(now):
            self._exchange = None
            raise PairingError(REFUSED)
        return self.window


PAIRING_SERVER = web.AppKey("pairing_server", PairingServer)


def add_pairing_routes(app: web.Application, state: PairingServer) -> None:
    """Mount the two pairing routes on the LAN listener's app (they work for clients that present no certificate)."""
    app[PAIRING_SERVER] = state

    async def start(request: web.Request) -> web.Response:
        return await _answer(request, lambda body: state.start(body, request.remote, state.clock()))

    async def finish(request: web.Request) -> web.Response:
        return await _answer(request, lambda body: state.finish(body, state.clock()))

    app.router.add_post(START_PATH, start)
    app.router.add_post(FINISH_PATH, finish)


async def _answer(request: web.Request, step: Callable[[Mapping[str, Any]], dict[str, Any]]) -> web.Response:
    headers = {"Cache-Control": "no-store"}
    try:
        body = _json_object(await request.read())
        return web.json_response(step(body), headers=headers)
    except PeerError as exc:
        log.debug("pairing: %s %s refused: %s", request.method, request.path, exc.message)
        return error_response(exc.status, exc.message, exc.error_type, exc.code, headers)
    except web.HTTPException:
        raise  # the body was over the app's size cap: aiohttp's own answer
    except Exception:  # untrusted bytes must never reach the client as a traceback
        log.exception("pairing: internal error on %s", request.path)
        return error_response(500, "internal error in hybridd (see the daemon log)", code="internal_error")


def _json_object(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_BODY_BYTES:
        raise BadPairingMessage(f"a pairing message is at most {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadPairingMessage("the body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise BadPairingMessage("the body must be a JSON object")
    return body


# ---------------------------------------------------------------- the joining side (SPAKE2 A)


async def pair_with(base_url: str, code: str, identity: Identity, name: str, role: str, store: PairingStore,
                    http: aiohttp.ClientSession | None = None, clock: Callable[[], float] = time.time) -> PairedPeer:
    """Pair with the node at `base_url` (https://host:port) using its one-time code; store and return it."""
    url = URL(base_url)
    if url.scheme != "https" or not url.host:
        raise PairingError(f"pair with an https:// address of the peer's LAN listener, not {base_url!r}")
    digits = normalize_code(code)
    if role not in ROLES:
        raise PairingError(f"role must be one of: {', '.join(ROLES)}")
    me = Party(name=name, role=role, node_id=identity.node_id)
    # Unverified on purpose: we have nothing to pin yet. Every handshake is observed, and the server certificate
    # goes into the transcript, which the peer only confirms if it is its own.
    tls = client_context(identity=None, peer_cert_pem=None)
    server_fingerprints = observe_handshakes(tls)
    session = http or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    try:
        spake = SPAKE2_A(digits.encode("ascii"), idA=ID_A, idB=ID_B)
        msg_a = spake.start()
        started = _Fields(await _post(session, url.join(URL(START_PATH)), tls, {
            "msg_a": _b64(msg_a), "name": me.name, "role": me.role, "node_id": me.node_id,
            "cert_pem": identity.cert_pem.decode("ascii")}), "the peer's ")
        msg_b = started.binary("msg_b", SPAKE2_MSG_BYTES)
        owner = Party(name=started.name("name"), role=started.role("role"), node_id=started.node_id("node_id"))
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
            finished = _Fields(await _post(session, url.join(URL(FINISH_PATH)), tls, {
                "session": started.text("session", 2 * SESSION_BYTES),
                "confirmation_a": _b64(confirmation(key, CONFIRM_A, transcript_bytes))}), "the peer's ")
        except PairingError as exc:
            if in_the_middle:
                raise PairingError(MIDDLE) from exc
            raise
        confirmation_b = finished.binary("confirmation_b", CONFIRMATION_BYTES)
        if not hmac.compare_digest(confirmation(key, CONFIRM_B, transcript_bytes), confirmation_b):
            raise PairingError("the peer's confirmation is wrong: it does not know the code; nothing was stored")
        cert_pem = _certificate(finished.body.get("cert_pem"), seen, "the peer's cert_pem")
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


async def _post(session: aiohttp.ClientSession, url: URL, tls: Any, body: dict[str, Any]) -> dict[str, Any]:
    try:
        async with session.post(url, json=body, ssl=tls) as response:
            raw = await response.read()
            status = response.status
    except aiohttp.ClientError as exc:
        raise LinkError(f"cannot reach the peer at {url.origin()}: {exc}") from exc
    except TimeoutError as exc:
        raise LinkError(f"the peer at {url.origin()} did not answer in time") from exc
    try:
        answer = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        answer = None
    if status != 200:
        message = _envelope_message(answer) or f"HTTP {status}"
        raise (PairingBusy if status == 409 else PairingError)(f"the peer refused: {message}")
    if not isinstance(answer, dict):
        raise PairingError("the peer answered with something that is not a JSON object")
    return answer


def _envelope_message(answer: Any) -> str | None:
    error = answer.get("error") if isinstance(answer, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message[:300] if isinstance(message, str) else None
