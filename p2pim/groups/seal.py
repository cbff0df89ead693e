"""Group messages sealed once for every member: sender keys, as Signal and WhatsApp do.

Each member has a symmetric key per group and *epoch* (32 random bytes), handed to
each other member inside the pairwise end-to-end envelopes (a ``GroupKey`` body). A
message is sealed once: a key for this message is derived from the sender key and
the message id (BLAKE2b, keyed), the body goes in a NaCl secretbox under it, and the
whole envelope is signed with the sender's identity key, so a member (who holds the
same sender key) cannot forge another member's message, and the server (which holds
none) can neither read nor forge one. The server stores one copy per member.

A new epoch after every membership change (:mod:`p2pim.groups.core` decides when):
whoever left never receives the keys that follow, whoever joined never the keys of what
came before, even with the server's database in hand. (Within an epoch there is no
ratchet: a member's key, once leaked, opens that epoch's messages from that member; the
epoch ends at the next change.)
"""

from __future__ import annotations

import hashlib
import os
import time

from google.protobuf.message import DecodeError
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.secret import SecretBox
from nacl.signing import VerifyKey

from ..identity import Identity
from ..messaging.ids import new_msg_id
from ..wire import envelope_pb2 as epb

KEY_SIZE = 32
SIGN_CONTEXT = b"p2pim-group\0"


class GroupSealError(Exception):
    """A group envelope that does not verify or open."""


def new_key() -> bytes:
    return os.urandom(KEY_SIZE)


def label(gid: bytes) -> str:
    """How a group is named where a peer name goes (history, the body's recipient)."""
    return "#" + gid.hex()


def _message_key(sender_key: bytes, msg_id: bytes) -> bytes:
    return hashlib.blake2b(msg_id, key=sender_key, digest_size=KEY_SIZE, person=b"p2pim-group-msg").digest()


def _signed(env: epb.Envelope) -> bytes:
    unsigned = epb.Envelope()
    unsigned.CopyFrom(env)
    unsigned.ClearField("signature")
    return SIGN_CONTEXT + unsigned.SerializeToString(deterministic=True)


def seal(identity: Identity, sender: str, gid: bytes, epoch: int, key: bytes, body: epb.Body) -> epb.Envelope:
    if not body.msg_id:
        body.msg_id = new_msg_id()
    if not body.sent_at_ms:
        body.sent_at_ms = int(time.time() * 1000)
    body.sender, body.recipient = sender, label(gid)
    box = SecretBox(_message_key(key, body.msg_id))
    env = epb.Envelope(
        msg_id=body.msg_id, sender=sender, sent_at_ms=body.sent_at_ms, group=gid, epoch=epoch,
        ciphertext=bytes(box.encrypt(body.SerializeToString())),
    )  # fmt: skip
    env.signature = identity.signing_key.sign(_signed(env)).signature
    return env


def verify(env: epb.Envelope, sender_identity: bytes) -> None:
    """The envelope is ``sender_identity``'s, unchanged; else :class:`GroupSealError`."""
    try:
        VerifyKey(sender_identity).verify(_signed(env), env.signature)
    except (BadSignatureError, ValueError):
        raise GroupSealError(f"a group message signed by someone other than {env.sender!r}") from None


def open_body(env: epb.Envelope, key: bytes) -> epb.Body:
    """Decrypt a verified envelope with the sender's key for its epoch."""
    try:
        body = epb.Body.FromString(SecretBox(_message_key(key, env.msg_id)).decrypt(env.ciphertext))
    except (CryptoError, ValueError, DecodeError) as exc:
        raise GroupSealError(
            f"a group message from {env.sender!r} does not open: {type(exc).__name__}"
        ) from None
    if (body.msg_id, body.sender, body.recipient, body.sent_at_ms) != (
        env.msg_id, env.sender, label(env.group), env.sent_at_ms,
    ):  # fmt: skip
        raise GroupSealError("sealed fields do not match the envelope")
    return body
