"""Direct paths through real kernel NATs: the matrix, blocked UDP, loss, NAT state flushed.

Each scenario runs the real `rendezvous serve` and two `p2pim chat` processes in
fresh namespaces (natlab.matrix), so these take a while: the matrix about 4 minutes.
"""

from __future__ import annotations

import pytest

from natlab.matrix import SAME_LAN, Result, profile, render, run_matrix, run_scenario
from natlab.topology import Topology
from tests.labutil import lab

pytestmark = lab
BIRTHDAY_RETRIES = 2  # symmetric + port-restricted relies on the birthday paradox: ~98% per round


@pytest.fixture(scope="module")
def matrix() -> list[Result]:
    return run_matrix()


def test_all_sixteen_scenarios_deliver_every_message_exactly_once(matrix: list[Result]) -> None:
    assert len(matrix) == 16
    assert all(not r.error for r in matrix), render(matrix)
    assert all(r.exactly_once for r in matrix), render(matrix)


def test_every_pair_but_symmetric_symmetric_goes_direct(matrix: list[Result]) -> None:
    for r in matrix:
        if {r.a, r.b} == {"symmetric"}:
            assert not r.direct and r.path_a == r.path_b == "relay", render([r])
            continue
        if {r.a, r.b} == {"symmetric", "port-restricted"} and not r.direct:
            # Birthday probing can miss (bounded at 256 x 1024 packets); retry a bounded number of times.
            for _ in range(BIRTHDAY_RETRIES):
                r = run_scenario("symmetric", "port-restricted")
                if r.direct:
                    break
        assert r.direct, render([r])
        assert r.first_message_s is not None and r.first_message_s < 1.0, render([r])  # relay first, no wait
    same = next(r for r in matrix if r.a == SAME_LAN)
    assert same.direct and same.addr_a.startswith("10.0.") and same.addr_b.startswith("10.0."), render([same])


def test_blocked_udp_on_one_side_uses_the_relay_and_loses_nothing() -> None:
    r = run_scenario(profile("port-restricted", block_udp=True), profile("full-cone"), messages=50)
    assert not r.error, r.error
    assert r.path_a == r.path_b == "relay", render([r])
    assert r.exactly_once, render([r])
    assert r.sent_direct == 0


def test_ten_percent_loss_on_both_nats_still_exactly_once() -> None:
    r = run_scenario(profile("port-restricted", loss=10), profile("full-cone", loss=10), messages=100)
    assert not r.error, r.error
    assert r.exactly_once, render([r])


def test_nat_reboot_mid_chat_recovers_the_path_and_loses_nothing() -> None:
    """Every conntrack entry gone: alice's TCP connection dies too, she reconnects and punches again."""

    def flush(topo: Topology, i: int) -> None:
        if i == 20:
            topo.flush_conntrack("nat1")  # alice's symmetric NAT: her next packets get new ports

    r = run_scenario(profile("symmetric"), profile("full-cone"), messages=150, during=flush)
    assert not r.error, r.error
    assert r.exactly_once, render([r])
    assert r.direct, f"path did not recover: {render([r])}\n" + "\n".join(r.path_log)
    assert r.addr_b != "", r.path_log


def test_udp_bindings_expired_mid_chat_heartbeats_fall_back_and_punch_again() -> None:
    """Only the UDP bindings go (a binding timeout): the control connection survives, so the
    dead direct path must be noticed by missed heartbeats, and the path punched again."""

    def expire(topo: Topology, i: int) -> None:
        if i == 20:
            topo.flush_conntrack("nat1", udp_only=True)

    r = run_scenario(profile("symmetric"), profile("full-cone"), messages=150, during=expire)
    log = "\n".join(r.path_log)
    assert not r.error, r.error
    assert r.exactly_once, render([r])
    assert r.fallbacks >= 1 and "heartbeats missed" in log, log
    assert r.direct, f"path did not recover: {render([r])}\n{log}"
