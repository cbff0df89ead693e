"""The sans-IO STUN server core, on a fake clock: no sockets."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pim.stun import codec
from p2pim.stun.codec import CHANGE_IP, CHANGE_PORT, Class
from rendezvous.stun_server import AMPLIFICATION_FACTOR, StunServerCore

P, A = "198.51.100.1", "198.51.100.2"
CLIENT = ("192.0.2.7", 40000)


def core(**kw: object) -> StunServerCore:
    return StunServerCore(P, 3478, kw.pop("alt_ip", A), kw.pop("alt_port", 3479), **kw)  # type: ignore[arg-type]


def ask(srv: StunServerCore, msg: codec.Message, local: tuple[str, int] = (P, 3478), now: float = 0.0):
    out = srv.handle(codec.encode(msg), local, CLIENT, now)
    assert out is not None
    return out, codec.decode(out.data).message


def test_binding_response_has_rfc5780_attributes() -> None:
    srv = core()
    out, reply = ask(srv, codec.binding_request())
    assert out.sock == (P, 3478) and out.addr == CLIENT
    assert reply.message_class == Class.RESPONSE
    assert reply.attributes["XOR-MAPPED-ADDRESS"] == CLIENT
    assert reply.attributes["RESPONSE-ORIGIN"] == (P, 3478)
    assert reply.attributes["OTHER-ADDRESS"] == (A, 3479)
    assert srv.counters.answered == 1


def test_change_request_is_relative_to_the_receiving_socket() -> None:
    srv = core()
    cases = {
        ((P, 3478), CHANGE_IP | CHANGE_PORT): (A, 3479),
        ((P, 3478), CHANGE_PORT): (P, 3479),
        ((P, 3478), CHANGE_IP): (A, 3478),
        # RFC 3489 test III as pystun3 does it: to the alternate address, change port.
        ((A, 3479), CHANGE_PORT): (A, 3478),
    }
    for (local, change), expected in cases.items():
        out, reply = ask(srv, codec.binding_request(change=change), local)
        assert out.sock == expected
        assert reply.attributes["RESPONSE-ORIGIN"] == expected
    # OTHER-ADDRESS is relative to the socket too.
    _, reply = ask(srv, codec.binding_request(), (A, 3479))
    assert reply.attributes["OTHER-ADDRESS"] == (P, 3478)


def test_single_address_refuses_to_change_ip_instead_of_lying() -> None:
    srv = core(alt_ip=None)
    out, reply = ask(srv, codec.binding_request(change=CHANGE_IP | CHANGE_PORT))
    assert out.sock == (P, 3478)
    assert reply.message_class == Class.ERROR and reply.error_code == 420
    assert reply.attributes["UNKNOWN-ATTRIBUTES"] == [0x0003]
    # Plain bindings still work, without OTHER-ADDRESS.
    _, reply = ask(srv, codec.binding_request())
    assert reply.message_class == Class.RESPONSE and "OTHER-ADDRESS" not in reply.attributes
    # It can still change port.
    out, _ = ask(srv, codec.binding_request(change=CHANGE_PORT))
    assert out.sock == (P, 3479)


def test_classic_client_gets_classic_answer() -> None:
    srv = core()
    tid16 = bytes(range(100, 116))
    data = bytes.fromhex("00010008") + tid16 + bytes.fromhex("0003000400000004")  # change IP
    out = srv.handle(data, (P, 3478), CLIENT, 0.0)
    assert out is not None and out.sock == (A, 3478)
    assert out.data[4:20] == tid16
    reply = codec.decode(out.data).message
    assert set(reply.attributes) == {"MAPPED-ADDRESS", "SOURCE-ADDRESS", "CHANGED-ADDRESS"}
    assert reply.attributes["SOURCE-ADDRESS"] == (A, 3478)
    assert reply.attributes["CHANGED-ADDRESS"] == (A, 3479)


def test_response_port_sends_to_source_ip_at_that_port() -> None:
    out, _ = ask(core(), codec.binding_request(response_port=5555))
    assert out.addr == (CLIENT[0], 5555)


def test_reflection_attributes_are_refused() -> None:
    srv = core()
    for name, value in (("RESPONSE-ADDRESS", ("203.0.113.9", 53)), ("PADDING", b"\x00" * 400)):
        msg = codec.binding_request()
        msg.attributes[name] = value
        out, reply = ask(srv, msg)
        assert out.addr == CLIENT
        assert reply.error_code == 420


def test_unknown_required_attribute_gets_420_listing_it() -> None:
    data = bytearray(codec.encode(codec.binding_request()))
    data += struct.pack("!HH", 0x7ABC, 4) + b"\x00" * 4
    data[2:4] = struct.pack("!H", len(data) - 20)
    out = core().handle(bytes(data), (P, 3478), CLIENT, 0.0)
    assert out is not None
    reply = codec.decode(out.data).message
    assert reply.error_code == 420 and reply.attributes["UNKNOWN-ATTRIBUTES"] == [0x7ABC]


def test_garbage_responses_and_other_methods() -> None:
    srv = core()
    assert srv.handle(b"\xde\xad\xbe\xef" * 10, (P, 3478), CLIENT, 0.0) is None
    resp = codec.Message(codec.Method.BINDING, Class.RESPONSE)
    assert srv.handle(codec.encode(resp), (P, 3478), CLIENT, 0.0) is None
    alloc = codec.Message(codec.Method.ALLOCATE, Class.REQUEST)
    _, reply = ask(srv, alloc)
    assert reply.error_code == 400
    assert srv.counters.malformed == 1 and srv.counters.not_request == 1 and srv.counters.errors_sent == 1


def test_rate_limit_per_source_refills_with_time() -> None:
    srv = core(rate=10.0, burst=5.0)
    req = codec.encode(codec.binding_request())
    answered = [srv.handle(req, (P, 3478), CLIENT, 0.0) is not None for _ in range(20)]
    assert answered.count(True) == 5
    assert srv.counters.rate_limited == 15
    # Another source is unaffected; the first recovers after a second.
    assert srv.handle(req, (P, 3478), ("192.0.2.8", 1), 0.0) is not None
    assert srv.handle(req, (P, 3478), CLIENT, 1.0) is not None


@settings(max_examples=300, deadline=None)
@given(
    change=st.sampled_from([0, CHANGE_IP, CHANGE_PORT, CHANGE_IP | CHANGE_PORT]),
    response_port=st.one_of(st.none(), st.integers(0, 65535)),
    classic=st.booleans(),
    software=st.text(max_size=300),
    ipv6=st.booleans(),
)
def test_answer_never_exceeds_amplification_factor(
    change: int, response_port: int | None, classic: bool, software: str, ipv6: bool
) -> None:
    srv = core(software=software)
    msg = codec.binding_request(change=change, response_port=response_port)
    data = codec.encode(msg)
    if classic:
        data = data[:4] + b"\x01\x02\x03\x04" + data[8:]
    client = ("2001:db8::1", 40000) if ipv6 else CLIENT
    out = srv.handle(data, (P, 3478), client, 0.0)
    if out is not None:
        assert len(out.data) <= AMPLIFICATION_FACTOR * len(data)
