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

    protocol.py  the window and the exchange: PairingServer takes a message's bytes and `now`, returns an answer
    attempts.py  what was tried against a window: per-source bounds on starts, the record `hybridd pair` shows
    fields.py    reading a message's fields (and a pairings file entry's), each failure naming the field
    store.py     the paired peers and their file
    client.py    the joining side over HTTPS: pair_with
    routes.py    the window owner's two routes on the LAN listener
"""

from hybridd.peer.pairing.attempts import (
    SOURCE_BURST,
    SOURCE_BURST_S,
    SOURCE_STARTS,
    PairingEvent,
    PairingReport,
    source_key,
)
from hybridd.peer.pairing.client import pair_with
from hybridd.peer.pairing.protocol import (
    EXCHANGE_TTL_S,
    FINISH_PATH,
    ID_A,
    ID_B,
    MAX_EXCHANGES,
    MAX_FAILURES,
    START_PATH,
    WINDOW_TTL_S,
    PairingServer,
    PairingWindow,
    normalize_code,
    open_window,
)
from hybridd.peer.pairing.routes import add_pairing_routes
from hybridd.peer.pairing.store import PairedPeer, PairingStore, paired_peer_for

__all__ = [
    "EXCHANGE_TTL_S",
    "FINISH_PATH",
    "ID_A",
    "ID_B",
    "MAX_EXCHANGES",
    "MAX_FAILURES",
    "SOURCE_BURST",
    "SOURCE_BURST_S",
    "SOURCE_STARTS",
    "START_PATH",
    "WINDOW_TTL_S",
    "PairedPeer",
    "PairingEvent",
    "PairingReport",
    "PairingServer",
    "PairingStore",
    "PairingWindow",
    "add_pairing_routes",
    "normalize_code",
    "open_window",
    "pair_with",
    "paired_peer_for",
    "source_key",
]
