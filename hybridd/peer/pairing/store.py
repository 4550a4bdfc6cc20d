"""The paired peers and their file, `state_dir/pairings.json`: who this node trusts, by pinned certificate."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hybridd.peer.errors import StateFileError, UntrustedPeer
from hybridd.peer.identity import same_fingerprint
from hybridd.peer.messages import MAX_BYTES, MAX_DEVICES, MAX_ID_CHARS, MAX_MODELS, MAX_TEXT_CHARS, ModelOffer
from hybridd.peer.pairing import fields
from hybridd.peer.tls import TLSSource, peer_fingerprint
from hybridd.validate import JSON, Reader

PAIRINGS_FILE = "pairings.json"
STORE_VERSION = 1


@dataclass(frozen=True)
class LastKnown:
    """What a peer last said of itself over its link, kept so that it can still be planned for while it sleeps: its
    hardware profile, the models it serves (none counted as loaded) and its free bytes per device."""

    hardware: str = ""
    models: tuple[ModelOffer, ...] = ()
    free_bytes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PairedPeer:
    """A node we paired with: its pinned certificate (node_id is its fingerprint), name, role, last address; the
    NIC to wake it by (learned from its hello) and what it last said of itself."""

    node_id: str
    name: str
    role: str
    cert_pem: bytes
    paired_at: float
    address: str | None = None
    port: int | None = None
    mac: str | None = None
    wake_broadcast: str | None = None
    last_known: LastKnown | None = None


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

    def remember(self, node_id: str, *, mac: str | None, broadcast: str | None, last_known: LastKnown) -> None:
        """Keep what a paired peer said of itself over its link (written only when it changed; unknown ids ignored):
        the NIC to wake it by, when it told us one, and its hardware, models and free memory."""
        peer = self.get(node_id)
        if peer is None:
            return
        last_known = replace(last_known, models=last_known.models[:MAX_MODELS],
                             free_bytes=dict(list(last_known.free_bytes.items())[:MAX_DEVICES]))
        updated = replace(peer, mac=mac or peer.mac, wake_broadcast=broadcast or peer.wake_broadcast,
                          last_known=last_known)
        if updated != peer:
            self._commit({**self._peers, peer.node_id: updated})

    def _commit(self, peers: dict[str, PairedPeer]) -> None:
        # Write first, then swap the in-memory view: a failed write changes neither.
        entries = [_entry(p) for p in peers.values()]
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


def _entry(peer: PairedPeer) -> dict[str, Any]:
    entry = {**asdict(peer), "cert_pem": peer.cert_pem.decode("ascii")}
    if peer.last_known is not None:  # an inventory's loaded_ctx is not kept: a woken peer has nothing loaded
        entry["last_known"]["models"] = [{k: v for k, v in m.items() if k != "loaded_ctx"}
                                         for m in entry["last_known"]["models"]]
    return entry


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
    return [_parse_entry(item) for item in Reader(doc, corrupt, JSON).table().at("peers").items()]


def _parse_entry(item: Reader) -> PairedPeer:
    entry = item.table()
    node_id = fields.node_id(entry.at("node_id"))
    # mac, wake_broadcast and last_known are optional: a file written before Wake-on-LAN has none of them.
    return PairedPeer(node_id=node_id, name=fields.name(entry.at("name")), role=fields.role(entry.at("role")),
                      cert_pem=fields.certificate(entry.at("cert_pem"), node_id),
                      paired_at=entry.at("paired_at").number(), address=entry.at("address").of(str, None),
                      port=entry.at("port").integer(None, low=1, high=65535),
                      mac=entry.at("mac").mac(None) if entry.at("mac").value is not None else None,
                      wake_broadcast=entry.at("wake_broadcast").ipv4(None)
                      if entry.at("wake_broadcast").value is not None else None,
                      last_known=_parse_last_known(entry.at("last_known")))


def _parse_last_known(item: Reader) -> LastKnown | None:
    if not item.present or item.value is None:
        return None
    known = item.table(("hardware", "models", "free_bytes"))
    models = []
    for model in known.at("models").items(optional=True, max_items=MAX_MODELS):
        offer = model.table(("id", "max_ctx", "trainable", "tools"))
        models.append(ModelOffer(offer.at("id").text(max_chars=MAX_TEXT_CHARS, printable=True),
                                 offer.at("max_ctx").integer(low=1), trainable=offer.at("trainable").of(bool, False),
                                 tools=offer.at("tools").of(bool, False)))
    free = {name: value.integer(low=0, high=MAX_BYTES) for name, value in
            known.at("free_bytes").entries(optional=True, max_items=MAX_DEVICES, max_key_chars=MAX_ID_CHARS).items()}
    return LastKnown(known.at("hardware").of(str, ""), tuple(models), free)
