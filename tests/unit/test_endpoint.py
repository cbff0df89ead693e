"""The paths endpoint on a fake clock and a fake network: candidates, disco, keys, probes."""

from __future__ import annotations

from p2pim.identity import Identity
from p2pim.paths.disco import DiscoBoxes, call_me_maybe, is_disco, new_tx, ping
from p2pim.paths.endpoint import (
    MAIN,
    RELAY,
    LocalKnown,
    PathChanged,
    PathEndpoint,
    ProbeAnswered,
)
from rendezvous.stun_server import StunServerCore

ALICE, BOB, EVE = Identity.generate(), Identity.generate(), Identity.generate()
A_HOST, B_HOST = ("10.0.1.2", 4000), ("10.0.2.2", 5000)
STUN = ("198.51.100.1", 3478)
STUN_ALT = ("198.51.100.2", 3479)


def endpoint(me: Identity, buddy: str, buddy_key: bytes, calls: list[float] | None = None) -> PathEndpoint:
    def keys() -> dict[bytes, str]:
        if calls is not None:
            calls.append(0.0)
        return {buddy_key: buddy}

    return PathEndpoint(me, keys)


def drain(ep: PathEndpoint) -> list[object]:
    out = []
    while (e := ep.next_event()) is not None:
        out.append(e)
    return out


class Net:
    """Two endpoints and an RFC 5780 STUN server on one flat network; the relay carries by name."""

    def __init__(self) -> None:
        self.a = endpoint(ALICE, "bob", BOB.public_key)
        self.b = endpoint(BOB, "alice", ALICE.public_key)
        self.host = {"alice": A_HOST, "bob": B_HOST}
        self.stun = StunServerCore(STUN[0], STUN[1], STUN_ALT[0], STUN_ALT[1])
        self.events: dict[str, list[object]] = {"alice": [], "bob": []}

    def run(self, start: float, until: float) -> None:
        now = start
        while now <= until:
            for me, name, other, other_name in (
                (self.a, "alice", self.b, "bob"),
                (self.b, "bob", self.a, "alice"),
            ):
                if (due := me.get_timer()) is not None and due <= now:
                    me.handle_timer(now)
                for dg in me.datagrams_to_send(now):
                    if dg.sock == RELAY:
                        other.receive_datagram(RELAY, dg.data, name, now)
                    elif dg.addr in (STUN, STUN_ALT):
                        self.stun.receive_datagram(dg.addr, dg.data, self.host[name], now)
                        for answer in self.stun.datagrams_to_send(now):
                            me.receive_datagram(MAIN, answer.data, answer.sock, now)
                    elif dg.addr == self.host[other_name]:
                        other.receive_datagram(MAIN, dg.data, self.host[name], now)
                self.events[name] += drain(me)
            now = round(now + 0.05, 3)


def test_candidates_come_from_the_rfc5780_mapping_test_and_call_me_maybe_waits_for_them() -> None:
    net = Net()
    net.a.want("bob", 0.0)  # before STUN answers: the call-me-maybe must wait for our candidates
    assert not [d for d in net.a.datagrams_to_send(0.0) if d.sock == RELAY]
    net.a.discover(A_HOST, [STUN], 0.0)
    net.b.discover(B_HOST, [STUN], 0.0)
    net.run(0.0, 2.0)
    [known] = [e for e in net.events["alice"] if isinstance(e, LocalKnown)]
    assert known.local.mapped == A_HOST and not known.local.hard  # no NAT: same address both times
    assert net.stun.counters.received >= 4  # primary, then OTHER-ADDRESS, for each side
    changed = [e for e in net.events["alice"] if isinstance(e, PathChanged)]
    assert changed and changed[-1].path is not None and changed[-1].path.addr == B_HOST
    assert net.a.route("bob") is not None and net.b.route("alice") is not None


def test_no_stun_server_means_host_candidates_only() -> None:
    ep = endpoint(ALICE, "bob", BOB.public_key)
    ep.discover(A_HOST, [], 0.0)
    [known] = drain(ep)
    assert isinstance(known, LocalKnown) and known.local.candidates().endpoints == (A_HOST,)


