"""No client, with or without credentials, can take the daemon's file descriptors: the table's policy, checked with
time as an argument."""

from __future__ import annotations

from hybridd.api.connections import ConnectionTable, Limits, State, Tally, share_descriptors, source_of

# -- the policy, time as an argument


def test_at_the_cap_a_newcomer_takes_the_place_of_the_connection_waiting_longest() -> None:
    table = ConnectionTable(Limits(max_untrusted=3))
    for conn, at in enumerate((0.0, 1.0, 2.0)):
        assert table.open(conn, "127.0.0.1", at).admitted
    table.started(0)  # busy: never evicted, however old
    verdict = table.open(3, "127.0.0.1", 3.0)
    assert verdict.admitted and verdict.evicted == (1,)
    assert table.state(1) is None and len(table) == 3
    # An idle keep-alive connection waits too; it is evicted by how long it has waited.
    table.finished(0, 4.0)
    assert table.open(4, "127.0.0.1", 5.0).evicted == (2,)
    assert table.open(5, "127.0.0.1", 6.0).evicted == (3,)
    assert table.open(6, "127.0.0.1", 7.0).evicted == (0,)


def test_when_every_connection_is_busy_the_newcomer_is_refused() -> None:
    table = ConnectionTable(Limits(max_untrusted=2))
    for conn in (0, 1):
        table.open(conn, "127.0.0.1", 0.0)
        table.started(conn)
    verdict = table.open(2, "127.0.0.1", 1.0)
    assert not verdict.admitted and verdict.refused == "all 2 connections busy"
    table.closed(0)
    table.closed(0)  # twice is fine
    assert table.open(2, "127.0.0.1", 2.0).admitted and table.untrusted == 2


def test_one_address_past_its_cap_is_refused_while_others_get_in() -> None:
    table = ConnectionTable(Limits(max_untrusted=10, max_per_source=2))
    assert all(table.open(conn, "192.0.2.7", 0.0, tls=True).admitted for conn in (0, 1))
    verdict = table.open(2, "192.0.2.7", 0.0, tls=True)
    assert not verdict.admitted and verdict.refused == "over 2 from 192.0.2.7"
    assert table.open(3, "192.0.2.8", 0.0, tls=True).admitted
    table.closed(0)
    assert table.open(4, "192.0.2.7", 0.0, tls=True).admitted
    # One host holds a whole IPv6 /64, so that is what is counted; a v4-mapped address is its v4 address.
    assert source_of("2001:db8:1:2::1") == source_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7" and source_of("fe80::1%eth0") == "fe80::/64"


def test_a_paired_node_leaves_the_count_once_its_certificate_is_seen() -> None:
    table = ConnectionTable(Limits(max_untrusted=2, max_per_source=1))
    table.open(0, "192.0.2.9", 0.0, tls=True)
    assert table.from_source("192.0.2.9") == 1
    table.ready(0, 0.1, trusted=True)
    assert table.untrusted == 0 and table.from_source("192.0.2.9") == 0
    assert table.open(1, "192.0.2.9", 0.2, tls=True).admitted  # its next connection gets in
    table.open(2, "192.0.2.10", 0.3, tls=True)
    assert table.open(3, "192.0.2.11", 0.4, tls=True).evicted == (1,)  # never the paired one
    table.closed(0)
    assert table.untrusted == 2


def test_clocks_cut_a_handshake_a_request_head_and_an_idle_connection_but_never_a_request() -> None:
    table = ConnectionTable(Limits(max_untrusted=10, header_s=10, handshake_s=5, idle_s=75))
    table.open(0, "a", 0.0, tls=True)  # never finishes its handshake
    table.open(1, "a", 0.0, tls=True)
    table.ready(1, 4.0)  # handshake done at 4 s; its head is due at 14 s
    table.open(2, "a", 0.0)
    table.started(2)  # a request served for ever
    assert table.overdue(4.9) == []
    assert table.overdue(5.0) == [(0, State.HANDSHAKE)]
    assert table.overdue(13.9) == []
    assert table.overdue(14.0) == [(1, State.WAITING)]
    table.finished(2, 20.0)
    table.receiving(2, 30.0)  # the first byte of its next request: the head is due at 40 s, not 95 s
    assert table.overdue(39.9) == [] and table.overdue(40.0) == [(2, State.WAITING)]
    table.open(3, "a", 50.0)
    table.started(3)
    table.receiving(3, 51.0)  # a body arriving is not a new request head
    assert table.overdue(10_000.0) == []
    table.finished(3, 60.0)
    assert table.overdue(134.9) == [] and table.overdue(135.0) == [(3, State.IDLE)]
    assert len(table) == 0


def test_the_warning_comes_at_once_then_at_most_once_per_interval() -> None:
    tally = Tally(every_s=10)
    assert tally.due(0.0) == []
    tally.add("refused")
    assert tally.due(1.0) == [("refused", 1)]
    tally.add("refused", 5)
    tally.add("cut")
    assert tally.due(5.0) == []
    assert tally.due(11.0) == [("refused", 5), ("cut", 1)]
    assert tally.due(30.0) == []


def test_the_caps_leave_room_under_the_descriptor_limit() -> None:
    shares = share_descriptors(1024)
    assert (shares.api, shares.lan, shares.lan_per_source) == (512, 128, 16)
    assert shares.left >= 1024 * 3 // 8
    assert share_descriptors(65536).api == 4096 and share_descriptors(65536).lan == 512
    assert share_descriptors(64).left > 0
