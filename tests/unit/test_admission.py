"""Connection admission: caps per address, per address before login, in all, and a rate."""

from __future__ import annotations

from rendezvous.admission import REFUSALS_IN_FLIGHT, Admission, Verdict


def test_caps_per_address_waiting_to_log_in_and_in_all() -> None:
    a = Admission(max_total=10, max_per_ip=6, max_pending_per_ip=3, connect_rate=1000, connect_burst=1000)
    assert [a.open("1.1.1.1", 0.0)[0] for _ in range(3)] == [Verdict.ACCEPT] * 3
    verdict, reason = a.open("1.1.1.1", 0.0)
    assert verdict is Verdict.REFUSE and "waiting to log in (at most 3)" in reason
    a.close("1.1.1.1", Verdict.REFUSE, logged_in=False)
    for _ in range(3):  # logging in frees the waiting slots, not the address's
        a.logged_in("1.1.1.1")
    assert [a.open("1.1.1.1", 0.0)[0] for _ in range(3)] == [Verdict.ACCEPT] * 3
    verdict, reason = a.open("1.1.1.1", 0.0)
    assert verdict is Verdict.REFUSE and "at most 6" in reason
    a.close("1.1.1.1", Verdict.REFUSE, logged_in=False)
    assert [a.open(f"2.2.2.{i}", 0.0)[0] for i in range(4)] == [Verdict.ACCEPT] * 4  # 10 in all now
    verdict, reason = a.open("3.3.3.3", 0.0)
    assert verdict is Verdict.REFUSE and "server is full" in reason


def test_closing_returns_every_count_to_zero() -> None:
    a = Admission(max_total=100, max_per_ip=100, max_pending_per_ip=100)
    opened = [a.open("1.1.1.1", 0.0)[0] for _ in range(5)]
    a.logged_in("1.1.1.1")
    a.close("1.1.1.1", opened[0], logged_in=True)
    for v in opened[1:]:
        a.close("1.1.1.1", v, logged_in=False)
    assert (a.total, a.per_ip, a.pending, a.refusing) == (0, {}, {}, 0)


def test_new_connections_per_address_are_rate_limited() -> None:
    a = Admission(max_total=1000, max_per_ip=1000, max_pending_per_ip=1000, connect_rate=10, connect_burst=5)
    verdicts = [a.open("1.1.1.1", 0.0)[0] for _ in range(6)]
    assert verdicts == [Verdict.ACCEPT] * 5 + [Verdict.REFUSE]
    assert "slow down" in a.open("1.1.1.1", 0.0)[1]
    assert a.open("9.9.9.9", 0.0)[0] is Verdict.ACCEPT  # another address is not affected
    assert a.open("1.1.1.1", 0.2)[0] is Verdict.ACCEPT  # tokens come back with time


def test_beyond_a_few_polite_refusals_a_flood_is_dropped() -> None:
    a = Admission(max_total=1, max_per_ip=1, max_pending_per_ip=1)
    assert a.open("1.1.1.1", 0.0)[0] is Verdict.ACCEPT
    verdicts = [a.open(f"2.2.{i // 250}.{i % 250}", 0.0)[0] for i in range(REFUSALS_IN_FLIGHT + 10)]
    assert verdicts.count(Verdict.REFUSE) == REFUSALS_IN_FLIGHT
    assert verdicts[-10:] == [Verdict.DROP] * 10
