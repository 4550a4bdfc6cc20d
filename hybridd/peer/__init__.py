"""Peers: identity (self-signed cert), pairing (one-time code, SPAKE2), discovery (zeroconf), the control link
(msgpack over WebSocket over mutual TLS) and forwarding. Nothing on the LAN is trusted before pairing."""
