"""Sealing and opening envelopes (NaCl box from sender to recipient).

The outer :class:`Envelope` fields route and deduplicate; the sealed
:class:`Body` repeats them, and :func:`open_envelope` refuses an envelope whose
outer fields disagree with the sealed ones, so a relay cannot replay a
ciphertext under a fresh id or another sender's name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from nacl.exceptions import CryptoError
from nacl.public import Box

from p2pim.identity import Identity, box_public_key
from p2pim.wire import envelope_pb2 as pb
from p2pim.wire.limits import ID_SIZE, MAX_ENVELOPE

from .ids import new_msg_id

MAX_TEXT = 16 * 1024  # characters; longer texts belong in a future file transfer


class EnvelopeError(Exception):
    """An envelope that is malformed, not for us, or fails authentication."""


@dataclass(frozen=True)
class Opened:
    """An authenticated envelope body."""

    envelope: pb.Envelope
    body: pb.Body


def seal(identity: Identity, sender: str, recipient: str, recipient_key: bytes, body: pb.Body) -> pb.Envelope:
    """Fill the body's routing fields, box it, and wrap it in an envelope."""
    if not body.msg_id:
        body.msg_id = new_msg_id()
    if not body.sent_at_ms:
        body.sent_at_ms = int(time.time() * 1000)
    body.sender = sender
    body.recipient = recipient
    box = Box(identity.box_private, box_public_key(recipient_key))
    env = pb.Envelope(
        msg_id=body.msg_id,
        sender=sender,
        recipient=recipient,
        sent_at_ms=body.sent_at_ms,
        ciphertext=bytes(box.encrypt(body.SerializeToString())),
    )
    return env


def text_body(text: str) -> pb.Body:
    if len(text) > MAX_TEXT:
        raise ValueError(f"message too long ({len(text)} characters, at most {MAX_TEXT})")
    return pb.Body(text=pb.Text(text=text))


def receipt_body(kind: int, msg_ids: list[bytes]) -> pb.Body:
    return pb.Body(receipt=pb.Receipt(kind=kind, msg_ids=msg_ids))  # type: ignore[arg-type]


def parse_envelope(data: bytes) -> pb.Envelope:
    if len(data) > MAX_ENVELOPE:
        raise EnvelopeError("envelope too large")
    try:
        env = pb.Envelope.FromString(data)
    except DecodeError:
        raise EnvelopeError("not an envelope") from None
    if len(env.msg_id) != ID_SIZE or not env.sender or not env.ciphertext:
        raise EnvelopeError("envelope lacks id, sender or ciphertext")
    return env


def open_envelope(identity: Identity, me: str, env: pb.Envelope, sender_key: bytes) -> Opened:
    """Authenticate and decrypt ``env`` from the holder of ``sender_key``."""
    if env.recipient != me:
        raise EnvelopeError(f"envelope for {env.recipient!r}, not us")
    try:
        plain = Box(identity.box_private, box_public_key(sender_key)).decrypt(env.ciphertext)
        body = pb.Body.FromString(plain)
    except (CryptoError, DecodeError, ValueError):
        raise EnvelopeError(f"envelope from {env.sender!r} failed authentication") from None
    if (body.msg_id, body.sender, body.recipient, body.sent_at_ms) != (
        env.msg_id,
        env.sender,
        env.recipient,
        env.sent_at_ms,
    ):
        raise EnvelopeError("sealed fields do not match the envelope")
    return Opened(env, body)
