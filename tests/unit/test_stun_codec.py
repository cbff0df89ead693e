"""STUN codec: golden vectors (RFC 5769, RFC 3489 layout) and hostile input."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pim.stun import codec
from p2pim.stun.codec import Class, Message, Method


def test_rfc5769_xor_mapped_address_decodes() -> None:
    # The XOR-MAPPED-ADDRESS part of RFC 5769 §2.2, framed as a response of its own.
    tid = bytes.fromhex("b7e7a701bc34d686fa87dfae")
    body = bytes.fromhex("002000080001a147e112a643")
    data = struct.pack("!HHI", 0x0101, len(body), codec.COOKIE) + tid + body
    decoded = codec.decode(data)
    assert decoded.message.attributes["XOR-MAPPED-ADDRESS"] == ("192.0.2.1", 32853)
    assert not decoded.classic
    assert codec.mapped_address(decoded.message) == ("192.0.2.1", 32853)


def test_classic_request_is_recognised_and_id_echoed() -> None:
    # RFC 3489 Binding request with CHANGE-REQUEST(change IP+port), as pystun3 sends it.
    tid16 = bytes(range(16))
    data = bytes.fromhex("00010008") + tid16 + bytes.fromhex("0003000400000006")
    decoded = codec.decode(data)
    assert decoded.classic
    assert decoded.transaction_id16 == tid16
    assert decoded.message.attributes["CHANGE-REQUEST"] == 6
    reply = Message(Method.BINDING, Class.RESPONSE, decoded.message.transaction_id)
    reply.attributes["MAPPED-ADDRESS"] = ("10.1.2.3", 4567)
    out = codec.encode(reply, decoded.transaction_id16)
    assert out[4:20] == tid16  # the whole 16-byte id, not the magic cookie
    assert out[:2] == b"\x01\x01"
    # MAPPED-ADDRESS, family 1, port 4567, 10.1.2.3
    assert out[20:] == bytes.fromhex("000100080001") + struct.pack("!H", 4567) + bytes([10, 1, 2, 3])


def test_rfc5780_attributes_round_trip() -> None:
    msg = codec.binding_request(change=codec.CHANGE_PORT, response_port=40000)
    again = codec.decode(codec.encode(msg)).message
    assert again.attributes == {"CHANGE-REQUEST": 2, "RESPONSE-PORT": 40000}
    assert again.transaction_id == msg.transaction_id


def test_unknown_comprehension_required_attribute_is_reported() -> None:
    msg = codec.binding_request()
    data = bytearray(codec.encode(msg))
    data += struct.pack("!HH", 0x7777, 4) + b"abcd"  # unknown, < 0x8000
    data += struct.pack("!HH", 0xC001, 4) + b"abcd"  # unknown, optional: ignored
    data[2:4] = struct.pack("!H", len(data) - 20)
    assert codec.decode(bytes(data)).unknown_required == [0x7777]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "shorter"),
        (b"\x00\x01\x00\x00" + b"\x00" * 15, "shorter"),
        (b"\xc0\x01\x00\x00" + b"\x00" * 16, "top two bits"),
        (b"\x00\x01\x00\x03" + b"\x00" * 16 + b"abc", "multiple of 4"),
        (b"\x00\x01\x00\x08" + b"\x00" * 16, "does not match"),
        (b"\x00\x01\x00\x04" + b"\x00" * 16 + b"\x00\x03\x00\x08", "overruns"),
        (b"\x00\x01\x00\x08" + b"\x00" * 16 + b"\x00\x03\x00\x02\x00\x00\x00\x00", "CHANGE-REQUEST"),
        (b"\x00\x01\x00\x08" + b"\x00" * 16 + b"\x80\x22\x00\x02\xff\xfe\x00\x00", "utf-8"),
        (b"\x00\x01" + b"\x00" * 1600, "too large"),
    ],
)
def test_malformed_is_one_exception_type(data: bytes, why: str) -> None:
    with pytest.raises(codec.StunDecodeError) as err:
        codec.decode(data)
    assert why.lower() in str(err.value).lower() or why == "utf-8"


@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_another_exception(data: bytes) -> None:
    with contextlib.suppress(codec.StunDecodeError):
        codec.decode(data)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=24)), max_size=6),
    st.binary(min_size=12, max_size=12),
)
def test_well_framed_random_attributes_never_crash(attrs: list[tuple[int, bytes]], tid: bytes) -> None:
    body = b""
    for t, v in attrs:
        body += struct.pack("!HH", t, len(v)) + v + bytes(-len(v) % 4)
    data = struct.pack("!HHI", 0x0001, len(body), codec.COOKIE) + tid + body
    with contextlib.suppress(codec.StunDecodeError):
        codec.decode(data)


def test_is_stun_demultiplexes() -> None:
    assert codec.is_stun(codec.encode(codec.binding_request()))
    assert not codec.is_stun(b"\x80" + bytes(19))  # RTP/disco-like first byte
    assert not codec.is_stun(b"hello")
