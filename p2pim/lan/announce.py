"""Signed LAN announcements: who is here, under which key, at which port.

An announcement is self-certifying (checked with the key it carries); trust
comes from pinning: the first key seen for a name is kept, and a different
key for that name later is a warning, never silently accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from ..identity import Identity, valid_public_key
from ..wire import lan_pb2 as lpb

MAGIC = b"P2PL"
CONTEXT = b"p2pim-lan-announce\0"
MAX_ANNOUNCE = 1024
MAX_NAME = 64
# An announcement says how often its sender announces; a peer is gone after 3.5 of
# those. Bounded, or one forged announcement would leave a peer for years.
MAX_INTERVAL_S = 300

ENTRY, ALIVE, ANSWER, EXIT = (lpb.Announce.ENTRY, lpb.Announce.ALIVE, lpb.Announce.ANSWER, lpb.Announce.EXIT)


class AnnounceError(ValueError):
    """Not a valid signed announcement."""


@dataclass(frozen=True)
class Heard:
    kind: int
    name: str
    key: bytes
    port: int
    at_ms: int
    interval_s: int


def is_announce(data: bytes) -> bool:
    return data[:4] == MAGIC


def make(
    identity: Identity, kind: lpb.Announce.Kind.ValueType, name: str, port: int, at_ms: int, interval_s: int
) -> bytes:
    body = lpb.Announce(
        kind=kind, name=name, identity_key=identity.public_key, port=port, at_ms=at_ms, interval_s=interval_s
    ).SerializeToString()
    signature = identity.signing_key.sign(CONTEXT + body).signature
    return MAGIC + lpb.SignedAnnounce(announce=body, signature=signature).SerializeToString()


def verify(data: bytes) -> Heard:
    if not is_announce(data) or len(data) > MAX_ANNOUNCE:
        raise AnnounceError("not an announcement")
    try:
        signed = lpb.SignedAnnounce.FromString(data[4:])
        ann = lpb.Announce.FromString(signed.announce)
    except DecodeError:
        raise AnnounceError("garbled") from None
    if not valid_public_key(ann.identity_key) or len(signed.signature) != 64:
        raise AnnounceError("bad key or signature")
    if not valid_name(ann.name) or not 0 < ann.port < 65536 or ann.kind not in (ENTRY, ALIVE, ANSWER, EXIT):
        raise AnnounceError("bad field")
    try:
        VerifyKey(ann.identity_key).verify(CONTEXT + signed.announce, signed.signature)
    except (BadSignatureError, ValueError):
        raise AnnounceError("bad signature") from None
    interval = min(MAX_INTERVAL_S, max(1, ann.interval_s))
    return Heard(ann.kind, ann.name, bytes(ann.identity_key), ann.port, ann.at_ms, interval)


def valid_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME and name.isprintable() and ":" not in name and "@" not in name
