"""The messaging core on a fake clock: one envelope in and out, for both worlds, exactly once."""

from __future__ import annotations

from pathlib import Path

from p2pim.identity import Identity
from p2pim.messaging.core import Keys, Messenger, Verdict
from p2pim.messaging.delivery import INTERNET, LAN, Transmit, Via
from p2pim.messaging.envelope import seal, text_body
from p2pim.messaging.events import Message, Outcome, Problem, Receipt
from p2pim.messaging.store import ClientStore

ALICE, BOB, EVE = Identity.generate(), Identity.generate(), Identity.generate()
KEYS = {"alice": ALICE.public_key, "bob": BOB.public_key}


def messenger(tmp: Path, name: str, identity: Identity, **kw: object) -> Messenger:
    store = ClientStore(tmp / f"{name}.db")
    keys = dict(KEYS)

    def lookup(peer: str, via: Via) -> Keys | None:
        return Keys(keys[peer]) if peer in keys else None

    m = Messenger(identity, store, lookup, name=name, clock_ms=lambda: 1_000, **kw)  # type: ignore[arg-type]
    m.connection(True)
    return m


def events(m: Messenger) -> list[object]:
    out = []
    while (e := m.next_event()) is not None:
        out.append(e)
    return out


def carry(src: Messenger, dst: Messenger, now: float, via: Via | None = None) -> list[Transmit]:
    """Hand everything ``src`` sends to ``dst`` (the road keeps it as it is)."""
    sent = src.datagrams_to_send(now)
    for t in sent:
        if t.via is not Via.STORE:
            dst.receive(t.item.envelope, via or t.via, now, sender=src.name)
    return sent


def test_a_text_is_shown_once_and_acknowledged_every_time(tmp_path: Path) -> None:
    a, b = messenger(tmp_path, "alice", ALICE), messenger(tmp_path, "bob", BOB)
    a.presence("bob", True)
    b.presence("alice", True)
    mid = a.send("bob", BOB.public_key, text_body("hi"), "hi", 0.0)
    env = a.datagrams_to_send(0.0)[0].item.envelope
    for _ in range(3):  # the relay, a retransmission, the offline store: one message
        assert b.receive(env, Via.RELAY, 0.1, sender="alice").verdict is Verdict.TAKEN
    assert [e for e in events(b) if isinstance(e, Message)] == [Message("alice", "hi", mid, 1_000, "relay")]
    assert b.counters["duplicates"] == 2
    receipts = b.datagrams_to_send(0.1)
    assert len(receipts) == 3 and all(t.item.receipt and t.via is Via.RELAY for t in receipts)
    for t in receipts:
        a.receive(t.item.envelope, Via.RELAY, 0.2, sender="bob")
    a.datagrams_to_send(0.2)
    got = events(a)
    assert Receipt("bob", "delivered", (mid,)) in got and Outcome("bob", mid, "delivered") in got
    assert len([e for e in got if isinstance(e, Outcome)]) == 1
    assert a.pending() == 0 and a.store.message(mid).state == "delivered"  # type: ignore[union-attr]


def test_a_direct_message_is_answered_directly_a_relayed_one_by_relay(tmp_path: Path) -> None:
    a, b = messenger(tmp_path, "alice", ALICE), messenger(tmp_path, "bob", BOB)
    b.presence("alice", True)
    b.path("alice", True)
    a.presence("bob", True)
    a.path("bob", True)
    a.send("bob", BOB.public_key, text_body("one"), "one", 0.0)
    [t] = carry(a, b, 0.0)
    assert t.via is Via.DIRECT
    assert [r.via for r in b.datagrams_to_send(0.0)] == [Via.DIRECT]
    a.send("bob", BOB.public_key, text_body("two"), "two", 0.0)
    carry(a, b, 0.0, via=Via.RELAY)  # it came by the relay (e.g. from alice's one-shot `send`)
    assert [r.via for r in b.datagrams_to_send(0.0)] == [Via.RELAY]


