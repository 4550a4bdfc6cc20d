"""Which network interface holds an address, and its MAC and IPv4 broadcast: what a peer tells a desktop so that
the desktop can wake it by Wake-on-LAN."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

NO_MAC = "00:00:00:00:00:00"  # loopback and tunnels


def wake_address(local_address: str, interfaces: Mapping[str, Sequence[Any]] | None = None) -> tuple[str, str] | None:
    """(MAC, IPv4 broadcast) of the interface that holds `local_address` (a socket's own address, IPv4, IPv6 or
    IPv4-mapped), or None: not found, or an interface without a MAC (loopback) or without IPv4."""
    try:
        wanted = ipaddress.ip_address(local_address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(wanted, ipaddress.IPv6Address) and wanted.ipv4_mapped is not None:
        wanted = wanted.ipv4_mapped
    table = psutil.net_if_addrs() if interfaces is None else interfaces
    for addresses in table.values():
        if not any(_same(a.address, wanted) for a in addresses if a.family in (socket.AF_INET, socket.AF_INET6)):
            continue
        mac = next((a.address.lower().replace("-", ":") for a in addresses if a.family == psutil.AF_LINK), None)
        ipv4 = next((a for a in addresses if a.family == socket.AF_INET and a.netmask), None)
        if mac is None or mac == NO_MAC or len(mac) != 17 or ipv4 is None:
            return None
        # Computed from the netmask: an address added without `brd` has no broadcast of its own in psutil.
        network = ipaddress.IPv4Network(f"{ipv4.address}/{ipv4.netmask}", strict=False)
        return mac, str(network.broadcast_address)
    return None


def _same(address: str, wanted: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]) == wanted
    except ValueError:
        return False
