"""Disco packets: authenticated path probes between two identity keys.

One UDP socket carries STUN, disco and direct envelopes, so every packet
starts with something that tells them apart: STUN's first byte is 0-3
(RFC 7983), ours start with a 4-byte magic. The same bytes may also travel
inside a relay frame, where a bare envelope (protobuf, first byte 0x0a) is
told apart the same way.

A disco packet is ``DISCO_MAGIC | sender's Ed25519 key (32) | nonce (24) |
NaCl box``; the box (Curve25519 keys derived from the two identity keys)
holds a :class:`~p2pim.wire.disco_pb2.Disco` message. Only the holder of
the peer's private key can make a box we open with that peer's key, so a
pong we accept is proof that the address it came from reaches the peer.
A direct envelope is ``DATA_MAGIC | envelope``: envelopes are sealed and
signed end to end already.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from nacl.exceptions import CryptoError
from nacl.public import Box

from ..identity import BoxCache, Identity
from ..wire import disco_pb2 as dpb
from ..wire import nat_pb2 as npb

DISCO_MAGIC = b"P2Pd"
DATA_MAGIC = b"P2Pe"
KEY_LEN = 32
NONCE_LEN = Box.NONCE_SIZE
HEADER = len(DISCO_MAGIC) + KEY_LEN + NONCE_LEN
MAX_DISCO = 1200  # a disco packet never needs more; bigger ones are garbage
TX_LEN = 12
MAC_LEN = 16  # Poly1305

Addr = tuple[str, int]


class DiscoError(ValueError):
    """Not a disco packet we can open (garbage, unknown sender, forged box)."""


def is_disco(data: bytes) -> bool:
    return data[:4] == DISCO_MAGIC


def is_data(data: bytes) -> bool:
    return data[:4] == DATA_MAGIC


def sender_key(data: bytes) -> bytes:
    """The claimed sender key of a disco packet (unauthenticated until opened)."""
    if not is_disco(data) or len(data) < HEADER + MAC_LEN or len(data) > MAX_DISCO:
        raise DiscoError("not a disco packet")
    return data[4 : 4 + KEY_LEN]


def new_tx() -> bytes:
    return os.urandom(TX_LEN)


def ping(tx: bytes) -> dpb.Disco:
    return dpb.Disco(ping=dpb.Ping(tx_id=tx))


def opened() -> dpb.Disco:
    return dpb.Disco(opened=dpb.Opened())


def pong(tx: bytes, src: Addr) -> dpb.Disco:
    return dpb.Disco(pong=dpb.Pong(tx_id=tx, src=npb.Address(ip=src[0], port=src[1])))


class DiscoBoxes:
    """Seals and opens disco packets for one identity; caches a Box per peer key."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._mine = identity.public_key
        self._box = BoxCache(identity)

    def seal(self, peer_key: bytes, message: dpb.Disco) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        sealed = self._box(peer_key).encrypt(message.SerializeToString(), nonce).ciphertext
        return DISCO_MAGIC + self._mine + nonce + sealed

    def open(self, data: bytes, peer_key: bytes) -> dpb.Disco:
        """Open a packet from ``peer_key`` (found with :func:`sender_key`); raises DiscoError."""
        if sender_key(data) != peer_key:
            raise DiscoError("sender key mismatch")
        nonce, sealed = data[4 + KEY_LEN : HEADER], data[HEADER:]
        try:
            plain = self._box(peer_key).decrypt(sealed, nonce)
            message = dpb.Disco.FromString(plain)
        except (CryptoError, DecodeError, ValueError) as exc:
            raise DiscoError(f"cannot open: {exc}") from None
        if message.WhichOneof("kind") is None:
            raise DiscoError("empty disco message")
        return message


@dataclass(frozen=True)
class Candidates:
    """What a peer told us in a call-me-maybe."""

    endpoints: tuple[Addr, ...]
    mapped: Addr | None
    hard: bool  # maps per destination: needs the birthday dance with an easy peer


def call_me_maybe(cands: Candidates, reply: bool) -> dpb.Disco:
    msg = dpb.CallMeMaybe(hard=cands.hard, reply=reply)
    for ip, port in cands.endpoints:
        msg.endpoints.add(ip=ip, port=port)
    if cands.mapped is not None:
        msg.mapped.ip, msg.mapped.port = cands.mapped
    return dpb.Disco(call_me_maybe=msg)


def parse_call_me_maybe(msg: dpb.CallMeMaybe) -> Candidates:
    """Keep only well-formed IPv4 and IPv6 endpoints (at most 16)."""
    endpoints = tuple(a for a in (_addr(e) for e in msg.endpoints[:16]) if a is not None)
    return Candidates(endpoints, _addr(msg.mapped), msg.hard)


def _addr(a: npb.Address) -> Addr | None:
    """An IPv4 or IPv6 unicast address and a port; anything else is a peer's bug or malice."""
    if not 0 < a.port < 65536 or len(a.ip) > 45:
        return None
    try:
        ip = ipaddress.ip_address(a.ip)
    except ValueError:
        return None
    if ip.is_multicast or ip.is_unspecified or (ip.version == 6 and ip.is_link_local):
        return None
    return (str(ip), a.port)


def is_v6(addr: Addr) -> bool:
    return ":" in addr[0]


def show(addr: Addr) -> str:
    """``ip:port``, or ``[ip]:port`` for IPv6."""
    return f"[{addr[0]}]:{addr[1]}" if is_v6(addr) else f"{addr[0]}:{addr[1]}"
