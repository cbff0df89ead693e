"""PeerPath, the sans-IO per-peer path core, on a fake clock."""

from __future__ import annotations

import random

from p2pim.paths.disco import Candidates
from p2pim.paths.peer import (
    BIRTHDAY_PROBES,
    BIRTHDAY_RATE,
    BIRTHDAY_SOCKETS,
    FIRST_SIDE_WAIT,
    HEARTBEAT_TRIES,
    MAIN,
    MAIN6,
    CloseSockets,
    PathChanged,
    PeerPath,
    SendCallMeMaybe,
    SendOpened,
    SendPing,
    SendPong,
)

A = ("10.0.1.2", 4000)
B = ("10.0.2.2", 5000)


def _core(
    name: str, me: tuple[str, int], hard: bool = False, mapped: tuple[str, int] | None = None
) -> PeerPath:
    core = PeerPath(name, keepalive=25.0, rng=random.Random(7))
    core.local = Candidates((me,), mapped or me, hard)
    return core


def _wire(a: PeerPath, b: PeerPath, until: float, drop: bool = False) -> list[object]:
    """Run both cores on a lossless, NAT-free network (or one that drops every UDP packet)."""
    now, seen = 0.0, []
    addr = {id(a): A, id(b): B}
    while now <= until:
        for me, other in ((a, b), (b, a)):
            for out in me.poll(now):
                seen.append(out)
                if isinstance(out, SendCallMeMaybe):
                    assert me.local is not None
                    other.call_me_maybe(now, me.local, out.reply)
                elif drop:
                    continue
                elif isinstance(out, SendPing):
                    for dst in out.addrs:
                        if dst == addr[id(other)]:
                            other.ping(now, MAIN, addr[id(me)], out.tx)
                elif isinstance(out, SendPong) and out.addr == addr[id(other)]:
                    other.pong(now, MAIN, addr[id(me)], out.tx)
        now = round(now + 0.05, 3)
    return seen


def test_call_me_maybe_then_both_sides_go_direct() -> None:
    a, b = _core("bob", A), _core("alice", B)
    a.activate(0.0)
    _wire(a, b, 1.0)
    assert a.path is not None and a.path.addr == B
    assert b.path is not None and b.path.addr == A


def test_pong_from_an_address_never_pinged_or_replayed_is_ignored() -> None:
    a = _core("bob", A)
    a.call_me_maybe(0.0, Candidates((B,), B, False), reply=True)
    pings = [o for o in a.poll(0.0) if isinstance(o, SendPing)]
    tx = pings[0].tx
    assert a.pong(0.01, MAIN, ("6.6.6.6", 1), tx) is None  # wrong source
    assert a.path is None
    assert a.pong(0.02, MAIN, B, b"x" * 12) is None  # unknown tx
    assert a.pong(0.03, MAIN, B, tx) is not None
    assert a.path is not None
    assert a.pong(0.04, MAIN, B, tx) is None  # the same pong again


def test_two_missed_heartbeats_fall_back_to_the_relay_and_punching_starts_again() -> None:
    a, b = _core("bob", A), _core("alice", B)
    a.activate(0.0)
    _wire(a, b, 1.0)
    assert a.path is not None
    seen = _wire(a, b, 40.0, drop=True)  # the NAT forgot us: nothing gets through any more
    changes = [o for o in seen if isinstance(o, PathChanged)]
    assert changes and changes[0].path is None and changes[0].reason == "heartbeats missed"
    heartbeat_pings = [o for o in seen if isinstance(o, SendPing) and o.addrs == (B,)]
    assert len(heartbeat_pings) >= 2 * HEARTBEAT_TRIES
    assert any(isinstance(o, SendCallMeMaybe) for o in seen)  # asks to punch again


def test_birthday_dance_is_bounded_in_sockets_probes_and_rate() -> None:
    hard = _core("easy", A, hard=True, mapped=("203.0.113.101", 40000))
    easy = _core("hard", B, hard=False, mapped=("203.0.113.102", 5000))
    hard.call_me_maybe(0.0, easy.local, reply=True)  # type: ignore[arg-type]
    easy.call_me_maybe(0.0, hard.local, reply=True)  # type: ignore[arg-type]
    outs: dict[str, list[object]] = {"hard": [], "easy": []}
    now = 0.0
    while now < 30.0:
        outs["hard"] += hard.poll(now)
        outs["easy"] += easy.poll(now)
        now = round(now + 0.01, 3)
    sockets = {o.sock for o in outs["hard"] if isinstance(o, SendPing) and o.sock != MAIN}
    assert len(sockets) == BIRTHDAY_SOCKETS
    probes = [
        (o, a) for o in outs["easy"] if isinstance(o, SendPing) for a in o.addrs if a[0] == "203.0.113.101"
    ]
    ports = {a[1] for _, a in probes if a[1] != 40000}
    assert BIRTHDAY_PROBES * 0.9 <= len(ports) <= BIRTHDAY_PROBES
    assert hard.counters["birthday_rounds"] >= 1 and easy.counters["birthday_rounds"] >= 1
    assert any(isinstance(o, CloseSockets) and not o.keep for o in outs["hard"])  # sockets given back
    # Rate: the sweep takes at least probes / rate seconds.
    assert BIRTHDAY_PROBES / BIRTHDAY_RATE > 3.0


