"""The TTL ladder (how many hops our NATs are) and the ICMP error parser, on a fake clock."""

from __future__ import annotations

import socket
import struct

from aioice import stun

from p2pim import icmp
from p2pim.icmp import IcmpError, is_public
from p2pim.nat.hops import MAX_HOPS, MAX_SILENT, STEP_WAIT, HopLadder
from p2pim.sansio import ShortDatagram
from p2pim.stun import codec

SERVER = ("203.0.113.10", 3478)
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)  # Linux


def _step(ladder: HopLadder, now: float) -> ShortDatagram:
    (dg,) = ladder.datagrams_to_send(now)
    return dg


def _exceeded(dg: ShortDatagram, offender: str) -> IcmpError:
    return IcmpError(dg.addr, offender, True, dg.data)


def _answer(dg: ShortDatagram) -> bytes:
    request = codec.decode(dg.data).message
    response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, transaction_id=request.transaction_id)
    response.attributes["XOR-MAPPED-ADDRESS"] = ("203.0.113.101", 4000)
    return codec.encode(response)


def test_one_nat_then_a_public_router_gives_ttl_two() -> None:
    ladder = HopLadder(SERVER, 0.0, frozenset({"203.0.113.101"}))
    first = _step(ladder, 0.0)
    assert first.ttl == 1 and first.addr == SERVER
    assert ladder.icmp(_exceeded(first, "10.0.1.1"), 0.001)
    second = _step(ladder, 0.001)
    assert second.ttl == 2
    assert ladder.icmp(_exceeded(second, "198.51.100.1"), 0.002)
    assert ladder.done and ladder.open_ttl == 2 and ladder.inside == ["10.0.1.1"]


def test_nat444_counts_the_carrier_nat_and_our_own_wan_address_as_inside() -> None:
    ladder = HopLadder(SERVER, 0.0, frozenset({"203.0.113.50"}))
    for hop in ("192.168.1.1", "100.64.0.1", "203.0.113.50"):  # home NAT, CGNAT, our mapped IP
        assert ladder.icmp(_exceeded(_step(ladder, 0.0), hop), 0.0)
    assert not ladder.done
    ladder.icmp(_exceeded(_step(ladder, 0.0), "203.0.113.1"), 0.0)
    assert ladder.open_ttl == 4 and ladder.inside == ["192.168.1.1", "100.64.0.1", "203.0.113.50"]


def test_silent_hops_are_skipped_and_the_server_answering_ends_the_ladder() -> None:
    ladder = HopLadder(SERVER, 0.0)
    _step(ladder, 0.0)
    assert ladder.get_timer() == STEP_WAIT
    ladder.handle_timer(STEP_WAIT)  # hop 1 silent
    second = _step(ladder, STEP_WAIT)
    assert second.ttl == 2
    assert not ladder.stun_answer(b"\x00" * 20, 0.4)  # not our transaction
    assert ladder.stun_answer(_answer(second), 0.4)
    assert ladder.done and ladder.reached == 2 and ladder.open_ttl == 2 and ladder.hops == [None, SERVER[0]]


def test_the_servers_host_refusing_is_reaching_it() -> None:
    ladder = HopLadder(SERVER, 0.0)
    ladder.icmp(_exceeded(_step(ladder, 0.0), "10.0.1.1"), 0.0)
    assert ladder.icmp(IcmpError(SERVER, SERVER[0], False, _step(ladder, 0.0).data), 0.0)
    assert ladder.done and ladder.reached == 2 and ladder.open_ttl == 2


def test_a_silent_path_gives_up_after_a_few_silent_hops_with_no_ttl() -> None:
    ladder = HopLadder(SERVER, 0.0)
    now = 0.0
    while not ladder.done:
        ladder.datagrams_to_send(now)
        now += STEP_WAIT
        ladder.handle_timer(now)
    assert ladder.hops == [None] * MAX_SILENT and ladder.open_ttl is None
    assert now <= MAX_SILENT * STEP_WAIT + 1e-9  # a client waits at most this for its candidates


def test_the_ladder_stops_at_max_hops() -> None:
    ladder = HopLadder(SERVER, 0.0)
    for _ in range(MAX_HOPS):
        ladder.icmp(_exceeded(_step(ladder, 0.0), "10.9.9.9"), 0.0)
    assert ladder.done and len(ladder.hops) == MAX_HOPS and ladder.open_ttl is None


def test_errors_about_other_datagrams_are_not_the_ladders() -> None:
    ladder = HopLadder(SERVER, 0.0)
    dg = _step(ladder, 0.0)
    assert not ladder.icmp(IcmpError(("198.51.100.7", 9), "10.0.0.1", True, dg.data), 0.0)  # elsewhere
    assert not ladder.icmp(IcmpError(SERVER, "10.0.0.1", False, dg.data), 0.0)  # a router's unreachable
    other = codec.encode(codec.binding_request())
    assert not ladder.icmp(IcmpError(SERVER, "10.0.0.1", True, other), 0.0)  # another request
    assert ladder.hops == []


def test_public_means_routable_and_documentation_ranges_count_as_public() -> None:
    assert is_public("203.0.113.1") and is_public("198.51.100.1") and is_public("8.8.8.8")
    assert not any(map(is_public, ("10.0.0.1", "192.168.1.1", "100.64.0.1", "127.0.0.1", "junk")))


def test_the_kernels_extended_error_is_parsed_with_its_offender() -> None:
    ee = struct.pack("=IBBBBII", 113, icmp.SO_EE_ORIGIN_ICMP, 11, 0, 0, 0, 0)
    offender = struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton("10.0.1.1"))
    err = icmp._parse([(socket.IPPROTO_IP, icmp.IP_RECVERR, ee + offender)], SERVER, b"quoted")
    assert err == IcmpError(SERVER, "10.0.1.1", True, b"quoted")
    unreachable = struct.pack("=IBBBBII", 111, icmp.SO_EE_ORIGIN_ICMP, 3, 3, 0, 0, 0)
    err = icmp._parse([(socket.IPPROTO_IP, icmp.IP_RECVERR, unreachable + offender)], SERVER, b"")
    assert err is not None and not err.time_exceeded
    assert icmp._parse([(socket.IPPROTO_IP, icmp.IP_RECVERR, b"short")], SERVER, b"") is None
    local = struct.pack("=IBBBBII", 90, 1, 0, 0, 0, 0, 0)  # SO_EE_ORIGIN_LOCAL (EMSGSIZE): not ICMP
    assert icmp._parse([(socket.IPPROTO_IP, icmp.IP_RECVERR, local + offender)], SERVER, b"") is None


def test_a_real_socket_sends_with_a_short_ttl_and_keeps_its_own() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
        before = tx.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
        assert icmp.enable(tx)
        icmp.send(tx, b"x", rx.getsockname(), ttl=3)
        _, anc, _, _ = rx.recvmsg(16, 64)
        ttl = next(struct.unpack("=i", data)[0] for lvl, kind, data in anc if kind == socket.IP_TTL)
        assert ttl == 3
        assert tx.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == before
    finally:
        rx.close()
        tx.close()
