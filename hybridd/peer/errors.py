"""Errors of the peer layer: identity, pairing, trust and the link to another node.

    HybriddError
    └── PeerError                   anything between nodes went wrong (502)
        ├── StateFileError          identity or pairings file unreadable or corrupt; names the file (500)
        ├── PairingError            pairing refused or failed (403, permission_error)
        │   ├── PairingThrottled    too many pairing starts from one address (429)
        │   └── BadPairingMessage   a malformed pairing body (400, invalid_request_error)
        ├── UntrustedPeer           the other side is not the pinned, paired node (403)
        ├── MalformedAdvert         an mDNS advert we refuse; also a ValueError (logged, never answered)
        └── LinkError               could not reach or talk to a paired peer (502)
            └── LinkProtocolError   the peer sent a frame we refuse (hybridd/peer/messages.py)
"""

from __future__ import annotations

from hybridd.errors import HybriddError


class PeerError(HybriddError):
    """Base of the errors between nodes."""

    status = 502
    error_type = "server_error"
    code = "peer_error"


class StateFileError(PeerError):
    """A state file (identity key or cert, pairings) cannot be read or parsed; the message names the file."""

    status = 500
    code = "state_file_corrupt"


class PairingError(PeerError):
    """Pairing was refused or failed; the message to a remote side never says why beyond what it already knows."""

    status = 403
    error_type = "permission_error"
    code = "pairing_refused"


class PairingThrottled(PairingError):
    """Too many pairing starts came from one address (see hybridd/peer/pairing/attempts.py)."""

    status = 429
    error_type = "rate_limit_error"
    code = "pairing_throttled"


class BadPairingMessage(PairingError):
    """A pairing message is malformed: not JSON, missing fields, wrong types, bad certificate."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_pairing_message"


class UntrustedPeer(PeerError):
    """The other side presented no certificate or one that is not the pinned certificate of a paired node."""

    status = 403
    error_type = "permission_error"
    code = "untrusted_peer"


class MalformedAdvert(PeerError, ValueError):
    """A TXT record we refuse to turn into an Advert; the message says which field and why."""

    code = "malformed_advert"


class LinkError(PeerError):
    """A paired peer could not be reached or broke the exchange."""

    status = 502
    code = "peer_link_failed"
