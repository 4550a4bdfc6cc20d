"""This node's side of peering, wired together: identity, pairings, discovery, the control links, and the peer
targets the scheduler places on. A desktop dials its paired peers; a peer accepts their links and requests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from hybridd import __version__
from hybridd.config import DEFAULT_LAN_PORT, Config
from hybridd.engine.pool import EnginePool
from hybridd.errors import BadRequest, ConfigError, PlacementRefused
from hybridd.node.catalog import Catalog
from hybridd.node.router import PeerTarget, Router
from hybridd.peer.discovery import Advert, Discovery
from hybridd.peer.errors import PairingError, StateFileError, UntrustedPeer
from hybridd.peer.identity import Identity, load_or_create_identity
from hybridd.peer.link import LinkClient, LinkHub, PeerLinkState
from hybridd.peer.messages import Busy, Capacity, Hello, Inventory, JobChanged, Message, ModelOffer
from hybridd.peer.pairing import PairedPeer, PairingServer, PairingStore, pair_with, paired_peer_for
from hybridd.peer.pairing.store import LastKnown
from hybridd.peer.tls import client_context, server_context
from hybridd.peer.wake import LIMITED_BROADCAST, WakeError, WakeTarget, send_magic_packet
from hybridd.place.hardware import Hardware
from hybridd.place.peer_view import peer_view
from hybridd.place.scheduler import Drain, PeerState
from hybridd.probe.hardware_profiles import load_hardware_profile
from hybridd.probe.interfaces import wake_address

log = logging.getLogger("hybridd.peer")


class PeerNode:
    """Owns the identity, the pairing store and window, discovery and the links of this node."""

    def __init__(self, config: Config, state_dir: Path, name: str, router: Router, catalog: Catalog,
                 pool: EnginePool, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.name = name
        self.role = config.node.role
        self.router = router
        self.catalog = catalog
        self.pool = pool
        self.clock = clock
        self.identity: Identity = load_or_create_identity(state_dir, name)
        self.store = PairingStore.load(state_dir)
        self.server_ssl: ssl.SSLContext = server_context(self.identity, self.store.cert_pems())
        self.pairing = PairingServer(self.identity, name, self.role, self.store, on_paired=self._paired)
        self.discovery = Discovery(interfaces=list(config.node.advertise_interfaces) or None)
        self.links: dict[str, LinkClient] = {}
        self.hub = LinkHub(local_hello=self.hello(), authorize=self.authorize, snapshot=self.capacity,
                           inventory=self.inventory, on_message=self._message, hello_for=self._hello_for)
        self.on_job_changed: Callable[[str], None] | None = None  # a job we sent a peer changed there
        self._sends: set[asyncio.Task[bool]] = set()
        self.lan_port: int | None = None
        self._hardware: dict[str, Hardware] = {}
        # Wake-on-LAN: one wake in flight per sleeping peer (its packet sent, its link awaited), and an event per
        # peer set while its link is up, for what waits on the wake.
        self._waking: dict[str, asyncio.Task[None]] = {}
        self._link_up: dict[str, asyncio.Event] = {}
        router.peer_sources.append(self.targets)

    # -- what we tell paired nodes about ourselves
    def hello(self) -> Hello:
        """Who we are: id, name, role, version and the hardware profile our speed is predicted from."""
        return Hello(node_id=self.identity.node_id, name=self.name, role=self.role, version=__version__,
                     hardware=self.config.node.hardware or "")

    def _hello_for(self, request: web.Request) -> Hello:
        """Our hello on a link that came in on `request`: with the MAC and IPv4 broadcast of the interface that
        holds the address it reached us at, so that the desktop at the other end can wake us by Wake-on-LAN."""
        hello = self.hello()
        sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
        found = wake_address(str(sockname[0])) if sockname else None
        return replace(hello, mac=found[0], broadcast=found[1]) if found else hello

    def inventory(self) -> Inventory:
        """The models we serve locally, with the context each engine is loaded at."""
        offers = []
        for model in self.catalog.models:
            if not model.local:
                continue
            spec = self.router.specs.get(model.name)
            max_ctx = spec.n_ctx_train if spec is not None and spec.n_ctx_train else model.ctx
            live = [s.run.ctx for s in self.pool.for_model(model.name) if s.live]
            offers.append(ModelOffer(id=model.name, max_ctx=max_ctx, loaded_ctx=max(live) if live else None,
                                     trainable=model.train_path is not None, tools=model.parses_tools))
        return Inventory(models=tuple(offers))

    def tell_job_changed(self, node_id: str, job_id: str) -> None:
        """Tell the paired node that asked for a fine-tuning job that it changed (it then fetches the job)."""
        task = asyncio.get_running_loop().create_task(self.hub.send(node_id, JobChanged(job_id)))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def _message(self, peer: str, message: Message) -> None:
        if isinstance(message, JobChanged) and self.on_job_changed is not None:
            self.on_job_changed(message.job_id)
        elif isinstance(message, Inventory) and self.role == "desktop" and peer in self.links:
            self._remember(peer, self.links[peer].state)

    def _remember(self, node_id: str, state: PeerLinkState) -> None:
        """Keep with the pairing what the peer's link told: the NIC to wake it by, its hardware, models and free
        memory, so that it is still planned for once it sleeps (also after a restart of this node)."""
        peer, hello = self.store.get(node_id), state.hello
        if peer is None or hello is None:
            return
        before = peer.last_known or LastKnown()
        models = tuple(replace(m, loaded_ctx=None) for m in state.inventory.models) if state.inventory \
            else before.models
        free = dict(state.capacity.free_bytes) if state.capacity and state.capacity.free_bytes else before.free_bytes
        try:
            self.store.remember(node_id, mac=hello.mac or None, broadcast=hello.broadcast or None,
                                last_known=LastKnown(hello.hardware, models, free))
        except StateFileError as exc:  # planning for a sleeping peer is worth a log line, not the link
            log.warning("cannot keep what %s said of itself: %s", peer.name, exc)

    def capacity(self) -> Capacity:
        """Our load for the peers to predict with (place/peer_view.py) and how many requests wait."""
        view = peer_view(self.router.local_state(), self.router.clock())
        queue = sum(s.waiting + max(0, s.in_flight - 1) for s in self.pool.slots.values())
        return Capacity(free_bytes=view.free_bytes, queue_depth=queue, backlog_s=view.backlog_s,
                        busy=tuple(Busy(d.backlog_s, dict(d.held)) for d in view.draining))

    # -- trust
    def authorize(self, request: web.Request) -> str | None:
        """The node id of a paired client on the LAN listener, or None (no or unknown certificate)."""
        try:
            return paired_peer_for(request.transport, self.store).node_id
        except UntrustedPeer:
            return None

    def _paired(self, peer: PairedPeer) -> None:
        # The running listener trusts the new node at once; no restart.
        self.server_ssl.load_verify_locations(cadata=peer.cert_pem.decode("ascii"))
        log.info("paired with %s (%s, node id %s)", peer.name, peer.role, peer.node_id[:16])
        if self.role == "desktop":
            self._dial(peer)

    # -- lifecycle
    async def start(self, lan_port: int | None) -> None:
        """Browse mDNS, announce this node if it serves others (node.advertise), and (desktop) dial its peers."""
        self.lan_port = lan_port
        self.discovery.on_change(self._discovered)
        try:
            await self.discovery.start()
            if self.config.node.advertised:
                await self.discovery.advertise(self.identity.node_id, self.name, self.role, __version__,
                                               lan_port or 0)
        except OSError as exc:
            log.warning("mDNS is unavailable (%s); peers must be paired by address", exc)
        if self.role == "desktop":
            for peer in self.store.all():
                self._dial(peer)

    async def stop(self) -> None:
        """Close links and stop mDNS."""
        for link in self.links.values():
            await link.close()
        self.links.clear()
        await self.hub.close()
        await self.discovery.stop()

    def _discovered(self, advert: Advert, gone: bool) -> None:
        peer = self.store.get(advert.node_id)
        if peer is None or gone or not advert.addresses:
            return
        link = self.links.get(peer.node_id)
        if link is not None and link.state.up:
            return  # the address we have works; mDNS may list another of the same host's addresses
        advertised = [(address, advert.port) for address in advert.addresses if advert.port]
        if advertised and (peer.address, peer.port) not in advertised and self.role == "desktop":
            # Maybe the node moved: try it at each address it advertises, and still where it was (an advert is
            # unauthenticated, and an address it lists may be one this node cannot reach). The address is only
            # stored once the pinned certificate answered there.
            log.info("peer %s may have moved to %s; trying it there", peer.name,
                     ", ".join(f"{a}:{p}" for a, p in advertised))
            self._dial(peer, replace_existing=True, also=advertised)

    def _dial(self, peer: PairedPeer, replace_existing: bool = False,
              also: Sequence[tuple[str, int]] = ()) -> None:
        places = list(also)
        if peer.address is not None and (peer.address, peer.port or DEFAULT_LAN_PORT) not in places:
            places.append((peer.address, peer.port or DEFAULT_LAN_PORT))
        if peer.role != "peer" or not places:
            return
        old = self.links.pop(peer.node_id, None) if replace_existing else self.links.get(peer.node_id)
        if old is not None and not replace_existing:
            return
        if old is not None:
            asyncio.get_running_loop().create_task(old.close())

        urls = {f"https://{_host(address)}:{port}/hybridd/v1/link": (address, port) for address, port in places}

        def on_state(_: str, state: PeerLinkState) -> None:
            event = self._link_up.setdefault(peer.node_id, asyncio.Event())
            event.set() if state.up else event.clear()
            self._remember(peer.node_id, state)  # on down too: its last free memory
            current = self.store.get(peer.node_id)
            address, port = urls[link.url]
            if state.up and current is not None and (current.address, current.port) != (address, port):
                log.info("peer %s answered with its pinned certificate at %s:%d; address updated", peer.name,
                         address, port)
                self.store.update_address(peer.node_id, address, port)

        link = LinkClient(list(urls), client_context(self.identity, peer.cert_pem), self.hello(),
                          snapshot=self.capacity, inventory=self.inventory, expected_node_id=peer.node_id,
                          on_state=on_state, on_message=self._message)
        self.links[peer.node_id] = link
        asyncio.get_running_loop().create_task(link.start())

    # -- pairing from the CLI
    def open_window(self) -> str:
        """Open the 2-minute pairing window; the code to type on the desktop."""
        return self.pairing.open()

    async def pair(self, target: str, code: str, http: aiohttp.ClientSession) -> PairedPeer:
        """Pair with target (a discovered name or id, or host[:port]) using its one-time code, then link to it."""
        address, port = self._locate(target)
        peer = await pair_with(f"https://{_host(address)}:{port}", code, self.identity, self.name, self.role,
                               self.store, http=http)
        self.store.update_address(peer.node_id, address, port)
        stored = self.store.get(peer.node_id) or peer
        self._paired(stored)
        return stored

    def _locate(self, target: str) -> tuple[str, int]:
        advert = self.discovery.resolve(target)
        if advert is not None and advert.addresses:
            return advert.addresses[0], advert.port or DEFAULT_LAN_PORT
        known = self.store.by_name(target)
        if known is not None and known.address:
            return known.address, known.port or DEFAULT_LAN_PORT
        host, sep, port = target.rpartition(":")
        if sep and port.isdigit() and host:
            return host.strip("[]"), int(port)
        if "." in target or ":" in target:
            return target.strip("[]"), DEFAULT_LAN_PORT
        raise PairingError(f"no node named '{target}' was found on the LAN; give its address (host or host:port)")

    # -- what the scheduler sees
    def targets(self) -> list[PeerTarget]:
        """Every paired peer whose link said hello, as a place the scheduler may put requests; and one whose link is
        down but that Wake-on-LAN can wake, as its pairing last knew it (also before its link ever came up since
        this node started)."""
        out = []
        for peer in self.store.all():
            link = self.links.get(peer.node_id)
            if link is None:
                continue
            state = link.state
            known = peer.last_known
            wakeable = self._asleep(peer, state)
            if state.hello is None and not (wakeable and known is not None):
                continue
            profile = state.hello.hardware if state.hello else known.hardware if known else ""
            hardware = self._peer_hardware(profile)
            free = state.capacity.free_bytes if state.capacity else known.free_bytes if known else {}
            if free:
                hardware = hardware.with_free(free)
            models = state.inventory.models if state.inventory else known.models if known else ()
            peer_state = PeerState(
                name=peer.name, hardware=hardware, models=frozenset(m.id for m in models),
                loaded={m.id: m.loaded_ctx for m in models if m.loaded_ctx}, up=state.up,
                queue_depth=state.capacity.queue_depth if state.capacity else 0, rtt_s=state.rtt_s or 0.001,
                backlog_s=state.capacity.backlog_s if state.capacity else {},
                draining=tuple(Drain(b.backlog_s, b.held) for b in state.capacity.busy) if state.capacity else (),
                trainable=frozenset(m.id for m in models if m.trainable),
                tools=frozenset(m.id for m in models if m.tools),
                wakeable=wakeable, wake_s=self.config.node.peer_wake_s,
            )
            if wakeable:  # what it was busy with before it slept is done or gone once it wakes
                peer_state = replace(peer_state, loaded={}, queue_depth=0, backlog_s={}, draining=())
            base = link.url.removesuffix("/hybridd/v1/link")  # where the pinned link answers
            # Made only for the peer a request is forwarded to, not each time the targets are listed.
            pinned = functools.partial(client_context, self.identity, peer.cert_pem)
            woken = functools.partial(self.woken, peer.node_id) if wakeable else None
            out.append(PeerTarget(peer_state, base, ssl=pinned, hybridd=True, wake=woken))
        return out

    # -- Wake-on-LAN
    def _asleep(self, peer: PairedPeer, state: PeerLinkState) -> bool:
        """Whether a magic packet may help: its link is down, its host did not answer (a host that refused the
        connection is awake, only its hybridd is not running) and a MAC is known for it."""
        return not state.up and not state.host_answered and self.wake_target(peer) is not None

    def wake_target(self, peer: PairedPeer) -> WakeTarget | None:
        """Where to send the peer's magic packet: a [[wake]] entry for it, else what its link told; None when no MAC
        is known for it."""
        configured = next((w for w in self.config.wake if w.peer == peer.name), None)
        mac = configured.mac if configured is not None else peer.mac
        if mac is None:
            return None
        broadcast = (configured.broadcast if configured is not None else "") or peer.wake_broadcast
        return WakeTarget(mac, broadcast or LIMITED_BROADCAST)

    def wake(self, name: str) -> dict[str, Any]:
        """Wake the paired peer `name` by hand (`hybridd wake`): send its magic packet now (and hurry its link),
        whether or not a wake is in flight; what was sent, or WakeError."""
        peer = self.store.by_name(name)
        if peer is None:
            raise BadRequest(f"no paired peer is named '{name}' (see `hybridd peers`)")
        target, sent = self._send_wake(peer)
        link = self.links.get(peer.node_id)
        return {"peer": peer.name, "mac": target.mac, "broadcast": target.broadcast, "sent_to": sent,
                "link": "up" if link is not None and link.state.up else "down",
                "wake_timeout_s": self.config.node.wake_timeout_s}

    def _send_wake(self, peer: PairedPeer) -> tuple[WakeTarget, list[str]]:
        target = self.wake_target(peer)
        if target is None:
            raise WakeError(f"no MAC address is known for {peer.name}: its link has not told one yet; add a [[wake]] "
                            f'entry for it (peer = "{peer.name}", mac = "aa:bb:cc:dd:ee:ff")')
        sent = send_magic_packet(target)
        log.info("Wake-on-LAN: magic packet for %s (%s) sent to %s", peer.name, target.mac, ", ".join(sent))
        link = self.links.get(peer.node_id)
        if link is not None:
            link.hurry()
        return target, sent

    async def woken(self, node_id: str) -> PeerTarget:
        """The peer's target once its link is up: it is sent a magic packet unless a wake is already in flight
        (one per peer, whatever number of requests wait on it), then waited for up to node.wake_timeout_s.
        PlacementRefused (503) when it did not come up, WakeError when the packet could not be sent."""
        task = self._waking.get(node_id)
        if task is None:
            task = self._waking[node_id] = asyncio.get_running_loop().create_task(self._wake_and_wait(node_id))
            task.add_done_callback(functools.partial(self._wake_done, node_id))
        await asyncio.shield(task)  # a request that goes away leaves the wake to the others
        peer = self.store.get(node_id)
        target = next((t for t in self.targets() if peer is not None and t.state.name == peer.name), None)
        if target is None or not target.state.up:  # down again at once
            raise PlacementRefused(f"{peer.name if peer else node_id} woke but its link went down again", 503,
                                   "peer_unavailable", 1.0)
        return target

    def _wake_done(self, node_id: str, task: asyncio.Task[None]) -> None:
        """A wake ended: the next request for a sleeping peer sends a packet again. Its failure is each waiter's to
        answer with; read here too, for when every request that waited on it has gone."""
        self._waking.pop(node_id, None)
        if not task.cancelled():
            task.exception()

    async def _wake_and_wait(self, node_id: str) -> None:
        peer = self.store.get(node_id)
        link = self.links.get(node_id)
        if peer is None or link is None:
            raise PlacementRefused("the peer was unpaired while it was being woken", 503, "peer_unavailable")
        if link.state.up:
            return
        target, _ = self._send_wake(peer)
        timeout = self.config.node.wake_timeout_s
        deadline = self.clock() + timeout
        up = self._link_up.setdefault(node_id, asyncio.Event())
        while not link.state.up:
            left = deadline - self.clock()
            if left <= 0:
                raise PlacementRefused(
                    f"{peer.name} did not wake within {timeout:g} s (node.wake_timeout_s) of its Wake-on-LAN packet "
                    f"({target.mac} via {target.broadcast}); its link: {link.state.down_reason}", 503, "peer_asleep",
                    retry_after_s=timeout)
            link.hurry()  # a sleeping peer's link backs off to 15 s between dials: dial again every second
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(up.wait(), min(1.0, left))

    def _peer_hardware(self, profile: str) -> Hardware:
        """A peer's hardware from the profile its hello names (a Spark when unknown), read once per profile:
        every request asks for the peer targets."""
        name = profile or "dgx-spark"
        if name not in self._hardware:
            try:
                self._hardware[name] = load_hardware_profile(name).hardware()
            except ConfigError:  # a profile this node does not have
                self._hardware[name] = load_hardware_profile("dgx-spark").hardware()
        return self._hardware[name]

    def describe(self) -> dict[str, Any]:
        """For `hybridd peers`: this node, what mDNS shows (paired or not), and each paired peer's link."""
        paired = []
        for peer in self.store.all():
            link = self.links.get(peer.node_id)
            state = link.state if link is not None else self.hub.states.get(peer.node_id, PeerLinkState())
            paired.append({**_describe_paired(peer, state), "wakeable": self._asleep(peer, state)})
        paired_ids = {p.node_id for p in self.store.all()}
        return {
            "node": {"name": self.name, "role": self.role, "node_id": self.identity.node_id,
                     "lan_port": self.lan_port, "pairing_open": self.pairing.is_open()},
            "paired": paired,
            "discovered": [{"name": a.name, "node_id": a.node_id, "role": a.role, "version": a.version,
                            "addresses": list(a.addresses), "port": a.port, "paired": a.node_id in paired_ids}
                           for a in self.discovery.found()],
        }


def _describe_paired(peer: PairedPeer, state: PeerLinkState) -> dict[str, Any]:
    capacity = state.capacity
    return {
        "name": peer.name, "node_id": peer.node_id, "role": peer.role, "address": peer.address, "port": peer.port,
        "link": "up" if state.up else "down", "down_reason": None if state.up else state.down_reason,
        "rtt_ms": round(state.rtt_s * 1000, 2) if state.rtt_s is not None else None,
        "free_bytes": dict(capacity.free_bytes) if capacity else {},
        "queue_depth": capacity.queue_depth if capacity else None,
        "models": [m.id for m in state.inventory.models] if state.inventory else [],
        "hardware": state.hello.hardware if state.hello else None,
        "mac": peer.mac, "wake_broadcast": peer.wake_broadcast,
    }


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address
