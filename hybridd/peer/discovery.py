"""Finding other hybridd nodes on the LAN with zeroconf (mDNS / DNS-SD), service type `_hybridd._tcp.local.`.

Each node advertises its instance name plus TXT `id`, `role`, `version`, `port`. These are hints only: anyone on the
LAN can claim anything, so nothing here is trusted; pairing and the pinned certificate decide who a peer is.

A peer that leaves politely sends goodbyes and zeroconf's browser reports it removed. A peer that dies cannot say
goodbye, and zeroconf keeps its PTR record for at least 1125 s, so we keep our own liveness: every `refresh_s` we ask
each known instance for its SRV record, note when any of its records was last heard, and report it gone once it has
been silent for `gone_after_s`. When it speaks again (it re-announces on restart) it is resolved and reported back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import ifaddr
from zeroconf import (
    DNSOutgoing,
    DNSQuestion,
    IPVersion,
    RecordUpdate,
    RecordUpdateListener,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from hybridd.peer.errors import MalformedAdvert

log = logging.getLogger("hybridd.peer")

SERVICE_TYPE = "_hybridd._tcp.local."
# DNS wire constants (RFC 1035 / 2782), spelled out rather than imported from zeroconf's private const module.
_TYPE_PTR, _TYPE_A, _TYPE_TXT, _TYPE_AAAA, _TYPE_SRV = 12, 1, 16, 28, 33
_CLASS_IN = 1
_FLAGS_QUERY = 0x0000
_RESOLVE_TIMEOUT_MS = 3000
_MALFORMED_LOG_EVERY_S = 300.0
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+~-]{0,127}")

Clock = Callable[[], float]
ZeroconfFactory = Callable[[list[str] | None], AsyncZeroconf]
ChangeCallback = Callable[["Advert", bool], None]


@dataclass(frozen=True)
class Advert:
    """What a node on the LAN says about itself; unauthenticated hints, never identity."""

    node_id: str
    name: str
    role: str
    version: str
    port: int
    addresses: tuple[str, ...]
    last_seen: float


def parse_advert(instance: str, properties: dict[bytes, bytes | None], srv_port: int | None,
                 addresses: tuple[str, ...], now: float) -> Advert:
    """An Advert from a resolved instance's TXT properties; raises MalformedAdvert naming the bad field."""
    fields: dict[str, str] = {}
    for key, value in properties.items():
        if key in (b"id", b"role", b"version", b"port"):
            if value is None:
                raise MalformedAdvert(f"TXT {key.decode()}: no value")
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                raise MalformedAdvert(f"TXT {key.decode()}: not ASCII") from None
            if not _TOKEN.fullmatch(text):
                raise MalformedAdvert(f"TXT {key.decode()}: {text[:40]!r} is not a short token")
            fields[key.decode()] = text
    missing = [k for k in ("id", "role", "version", "port") if k not in fields]
    if missing:
        raise MalformedAdvert(f"TXT lacks {', '.join(missing)}")
    # Port 0 is allowed: a node without a LAN listener (a desktop) still shows up in `hybridd peers`.
    if not fields["port"].isdigit() or not 0 <= int(fields["port"]) < 65536:
        raise MalformedAdvert(f"TXT port: {fields['port']!r} is not a port number")
    # SRV is where DNS-SD puts the port; the TXT copy only fills in when SRV is absent.
    port = srv_port if srv_port else int(fields["port"])
    return Advert(fields["id"], instance_label(instance), fields["role"], fields["version"], port, addresses, now)


def instance_label(instance: str) -> str:
    """`spark-1._hybridd._tcp.local.` -> `spark-1`."""
    suffix = "." + SERVICE_TYPE
    return instance[: -len(suffix)] if instance.lower().endswith(suffix.lower()) else instance


class _HeardListener(RecordUpdateListener):
    """Notes every fresh record that arrives for an instance of our type, before zeroconf's cache dedupes it."""

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        """Called by zeroconf in the event loop for every record of every packet."""
        heard: set[str] = set()
        for update in records:
            record: Any = update.new
            if record.is_expired(now):  # a goodbye, or the cache expiring something: not a sign of life
                continue
            if record.type == _TYPE_PTR and record.name.lower() == SERVICE_TYPE:
                heard.add(record.alias.lower())
            elif record.type in (_TYPE_SRV, _TYPE_TXT) and record.name.lower().endswith("." + SERVICE_TYPE):
                heard.add(record.name.lower())
            elif record.type in (_TYPE_A, _TYPE_AAAA):
                heard |= self.discovery._instances_on_host(record.name.lower())
        if heard:
            self.discovery._heard(heard)

    def async_update_records_complete(self) -> None:
        """Nothing to do once the cache has committed the batch."""


