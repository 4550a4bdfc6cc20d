"""Discovery over real mDNS: two processes in two network namespaces on a veth, and two instances on loopback."""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

import ifaddr
import pytest
from netns import NetnsPair, emit, netns_available
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from hybridd.peer.discovery import (
    SERVICE_TYPE,
    Advert,
    Discovery,
    MalformedAdvert,
    interface_addresses,
    parse_advert,
)

# -- an agent: runs inside a namespace, reports discovery events as JSON lines, stops cleanly when stdin closes --


def discovery_agent(address: str, node_id: str, name: str, port: int, refresh_s: float, gone_after_s: float) -> None:
    """Advertise as node_id on address, report every change, say goodbye when stdin closes."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(_agent(address, node_id, name, port, refresh_s, gone_after_s))


async def _agent(address: str, node_id: str, name: str, port: int, refresh_s: float, gone_after_s: float) -> None:
    discovery = Discovery(interfaces=[address], refresh_s=refresh_s, gone_after_s=gone_after_s)
    discovery.on_change(lambda advert, gone: emit({"event": "gone" if gone else "found", **asdict(advert)}))
    await discovery.start()
    await discovery.advertise(node_id, name, "spark" if name.startswith("spark") else "desktop", "0.1.0", port)
    emit({"event": "advertising"})
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await stdin.read()  # EOF: the test wants us to stop
    await discovery.stop()
    emit({"event": "stopped"})


def _require_netns() -> None:
    ok, why = netns_available()
    if not ok:
        pytest.skip(why)


def _is(event: str, node_id: str, **fields: object) -> Callable[[dict], bool]:  # type: ignore[type-arg]
    return lambda line: (line.get("event") == event and line.get("node_id") == node_id
                         and all(line.get(k) == v for k, v in fields.items()))


@pytest.mark.timeout(30)
def test_two_namespaces_find_each_other_and_goodbye_reports_gone() -> None:
    _require_netns()
    with NetnsPair() as net:
        # gone_after_s is long here, so a prompt "gone" can only come from the goodbye packets.
        desk = net.spawn(net.a, "test_discovery:discovery_agent", net.a.address, "id-desk", "desk", 11435, 1.0, 60.0)
        spark = net.spawn(net.b, "test_discovery:discovery_agent", net.b.address, "id-spark", "spark-1", 7443, 1.0,
                          60.0)
        found = desk.expect(_is("found", "id-spark"), 10, "the desktop to find the spark")
        assert (found["name"], found["role"], found["version"], found["port"], found["addresses"]) == (
            "spark-1", "spark", "0.1.0", 7443, [net.b.address])
        back = spark.expect(_is("found", "id-desk"), 10, "the spark to find the desktop")
        assert (back["role"], back["port"], back["addresses"]) == ("desktop", 11435, [net.a.address])
        assert not [line for line in desk.seen if line.get("node_id") == "id-desk"], "a node must not list itself"

        started = time.monotonic()
        assert spark.stop() == 0
        desk.expect(_is("gone", "id-spark"), 5, "the desktop to see the spark's goodbye")
        assert time.monotonic() - started < 5
        assert desk.stop() == 0


@pytest.mark.timeout(30)
def test_killed_peer_is_gone_within_seconds_and_back_at_its_new_port() -> None:
    _require_netns()
    with NetnsPair() as net:
        desk = net.spawn(net.a, "test_discovery:discovery_agent", net.a.address, "id-desk", "desk", 11435, 0.5, 2.0)
        spark = net.spawn(net.b, "test_discovery:discovery_agent", net.b.address, "id-spark", "spark-1", 7443, 0.5,
                          2.0)
        desk.expect(_is("found", "id-spark", port=7443), 10, "the desktop to find the spark")
        # Alive and answering the liveness queries, it stays listed well past gone_after_s.
        desk.collect(3.0)
        assert not [line for line in desk.seen if line.get("event") == "gone"], desk.seen

        started = time.monotonic()
        spark.kill()  # no goodbye: only our liveness sweep can notice
        desk.expect(_is("gone", "id-spark"), 6, "the desktop to notice the dead spark")
        assert time.monotonic() - started < 6

        net.spawn(net.b, "test_discovery:discovery_agent", net.b.address, "id-spark", "spark-1", 8443, 0.5, 2.0)
        desk.expect(_is("found", "id-spark", port=8443), 8, "the desktop to see the spark back at its new port")
        assert desk.stop() == 0


# -- loopback: two instances in this process --------------------------------------------------------------------


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Discovery, Discovery]]:
    """Two started Discovery instances on 127.0.0.1, stopped at teardown."""
    a = Discovery(interfaces=["127.0.0.1"], refresh_s=0.5, gone_after_s=30.0)
    b = Discovery(interfaces=["127.0.0.1"], refresh_s=0.5, gone_after_s=30.0)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def _until(predicate: Callable[[], object], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.05)


# Other hybridd nodes (other test sessions, a real daemon) may share this host's loopback, so every id and name here
# is unique to the run and every assertion looks only at ours.
RUN = secrets.token_hex(3)


def ours(discovery: Discovery) -> list[Advert]:
    return [advert for advert in discovery.found() if advert.node_id.startswith(RUN)]


async def test_loopback_pair_resolves_by_id_name_and_address(pair: tuple[Discovery, Discovery]) -> None:
    a, b = pair
    desk_id, spark_id, spark_name = f"{RUN}-desk", f"{RUN}-spark", f"spark-{RUN}"
    changes: list[tuple[Advert, bool]] = []
    a.on_change(lambda advert, gone: changes.append((advert, gone)) if advert.node_id == spark_id else None)
    await a.advertise(desk_id, f"desk-{RUN}", "desktop", "0.1.0", 11435, addresses=["127.0.0.1"])
    await b.advertise(spark_id, spark_name, "spark", "0.2.0", 7443, addresses=["127.0.0.1"])
    await _until(lambda: ours(a) and ours(b), 10, "both to see each other")

    assert [x.node_id for x in ours(a)] == [spark_id]
    assert [x.node_id for x in ours(b)] == [desk_id]
    assert desk_id not in {x.node_id for x in a.found()}, "a node must not list itself"
    spark = a.resolve(spark_id)
    assert spark is not None and (spark.name, spark.role, spark.version, spark.port, spark.addresses) == (
        spark_name, "spark", "0.2.0", 7443, ("127.0.0.1",))
    assert a.resolve(spark_name.upper()) == a.resolve(spark_id)
    assert a.resolve(desk_id) is None and a.resolve(f"{RUN}-nobody") is None

    # The same id at a new port is followed, and reported as a change.
    await b.advertise(spark_id, spark_name, "spark", "0.2.0", 8443, addresses=["127.0.0.1"])
    await _until(lambda: (r := a.resolve(spark_id)) is not None and r.port == 8443, 10, "the new port")
    assert [(c.port, gone) for c, gone in changes] == [(7443, False), (8443, False)]

    await b.stop()
    await _until(lambda: not ours(a), 5, "the goodbye")
    assert changes[-1][1] is True and changes[-1][0].node_id == spark_id


async def test_silence_is_judged_by_the_injected_clock(pair: tuple[Discovery, Discovery]) -> None:
    now = [1000.0]
    a = Discovery(interfaces=["127.0.0.1"], clock=lambda: now[0], refresh_s=3600.0, gone_after_s=7.0)
    _, b = pair
    spark_id = f"{RUN}-quiet"
    await a.start()
    try:
        gone: list[str] = []
        a.on_change(lambda advert, is_gone: gone.append(advert.node_id) if is_gone and advert.node_id == spark_id
                    else None)
        await b.advertise(spark_id, f"quiet-{RUN}", "spark", "0.1.0", 7443, addresses=["127.0.0.1"])
        await _until(lambda: a.resolve(spark_id), 10, "the spark")
        assert a.sweep(now[0] + 6.9) == [] and gone == []
        assert spark_id in [x.node_id for x in a.sweep(now[0] + 7.1)] and gone == [spark_id]
        assert a.resolve(spark_id) is None
        # It is still alive: the next thing it says brings it back.
        await b.advertise(spark_id, f"quiet-{RUN}", "spark", "0.1.0", 7444, addresses=["127.0.0.1"])
        await _until(lambda: a.resolve(spark_id), 10, "the spark to come back")
    finally:
        await a.stop()


async def test_malformed_txt_is_ignored_with_one_log_line(caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridd.peer import discovery as discovery_module

    junk = f"junk-{RUN}"
    # Which versions of the junk instance `a` has resolved and judged: the test waits on these, not on a sleep.
    judged: list[dict[bytes, bytes | None]] = []
    real_parse = discovery_module.parse_advert

    def parse(instance: str, properties: dict[bytes, bytes | None], *rest):  # type: ignore[no-untyped-def]
        if instance.lower().startswith(junk):
            judged.append(dict(properties))
        return real_parse(instance, properties, *rest)

    monkeypatch.setattr(discovery_module, "parse_advert", parse)

    def junk_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if junk in r.getMessage()]

    a = Discovery(interfaces=["127.0.0.1"], refresh_s=0.5)
    await a.start()
    liar = AsyncZeroconf(interfaces=["127.0.0.1"])
    try:
        bad = AsyncServiceInfo(SERVICE_TYPE, f"{junk}.{SERVICE_TYPE}", port=1, server=f"{junk}.local.",
                               properties={b"id": b"\xff\xfe", b"role": b"x"}, parsed_addresses=["127.0.0.1"])
        with caplog.at_level(logging.WARNING, logger="hybridd.peer"):
            await liar.async_register_service(bad)
            good = AsyncServiceInfo(SERVICE_TYPE, f"fine-{RUN}.{SERVICE_TYPE}", port=2, server=f"fine-{RUN}.local.",
                                    properties={"id": f"{RUN}-fine", "role": "spark", "version": "1", "port": "2"},
                                    parsed_addresses=["127.0.0.1"])
            await liar.async_register_service(good)
            await _until(lambda: ours(a) and junk_lines(), 10, "the well-formed advert and the malformed one's line")
            # A second malformed version of the same instance is ignored without another log line.
            worse = AsyncServiceInfo(SERVICE_TYPE, f"{junk}.{SERVICE_TYPE}", port=1, server=f"{junk}.local.",
                                     properties={b"id": b"ok", b"port": b"99999"}, parsed_addresses=["127.0.0.1"])
            await liar.async_update_service(worse)
            # Judged and logged (or not) in one step: once `a` has parsed the new version, its log line would be there.
            await _until(lambda: any(p.get(b"id") == b"ok" for p in judged), 10, "the malformed update to be judged")
        assert [x.node_id for x in ours(a)] == [f"{RUN}-fine"]
        lines = junk_lines()
        assert len(lines) == 1 and "TXT id: not ASCII" in lines[0], lines
    finally:
        await liar.async_close()
        await a.stop()


def test_an_interface_name_stands_for_its_ipv4_addresses() -> None:
    adapters = ifaddr.get_adapters()
    loopback = next(a for a in adapters if any(ip.ip == "127.0.0.1" for ip in a.ips))
    addresses, unknown = interface_addresses([loopback.name, "127.0.0.1", "10.9.8.7", "nope0"], adapters)
    assert addresses == [ip.ip for ip in loopback.ips if isinstance(ip.ip, str)] + ["10.9.8.7"]  # no IPv6, no twice
    assert unknown == ["nope0"]


async def test_interfaces_that_are_not_here_keep_mdns_off_rather_than_on_everywhere() -> None:
    discovery = Discovery(interfaces=["nope0", "nope1"])
    with pytest.raises(OSError, match=r"none of the interfaces chosen for mDNS \(nope0, nope1\) is on this host"):
        await discovery.start()
    await discovery.stop()


@pytest.mark.parametrize(("properties", "reason"), [
    ({b"role": b"spark", b"version": b"1", b"port": b"1"}, "lacks id"),
    ({b"id": None, b"role": b"spark", b"version": b"1", b"port": b"1"}, "id: no value"),
    ({b"id": b"\xff", b"role": b"spark", b"version": b"1", b"port": b"1"}, "id: not ASCII"),
    ({b"id": b"a b", b"role": b"spark", b"version": b"1", b"port": b"1"}, "not a short token"),
    ({b"id": b"x" * 200, b"role": b"spark", b"version": b"1", b"port": b"1"}, "not a short token"),
    ({b"id": b"a", b"role": b"spark", b"version": b"1", b"port": b"65536"}, "not a port number"),
    ({b"id": b"a", b"role": b"spark", b"version": b"1", b"port": b"-1"}, "not a short token"),
    ({b"id": b"a", b"role": b"spark", b"version": b"1", b"port": b"http"}, "not a port number"),
])
def test_parse_advert_rejects(properties: dict[bytes, bytes | None], reason: str) -> None:
    with pytest.raises(MalformedAdvert, match=reason):
        parse_advert(f"x.{SERVICE_TYPE}", properties, 1, (), 0.0)


def test_parse_advert_prefers_the_srv_port_and_ignores_unknown_keys() -> None:
    properties = {b"id": b"abc", b"role": b"spark", b"version": b"0.1.0", b"port": b"1", b"extra": b"\x00"}
    advert = parse_advert(f"spark-1.{SERVICE_TYPE}", properties, 7443, ("10.0.0.2",), 5.0)
    assert advert == Advert("abc", "spark-1", "spark", "0.1.0", 7443, ("10.0.0.2",), 5.0)
    # Port 0: a node without a LAN listener, still listed.
    assert parse_advert(f"desk.{SERVICE_TYPE}", {**properties, b"port": b"0"}, 0, (), 5.0).port == 0