def test_strangers_forgeries_and_garbage_are_counted_and_keys_are_read_at_most_once_a_second() -> None:
    calls: list[float] = []
    ep = endpoint(ALICE, "bob", BOB.public_key, calls)
    stranger = DiscoBoxes(EVE)
    for i in range(200):  # a flood under a stranger's key
        ep.receive_datagram(
            MAIN, stranger.seal(ALICE.public_key, ping(new_tx())), ("203.0.113.9", 9), i * 0.001
        )
    assert ep.counters["unknown_sender"] == 200 and len(calls) == 1
    forged = DiscoBoxes(BOB).seal(ALICE.public_key, ping(new_tx()))[:-1] + b"\x00"
    ep.receive_datagram(MAIN, forged, ("203.0.113.9", 9), 0.5)
    ep.receive_datagram(MAIN, b"\x00\x01\x00\x00" + b"x" * 20, ("203.0.113.9", 9), 0.5)  # bad STUN
    ep.receive_datagram(MAIN, b"garbage", ("203.0.113.9", 9), 0.5)
    # bob's packet on a birthday socket opened for someone else is not bob's to use
    ep.receive_datagram(("carol", 3), DiscoBoxes(BOB).seal(ALICE.public_key, ping(new_tx())), B_HOST, 0.5)
    assert (
        ep.counters["forged"] == 1
        and ep.counters["bad_packets"] == 2
        and ep.counters["unknown_sender"] == 201
    )
    assert ep.peers == {} and ep.datagrams_to_send(0.6) == []


def test_a_call_me_maybe_through_the_relay_is_answered_and_a_probe_measures_the_path() -> None:
    ep = endpoint(ALICE, "bob", BOB.public_key)
    ep.discover(A_HOST, [], 0.0)
    drain(ep)
    from p2pim.paths.disco import Candidates

    cmm = DiscoBoxes(BOB).seal(ALICE.public_key, call_me_maybe(Candidates((B_HOST,), None, False), False))
    ep.receive_datagram(RELAY, cmm, "bob", 0.0)
    out = ep.datagrams_to_send(0.0)
    assert any(d.sock == RELAY and d.addr == "bob" and is_disco(d.data) for d in out)  # our answer
    assert any(d.sock == MAIN and d.addr == B_HOST for d in out)  # and we punch at once
    sent = ep.probe("bob", 1.0)
    assert sent is not None and sent[1] == "relay"  # no direct path yet
    [dg] = [d for d in ep.datagrams_to_send(1.0) if d.sock == RELAY]
    from p2pim.paths.disco import pong

    tx = DiscoBoxes(BOB).open(dg.data, ALICE.public_key).ping.tx_id
    ep.receive_datagram(RELAY, DiscoBoxes(BOB).seal(ALICE.public_key, pong(tx, ("0.0.0.0", 0))), "bob", 1.2)
    assert [e for e in drain(ep) if isinstance(e, ProbeAnswered)] == [ProbeAnswered(tx, 1.2 - 1.0)]


def test_call_me_maybe_keeps_ipv4_and_ipv6_unicast_endpoints_and_drops_the_rest() -> None:
    from p2pim.paths.disco import parse_call_me_maybe
    from p2pim.wire import disco_pb2 as dpb

    msg = dpb.CallMeMaybe()
    for ip, port in (
        ("10.0.1.2", 4000),
        ("2001:db8:1::2", 4000),
        ("fe80::1", 4000),  # link-local: useless to a peer elsewhere
        ("ff02::1", 4000),  # multicast
        ("::", 4000),
        ("not an address", 4000),
        ("10.0.1.3", 0),
        ("10.0.1.4", 70000 % 65536 + 65536),
    ):
        msg.endpoints.add(ip=ip, port=port)
    cands = parse_call_me_maybe(msg)
    assert cands.endpoints == (("10.0.1.2", 4000), ("2001:db8:1::2", 4000))