def test_same_nat_does_not_start_a_birthday_dance() -> None:
    hard = _core("x", A, hard=True, mapped=("203.0.113.101", 40000))
    easy = _core("y", B, hard=False, mapped=("203.0.113.101", 5000))
    hard.call_me_maybe(0.0, easy.local, reply=True)  # type: ignore[arg-type]
    outs = []
    now = 0.0
    while now < 10.0:
        outs += hard.poll(now)
        now += 0.05
    assert hard.counters["birthday_rounds"] == 0
    assert all(o.sock == MAIN for o in outs if isinstance(o, SendPing))


def test_a_suspected_path_is_not_used_until_a_heartbeat_answers() -> None:
    a, b = _core("bob", A), _core("alice", B)
    a.activate(0.0)
    _wire(a, b, 1.0)
    assert a.usable is not None
    a.suspect(1.0)
    assert a.usable is None and a.path is not None  # traffic takes the relay meanwhile
    pings = [o for o in a.poll(1.0) if isinstance(o, SendPing)]
    assert pings and pings[0].addrs == (B,)
    a.pong(1.01, MAIN, B, pings[0].tx)
    assert a.usable is not None


def test_our_candidates_add_reflexive_addresses_from_pongs_newest_first() -> None:
    from p2pim.paths.manager import Local

    local = Local(
        A, ("203.0.113.101", 4000), False, reflexive=(("203.0.113.101", 4000), ("203.0.113.101", 777))
    )
    assert local.candidates().endpoints == (A, ("203.0.113.101", 4000), ("203.0.113.101", 777))
    assert Local(A, A, False).candidates().endpoints == (A,)


# -- opening pings (routers without an input firewall) -------------------------------------


def _opening(name: str, me: tuple[str, int], open_ttl: int | None = 2, hard: bool = False) -> PeerPath:
    core = PeerPath(name, keepalive=25.0, rng=random.Random(7))
    core.set_local(Candidates((me,), me, hard), open_ttl, None)
    return core


def _full(outs: list[object]) -> list[SendPing]:
    return [o for o in outs if isinstance(o, SendPing) and o.ttl is None]


def test_the_answering_side_opens_with_short_ttl_before_answering_and_waits_to_ping_in_full() -> None:
    b = _opening("alice", B)
    b.call_me_maybe(0.0, Candidates((A,), A, False), reply=False)
    first = b.poll(0.0)
    kinds = [type(o).__name__ for o in first]
    assert kinds == ["SendPing", "SendCallMeMaybe"]  # the opening ping leaves before the answer
    opening = first[0]
    assert isinstance(opening, SendPing) and opening.ttl == 2 and opening.addrs == (A,)
    outs: list[object] = []
    now = 0.0
    while now < FIRST_SIDE_WAIT - 0.05:
        now = round(now + 0.05, 3)
        outs += b.poll(now)
    assert _full(outs) == []  # nothing may reach the asker's router before it opened
    assert [o for o in outs if isinstance(o, SendPing)]  # but the opening is repeated (loss)
    b.opened(now)  # the asker says it is open: ping in full at once
    assert _full(b.poll(now))


def test_without_word_from_the_asker_the_answerer_pings_in_full_after_the_wait() -> None:
    b = _opening("alice", B)
    b.call_me_maybe(0.0, Candidates((A,), A, False), reply=False)
    outs: list[object] = []
    now = 0.0
    while now < 3.0:
        outs += b.poll(now)
        now = round(now + 0.05, 3)
    assert _full(outs)
    assert all(o.ttl == 2 for o in outs if isinstance(o, SendPing) and o not in _full(outs))


def test_the_asker_opens_says_so_and_pings_in_full_at_once() -> None:
    a = _opening("bob", A)
    a.call_me_maybe(0.0, Candidates((B,), B, False), reply=True)
    outs = a.poll(0.0)
    assert [type(o).__name__ for o in outs] == ["SendPing", "SendOpened", "SendPing"]
    assert isinstance(outs[0], SendPing) and outs[0].ttl == 2
    assert isinstance(outs[2], SendPing) and outs[2].ttl is None
    assert not any(isinstance(o, SendCallMeMaybe) for o in outs)  # an answer is not answered


def test_when_both_asked_at_once_the_answer_to_ours_is_word_enough() -> None:
    b = _opening("alice", B)
    b.call_me_maybe(0.0, Candidates((A,), A, False), reply=False)  # the peer asked too
    b.poll(0.0)
    b.call_me_maybe(0.02, Candidates((A,), A, False), reply=True)  # ... and answered ours
    assert _full(b.poll(0.02))  # no wait for FIRST_SIDE_WAIT


