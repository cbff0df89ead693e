"""The outbox and its route policy on a fake clock: which road, when again, nothing lost or repeated."""

from __future__ import annotations

import itertools

from p2pim.messaging.delivery import (
    INTERNET,
    IPMSG,
    LAN,
    MAX_DIRECT,
    RELAY_RTO,
    RELAY_TRIES,
    Delivery,
    Failed,
    Finished,
    Transmit,
    Via,
)


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


# -- the route policy as data -------------------------------------------------------------


def test_internet_first_try_goes_direct_when_a_path_is_up_retries_take_the_relay() -> None:
    d = Delivery(INTERNET)
    d.connection(True)
    d.presence("bob", True)
    d.path("bob", True)
    d.add(b"1", "bob", b"env", receipt=False)
    [first] = d.poll(0.0)
    assert isinstance(first, Transmit) and (first.via, first.suspect) == (Via.DIRECT, False)
    now, later = 0.0, []
    for _ in range(RELAY_TRIES):
        now = d.next_timer() or now
        later += [a for a in d.poll(now) if isinstance(a, Transmit)]
    # no receipt: the relay (which cannot lose it), asking for the path to be checked; then the store
    assert [(t.via, t.suspect) for t in later] == [(Via.RELAY, True), (Via.RELAY, True), (Via.STORE, False)]


def test_internet_without_a_path_big_envelopes_and_relay_only_items_take_the_relay() -> None:
    d = Delivery(INTERNET)
    d.connection(True)
    d.presence("bob", True)
    d.add(b"1", "bob", b"env", receipt=False)  # no direct path
    d.path("bob", True)
    d.add(b"2", "bob", b"x" * (MAX_DIRECT + 1), receipt=False)  # would fragment
    d.add(b"3", "bob", b"receipt", receipt=True, relay_only=True)  # answers a relayed message
    d.path("carol", True)
    d.add(b"4", "bob", b"env", receipt=False)
    vias = dict(sends(d.poll(0.0)))
    assert vias == {b"1": Via.DIRECT, b"2": Via.RELAY, b"3": Via.RELAY, b"4": Via.DIRECT}
    d.presence("bob", False)  # gone: its direct path with it
    assert "bob" not in d.direct


def test_lan_policy_waits_while_the_peer_is_away_and_retries_forever_while_it_is_here() -> None:
    d = Delivery(LAN, connected=True)
    d.add(b"1", "bob", b"env", receipt=False)
    assert d.poll(0.0) == [] and d.next_timer() is None  # bob is not here: nothing, no timer
    d.presence("bob", True)
    d.resend_now("bob")
    now, times = 0.0, []
    for _ in range(8):
        sent = sends(d.poll(now))
        if sent:
            assert sent == [(b"1", Via.LAN)]
            times.append(now)
        now = d.next_timer() or now
    assert [b - a for a, b in itertools.pairwise(times)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    d.presence("bob", False)
    assert d.poll(now + 100) == [] and d.next_timer() is None  # away: it waits, never stored
    d.presence("bob", True)
    d.resend_now("bob")  # back: at once
    assert sends(d.poll(now + 100)) == [(b"1", Via.LAN)]


def test_lan_receipt_goes_once_back_where_its_message_came_from() -> None:
    d = Delivery(LAN, connected=True)
    d.add(b"r", "bob", b"receipt", receipt=True, reply_to=("10.0.0.2", 5002))  # bob not announced yet
    actions = d.poll(0.0)
    [t] = [a for a in actions if isinstance(a, Transmit)]
    assert t.via is Via.LAN and t.item.reply_to == ("10.0.0.2", 5002)
    assert d.items == {}


def test_ipmsg_policy_one_in_flight_per_peer_oldest_first_and_waits_while_away() -> None:
    d = Delivery(IPMSG, connected=True)
    for msg_id, peer in ((b"1", "carol"), (b"2", "carol"), (b"3", "dave")):
        d.add(msg_id, peer, b"text " + msg_id, receipt=False)
    d.presence("carol", True)
    d.presence("dave", True)
    # one per peer: carol's oldest, and dave's
    assert sorted(t.item.msg_id for t in sends_of(d.poll(0.0))) == [b"1", b"3"]
    times = []
    now = 0.0
    while len(times) < 8:  # carol never answers: 1 s, 1, 1, 2, 4, 8, 8 ... and never gives up
        now = d.next_timer() or now
        sent = [t.item.msg_id for t in sends_of(d.poll(now)) if t.item.peer == "carol"]
        assert sent in ([], [b"1"])  # never b"2" while b"1" waits for its RECVMSG
        times += [now] * len(sent)
    assert [b - a for a, b in itertools.pairwise(times)] == [1.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    d.delivered([b"1", b"3"])
    assert [t.item.msg_id for t in sends_of(d.poll(now))] == [b"2"]  # now the next one
    d.presence("carol", False)
    assert sends_of(d.poll(now + 100)) == [] and b"2" in d.items  # away: kept, not failed
    d.rename("carol", "caroline")  # a new nickname at the same address
    d.presence("caroline", True)
    assert [(t.item.msg_id, t.item.peer) for t in sends_of(d.poll(now + 100))] == [(b"2", "caroline")]


def sends_of(actions: list[object]) -> list[Transmit]:
    return [a for a in actions if isinstance(a, Transmit)]
