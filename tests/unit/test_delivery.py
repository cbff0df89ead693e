"""The delivery core on a fake clock: relay first, store as fallback, nothing lost or repeated."""

from __future__ import annotations

from p2pim.messaging.delivery import RELAY_RTO, RELAY_TRIES, Delivery, Failed, Finished, Transmit, Via


def sends(actions: list[object]) -> list[tuple[bytes, Via]]:
    return [(a.item.msg_id, a.via) for a in actions if isinstance(a, Transmit)]


def test_nothing_leaves_while_disconnected_then_everything_does() -> None:
    d = Delivery()
    d.add(b"1", "bob", b"env1", receipt=False)
    d.add(b"2", "bob", b"env2", receipt=False)
    assert d.poll(0.0) == []
    d.connection(True)
    assert sends(d.poll(0.0)) == [(b"1", Via.STORE), (b"2", Via.STORE)]  # bob offline: store
    assert d.poll(0.1) == []  # in flight: not sent twice
    d.stored(b"1")
    d.stored(b"2")
    done = d.poll(0.2)
    assert [(a.item.msg_id, a.state) for a in done if isinstance(a, Finished)] == [
        (b"1", "stored"),
        (b"2", "stored"),
    ]
    assert d.items == {}


def test_relay_to_online_peer_until_receipt() -> None:
    d = Delivery()
    d.connection(True)
    d.presence("bob", True)
    d.add(b"1", "bob", b"env", receipt=False)
    assert sends(d.poll(0.0)) == [(b"1", Via.RELAY)]
    assert d.next_timer() == RELAY_RTO
    assert d.poll(RELAY_RTO / 2) == []
    d.delivered([b"1"])
    [fin] = d.poll(0.6)
    assert isinstance(fin, Finished) and fin.state == "delivered"
    assert d.next_timer() is None


def test_unanswered_relay_retransmits_then_falls_back_to_store() -> None:
    d = Delivery()
    d.connection(True)
    d.presence("bob", True)
    d.add(b"1", "bob", b"env", receipt=False)
    now, vias = 0.0, []
    for _ in range(RELAY_TRIES + 1):
        vias += [v for _, v in sends(d.poll(now))]
        timer = d.next_timer()
        now = timer if timer is not None else now + 1
    assert vias == [Via.RELAY] * RELAY_TRIES + [Via.STORE]


def test_peer_going_offline_or_refusal_moves_to_store() -> None:
    d = Delivery()
    d.connection(True)
    d.presence("bob", True)
    d.add(b"1", "bob", b"env", receipt=False)
    d.add(b"2", "bob", b"env", receipt=False)
    d.poll(0.0)
    d.presence("bob", False)
    assert sends(d.poll(0.1)) == [(b"1", Via.STORE), (b"2", Via.STORE)]
    d2 = Delivery()
    d2.connection(True)
    d2.presence("carol", True)
    d2.add(b"3", "carol", b"env", receipt=False)
    d2.poll(0.0)
    d2.refused(b"3", peer_offline=True, reason="carol is offline")
    assert sends(d2.poll(0.1)) == [(b"3", Via.STORE)]


def test_refusal_other_than_offline_fails_the_item() -> None:
    d = Delivery()
    d.connection(True)
    d.add(b"1", "mallory", b"env", receipt=False)
    d.poll(0.0)
    d.refused(b"1", peer_offline=False, reason="mallory is not your buddy")
    [failed] = d.poll(0.1)
    assert isinstance(failed, Failed) and failed.reason == "mallory is not your buddy"
    assert d.items == {}


def test_lost_connection_resends_in_flight_items_after_reconnect() -> None:
    d = Delivery()
    d.connection(True)
    d.add(b"1", "bob", b"env", receipt=False)
    assert sends(d.poll(0.0)) == [(b"1", Via.STORE)]
    d.connection(False)  # the store answer never came
    assert d.poll(1.0) == []
    d.connection(True)
    assert sends(d.poll(2.0)) == [(b"1", Via.STORE)]


def test_receipts_are_sent_once_over_the_relay_or_stored() -> None:
    d = Delivery()
    d.connection(True)
    d.presence("bob", True)
    d.add(b"r1", "bob", b"receipt", receipt=True)
    actions = d.poll(0.0)
    assert sends(actions) == [(b"r1", Via.RELAY)]
    assert any(isinstance(a, Finished) and a.state == "relayed" for a in actions)
    assert d.items == {} and d.next_timer() is None
    d.presence("bob", False)
    d.add(b"r2", "bob", b"receipt", receipt=True)
    assert sends(d.poll(0.1)) == [(b"r2", Via.STORE)]


def test_a_receipt_for_an_unknown_id_changes_nothing() -> None:
    d = Delivery()
    d.connection(True)
    d.delivered([b"nope"])
    d.stored(b"nope")
    d.refused(b"nope", peer_offline=False, reason="x")
    assert d.poll(0.0) == []


def test_a_server_shedding_load_delays_a_message_and_never_fails_it() -> None:
    d = Delivery()
    d.connection(True)
    d.add(b"1", "bob", b"env", receipt=False)
    assert sends(d.poll(0.0)) == [(b"1", Via.STORE)]
    d.refused(b"1", peer_offline=False, reason="too many requests", retry_in=0.5, now=0.0)
    assert d.poll(0.1) == []  # not failed, not sent again yet
    assert d.next_timer() == 0.5
    assert sends(d.poll(0.5)) == [(b"1", Via.STORE)]
    d.stored(b"1")
    [fin] = d.poll(0.6)
    assert isinstance(fin, Finished) and fin.state == "stored"