def test_unknown_open_ttl_pings_in_full_at_once_on_both_sides() -> None:
    b = _opening("alice", B, open_ttl=None)
    b.call_me_maybe(0.0, Candidates((A,), A, False), reply=False)
    outs = b.poll(0.0)
    assert _full(outs) and not any(isinstance(o, SendOpened) for o in outs)
    assert all(o.ttl is None for o in outs if isinstance(o, SendPing))


def test_a_round_asked_for_before_we_know_ourselves_starts_when_we_do() -> None:
    b = PeerPath("alice", keepalive=25.0)
    b.call_me_maybe(0.0, Candidates((A,), A, False), reply=False)
    assert not [o for o in b.poll(0.0) if isinstance(o, SendPing)]  # no ping without our TTL
    b.set_local(Candidates((B,), B, False), 2, 0.3)
    outs = b.poll(0.3)
    pings = [o for o in outs if isinstance(o, SendPing)]
    assert pings and all(p.ttl == 2 for p in pings)


def test_the_hard_sides_birthday_mappings_are_opened_with_short_ttl() -> None:
    hard = _opening("easy", A, hard=True)
    hard.local = Candidates((A,), ("203.0.113.101", 40000), True)
    hard.call_me_maybe(0.0, Candidates((B,), ("203.0.113.102", 5000), False), reply=True)
    outs: list[object] = []
    now = 0.0
    while now < 4.0:
        outs += hard.poll(now)
        now = round(now + 0.05, 3)
    birthday = [o for o in outs if isinstance(o, SendPing) and o.sock != MAIN]
    assert len(birthday) >= BIRTHDAY_SOCKETS
    assert all(o.ttl == 2 for o in birthday)


# -- IPv6 ------------------------------------------------------------------------------------

V6_A = ("2001:db8:1::2", 4000)
V6_B = ("2001:db8:2::2", 5000)


def test_ipv6_candidates_are_pinged_from_the_ipv6_socket_and_ipv4_ones_from_the_main_one() -> None:
    a = PeerPath("bob", keepalive=25.0)
    a.set_local(Candidates((V6_A, A), A, False), None, None)
    a.call_me_maybe(0.0, Candidates((V6_B, B), B, False), reply=True)
    pings = [o for o in a.poll(0.0) if isinstance(o, SendPing)]
    by_sock = {p.sock: p.addrs for p in pings}
    assert by_sock == {MAIN6: (V6_B,), MAIN: (B,)}


def test_without_an_ipv6_socket_ipv6_candidates_are_not_pinged() -> None:
    a = _core("bob", A)
    a.call_me_maybe(0.0, Candidates((V6_B, B), B, False), reply=True)
    pings = [o for o in a.poll(0.0) if isinstance(o, SendPing)]
    assert all(p.sock == MAIN and p.addrs == (B,) for p in pings)


def test_an_ipv6_path_is_preferred_to_an_ipv4_one_unless_much_slower() -> None:
    a = PeerPath("bob", keepalive=25.0)
    a.set_local(Candidates((V6_A, A), A, False), None, None)
    a.call_me_maybe(0.0, Candidates((V6_B, B), B, False), reply=True)
    pings = {p.sock: p for p in a.poll(0.0) if isinstance(p, SendPing)}
    a.pong(0.010, MAIN, B, pings[MAIN].tx)  # IPv4 answers first: 10 ms
    assert a.path is not None and a.path.addr == B
    a.pong(0.012, MAIN6, V6_B, pings[MAIN6].tx)  # IPv6 at 12 ms: not 2x faster, but IPv6
    assert a.path is not None and a.path.addr == V6_B and a.path.sock == MAIN6
    changes = [o for o in a.poll(0.02) if isinstance(o, PathChanged)]
    assert changes[-1].reason == "IPv6"


def test_an_ipv6_path_is_not_left_for_an_ipv4_pong_that_looks_faster() -> None:
    a = PeerPath("bob", keepalive=25.0)
    a.set_local(Candidates((V6_A, A), A, False), None, None)
    a.call_me_maybe(0.0, Candidates((V6_B, B), B, False), reply=True)
    first = {p.sock: p for p in a.poll(0.0) if isinstance(p, SendPing)}
    later = {p.sock: p for p in a.poll(0.25) if isinstance(p, SendPing)}
    a.pong(0.26, MAIN6, V6_B, first[MAIN6].tx)  # IPv6's first ping, slowed by neighbour discovery
    a.pong(0.2602, MAIN, B, later[MAIN].tx)  # IPv4's second ping: 10 ms, in flight from the round
    assert a.path is not None and a.path.addr == V6_B
    assert [c.reason for c in a.poll(0.3) if isinstance(c, PathChanged)] == ["punched"]
