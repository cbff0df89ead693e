"""The port-mapping core (PCP, then NAT-PMP, then UPnP) and its codecs, on a fake clock."""

from __future__ import annotations

import struct

from p2pim.nat.portmap import (
    GIVE_UP,
    PORT,
    Mapping,
    MappingChanged,
    PortMapper,
    TryUpnp,
    natpmp_map_request,
    parse_natpmp,
    parse_pcp,
    pcp_map_request,
)

GW = "10.0.1.1"
ME = ("10.0.1.2", 40000)
EXT = "11.0.113.101"


def _mapper(**kw: object) -> PortMapper:
    return PortMapper(GW, ME, 0.0, "pm", **kw)  # type: ignore[arg-type]


def _events(m: PortMapper) -> list[object]:
    out = []
    while (ev := m.next_event()) is not None:
        out.append(ev)
    return out


def _pcp_answer(request: bytes, result: int = 0, lifetime: int = 7200, port: int = 40000) -> bytes:
    nonce, _proto, internal = struct.unpack_from("!12sB3xH", request, 24)
    head = struct.pack("!BBBBII12x", 2, 0x81, 0, result, lifetime, 1234)
    ext_ip = bytes(10) + b"\xff\xff" + bytes(int(x) for x in EXT.split("."))
    return head + struct.pack("!12sB3xHH16s", nonce, 17, internal, port, ext_ip)


def test_pcp_request_layout_and_a_granted_mapping() -> None:
    m = _mapper()
    (dg,) = m.datagrams_to_send(0.0)
    assert dg.addr == (GW, PORT) and len(dg.data) == 60
    assert dg.data[0] == 2 and dg.data[1] == 1  # version 2, MAP request
    assert dg.data[8:24] == bytes(10) + b"\xff\xff" + bytes([10, 0, 1, 2])  # our IPv4, mapped
    assert struct.unpack_from("!HH", dg.data, 40) == (40000, 40000)  # internal, suggested external
    m.receive_datagram("pm", _pcp_answer(dg.data, port=40001), (GW, PORT), 0.01)
    (ev,) = _events(m)
    assert isinstance(ev, MappingChanged) and ev.tried == ("PCP",)
    assert ev.mapping == Mapping("PCP", (EXT, 40001), 7200, 0.01)
    assert m.get_timer() == 0.01 + 3600  # renewed at half the lifetime


def test_answers_from_elsewhere_with_another_nonce_or_garbage_are_counted_and_ignored() -> None:
    m = _mapper()
    (dg,) = m.datagrams_to_send(0.0)
    m.receive_datagram("pm", _pcp_answer(dg.data), ("10.0.1.99", PORT), 0.01)  # not the gateway
    forged = bytearray(_pcp_answer(dg.data))
    forged[24] ^= 1  # another nonce
    m.receive_datagram("pm", bytes(forged), (GW, PORT), 0.01)
    for junk in (b"", b"\x02", b"\x02\x81" + bytes(22), bytes(100)):
        m.receive_datagram("pm", junk, (GW, PORT), 0.01)
    assert m.mapping is None and m.counters["bad_replies"] >= 5
    m.receive_datagram("pm", _pcp_answer(dg.data), (GW, PORT), 0.02)
    assert m.mapping is not None


def test_unsupported_pcp_falls_back_to_nat_pmp() -> None:
    m = _mapper()
    m.datagrams_to_send(0.0)
    m.receive_datagram("pm", struct.pack("!BBBBII12x", 2, 0x81, 0, 1, 0, 0), (GW, PORT), 0.01)
    (ask,) = m.datagrams_to_send(0.01)
    assert ask.data == b"\x00\x00"  # NAT-PMP: external address
    m.receive_datagram("pm", struct.pack("!BBHI4B", 0, 128, 0, 9, 11, 0, 113, 101), (GW, PORT), 0.02)
    (mapreq,) = m.datagrams_to_send(0.02)
    assert mapreq.data == natpmp_map_request(40000, 7200, 40000)
    m.receive_datagram("pm", struct.pack("!BBHIHHI", 0, 129, 0, 9, 40000, 40002, 3600), (GW, PORT), 0.03)
    assert m.mapping == Mapping("NAT-PMP", (EXT, 40002), 3600, 0.03)
    assert m.tried == ["PCP", "NAT-PMP"]


