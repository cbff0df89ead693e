"""STUN wire codec: aioice's attribute table, extended, behind strict input checks.

aioice.stun encodes and decodes RFC 8489 messages from one table of attributes.
We register the RFC 5780 and RFC 3489 attributes NAT discovery needs into that
same table (one codec, not two) and wrap its parser with what a socket facing
the internet needs:

* the framing checks aioice skips (top two bits zero, 4-byte aligned length,
  every attribute inside the message), so garbage and truncations become one
  exception type, :class:`StunDecodeError`, instead of ``struct.error`` or
  ``IndexError`` leaking out of a server loop;
* classic RFC 3489 messages, which have no magic cookie and a 16-byte
  transaction id: aioice always writes the cookie, so :func:`encode` writes the
  first four id bytes back over it for classic peers;
* the list of comprehension-required attributes we did not understand, which a
  server must answer with 420 (RFC 8489 §14).

Byte layout (RFC 8489 §5)::

    0                   1                   2                   3
    |0 0|  message type (14 bits)  |        message length         |
    |                  magic cookie 0x2112A442                      |  (RFC 3489: id bytes 0-3)
    |                  transaction id (96 bits)                     |
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from aioice import stun

Addr = tuple[str, int]

COOKIE = stun.COOKIE
HEADER_LENGTH = stun.HEADER_LENGTH
#: Largest datagram we will try to parse; STUN over UDP stays under the path MTU
#: (RFC 8489 §6.1), so anything bigger is garbage or an attack.
MAX_MESSAGE = 1500

# CHANGE-REQUEST flag bits (RFC 5780 §7.2, RFC 3489 §11.2.4).
CHANGE_IP = 0x04
CHANGE_PORT = 0x02

Message = stun.Message
Method = stun.Method
Class = stun.Class


def _pack_attribute_list(value: list[int]) -> bytes:
    return b"".join(struct.pack("!H", v) for v in value)


def _unpack_attribute_list(data: bytes) -> list[int]:
    if len(data) % 2:
        raise ValueError("UNKNOWN-ATTRIBUTES length is odd")
    return [v for (v,) in struct.iter_unpack("!H", data)]


def _unpack_response_port(data: bytes) -> int:
    # RFC 5780 §7.5: a 16-bit port followed by 2 bytes of padding.
    if len(data) != 4:
        raise ValueError("RESPONSE-PORT must be 4 bytes")
    return stun.unpack_unsigned_short(data)


def _unpack_change_request(data: bytes) -> int:
    if len(data) != 4:
        raise ValueError("CHANGE-REQUEST must be 4 bytes")
    return stun.unpack_unsigned(data)


# The attributes aioice lacks, registered into its own table.
_EXTRA_ATTRIBUTES: list[stun.AttributeEntry] = [
    # RFC 3489 §11.2.2: asks the server to answer elsewhere. Registered so we can
    # recognise it; the server refuses it (a reflection vector RFC 5389 dropped).
    (0x0002, "RESPONSE-ADDRESS", stun.pack_address, stun.unpack_address),
    (0x000A, "UNKNOWN-ATTRIBUTES", _pack_attribute_list, _unpack_attribute_list),
    # RFC 5780 §7.6: refused by the server, like RESPONSE-ADDRESS.
    (0x0026, "PADDING", stun.pack_bytes, stun.unpack_bytes),
    # RFC 5780 §7.5: answer to the request's source IP, at this port.
    (0x0027, "RESPONSE-PORT", stun.pack_unsigned_short, _unpack_response_port),
]
for _entry in _EXTRA_ATTRIBUTES:
    if _entry[0] not in stun.ATTRIBUTES_BY_TYPE:
        stun.ATTRIBUTES.append(_entry)
        stun.ATTRIBUTES_BY_TYPE[_entry[0]] = _entry
        stun.ATTRIBUTES_BY_NAME[_entry[1]] = _entry

# aioice's CHANGE-REQUEST accepts any length; be strict about it.
_cr = stun.ATTRIBUTES_BY_TYPE[0x0003]
_cr = (_cr[0], _cr[1], _cr[2], _unpack_change_request)
stun.ATTRIBUTES_BY_TYPE[0x0003] = _cr
stun.ATTRIBUTES_BY_NAME["CHANGE-REQUEST"] = _cr


class StunDecodeError(ValueError):
    """The bytes are not a well-formed STUN message (the remote side's fault)."""


@dataclass
class Decoded:
    """A parsed message with what aioice's Message cannot say about it."""

    message: stun.Message
    #: True for RFC 3489 peers: no magic cookie, 16-byte transaction id.
    classic: bool
    #: The full 16 bytes after the length field (cookie + id, or the classic id).
    transaction_id16: bytes
    #: Comprehension-required attribute types (< 0x8000) we do not know.
    unknown_required: list[int] = field(default_factory=list)


def is_stun(data: bytes) -> bool:
    """Cheap demultiplexing test (RFC 8489 §6.3 / RFC 7983): could this be STUN?"""
    return (
        len(data) >= HEADER_LENGTH
        and data[0] & 0xC0 == 0
        and len(data) == HEADER_LENGTH + int.from_bytes(data[2:4], "big")
    )


def decode(data: bytes) -> Decoded:
    """Parse one datagram; raise :class:`StunDecodeError` for anything malformed."""
    if len(data) > MAX_MESSAGE:
        raise StunDecodeError(f"datagram of {len(data)} bytes is too large")
    if len(data) < HEADER_LENGTH:
        raise StunDecodeError("shorter than a STUN header")
    if data[0] & 0xC0:
        raise StunDecodeError("top two bits are not zero")
    length = int.from_bytes(data[2:4], "big")
    if length % 4:
        raise StunDecodeError("length is not a multiple of 4")
    if len(data) != HEADER_LENGTH + length:
        raise StunDecodeError("length field does not match datagram size")

    unknown: list[int] = []
    pos = HEADER_LENGTH
    while pos < len(data):
        if pos + 4 > len(data):
            raise StunDecodeError("truncated attribute header")
        attr_type, attr_len = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + attr_len
        if end > len(data):
            raise StunDecodeError(f"attribute 0x{attr_type:04x} overruns the message")
        if attr_type < 0x8000 and attr_type not in stun.ATTRIBUTES_BY_TYPE:
            unknown.append(attr_type)
        pos = end + stun.padding_length(attr_len)

    try:
        message = stun.parse_message(data)
    except (ValueError, struct.error, IndexError, KeyError) as exc:
        raise StunDecodeError(str(exc) or type(exc).__name__) from None
    cookie = int.from_bytes(data[4:8], "big")
    return Decoded(
        message=message,
        classic=cookie != COOKIE,
        transaction_id16=bytes(data[4:20]),
        unknown_required=unknown,
    )


def encode(message: stun.Message, classic_id16: bytes | None = None) -> bytes:
    """Serialise ``message``; for a classic peer, echo its 16-byte transaction id.

    A classic message must carry no XOR-* attribute and no FINGERPRINT, since
    both are computed with the magic cookie that a classic id overwrites.
    """
    data = bytes(message)
    if classic_id16 is None:
        return data
    if classic_id16[4:] != message.transaction_id:
        raise ValueError("classic id must end with the message's transaction id")
    return data[:4] + classic_id16[:4] + data[8:]


def binding_request(
    transaction_id: bytes | None = None,
    change: int = 0,
    response_port: int | None = None,
) -> stun.Message:
    """A Binding request, optionally with CHANGE-REQUEST and RESPONSE-PORT."""
    msg = stun.Message(Method.BINDING, Class.REQUEST, transaction_id=transaction_id)
    if change:
        msg.attributes["CHANGE-REQUEST"] = change
    if response_port is not None:
        msg.attributes["RESPONSE-PORT"] = response_port
    return msg


def _first_address(message: stun.Message, *names: str) -> Addr | None:
    for name in names:
        addr = message.attributes.get(name)
        if addr:
            return (str(addr[0]), int(addr[1]))
    return None


def mapped_address(message: stun.Message) -> Addr | None:
    """The reflexive address: XOR-MAPPED-ADDRESS, else classic MAPPED-ADDRESS."""
    return _first_address(message, "XOR-MAPPED-ADDRESS", "MAPPED-ADDRESS")


def other_address(message: stun.Message) -> Addr | None:
    """The server's alternate address: OTHER-ADDRESS (5780) or CHANGED-ADDRESS (3489)."""
    return _first_address(message, "OTHER-ADDRESS", "CHANGED-ADDRESS")