def test_forged_garbage_and_strangers_are_dropped_counted_and_shown_once(tmp_path: Path) -> None:
    b = messenger(tmp_path, "bob", BOB)
    as_alice = seal(EVE, "alice", "bob", BOB.public_key, text_body("I am alice")).SerializeToString()
    stranger = seal(EVE, "eve", "bob", BOB.public_key, text_body("hello")).SerializeToString()
    verdicts = [
        b.receive(as_alice, Via.RELAY, 1.0, sender="alice").verdict,  # fails authentication
        b.receive(as_alice, Via.RELAY, 1.0, sender="mallory").verdict,  # the road says otherwise
        b.receive(b"\x00garbage", Via.RELAY, 1.0, sender="alice").verdict,
        b.receive(stranger, Via.RELAY, 1.0, sender="eve").verdict,  # no key for eve
    ]
    assert verdicts == [Verdict.DROPPED] * 4
    assert b.counters["bad_envelopes"] == 3 and b.counters["unknown_sender"] == 1
    for i in range(50):  # a flood from one sender is one warning per 30 s, then a summary
        b.receive(b"\x00garbage", Via.RELAY, 2.0 + i * 0.1, sender="alice")
    b.receive(b"\x00garbage", Via.RELAY, 40.0, sender="alice")
    problems = [e for e in events(b) if isinstance(e, Problem)]
    alice_problems = [p for p in problems if p.message.startswith("dropped a message from alice:")]
    assert len(alice_problems) == 2 and "more like it" in alice_problems[1].message
    # the relay says mallory sent the one claiming to be alice: mallory's problem, not alice's
    assert len([p for p in problems if "came from 'mallory'" in p.message]) == 1
    assert not [e for e in events(b) if isinstance(e, Message)]


def test_a_session_without_an_inbox_leaves_texts_for_one_that_shows_them(tmp_path: Path) -> None:
    a, b = messenger(tmp_path, "alice", ALICE), messenger(tmp_path, "bob", BOB, inbox=False)
    a.presence("bob", True)
    a.send("bob", BOB.public_key, text_body("later"), "later", 0.0)
    env = a.datagrams_to_send(0.0)[0].item.envelope
    assert b.receive(env, Via.STORE, 0.0, sender="alice").verdict is Verdict.KEPT
    assert events(b) == [] and b.datagrams_to_send(0.0) == []  # not shown, not acknowledged


def test_a_message_sealed_with_an_untrusted_new_key_is_kept_not_dropped(tmp_path: Path) -> None:
    new_alice = Identity.generate()
    store = ClientStore(tmp_path / "bob.db")
    b = Messenger(BOB, store, lambda p, v: Keys(ALICE.public_key, offered=new_alice.public_key), name="bob")

    env = seal(new_alice, "alice", "bob", BOB.public_key, text_body("new phone")).SerializeToString()
    assert b.receive(env, Via.STORE, 0.0, sender="alice").verdict is Verdict.KEPT
    [problem] = events(b)
    assert isinstance(problem, Problem) and "p2pim buddy trust alice" in problem.message


def test_the_outbox_survives_a_restart_and_each_owner_takes_only_its_own(tmp_path: Path) -> None:
    a = messenger(tmp_path, "alice", ALICE)
    internet = a.send("bob", BOB.public_key, text_body("by server"), "by server", 0.0)
    lan = Messenger(
        ALICE, a.store, lambda p, v: Keys(BOB.public_key), name="alice", policy=LAN, prefix="lan:"
    )
    on_lan = lan.send("bob", BOB.public_key, text_body("on the LAN"), "on the LAN", 0.0)
    again = Messenger(ALICE, a.store, lambda p, v: None, name="alice", policy=INTERNET)
    lan_again = Messenger(ALICE, a.store, lambda p, v: None, name="alice", policy=LAN, prefix="lan:")
    assert set(again.delivery.items) == {internet}
    assert set(lan_again.delivery.items) == {on_lan}


def test_a_stranger_cycling_names_on_the_direct_path_is_one_warning_not_one_per_name(tmp_path: Path) -> None:
    b = messenger(tmp_path, "bob", BOB)
    for i in range(100):  # anyone can reach our UDP socket and write any sender name
        env = seal(EVE, f"name{i}", "bob", BOB.public_key, text_body("hi")).SerializeToString()
        assert b.receive(env, Via.DIRECT, 1.0 + i * 0.01).verdict is Verdict.DROPPED
    problems = [e for e in events(b) if isinstance(e, Problem)]
    assert len(problems) == 1 and b.counters["unknown_sender"] == 100