def test_silence_goes_pcp_then_nat_pmp_then_asks_the_shell_for_upnp() -> None:
    m = _mapper()
    sent = []
    now = 0.0
    while now < 2 * GIVE_UP + 0.1:
        sent += m.datagrams_to_send(now)
        now = round(now + 0.05, 3)
    assert [d.data[0] for d in sent].count(2) == 3 and [d.data[0] for d in sent].count(0) == 3
    (ev,) = _events(m)
    assert ev == TryUpnp(ME, 7200)
    m.upnp_result((EXT, 40000), 3600, now)
    (changed,) = _events(m)
    assert isinstance(changed, MappingChanged) and changed.mapping is not None
    assert changed.mapping.protocol == "UPnP" and changed.tried == ("PCP", "NAT-PMP", "UPnP")


def test_nothing_listening_on_the_gateway_skips_straight_to_upnp_or_none() -> None:
    m = _mapper(upnp=False)
    m.datagrams_to_send(0.0)
    m.socket_error("pm", 0.01)  # ICMP port unreachable on the connected socket
    (ev,) = _events(m)
    assert ev == MappingChanged(None, ("PCP", "NAT-PMP")) and m.done


def test_a_router_that_refuses_is_not_asked_again_by_another_protocol() -> None:
    m = _mapper()
    (dg,) = m.datagrams_to_send(0.0)
    m.receive_datagram("pm", _pcp_answer(dg.data, result=2), (GW, PORT), 0.01)  # NOT_AUTHORIZED
    (ev,) = _events(m)
    assert ev == MappingChanged(None, ("PCP",))


def test_renewal_keeps_the_mapping_and_failed_renewals_end_it_at_expiry() -> None:
    m = _mapper(lifetime=120)
    (dg,) = m.datagrams_to_send(0.0)
    m.receive_datagram("pm", _pcp_answer(dg.data, lifetime=120), (GW, PORT), 0.0)
    _events(m)
    (renew,) = m.datagrams_to_send(60.0)
    assert renew.data[:2] == b"\x02\x01" and m.counters["renewals"] == 1
    m.receive_datagram("pm", _pcp_answer(renew.data, lifetime=120), (GW, PORT), 60.01)
    assert _events(m) == []  # same external address: nothing to tell
    assert m.get_timer() == 60.01 + 60
    # The router is gone: renewals go unanswered until the mapping expires.
    now = 120.0
    while now < 200:
        m.datagrams_to_send(now)
        now += 0.5
    assert m.mapping is None
    assert MappingChanged(None, ("PCP",)) in _events(m)


def test_release_deletes_with_lifetime_zero() -> None:
    m = _mapper()
    (dg,) = m.datagrams_to_send(0.0)
    m.receive_datagram("pm", _pcp_answer(dg.data), (GW, PORT), 0.0)
    (bye,) = m.release(1.0)
    assert struct.unpack_from("!I", bye.data, 4)[0] == 0 and bye.data[24:36] == dg.data[24:36]
    assert m.mapping is None and m.release(2.0) == []
    upnp = _mapper()
    upnp.mapping = Mapping("UPnP", (EXT, 40000), 3600, 0.0)
    assert upnp.release(1.0) == [] and _events(upnp)[-1] == TryUpnp(ME, 0, release=True)


def test_codecs_round_trip_and_refuse_short_or_foreign_packets() -> None:
    req = pcp_map_request("10.0.1.2", 40000, 60, b"n" * 12)
    answer = parse_pcp(_pcp_answer(req, port=41000))
    assert answer is not None and answer.external == (EXT, 41000) and answer.nonce == b"n" * 12
    assert parse_pcp(req) is None  # a request, not a response
    assert parse_natpmp(b"\x00\x80\x00\x00") is None
    assert parse_natpmp(struct.pack("!BBHI4B", 0, 128, 0, 1, 1, 2, 3, 4)) == (0, 0, "1.2.3.4")
