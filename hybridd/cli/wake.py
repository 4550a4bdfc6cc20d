"""`hybridd wake PEER`: wake a sleeping paired peer by Wake-on-LAN, through the running daemon (which knows its MAC),
or `hybridd wake --mac MAC` straight from this machine, daemon or not."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from hybridd.cli.waiting import StatusLine
from hybridd.errors import HybriddError
from hybridd.peer.wake import LIMITED_BROADCAST, WakeTarget, send_magic_packet
from hybridd.validate import Reader

HELP = "wake a sleeping paired peer by Wake-on-LAN (its MAC learned over the link, or --mac)"
DESCRIPTION = ("'hybridd wake PEER' asks the running daemon to send the paired peer's magic packet (UDP broadcast to "
               "ports 9 and 7) to the MAC its link told, or the one a [[wake]] entry gives; with --wait it then waits "
               "for the peer's link to come up. 'hybridd wake --mac aa:bb:cc:dd:ee:ff [--broadcast ADDR]' sends the "
               "packet from here without a daemon.")
PEERS_PATH = "/hybridd/v1/peers"
_TRUE = {"1", "true", "yes", "on"}

Ask = Callable[[str, Any], Any]


def wake_path(peer: str) -> str:
    """The daemon's route that wakes `peer` (hybridd.api.routes_peers; the CLI does not import the API)."""
    return f"{PEERS_PATH}/{peer}/wake"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """PEER, --mac, --broadcast, --wait and --json (the caller adds --url and --config)."""
    parser.add_argument("peer", nargs="?", help="the paired peer's name (as `hybridd peers` shows it)")
    env = os.environ
    parser.add_argument("--mac", default=env.get("HYBRIDD_MAC"),
                        help="send to this MAC address from here, without asking the daemon [env HYBRIDD_MAC]")
    parser.add_argument("--broadcast", default=env.get("HYBRIDD_BROADCAST", LIMITED_BROADCAST),
                        help=f"with --mac: the IPv4 broadcast address to send to (default {LIMITED_BROADCAST}) "
                        "[env HYBRIDD_BROADCAST]")
    parser.add_argument("--wait", type=float, default=float(env.get("HYBRIDD_WAIT", "0")), metavar="SECONDS",
                        help="then wait up to this long for the peer's link to come up (exit 1 if it does not) "
                        "[env HYBRIDD_WAIT]")
    parser.add_argument("--json", action="store_true", default=env.get("HYBRIDD_JSON", "").lower() in _TRUE,
                        help="print the result as JSON [env HYBRIDD_JSON]")


def run(args: argparse.Namespace, ask: Ask, out: TextIO, clock: Callable[[], float] = time.monotonic,
        send: Callable[[WakeTarget], list[str]] = send_magic_packet, err: TextIO | None = None,
        sleep: Callable[[float], None] = time.sleep) -> int:
    """Send the packet (by the daemon, or here with --mac), print where it went; with --wait, wait for the link,
    saying so on err (stderr) while it waits."""
    if args.mac is not None:
        try:
            mac = Reader(args.mac, ValueError, path="--mac").mac()
            broadcast = Reader(args.broadcast, ValueError, path="--broadcast").ipv4()
            sent = send(WakeTarget(mac, broadcast))
        except (ValueError, HybriddError) as exc:
            raise SystemExit(f"hybridd wake: {exc}") from exc
        result: dict[str, Any] = {"peer": args.peer, "mac": mac, "broadcast": broadcast, "sent_to": sent}
    elif args.peer is None:
        raise SystemExit("hybridd wake: name the paired peer (hybridd wake NAME) or give --mac")
    else:
        result = ask(wake_path(args.peer), {})
    print(json.dumps(result) if args.json else render_woken(result), file=out, flush=True)
    if args.wait <= 0 or args.peer is None:
        return 0
    deadline = clock() + args.wait
    status = StatusLine(sys.stderr if err is None else err, clock)
    status.begin(f"{args.peer}'s link to come up", args.wait)
    try:
        while clock() < deadline:
            if _link(ask, args.peer) == "up":
                status.end()
                if not args.json:
                    print(f"{args.peer} is up", file=out)
                return 0
            sleep(min(0.5, max(0.0, deadline - clock())))
            status.tick()
    finally:
        status.end()
    print(f"{args.peer} did not come up within {args.wait:g} s", file=out)
    return 1


def render_woken(result: dict[str, Any]) -> str:
    """One line: whose packet went where."""
    who = f"{result['peer']} ({result['mac']})" if result.get("peer") else result["mac"]
    line = f"magic packet for {who} sent to {', '.join(result['sent_to'])}"
    if result.get("link") == "up":
        line += f"; {result['peer']}'s link is up already"
    return line


def _link(ask: Ask, peer: str) -> str | None:
    peers = ask(PEERS_PATH, None)
    return next((p["link"] for p in peers.get("paired", []) if p["name"] == peer), None)
