"""Envelopes, identities, ids, passwords and both SQLite stores (no network)."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from p2pim.identity import Identity, IdentityError, fingerprint, verify_login
from p2pim.messaging.envelope import (
    EnvelopeError,
    open_envelope,
    parse_envelope,
    receipt_body,
    seal,
    text_body,
)
from p2pim.messaging.ids import new_msg_id
from p2pim.messaging.store import ClientStore
from p2pim.wire import envelope_pb2 as epb
from rendezvous.db import MIGRATIONS, Database, SchemaTooNew
from rendezvous.passwords import PasswordHasher

ALICE, BOB, EVE = Identity.generate(), Identity.generate(), Identity.generate()


def test_envelope_round_trip_and_tampering() -> None:
    env = seal(ALICE, "alice", "bob", BOB.public_key, text_body("hi bob"))
    wire = env.SerializeToString()
    assert b"hi bob" not in wire
    opened = open_envelope(BOB, "bob", parse_envelope(wire), ALICE.public_key)
    assert opened.body.text.text == "hi bob" and opened.body.msg_id == env.msg_id
    with pytest.raises(EnvelopeError):  # not from the key we pinned for alice
        open_envelope(BOB, "bob", env, EVE.public_key)
    with pytest.raises(EnvelopeError):  # not for us
        open_envelope(EVE, "eve", env, ALICE.public_key)
    spliced = epb.Envelope()
    spliced.CopyFrom(env)
    spliced.msg_id = new_msg_id()  # a relay replaying the ciphertext under a fresh id
    with pytest.raises(EnvelopeError, match="do not match"):
        open_envelope(BOB, "bob", spliced, ALICE.public_key)
    flipped = bytearray(wire)
    flipped[-1] ^= 1
    with pytest.raises(EnvelopeError):
        open_envelope(BOB, "bob", parse_envelope(bytes(flipped)), ALICE.public_key)
    for garbage in (b"", os.urandom(100), b"\xff" * 70_000):
        with pytest.raises(EnvelopeError):
            parse_envelope(garbage)


def test_receipt_body_and_text_limit() -> None:
    body = receipt_body(epb.Receipt.READ, [b"a" * 16])
    assert body.receipt.kind == epb.Receipt.READ
    with pytest.raises(ValueError):
        text_body("x" * 20_000)


def test_msg_ids_are_unique_and_time_ordered() -> None:
    ids = [new_msg_id(1000 + i // 10) for i in range(100)]
    assert len(set(ids)) == 100
    assert [i[:6] for i in ids] == sorted(i[:6] for i in ids)


def test_identity_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "p" / "identity.key"
    a = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path).public_key == a.public_key
    path.write_bytes(b"short")
    with pytest.raises(IdentityError):
        Identity.load_or_create(path)
    fp = fingerprint(a.public_key)
    assert len(fp.split()) == 8 and fp != fingerprint(BOB.public_key)


def test_login_signature_binds_nonce_and_name() -> None:
    sig = ALICE.sign_login(b"n" * 32, "alice")
    assert verify_login(ALICE.public_key, b"n" * 32, "alice", sig)
    assert not verify_login(ALICE.public_key, b"m" * 32, "alice", sig)
    assert not verify_login(ALICE.public_key, b"n" * 32, "alicf", sig)
    assert not verify_login(BOB.public_key, b"n" * 32, "alice", sig)
    assert not verify_login(b"short", b"n" * 32, "alice", sig)


def test_passwords_are_argon2id_and_checked() -> None:
    h = PasswordHasher("min")
    stored = h.hash("hunter22")
    assert stored.startswith(b"$argon2id$")
    assert h.verify(stored, "hunter22")
    assert not h.verify(stored, "hunter23")
    assert not h.verify(None, "hunter22")  # unknown user: same work, always False
    assert not h.verify(b"$argon2i$v=19$m=8,t=1,p=1$xxxx$yyyy", "hunter22")  # other algorithms refused


def test_server_db_migrates_and_refuses_newer_schema(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    assert db.schema_version == len(MIGRATIONS)
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    Database(tmp_path / "s.db").close()  # reopening is a no-op
    with sqlite3.connect(tmp_path / "s.db") as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(SchemaTooNew):
        Database(tmp_path / "s.db")


def test_server_db_offline_store_dedups_and_acks_only_own(store_target: str) -> None:
    db = Database(store_target)
    assert db.add_user("alice", b"h", b"k" * 32, 0) and db.add_user("bob", b"h", b"k" * 32, 0)
    assert not db.add_user("alice", b"h", b"k" * 32, 0)
    bob, alice = db.user("bob"), db.user("alice")
    assert bob is not None and alice is not None
    first = db.store_offline(bob.id, "alice", b"i" * 16, b"env", 1000)
    assert first is not None
    assert db.store_offline(bob.id, "alice", b"i" * 16, b"env", 1001) is None  # retransmission
    assert db.ack_offline(alice.id, [first]) == 0  # not alice's to delete
    assert db.has_offline(bob.id, b"i" * 16) and not db.has_offline(alice.id, b"i" * 16)
    assert db.add_user("carol", b"h", b"k" * 32, 0)
    second = db.store_offline(bob.id, "carol", b"j" * 16, b"envelope", 1002)
    # in all, then this sender's share
    assert db.offline_usage(bob.id, "alice") == (2, 11, 1, 3)
    assert db.offline_usage(bob.id, "carol") == (2, 11, 1, 8)
    assert [e.id for e in db.pending_offline(bob.id)] == [first, second]
    assert [e.id for e in db.pending_offline(bob.id, after_id=first)] == [second]  # the window's cursor
    assert [e.id for e in db.pending_offline(bob.id, limit=1)] == [first]
    carol = db.user("carol")
    assert carol is not None
    assert db.drop_offline_between(carol, bob) == 1  # they are no longer buddies
    assert db.offline_count(bob.id) == 1
    assert db.expire(now_ms=10_000, max_age_ms=5_000) == 1


def test_server_db_a_removed_device_leaves_its_copies_to_the_others(store_target: str) -> None:
    """Three devices; one is removed: the copies it made for the others still reach each of
    them (not dropped), and a copy the remaining devices have all had goes (not kept)."""
    db = Database(store_target)
    assert db.add_user("alice", b"h", b"k" * 32, 0)
    alice = db.user("alice")
    assert alice is not None
    d1 = db.devices(alice.id)[0].id
    d2, d3 = db.add_device(alice.id, b"2" * 32, "laptop", 0), db.add_device(alice.id, b"3" * 32, "phone", 0)
    assert d2 is not None and d3 is not None
    from_d3 = db.store_offline(alice.id, "alice", b"a" * 16, b"sent on the phone", 1, not_for=d3)
    from_bob = db.store_offline(alice.id, "bob", b"b" * 16, b"to alice", 1)
    from_d1 = db.store_offline(alice.id, "alice", b"c" * 16, b"sent on the desk", 1, not_for=d1)
    assert db.ack_offline(alice.id, [from_d3, from_bob, from_d1], d2) == 0  # taken by the laptop
    assert db.remove_device(alice.id, d3)
    assert [e.id for e in db.pending_offline(alice.id, device_id=d1)] == [from_d3, from_bob]
    assert db.pending_offline(alice.id, device_id=d2) == []
    assert not db.conn.execute("SELECT 1 FROM offline WHERE id = ?", (from_d1,)).fetchone()  # all had it
    assert db.ack_offline(alice.id, [from_d3, from_bob], d1) == 2
    assert db.offline_count(alice.id) == 0


def test_server_db_is_private_to_its_user(tmp_path: Path) -> None:
    Database(tmp_path / "data" / "s.db").close()
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    for name in ("s.db", "s.db-wal", "s.db-shm"):
        path = tmp_path / "data" / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


def test_client_store_pins_keys_and_dedups(tmp_path: Path) -> None:
    store = ClientStore(tmp_path / "c.db")
    assert stat.S_IMODE((tmp_path / "c.db").stat().st_mode) == 0o600
    assert store.see_key("bob", b"1" * 32, 0) == "new"
    assert store.see_key("bob", b"1" * 32, 0) == "same"
    assert store.see_key("bob", b"2" * 32, 0) == "changed"
    contact = store.contact("bob")
    assert contact is not None and contact.identity_key == b"1" * 32 and contact.offered_key == b"2" * 32
    assert store.trust_offered_key("bob", 1)
    contact = store.contact("bob")
    assert contact is not None and contact.identity_key == b"2" * 32
    assert store.add_incoming(b"m" * 16, "bob", "hi", 1, 2)
    assert not store.add_incoming(b"m" * 16, "bob", "hi", 1, 3)
    store.queue_outgoing(b"o" * 16, "bob", "yo", b"env", 5, 5)
    assert [r.msg_id for r in store.outbox()] == [b"o" * 16]
    store.outbox_done(b"o" * 16, "stored")
    assert store.advance(b"o" * 16, "delivered") and not store.advance(b"o" * 16, "stored")  # never back
    assert store.outbox() == []