class Discovery:
    """Advertise this node and keep a live list of the other hybridd nodes that mDNS shows on the LAN."""

    def __init__(self, *, interfaces: list[str] | None = None, clock: Clock = time.monotonic,
                 zeroconf_factory: ZeroconfFactory | None = None, refresh_s: float = 2.0,
                 gone_after_s: float = 7.0) -> None:
        self.interfaces = interfaces
        self.refresh_s = refresh_s
        self.gone_after_s = gone_after_s
        self._clock = clock
        self._factory = zeroconf_factory or _default_zeroconf
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._listener = _HeardListener(self)
        self._sweeper: asyncio.Task[None] | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._adverts: dict[str, Advert] = {}  # lower-cased instance name -> advert
        self._servers: dict[str, str] = {}  # lower-cased instance name -> lower-cased host name
        self._last_heard: dict[str, float] = {}
        self._addresses: list[str] | None = None  # the chosen interfaces' addresses once started; None = all
        self._own_info: AsyncServiceInfo | None = None
        self._own_node_id: str | None = None
        self._callbacks: list[ChangeCallback] = []
        self._malformed_logged: dict[str, float] = {}

    async def start(self) -> None:
        """Open the mDNS sockets and begin browsing for peers."""
        if self._aiozc is not None:
            return
        self._addresses = self._chosen_addresses()
        self._aiozc = self._factory(self._addresses)
        zc = self._aiozc.zeroconf
        if self._addresses is not None:
            await zc.async_wait_for_start()
            _hear_only_joined_groups(zc)
        zc.async_add_listener(self._listener, None)
        self._browser = AsyncServiceBrowser(zc, [SERVICE_TYPE], handlers=[self._on_service_state_change])
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="discovery sweep")

    async def advertise(self, node_id: str, name: str, role: str, version: str, port: int,
                        addresses: list[str] | None = None) -> None:
        """Announce this node (again, if anything changed); addresses default to those of our interfaces."""
        if self._aiozc is None:
            raise RuntimeError("Discovery.advertise before start")
        properties = {"id": node_id, "role": role, "version": version, "port": str(port)}
        chosen = addresses if addresses is not None else _local_addresses(self._addresses)
        # One DNS label, at most 63 bytes (UTF-8), cut at a character boundary.
        label = name.replace(".", "-").encode()[:63].decode(errors="ignore") or "hybridd"
        info = AsyncServiceInfo(SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", port=port, properties=properties,
                                server=f"hybridd-{_host_label(node_id)}.local.", parsed_addresses=chosen)
        self._own_node_id = node_id
        if self._own_info is not None and self._own_info.name == info.name:
            await self._aiozc.async_update_service(info)
        else:
            if self._own_info is not None:
                await self._aiozc.async_unregister_service(self._own_info)
            # Two nodes may share a friendly name; zeroconf then renames ours to "name (2)" instead of failing.
            await self._aiozc.async_register_service(info, allow_name_change=True)
        self._own_info = info
        own = info.name.lower()
        if own in self._adverts:  # we may have heard ourselves before we knew who we were
            self._drop(own)

    async def stop(self) -> None:
        """Say goodbye, stop browsing and close the sockets."""
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is None:
            return
        tasks = [t for t in (self._sweeper, *self._resolving.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sweeper = None
        self._resolving.clear()
        aiozc.zeroconf.async_remove_listener(self._listener)
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        await aiozc.async_close()  # unregisters our service, which sends the goodbye packets
        self._own_info = None

    def _chosen_addresses(self) -> list[str] | None:
        """The addresses of `interfaces` (a name stands for its IPv4 addresses); None for every interface."""
        if self.interfaces is None:
            return None
        addresses, unknown = interface_addresses(self.interfaces, ifaddr.get_adapters())
        if unknown:
            log.warning("mDNS: no interface %s on this host; running on the others chosen",
                        ", ".join(repr(name) for name in unknown))
        if not addresses:  # never fall back to every interface: the choice was made to keep some out
            raise OSError(f"none of the interfaces chosen for mDNS ({', '.join(self.interfaces)}) is on this host")
        return addresses

    def on_change(self, callback: ChangeCallback) -> None:
        """Call callback(advert, gone) when a peer appears, changes, or is gone."""
        self._callbacks.append(callback)

    def found(self) -> list[Advert]:
        """Every node seen now, minus ourselves, by name."""
        adverts = [replace(a, last_seen=self._last_heard.get(key, a.last_seen))
                   for key, a in self._adverts.items() if not self._is_own(key, a)]
        return sorted(adverts, key=lambda a: (a.name.lower(), a.node_id))

    def resolve(self, name_or_id_or_address: str) -> Advert | None:
        """The current advert for a node id, instance name or address (most recently heard wins); None if unseen."""
        wanted = name_or_id_or_address.strip()
        adverts = self.found()
        for matches in (lambda a: a.node_id == wanted, lambda a: a.name.lower() == wanted.lower(),
                        lambda a: _same_address(wanted, a.addresses)):
            hits = [a for a in adverts if matches(a)]
            if hits:
                return max(hits, key=lambda a: a.last_seen)
        return None

    def sweep(self, now: float) -> list[Advert]:
        """Drop the instances silent for longer than gone_after_s at time now; returns those dropped."""
        silent = [key for key in self._adverts if now - self._last_heard.get(key, now) > self.gone_after_s]
        return [advert for key in silent if (advert := self._drop(key)) is not None]

    # -- zeroconf events -------------------------------------------------------------------------------------

    def _on_service_state_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                                 state_change: ServiceStateChange) -> None:
        key = name.lower()
        if state_change is ServiceStateChange.Removed:
            self._drop(key)
        else:
            self._schedule_resolve(name)

    def _heard(self, instances: set[str]) -> None:
        now = self._clock()
        for key in instances:
            self._last_heard[key] = now
            if key not in self._adverts and not self._is_own(key, None):
                self._schedule_resolve(key)  # a node we had given up on is talking again

    def _instances_on_host(self, host: str) -> set[str]:
        return {key for key, server in self._servers.items() if server == host}

    def _schedule_resolve(self, name: str) -> None:
        key = name.lower()
        if self._aiozc is None or key in self._resolving or self._is_own(key, None):
            return
        self._resolving[key] = asyncio.create_task(self._resolve(name), name=f"resolve {key}")

    async def _resolve(self, name: str) -> None:
        key = name.lower()
        try:
            assert self._aiozc is not None
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(self._aiozc.zeroconf, _RESOLVE_TIMEOUT_MS):
                return
            addresses = tuple(info.parsed_scoped_addresses(IPVersion.All))
            advert = parse_advert(info.name, info.properties, info.port, addresses, self._clock())
        except MalformedAdvert as exc:
            self._log_malformed(key, str(exc))
            return
        except Exception as exc:  # a resolver bug or garbage we did not foresee must not end discovery
            self._log_malformed(key, f"{type(exc).__name__}: {exc}")
            return
        finally:
            self._resolving.pop(key, None)
        if self._is_own(key, advert):
            return
        self._last_heard[key] = advert.last_seen
        if info.server:
            self._servers[key] = info.server.lower()
        previous = self._adverts.get(key)
        self._adverts[key] = advert
        if previous is None or replace(previous, last_seen=0.0) != replace(advert, last_seen=0.0):
            log.info("discovery: %s %s (%s, id %s) at %s:%d", "found" if previous is None else "updated",
                     advert.name, advert.role, advert.node_id[:16], ",".join(advert.addresses) or "?", advert.port)
            self._emit(advert, gone=False)

    def _drop(self, key: str) -> Advert | None:
        advert = self._adverts.pop(key, None)
        self._last_heard.pop(key, None)
        self._servers.pop(key, None)
        if advert is not None and not self._is_own(key, advert):
            log.info("discovery: %s (id %s) is gone", advert.name, advert.node_id[:16])
            self._emit(advert, gone=True)
        return advert

    def _emit(self, advert: Advert, gone: bool) -> None:
        for callback in list(self._callbacks):
            try:
                callback(advert, gone)
            except Exception:
                log.exception("discovery: change callback failed")

    def _is_own(self, key: str, advert: Advert | None) -> bool:
        if self._own_info is not None and key == self._own_info.name.lower():
            return True
        return advert is not None and advert.node_id == self._own_node_id

    def _log_malformed(self, key: str, reason: str) -> None:
        """One line per instance per few minutes: a LAN full of junk must not flood the log."""
        now = self._clock()
        last = self._malformed_logged.get(key)
        if last is not None and now - last < _MALFORMED_LOG_EVERY_S:
            return
        if len(self._malformed_logged) > 256:  # bounded, whatever a hostile LAN sends
            self._malformed_logged.clear()
        self._malformed_logged[key] = now
        log.warning("discovery: ignoring %s: %s", key[:80], reason)

    # -- liveness --------------------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            self.sweep(self._clock())
            self._ask_known()

    def _ask_known(self) -> None:
        """Ask every known instance for its SRV record; the answers (or their absence) are the liveness signal."""
        if self._aiozc is None or not self._adverts:
            return
        out = DNSOutgoing(_FLAGS_QUERY, multicast=True)
        for key in self._adverts:
            out.add_question(DNSQuestion(key, _TYPE_SRV, _CLASS_IN))
        self._aiozc.zeroconf.async_send(out)


def _default_zeroconf(interfaces: list[str] | None) -> AsyncZeroconf:
    if interfaces is None:
        return AsyncZeroconf()
    return AsyncZeroconf(interfaces=list(interfaces))


def interface_addresses(choices: list[str], adapters: Iterable[ifaddr.Adapter]) -> tuple[list[str], list[str]]:
    """(addresses, unknown names): each choice that is an IP address as is, each name as its IPv4 addresses."""
    addresses: list[str] = []
    unknown = []
    for choice in choices:
        if _is_ip(choice):
            found = [choice]
        else:
            found = [ip.ip for adapter in adapters if choice in (adapter.name, adapter.nice_name)
                     for ip in adapter.ips if isinstance(ip.ip, str)]
            if not found:
                unknown.append(choice)
        addresses += [a for a in found if a not in addresses]
    return addresses, unknown


# Linux socket options Python's socket module does not name (linux/in.h, linux/in6.h).
_IP_MULTICAST_ALL, _IPV6_MULTICAST_ALL = 49, 29


def _hear_only_joined_groups(zc: Zeroconf) -> None:
    """Keep zeroconf's sockets from hearing mDNS that arrives on interfaces it was not told to use.

    zeroconf binds its sockets to every address and joins the group on the chosen interfaces only; but by default
    Linux hands a socket the group's packets from every interface on which any socket of the host joined it (avahi
    does, on all). zeroconf would then answer a query from another interface, by unicast, out of that interface.
    """
    for reader in zc.engine.readers:
        ipv6 = reader.sock.family == socket.AF_INET6
        with contextlib.suppress(OSError):  # not Linux, or a kernel without the option: as zeroconf does it
            reader.sock.setsockopt(socket.IPPROTO_IPV6 if ipv6 else socket.IPPROTO_IP,
                                   _IPV6_MULTICAST_ALL if ipv6 else _IP_MULTICAST_ALL, 0)


def _local_addresses(interfaces: list[str] | None) -> list[str]:
    """Addresses to advertise: the chosen interface addresses, else every non-loopback address we have."""
    if interfaces is not None:
        return [i for i in interfaces if _is_ip(i)]
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            address = ipaddress.ip_address(text)
            if address.is_loopback or address.is_link_local:  # link-local v6 needs a scope a peer cannot use
                continue
            found.append(text)
    return found


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _same_address(wanted: str, addresses: tuple[str, ...]) -> bool:
    if not _is_ip(wanted):
        return False
    target = ipaddress.ip_address(wanted.split("%", 1)[0])
    return any(_is_ip(a) and ipaddress.ip_address(a.split("%", 1)[0]) == target for a in addresses)


def _host_label(node_id: str) -> str:
    """A host-name-safe label derived from the node id (ids are fingerprints; keep it short)."""
    return (re.sub(r"[^a-z0-9-]", "-", node_id.lower())[:16] or "node").strip("-") or "node"
