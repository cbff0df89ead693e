"""Sender keys: what opens, and what does not (tampering, another signer, another epoch)."""

from __future__ import annotations

import pytest

from p2pim.groups import seal as gseal
from p2pim.identity import Identity
from p2pim.messaging.envelope import text_body
from p2pim.wire import envelope_pb2 as epb

GID, OTHER = b"g" * 8, b"h" * 8


def sealed(who: Identity, key: bytes, gid: bytes = GID, epoch: int = 1) -> epb.Envelope:
    return gseal.seal(who, "bob", gid, epoch, key, text_body("meet at 6"))


def test_a_member_opens_what_another_sealed_once_for_all() -> None:
    bob, key = Identity.generate(), gseal.new_key()
    env = epb.Envelope.FromString(sealed(bob, key).SerializeToString())
    gseal.verify(env, bob.public_key)
    body = gseal.open_body(env, key)
    assert body.text.text == "meet at 6" and body.recipient == gseal.label(GID)
    assert b"meet at 6" not in env.SerializeToString()


@pytest.mark.parametrize("change", ["ciphertext", "sender", "group", "epoch", "msg_id", "sent_at_ms"])
def test_any_change_fails_the_signature(change: str) -> None:
    bob, key = Identity.generate(), gseal.new_key()
    env = sealed(bob, key)
    if change == "ciphertext":
        env.ciphertext = env.ciphertext[:-1] + bytes([env.ciphertext[-1] ^ 1])
    elif change == "sender":
        env.sender = "mallory"
    elif change == "group":
        env.group = OTHER
    elif change == "epoch":
        env.epoch = 2
    elif change == "msg_id":
        env.msg_id = bytes(16)
    else:
        env.sent_at_ms += 1
    with pytest.raises(gseal.GroupSealError):
        gseal.verify(env, bob.public_key)


def test_a_member_cannot_forge_another_and_an_old_key_opens_nothing_new() -> None:
    bob, mallory = Identity.generate(), Identity.generate()
    key = gseal.new_key()
    forged = gseal.seal(
        mallory, "bob", GID, 1, key, text_body("it is bob, honest")
    )  # mallory holds bob's key
    with pytest.raises(gseal.GroupSealError):
        gseal.verify(forged, bob.public_key)
    new = sealed(bob, gseal.new_key(), epoch=2)  # after a removal: a new key
    with pytest.raises(gseal.GroupSealError):
        gseal.open_body(new, key)
