"""LAN mode cores: IP Messenger codec, signed announcements, LanCore on a fake clock."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pim.identity import Identity
from p2pim.lan import announce, ipmsg, ipmsg_messages
from p2pim.lan import core as ipmsg_core
from p2pim.lan.core import MAX_PEERS, LanCore, PeerChanged, PeerGone, PeerUp
from p2pim.messaging.events import Message, Outcome, Problem
from p2pim.messaging.store import ClientStore
from p2pim.sansio import Datagram
from p2pim.wire import lan_pb2 as lpb
from tests.mixedkey import MixedKey

# -- IP Messenger codec ------------------------------------------------------------------


def test_ipmsg_parse_and_encode_round_trip() -> None:
    data = ipmsg.encode(
        42, "al:ice", "host", ipmsg.SENDMSG | ipmsg.SENDCHECKOPT | ipmsg.UTF8OPT, "a:b ✓".encode()
    )
    pkt = ipmsg.parse(data)
    assert (pkt.packetno, pkt.user, pkt.host, pkt.mode) == (42, "al_ice", "host", ipmsg.SENDMSG)
    assert pkt.has(ipmsg.SENDCHECKOPT) and pkt.text() == "a:b ✓"  # ':' in the text survives


def test_ipmsg_versions_of_real_clients_are_accepted_and_named() -> None:
    iptux = ipmsg.parse(b"1_iptux 0.8.3:4:root:host:257:alice\0lab\0icon-tux.png\0utf-8\0")
    assert (iptux.tag, iptux.mode, iptux.text(), iptux.group()) == (
        "iptux 0.8.3",
        ipmsg.BR_ENTRY,
        "alice",
        "lab",
    )
    assert ipmsg.client_name(iptux.tag) == "iptux 0.8.3"
    assert ipmsg.absence(iptux) is None  # iptux sets ABSENCEOPT on every entry: it means nothing
    feiq = ipmsg.parse(b"1_lbt4_0#128#000C29D68D8F#0#0#0#4001#9:1433478504:Admin:PC:6291457:bob\0\0")
    assert ipmsg.client_name(feiq.tag) == "FeiQ" and ipmsg.absence(feiq) is False
    away = ipmsg.parse(b"1:7:u:h:257:carol[away]\0g\0")
    assert ipmsg.client_name(away.tag) == "IP Messenger" and ipmsg.absence(away) is True


def test_ipmsg_legacy_encodings_are_decoded() -> None:
    gbk = ipmsg.parse(b"1:1:u:h:32:" + "你好".encode("gbk"))
    assert gbk.text() == "你好"
    entry = ipmsg.parse(b"1:1:u:h:1:nick\0group\0")
    assert (entry.text(), entry.group()) == ("nick", "group")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"1:2:3",
        b"2:1:u:h:32:x",
        b"1_:1:u:h:32:x",
        b"2_iptux:1:u:h:32:x",
        b"11:1:u:h:32:x",
        b"1_\xe4\xbd\xa0:1:u:h:32:x",
        b"1_tab\there:1:u:h:32:x",
        b"1_" + b"x" * 97 + b":1:u:h:32:x",
        b"1:-1:u:h:32:x",
        b"1:1:u:h:0x20:x",
        b"1:1:u:h:4294967296:x",
        b"1:1:" + b"u" * 129 + b":h:32:x",
        b"1:1:u\0:h:32:x",
        b"1:" + b"9" * 21 + b":u:h:32:x",
        b"1:1:u:h:32:" + b"x" * ipmsg.MAX_PACKET,
    ],
)
def test_ipmsg_malformed_packets_raise_ipmsg_error(data: bytes) -> None:
    with pytest.raises(ipmsg.IpmsgError):
        ipmsg.parse(data)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_ipmsg_parser_never_fails_otherwise(data: bytes) -> None:
    with contextlib.suppress(ipmsg.IpmsgError):
        ipmsg.parse(data).text()


# -- announcements ---------------------------------------------------------------------


def test_announcement_round_trip_and_forgeries() -> None:
    me = Identity.generate()
    data = announce.make(me, announce.ALIVE, "alice", 4000, 1000, 10)
    heard = announce.verify(data)
    assert (heard.name, heard.key, heard.port, heard.kind) == ("alice", me.public_key, 4000, announce.ALIVE)
    tampered = bytearray(data)
    tampered[-70] ^= 1
    for bad in (bytes(tampered), data[:-1], b"P2PL" + b"\x00" * 50, data + b"x" * 2000):
        with pytest.raises(announce.AnnounceError):
            announce.verify(bad)
    for name in ("", "a:b", "a@b", "x" * 65, "tab\there"):
        with pytest.raises(announce.AnnounceError):
            announce.verify(announce.make(me, announce.ALIVE, name, 4000, 1, 10))


@settings(max_examples=200)
@given(st.binary(max_size=400))
def test_announcement_verify_never_fails_otherwise(data: bytes) -> None:
    with contextlib.suppress(announce.AnnounceError):
        announce.verify(b"P2PL" + data)


# -- LanCore ---------------------------------------------------------------------------


def poll(core: LanCore, now: float) -> tuple[list[Datagram], list[object]]:
    """What the driver does at ``now``: the timer if it is due, then sends and events."""
    if now >= core.get_timer():
        core.handle_timer(now)
    sends = core.datagrams_to_send(now)
    events = []
    while (event := core.next_event()) is not None:
        events.append(event)
    return sends, events


class Net:
    """Two cores on one LAN segment: broadcasts reach the other, unicast goes by address."""

    def __init__(self, tmp: Path) -> None:
        self.a = self._core(tmp, "alice", 5001)
        self.b = self._core(tmp, "bob", 5002)
        self.addr = {id(self.a): ("10.0.0.1", 5001), id(self.b): ("10.0.0.2", 5002)}
        self.events: dict[str, list[object]] = {"alice": [], "bob": []}
        self.drop_to: set[str] = set()

    @staticmethod
    def _core(tmp: Path, name: str, port: int, identity: Identity | None = None) -> LanCore:
        store = ClientStore(tmp / f"{name}-{port}.db")
        return LanCore(identity or Identity.generate(), name, store, port, interval=1.0, ipmsg_enabled=False)

    def run(self, now: float, until: float, duplicate: bool = False) -> None:
        t = now
        while t <= until:
            for me, other in ((self.a, self.b), (self.b, self.a)):
                sends, events = poll(me, t)
                self.events[me.name] += events
                for s in sends:
                    self._deliver(me, other, s, t, duplicate)
            t = round(t + 0.05, 3)

    def _deliver(self, me: LanCore, other: LanCore, s: Datagram, t: float, duplicate: bool) -> None:
        if other.name in self.drop_to:
            return
        if s.addr is not None and s.addr != self.addr[id(other)]:
            return
        for _ in range(2 if duplicate else 1):
            other.receive_datagram("discovery", s.data, self.addr[id(me)], t)


def test_two_cores_discover_each_other_and_deliver_exactly_once(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.a.start(0.0)
    net.b.start(0.0)
    net.run(0.0, 0.5)
    assert any(isinstance(e, PeerUp) and e.peer.name == "bob" for e in net.events["alice"])
    ids = [net.a.send("bob", f"m{i}", 0.5) for i in range(5)]
    net.run(0.5, 2.0, duplicate=True)  # every packet arrives twice
    got = [e for e in net.events["bob"] if isinstance(e, Message)]
    assert [m.text for m in got] == [f"m{i}" for i in range(5)] and all(m.encrypted for m in got)
    assert net.b.counters["duplicates"] == 5
    delivered = {e.msg_id for e in net.events["alice"] if isinstance(e, Outcome) and e.state == "delivered"}
    assert delivered == set(ids) and net.a.pending() == 0


def test_silence_means_gone_and_a_queued_message_waits_for_the_return(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.a.start(0.0)
    net.b.start(0.0)
    net.run(0.0, 0.5)
    net.drop_to.add("alice")  # bob's packets no longer reach alice
    net.run(0.5, 5.0)
    assert any(isinstance(e, PeerGone) and e.reason == "timeout" for e in net.events["alice"])
    net.a.send("bob", "later", 5.0)  # known (pinned), not here: queued
    assert net.a.pending() == 1
    net.drop_to.clear()
    net.run(5.0, 7.0)
    assert [e.text for e in net.events["bob"] if isinstance(e, Message)] == ["later"]
    assert net.a.pending() == 0


def test_exit_is_left_and_a_replayed_announcement_is_ignored(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.a.start(0.0)
    sends, _ = poll(net.a, 0.0)
    entry = sends[0].data
    net.b.receive_datagram("discovery", entry, ("10.0.0.1", 5001), 0.1)
    poll(net.b, 0.1)
    net.a.stop()
    exit_sends, _ = poll(net.a, 0.2)
    net.b.receive_datagram("discovery", exit_sends[0].data, ("10.0.0.1", 5001), 0.2)
    _, events = poll(net.b, 0.2)
    assert any(isinstance(e, PeerGone) and e.reason == "left" for e in events)
    net.b.receive_datagram(
        "discovery", entry, ("10.0.0.1", 5001), 0.3
    )  # an old ENTRY replayed: "alice is back"?
    _, events = poll(net.b, 0.3)
    assert not any(isinstance(e, PeerUp) for e in events)
    assert net.b.counters["replayed"] == 1


def test_a_changed_key_for_a_known_name_is_a_warning_and_sends_are_refused(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.a.start(0.0)
    net.b.start(0.0)
    net.run(0.0, 0.5)
    net.a.send("bob", "hello", 0.5)  # an exchange: now bob's key is pinned
    net.run(0.5, 1.0)
    impostor = Identity.generate()
    fake = announce.make(impostor, announce.ALIVE, "bob", 6000, 10**13, 1)
    net.a.receive_datagram("discovery", fake, ("10.0.0.9", 6000), 1.1)
    _, events = poll(net.a, 1.1)
    assert any(isinstance(e, Problem) and "different key" in e.message for e in events)
    assert net.a.peers["bob"].addr == ("10.0.0.2", 5002)  # still the real bob
    with pytest.raises(Exception, match="key changed"):
        net.a.send("bob", "to whom?", 1.2)


def _lan_rows(core: LanCore) -> int:
    return int(
        core.store.conn.execute("SELECT COUNT(*) FROM contacts WHERE username LIKE 'lan:%'").fetchone()[0]
    )


def test_keys_are_pinned_only_after_a_message_exchange(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.a.start(0.0)
    net.b.start(0.0)
    net.run(0.0, 0.5)
    assert "bob" in net.a.peers and "alice" in net.b.peers
    assert _lan_rows(net.a) == 0 and _lan_rows(net.b) == 0  # discovery alone writes nothing
    net.a.send("bob", "hi", 0.5)
    assert net.a.store.contact("lan:bob") is not None  # we wrote to bob: pinned
    net.run(0.5, 1.0)
    assert net.b.store.contact("lan:alice") is not None  # bob opened alice's message: pinned
    assert [e.text for e in net.events["bob"] if isinstance(e, Message)] == ["hi"]


def test_two_unpinned_keys_for_one_name_the_first_keeps_it(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.a.start(0.0)
    net.b.start(0.0)
    net.run(0.0, 0.5)
    squatter = Identity.generate()
    for t in (0.6, 0.7):  # twice: one warning, two counts
        fake = announce.make(squatter, announce.ALIVE, "bob", 6000, int(t * 1000) + 10**13, 1)
        net.a.receive_datagram("discovery", fake, ("10.0.0.9", 6000), t)
    _, events = poll(net.a, 0.7)
    warnings = [e for e in events if isinstance(e, Problem)]
    assert len(warnings) == 1 and "also announces itself as bob" in warnings[0].message
    assert net.a.counters["name_conflicts"] == 2
    assert net.a.peers["bob"].key == net.b.identity.public_key
    net.a.send("bob", "to the first bob", 0.8)
    net.run(0.8, 1.5)
    assert [e.text for e in net.events["bob"] if isinstance(e, Message)] == ["to the first bob"]


def test_a_flood_of_forged_announcements_is_bounded_in_memory_disk_and_time(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.a.start(0.0)
    net.b.start(0.0)
    net.run(0.0, 0.5)
    net.a.send("bob", "pin me", 0.5)
    net.run(0.5, 1.0)
    assert net.a.peers["bob"].pinned
    forged = [Identity.generate() for _ in range(600)]
    for i, ident in enumerate(forged):  # each claims to announce once a year
        data = announce.make(ident, announce.ALIVE, f"f{i}", 7000, 10**13 + i, 365 * 86400)
        net.a.receive_datagram("discovery", data, (f"10.0.{i // 250}.{i % 250 + 1}", 7000), 1.0)
    assert len(net.a.peers) <= MAX_PEERS
    assert "bob" in net.a.peers  # pinned peers are never pushed out by strangers
    assert net.a.counters["evicted"] >= 600 - MAX_PEERS
    assert _lan_rows(net.a) == 1  # only bob, with whom a message was exchanged
    # The interval is capped: 3.5 x 300 s later, every forged peer has expired.
    poll(net.a, 1.0 + 3.5 * announce.MAX_INTERVAL_S + 1)
    assert not any(name.startswith("f") for name in net.a.peers)


def test_announced_interval_is_capped_and_small_order_keys_are_refused() -> None:
    me = Identity.generate()
    heard = announce.verify(announce.make(me, announce.ALIVE, "alice", 4000, 1, 10**9))
    assert heard.interval_s == announce.MAX_INTERVAL_S
    mixed = MixedKey()  # signs announcements libsodium verifies, but is no box key
    body = lpb.Announce(
        kind=announce.ALIVE, name="mallory", identity_key=mixed.public_key, port=4000, at_ms=1, interval_s=1
    ).SerializeToString()
    signed = lpb.SignedAnnounce(announce=body, signature=mixed.sign(announce.CONTEXT + body))
    with pytest.raises(announce.AnnounceError):
        announce.verify(announce.MAGIC + signed.SerializeToString())


def _ipmsg_core(tmp: Path) -> LanCore:
    return LanCore(Identity.generate(), "alice", ClientStore(tmp / "a.db"), 5001, interval=10.0)


def test_an_ip_messenger_peer_that_stops_answering_is_asked_then_gone(tmp_path: Path) -> None:
    core = _ipmsg_core(tmp_path)
    core.start(0.0)
    poll(core, 0.0)
    iptux = ("10.0.0.7", 2425)
    quiet = ("10.0.0.8", 2425)
    for n, addr in enumerate((iptux, quiet), start=1):
        core.receive_datagram(
            "ipmsg", ipmsg.encode(n, "u", "h", ipmsg.BR_ENTRY, ipmsg.entry_extra(f"p{n}")), addr, 1.0
        )
    poll(core, 1.0)
    assert {p.name for p in core.peers.values() if p.kind == "ipmsg"} == {"p1@10.0.0.7", "p2@10.0.0.8"}
    asked: dict[tuple[str, int], int] = {}
    gone: list[str] = []
    t = 1.0
    while t < 1.0 + ipmsg_core.IPMSG_IDLE + 30:
        t = core.get_timer()
        sends, events = poll(core, t)
        for s in sends:
            if s.sock == "ipmsg" and s.addr is not None and ipmsg.parse(s.data).mode == ipmsg.BR_ENTRY:
                asked[s.addr] = asked.get(s.addr, 0) + 1
                if s.addr == iptux:  # this one answers, as real clients do
                    answer = ipmsg.encode(9, "u", "h", ipmsg.ANSENTRY, ipmsg.entry_extra("p1"))
                    core.receive_datagram("ipmsg", answer, iptux, t)
        gone += [e.peer.name for e in events if isinstance(e, PeerGone) and e.reason == "timeout"]
    assert gone == ["p2@10.0.0.8"]
    assert asked[quiet] == ipmsg_core.IPMSG_PROBES
    assert asked[iptux] >= 1 and "p1@10.0.0.7" in core.peers


# -- IP Messenger peers: real clients' habits ----------------------------------------------

TUX = ("10.0.0.7", 2425)


def tux(no: int, command: int, extra: bytes) -> bytes:
    """A packet as iptux 0.8.3 sends it: its version tag, no UTF8OPT, entries with ABSENCEOPT."""
    return b"1_iptux 0.8.3:%d:root:vm:%d:%s" % (no, command, extra)


def tux_entry(no: int, nick: str = "tux", mode: int = ipmsg.BR_ENTRY) -> bytes:
    return tux(no, ipmsg.ABSENCEOPT | mode, nick.encode() + b"\0lab\0icon-tux.png\0utf-8\0")


def tux_msg(no: int, text: str) -> bytes:
    return tux(no, ipmsg.SENDCHECKOPT | ipmsg.SENDMSG, text.encode() + b"\0")


def ipmsg_out(sends: list[Datagram], mode: int) -> list[ipmsg.Packet]:
    return [ipmsg.parse(s.data) for s in sends if s.sock == "ipmsg" and ipmsg.parse(s.data).mode == mode]


def texts(events: list[object]) -> list[str]:
    return [e.text for e in events if isinstance(e, Message)]


def test_iptux_is_listed_answered_and_its_restart_starts_a_new_numbering(tmp_path: Path) -> None:
    core = _ipmsg_core(tmp_path)
    core.start(0.0)
    poll(core, 0.0)
    core.receive_datagram("ipmsg", tux_entry(1), TUX, 0.1)
    sends, events = poll(core, 0.1)
    [up] = [e for e in events if isinstance(e, PeerUp)]
    assert (up.peer.name, up.peer.client, up.peer.away) == ("tux@10.0.0.7", "iptux 0.8.3", None)
    assert [p.mode for p in ipmsg_out(sends, ipmsg.ANSENTRY)] == [ipmsg.ANSENTRY]
    # a message, then iptux's resend of the same packet: shown once, answered twice
    shown = []
    for t in (0.2, 1.2):
        core.receive_datagram("ipmsg", tux_msg(5, "你好 héllo"), TUX, t)
        sends, events = poll(core, t)
        shown += texts(events)
        assert [p.extra for p in ipmsg_out(sends, ipmsg.RECVMSG)] == [b"5"]
    assert shown == ["你好 héllo"]
    # iptux restarts (numbers from 1 again): packet 5 is a new message, even with the same text
    core.receive_datagram("ipmsg", tux_entry(1), TUX, 2.0)
    core.receive_datagram("ipmsg", tux_msg(5, "你好 héllo"), TUX, 2.1)
    core.receive_datagram("ipmsg", tux_msg(6, "second run"), TUX, 2.2)
    sends, events = poll(core, 2.2)
    assert texts(events) == ["你好 héllo", "second run"]
    assert [e.again for e in events if isinstance(e, PeerUp)] == [True]
    # and it leaves: gone, and its next run numbers afresh too
    core.receive_datagram("ipmsg", tux(99, ipmsg.BR_EXIT, b""), TUX, 3.0)
    _, events = poll(core, 3.0)
    assert [(e.peer.name, e.reason) for e in events if isinstance(e, PeerGone)] == [("tux@10.0.0.7", "left")]
    core.receive_datagram("ipmsg", tux_msg(6, "second run"), TUX, 3.1)
    _, events = poll(core, 3.1)
    assert texts(events) == ["second run"]  # not a duplicate of the last run's packet 6
    history = core.store.history("ipmsg:tux@10.0.0.7")
    assert [r.text for r in history] == ["你好 héllo", "你好 héllo", "second run", "second run"]
    assert core.counters["ipmsg_duplicates"] == 1


def test_a_resend_after_p2pim_was_killed_is_still_a_duplicate(tmp_path: Path) -> None:
    first = _ipmsg_core(tmp_path)
    first.receive_datagram("ipmsg", tux_entry(1), TUX, 0.0)
    first.receive_datagram("ipmsg", tux_msg(3, "once"), TUX, 0.1)
    assert texts(poll(first, 0.1)[1]) == ["once"]
    # killed before its RECVMSG left; iptux resends to the restarted p2pim
    second = _ipmsg_core(tmp_path)
    second.receive_datagram("ipmsg", tux_msg(3, "once"), TUX, 1.0)
    sends, events = poll(second, 1.0)
    assert texts(events) == [] and [p.extra for p in ipmsg_out(sends, ipmsg.RECVMSG)] == [b"3"]


def test_a_message_to_an_ip_messenger_peer_that_left_waits_for_it_and_goes_once(tmp_path: Path) -> None:
    core = _ipmsg_core(tmp_path)
    core.receive_datagram("ipmsg", tux_entry(1), TUX, 0.0)
    poll(core, 0.0)
    first = core.send("tux", "one", 0.1)
    second = core.send("tux", "two", 0.1)
    sends, _ = poll(core, 0.1)
    [m1] = ipmsg_out(sends, ipmsg.SENDMSG)  # one at a time: "two" waits for "one"'s RECVMSG
    assert m1.text() == "one" and m1.has(ipmsg.SENDCHECKOPT)
    core.receive_datagram("ipmsg", tux(2, ipmsg.BR_EXIT, b""), TUX, 0.5)  # gone before answering
    poll(core, 0.5)
    assert "tux@10.0.0.7" not in core.peers
    assert ipmsg_out(poll(core, 30.0)[0], ipmsg.SENDMSG) == []  # nothing goes while it is away
    # p2pim restarts; iptux comes back
    core = _ipmsg_core(tmp_path)
    assert core.pending() == 2 and core.known("tux")
    core.receive_datagram("ipmsg", tux_entry(1), TUX, 40.0)
    sends, _ = poll(core, 40.0)
    [m1] = ipmsg_out(sends, ipmsg.SENDMSG)
    assert m1.text() == "one"
    core.receive_datagram(
        "ipmsg", tux(2, ipmsg.RECVMSG | ipmsg.SENDCHECKOPT, str(m1.packetno).encode()), TUX, 40.1
    )
    sends, events = poll(core, 40.1)
    [m2] = ipmsg_out(sends, ipmsg.SENDMSG)
    assert m2.text() == "two" and m2.packetno > m1.packetno
    assert [(e.msg_id, e.state) for e in events if isinstance(e, Outcome)] == [(first, "delivered")]
    core.receive_datagram("ipmsg", tux(3, ipmsg.RECVMSG, str(m2.packetno).encode()), TUX, 40.2)
    _, events = poll(core, 40.2)
    assert [(e.msg_id, e.state) for e in events if isinstance(e, Outcome)] == [(second, "delivered")]
    assert core.pending() == 0 and core.store.outbox() == []
    assert [(r.text, r.state) for r in core.store.history("ipmsg:tux@10.0.0.7")] == [
        ("one", "delivered"), ("two", "delivered"),
    ]  # fmt: skip


def test_nickname_and_away_changes_are_events_and_queued_messages_follow(tmp_path: Path) -> None:
    core = _ipmsg_core(tmp_path)
    carol = ("10.0.0.9", 2425)
    core.receive_datagram("ipmsg", b"1:1:c:h:%d:carol\0g\0" % ipmsg.BR_ENTRY, carol, 0.0)
    poll(core, 0.0)
    core.send("carol", "hi", 0.1)
    poll(core, 0.1)
    core.receive_datagram("ipmsg", b"1:2:c:h:%d:caroline\0g\0" % ipmsg.BR_ABSENCE, carol, 0.2)
    core.receive_datagram(
        "ipmsg", b"1:3:c:h:%d:caroline\0g\0" % (ipmsg.BR_ABSENCE | ipmsg.ABSENCEOPT), carol, 0.3
    )
    sends, events = poll(core, 1.5)
    changes = [
        (e.peer.name, e.renamed_from, e.away_changed, e.peer.away)
        for e in events
        if isinstance(e, PeerChanged)
    ]
    assert changes == [
        ("caroline@10.0.0.9", "carol@10.0.0.9", False, False),
        ("caroline@10.0.0.9", "", True, True),
    ]
    assert list(core.peers) == ["caroline@10.0.0.9"]
    [resent] = ipmsg_out(sends, ipmsg.SENDMSG)
    core.receive_datagram("ipmsg", b"1:4:c:h:%d:%d" % (ipmsg.RECVMSG, resent.packetno), carol, 1.6)
    _, events = poll(core, 1.6)
    assert [(e.peer, e.state) for e in events if isinstance(e, Outcome)] == [
        ("caroline@10.0.0.9", "delivered")
    ]
    assert [r.text for r in core.store.history("ipmsg:caroline@10.0.0.9")] == ["hi"]


def test_who_asks_ip_messenger_clients_too(tmp_path: Path) -> None:
    core = _ipmsg_core(tmp_path)
    core.ask()
    sends = core.datagrams_to_send(0.0)
    assert [s.addr for s in sends if s.sock == "ipmsg" and ipmsg.parse(s.data).mode == ipmsg.BR_ENTRY] == [
        None
    ]


def test_a_flood_of_messages_from_one_address_is_limited_and_others_still_get_through(tmp_path: Path) -> None:
    core = _ipmsg_core(tmp_path)
    answered = shown = 0
    for n in range(1, 501):
        core.receive_datagram("ipmsg", tux_msg(n, f"spam {n}"), ("10.0.0.66", 2425), 1.0)
    core.receive_datagram("ipmsg", tux_msg(1, "real"), TUX, 1.0)
    sends, events = poll(core, 1.0)
    answered = len(ipmsg_out(sends, ipmsg.RECVMSG))
    shown = len(texts(events))
    assert shown == answered == ipmsg_messages.BURST + 1  # the burst, and the other address
    assert "real" in texts(events) and core.counters["ipmsg_rate_limited"] == 500 - ipmsg_messages.BURST


def test_feiq_as_it_is_documented_to_send_is_listed_and_heard(tmp_path: Path) -> None:
    """FeiQ cannot run here: its packet forms as captured from it (version tag with MAC and
    port, time as packet number, a GBK nickname without a trailing NUL, GBK texts)."""
    core = _ipmsg_core(tmp_path)
    feiq = ("10.0.0.11", 2425)
    head = b"1_lbt4_41#128#24F5AAD7C96A#0#0#0#311c#9:1767153479:t0250254:DESKTOP-IOHG15K:"
    core.receive_datagram("ipmsg", head + b"6291459:" + "陈俞辛".encode("gbk"), feiq, 0.0)  # ANSENTRY
    _, events = poll(core, 0.0)
    [up] = [e for e in events if isinstance(e, PeerUp)]
    assert (up.peer.name, up.peer.client, up.peer.away) == ("陈俞辛@10.0.0.11", "FeiQ", False)
    msg = b"1_lbt4_41#128#24F5AAD7C96A#0#0#0#311c#9:1767153480:t0250254:DESKTOP-IOHG15K:"
    core.receive_datagram("ipmsg", msg + b"288:" + "你好 世界".encode("gbk") + b"\0", feiq, 0.1)
    sends, events = poll(core, 0.1)
    assert texts(events) == ["你好 世界"]
    assert [p.extra for p in ipmsg_out(sends, ipmsg.RECVMSG)] == [b"1767153480"]
    assert [e.peer for e in events if isinstance(e, Message)] == ["陈俞辛@10.0.0.11"]


def test_a_peer_back_under_another_nickname_is_said_and_gets_what_waited(tmp_path: Path) -> None:
    core = _ipmsg_core(tmp_path)
    core.receive_datagram("ipmsg", tux_entry(1, "tux"), TUX, 0.0)
    core.receive_datagram("ipmsg", tux(2, ipmsg.BR_EXIT, b""), TUX, 0.1)
    poll(core, 0.1)
    kept = core.send("tux", "while you were away", 0.2)
    core.receive_datagram("ipmsg", tux_entry(1, "tuxie"), TUX, 5.0)
    sends, events = poll(core, 5.0)
    assert [type(e).__name__ for e in events] == ["PeerUp", "PeerChanged"]
    assert [(e.peer.name, e.renamed_from) for e in events if isinstance(e, PeerChanged)] == [
        ("tuxie@10.0.0.7", "tux@10.0.0.7")
    ]
    [m] = ipmsg_out(sends, ipmsg.SENDMSG)
    core.receive_datagram("ipmsg", tux(2, ipmsg.RECVMSG, str(m.packetno).encode()), TUX, 5.1)
    _, events = poll(core, 5.1)
    assert [(e.peer, e.msg_id) for e in events if isinstance(e, Outcome)] == [("tuxie@10.0.0.7", kept)]


def test_messages_from_many_forged_addresses_are_capped_in_total(tmp_path: Path) -> None:
    core = _ipmsg_core(tmp_path)
    for n in range(1000):  # 1000 addresses, 1 message each, in one instant
        core.receive_datagram("ipmsg", tux_msg(1, f"spam {n}"), (f"10.1.{n // 256}.{n % 256}", 2425), 1.0)
    sends, events = poll(core, 1.0)
    assert len(texts(events)) == len(ipmsg_out(sends, ipmsg.RECVMSG)) == ipmsg_messages.TOTAL_BURST
    assert core.counters["ipmsg_rate_limited"] == 1000 - ipmsg_messages.TOTAL_BURST
    assert len(core.store.history("ipmsg:root@10.1.0.5", 10)) == 1
    # a second later there is room again for a real client's resend
    core.receive_datagram("ipmsg", tux_msg(7, "real"), TUX, 2.0)
    assert texts(poll(core, 2.0)[1]) == ["real"]


# -- IP Messenger file attachments ------------------------------------------------------------

#: what iptux 0.8.3 sent when its user attached a file and pressed Enter (captured in natlab):
#: no text, no SENDCHECKOPT, no UTF8OPT, file id decimal, the rest hex, BEL after each entry
IPTUX_ATTACHMENT = b"1_iptux 0.8.3:8:root:vm:2097184:\x0010000:outgoing.bin:30d40:6b16cdbb:1:\x07\x00"


def test_attachments_as_iptux_and_ip_messenger_write_them() -> None:
    pkt = ipmsg.parse(IPTUX_ATTACHMENT)
    assert pkt.mode == ipmsg.SENDMSG and pkt.has(ipmsg.FILEATTACHOPT) and pkt.text() == ""
    assert ipmsg.attachments(pkt) == [ipmsg.Attachment(10000, "outgoing.bin", 200000, 0x6B16CDBB, 1)]
    # IP Messenger: extended attributes after the five fields, ':' doubled in a name, "\a:" between
    data = b"1:5:u:h:%d:see these\0" % (ipmsg.SENDMSG | ipmsg.FILEATTACHOPT | ipmsg.UTF8OPT)
    data += "0:a::b 报告.txt:400:5f000000:1:14=5f000000:16=5f000001:\a:1:dir:0:5f000000:2:\a\0".encode()
    pkt = ipmsg.parse(data)
    files = ipmsg.attachments(pkt)
    assert [(f.file_id, f.name, f.size, f.regular) for f in files] == [
        (0, "a:b 报告.txt", 0x400, True),
        (1, "dir", 0, False),
    ]
    assert pkt.text() == "see these"
    # ours round-trip, and iptux's parser would read them the same way (the same five fields)
    ours = ipmsg.attachment_extra("", [ipmsg.Attachment(7, "x:y ✓.bin", 3, 9, ipmsg.FILE_REGULAR)])
    again = ipmsg.parse(ipmsg.encode(1, "a", "h", ipmsg.SENDMSG | ipmsg.FILEATTACHOPT, ours))
    assert ipmsg.attachments(again) == [ipmsg.Attachment(7, "x:y ✓.bin", 3, 9, 1)]


@pytest.mark.parametrize(
    "listing",
    [b"x:name:1:1:1:\a", b"1:name:zz:1:1:\a", b"1::1:1:1:\a", b"1:n:1:1\a", b"-1:n:1:1:1:\a",
     b"1:n:" + b"f" * 17 + b":1:1:\a", b"".join(b"%d:n:1:1:1:\a" % i for i in range(65))],
)  # fmt: skip
def test_malformed_attachments_raise_ipmsg_error(listing: bytes) -> None:
    pkt = ipmsg.parse(b"1:5:u:h:%d:\0" % (ipmsg.SENDMSG | ipmsg.FILEATTACHOPT) + listing)
    with pytest.raises(ipmsg.IpmsgError):
        ipmsg.attachments(pkt)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_attachment_and_file_request_parsers_never_fail_otherwise(listing: bytes) -> None:
    for extra in (b"text\0" + listing, listing):
        pkt = ipmsg.Packet(1, "u", "h", ipmsg.SENDMSG | ipmsg.FILEATTACHOPT, extra)
        with contextlib.suppress(ipmsg.IpmsgError):
            ipmsg.attachments(pkt)
        with contextlib.suppress(ipmsg.IpmsgError):
            ipmsg.file_request(pkt)


def test_file_requests_as_iptux_sends_them() -> None:
    # captured: iptux asking p2pim for file 7 of packet 101 (hex 65), from byte 0
    pkt = ipmsg.parse(b"1_iptux 0.8.3:7:root:vm:96:65:7:0\0".rstrip(b"\0"))
    assert pkt.mode == ipmsg.GETFILEDATA and ipmsg.file_request(pkt) == (101, 7, 0)
    ours = ipmsg.parse(ipmsg.encode(3, "a", "h", ipmsg.GETFILEDATA, ipmsg.file_request_extra(101, 7, 4096)))
    assert ipmsg.file_request(ours) == (101, 7, 4096)
    for bad in (b"", b"65", b"65:zz:0", b"65::0", b"65:7:" + b"1" * 17):
        with pytest.raises(ipmsg.IpmsgError):
            ipmsg.file_request(ipmsg.Packet(1, "u", "h", ipmsg.GETFILEDATA, bad))


def test_iptux_attachments_are_an_event_once_per_packet_and_answered(tmp_path: Path) -> None:
    core = _ipmsg_core(tmp_path)
    core.start(0.0)
    core.receive_datagram("ipmsg", tux_entry(1), TUX, 0.1)
    poll(core, 0.1)
    offers = []
    for t in (0.2, 0.3):  # the same packet twice: the same id both times
        core.receive_datagram("ipmsg", IPTUX_ATTACHMENT, TUX, t)
        sends, events = poll(core, t)
        offers += [e for e in events if isinstance(e, ipmsg_core.IpmsgFilesOffered)]
        assert not texts(events)  # no text: no empty message in the history
        assert not ipmsg_out(sends, ipmsg.RECVMSG)  # iptux asked for no answer
    assert [(o.sender, o.packetno, o.files[0].name) for o in offers] == [
        ("tux@10.0.0.7", 8, "outgoing.bin")
    ] * 2
    assert offers[0].digest == offers[1].digest
    # with a text and SENDCHECKOPT: the text is a message, and it is answered
    with_text = tux(
        9, ipmsg.SENDMSG | ipmsg.SENDCHECKOPT | ipmsg.FILEATTACHOPT, b"look\0" + b"1:a.txt:1:1:1:\a\0"
    )
    core.receive_datagram("ipmsg", with_text, TUX, 0.4)
    sends, events = poll(core, 0.4)
    assert (
        texts(events) == ["look"]
        and len([e for e in events if isinstance(e, ipmsg_core.IpmsgFilesOffered)]) == 1
    )
    assert [p.extra for p in ipmsg_out(sends, ipmsg.RECVMSG)] == [b"9"]
    # a broken listing is counted, not an offer
    core.receive_datagram("ipmsg", tux(10, ipmsg.SENDMSG | ipmsg.FILEATTACHOPT, b"\0x:y\a"), TUX, 0.5)
    _, events = poll(core, 0.5)
    assert not events and core.counters["ipmsg_malformed"] == 1


def test_our_file_offer_goes_like_a_text_and_a_release_declines_it(tmp_path: Path) -> None:
    core = _ipmsg_core(tmp_path)
    core.start(0.0)
    core.receive_datagram("ipmsg", tux_entry(1), TUX, 0.1)
    poll(core, 0.1)
    name = core.ipmsg_peer("tux")
    file_id = bytes(range(16))
    core.ipmsg.attach(name, file_id, [ipmsg.Attachment(5, "a.bin", 10, 1, 1)], "file: a.bin (10 B)", 0.2)
    sends, _ = poll(core, 0.2)
    [offer] = ipmsg_out(sends, ipmsg.SENDMSG)
    assert offer.has(ipmsg.FILEATTACHOPT | ipmsg.SENDCHECKOPT) and ipmsg.attachments(offer)[0].name == "a.bin"
    sends, _ = poll(core, core.get_timer())  # no RECVMSG yet: sent again, with the same number
    assert [p.packetno for p in ipmsg_out(sends, ipmsg.SENDMSG)] == [offer.packetno]
    core.receive_datagram("ipmsg", tux(3, ipmsg.RECVMSG, b"%d\0" % offer.packetno), TUX, 2.0)
    _, events = poll(core, 2.0)
    assert [e.state for e in events if isinstance(e, Outcome)] == ["delivered"]
    # IP Messenger's user declines: RELEASEFILES names the packet
    core.receive_datagram("ipmsg", tux(4, ipmsg.RELEASEFILES, b"%d" % offer.packetno), TUX, 2.1)
    core.receive_datagram("ipmsg", tux(5, ipmsg.RELEASEFILES, b"12345"), TUX, 2.1)  # not ours: nothing
    _, events = poll(core, 2.1)
    assert [(e.sender, e.file_id) for e in events if isinstance(e, ipmsg_core.IpmsgFilesReleased)] == [
        ("tux@10.0.0.7", file_id)
    ]
    assert [r.text for r in core.store.history("ipmsg:tux@10.0.0.7")] == ["file: a.bin (10 B)"]
    with pytest.raises(ipmsg_core.LanError):
        core.ipmsg_peer("nobody")
