"""LAN mode cores: IP Messenger codec, signed announcements, LanCore on a fake clock."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pim.identity import Identity
from p2pim.lan import announce, ipmsg
from p2pim.lan.core import LanCore, LanDelivered, LanMessage, LanWarning, PeerGone, PeerUp, Send
from p2pim.messaging.store import ClientStore

# -- IP Messenger codec ------------------------------------------------------------------


def test_ipmsg_parse_and_encode_round_trip() -> None:
    data = ipmsg.encode(
        42, "al:ice", "host", ipmsg.SENDMSG | ipmsg.SENDCHECKOPT | ipmsg.UTF8OPT, "a:b ✓".encode()
    )
    pkt = ipmsg.parse(data)
    assert (pkt.packetno, pkt.user, pkt.host, pkt.mode) == (42, "al_ice", "host", ipmsg.SENDMSG)
    assert pkt.has(ipmsg.SENDCHECKOPT) and pkt.text() == "a:b ✓"  # ':' in the text survives


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
                sends, events = me.poll(t)
                self.events[me.name] += events
                for s in sends:
                    self._deliver(me, other, s, t, duplicate)
            t = round(t + 0.05, 3)

    def _deliver(self, me: LanCore, other: LanCore, s: Send, t: float, duplicate: bool) -> None:
        if other.name in self.drop_to:
            return
        if s.dest is not None and s.dest != self.addr[id(other)]:
            return
        for _ in range(2 if duplicate else 1):
            other.datagram("discovery", s.data, self.addr[id(me)], t)


def test_two_cores_discover_each_other_and_deliver_exactly_once(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.a.start(0.0)
    net.b.start(0.0)
    net.run(0.0, 0.5)
    assert any(isinstance(e, PeerUp) and e.peer.name == "bob" for e in net.events["alice"])
    ids = [net.a.send("bob", f"m{i}", 0.5) for i in range(5)]
    net.run(0.5, 2.0, duplicate=True)  # every packet arrives twice
    got = [e for e in net.events["bob"] if isinstance(e, LanMessage)]
    assert [m.text for m in got] == [f"m{i}" for i in range(5)] and all(m.encrypted for m in got)
    assert net.b.counters["duplicates"] == 5
    delivered = {e.msg_id for e in net.events["alice"] if isinstance(e, LanDelivered)}
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
    assert [e.text for e in net.events["bob"] if isinstance(e, LanMessage)] == ["later"]
    assert net.a.pending() == 0


def test_exit_is_left_and_a_replayed_announcement_is_ignored(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.a.start(0.0)
    sends, _ = net.a.poll(0.0)
    entry = sends[0].data
    net.b.datagram("discovery", entry, ("10.0.0.1", 5001), 0.1)
    net.b.poll(0.1)
    net.a.stop()
    exit_sends, _ = net.a.poll(0.2)
    net.b.datagram("discovery", exit_sends[0].data, ("10.0.0.1", 5001), 0.2)
    _, events = net.b.poll(0.2)
    assert any(isinstance(e, PeerGone) and e.reason == "left" for e in events)
    net.b.datagram("discovery", entry, ("10.0.0.1", 5001), 0.3)  # an old ENTRY replayed: "alice is back"?
    _, events = net.b.poll(0.3)
    assert not any(isinstance(e, PeerUp) for e in events)
    assert net.b.counters["replayed"] == 1


def test_a_changed_key_for_a_known_name_is_a_warning_and_sends_are_refused(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.a.start(0.0)
    net.b.start(0.0)
    net.run(0.0, 0.5)
    impostor = Identity.generate()
    fake = announce.make(impostor, announce.ALIVE, "bob", 6000, 10**13, 1)
    net.a.datagram("discovery", fake, ("10.0.0.9", 6000), 0.6)
    _, events = net.a.poll(0.6)
    assert any(isinstance(e, LanWarning) and "different key" in e.message for e in events)
    assert net.a.peers["bob"].addr == ("10.0.0.2", 5002)  # still the real bob
    with pytest.raises(Exception, match="key changed"):
        net.a.send("bob", "to whom?", 0.7)
