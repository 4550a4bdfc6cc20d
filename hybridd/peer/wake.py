"""Wake-on-LAN: the magic packet for a MAC address, and sending it as a UDP broadcast to the ports NICs listen on.

A magic packet is 6 bytes of 0xFF, then the target's 6-byte MAC 16 times (102 bytes). A NIC armed for WoL wakes its
machine on seeing it in any frame, so UDP to the subnet's broadcast address on port 9 (discard) and 7 (echo) reaches
every armed NIC on the LAN, whatever the sleeping machine's IP address was.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from hybridd.peer.errors import PeerError

WAKE_PORTS = (9, 7)
# Where a packet goes when the subnet's own broadcast address is unknown (the interface of the default route).
LIMITED_BROADCAST = "255.255.255.255"


class WakeError(PeerError):
    """The magic packet could not be sent (no route to the broadcast address, no MAC known for the peer)."""

    status = 503
    code = "wake_failed"


@dataclass(frozen=True)
class WakeTarget:
    """Where a sleeping peer is woken: its NIC's MAC and the broadcast address of its subnet."""

    mac: str  # "aa:bb:cc:dd:ee:ff"
    broadcast: str = LIMITED_BROADCAST


def magic_packet(mac: str) -> bytes:
    """The 102-byte magic packet for `mac` ("aa:bb:cc:dd:ee:ff" or with '-'); ValueError for anything else."""
    digits = mac.replace(":", "").replace("-", "")
    if len(digits) != 12 or len(mac) != 17:
        raise ValueError(f"not a MAC address: {mac!r}")
    return b"\xff" * 6 + bytes.fromhex(digits) * 16


def send_magic_packet(target: WakeTarget, ports: tuple[int, ...] = WAKE_PORTS) -> list[str]:
    """Broadcast the magic packet for target.mac to each port; where it went ("10.0.0.255:9"), or WakeError."""
    packet = magic_packet(target.mac)
    sent = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setblocking(False)  # one datagram into the socket buffer: it never waits, on or off the event loop
            for port in ports:
                sock.sendto(packet, (target.broadcast, port))
                sent.append(f"{target.broadcast}:{port}")
    except OSError as exc:
        raise WakeError(f"cannot send the Wake-on-LAN packet for {target.mac} to {target.broadcast}: "
                        f"{exc.strerror or exc}") from exc
    return sent
