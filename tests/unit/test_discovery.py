"""NAT discovery and lifetime cores against the real server core through a
simulated RFC 4787 NAT, on a fake clock (see natsim.py)."""

from __future__ import annotations

import pytest

from p2pim.nat.classify import Behaviour, Label
from p2pim.nat.discovery import NatDiscovery, Timings
from p2pim.nat.lifetime import LifetimeMeasurement
from rendezvous.stun_server import StunServerCore

from .natsim import SimNat, World

SERVER = ("198.51.100.1", 3478)


def server(alt: bool = True) -> StunServerCore:
    return StunServerCore(SERVER[0], SERVER[1], "198.51.100.2" if alt else None, 3479, rate=1e6, burst=1e6)


def discover(world: World, timings: Timings = Timings()):  # type: ignore[no-untyped-def]
    core = NatDiscovery(SERVER, world.open(NatDiscovery.sockets), 0.0, timings)
    world.run(core)
    return core.report()


CASES = [
    ("eim", "eif", True, Label.FULL_CONE),
    ("eim", "adf", True, Label.RESTRICTED_CONE),
    ("eim", "apdf", True, Label.PORT_RESTRICTED_CONE),
    ("apdm", "apdf", False, Label.SYMMETRIC),
    ("adm", "adf", False, Label.SYMMETRIC),
]
B = {"eim": "endpoint-independent", "adm": "address-dependent", "apdm": "address-and-port-dependent"}
F = {"eif": "endpoint-independent", "adf": "address-dependent", "apdf": "address-and-port-dependent"}


@pytest.mark.parametrize(("mapping", "filtering", "preserve", "label"), CASES)
@pytest.mark.parametrize("hairpin", [False, True])
@pytest.mark.parametrize("loss", [0.0, 0.1])
def test_every_nat_type_is_classified(mapping, filtering, preserve, label, hairpin, loss) -> None:  # type: ignore[no-untyped-def]
    nat = SimNat(mapping, filtering, hairpin=hairpin, preserve_ports=preserve)
    rep = discover(World(server(), nat, loss=loss, seed=7))
    assert rep.label is label
    assert rep.mapping.value == B[mapping]
    assert rep.filtering.value == F[filtering]
    assert rep.nat_present is True
    assert rep.port_preserved is preserve
    assert rep.hairpin is hairpin
    assert rep.server_kind == "rfc5780"


def test_no_nat_is_open_internet_and_fast() -> None:
    rep = discover(World(server(), None))
    assert rep.label is Label.OPEN_INTERNET
    assert rep.nat_present is False and rep.hairpin is None and rep.port_preserved is None
    # Every test answered: done in about two round trips, no negative waits.
    assert rep.elapsed_s < 0.1
    assert rep.rtt_ms == pytest.approx(20.0)


def test_negative_verdicts_wait_a_bounded_rtt_multiple() -> None:
    rep = discover(World(server(), SimNat("eim", "apdf")))
    t = Timings()
    assert rep.elapsed_s <= 0.02 + t.negative_wait(0.02) + 0.05


def test_no_server_is_blocked_within_give_up() -> None:
    rep = discover(World(None, SimNat()), Timings(give_up=2.0))
    assert rep.label is Label.BLOCKED and not rep.responded
    assert rep.elapsed_s == pytest.approx(2.0)
    assert any("no answer" in n for n in rep.notes)


def test_single_address_server_gives_unknown_not_a_guess() -> None:
    rep = discover(World(server(alt=False), SimNat("eim", "apdf")))
    assert rep.server_kind == "single-address"
    assert rep.mapping is Behaviour.UNKNOWN and rep.filtering is Behaviour.UNKNOWN
    assert rep.label is Label.UNKNOWN
    assert rep.mapped is not None and rep.nat_present
    assert any("no alternate address" in n for n in rep.notes)


def test_server_ignoring_change_request_is_detected() -> None:
    rep = discover(World(server(), None, wrong_source=True))
    assert rep.filtering is Behaviour.UNKNOWN
    assert any("does not honour CHANGE-REQUEST" in n for n in rep.notes)


def test_garbage_is_counted_and_ignored() -> None:
    world = World(server(), None)
    core = NatDiscovery(SERVER, world.open(NatDiscovery.sockets), 0.0)
    core.receive_datagram("map", b"\xff" * 30, ("192.0.2.1", 1), 0.0)
    core.receive_datagram("map", b"\x01\x01\x00\x00" + b"\x21\x12\xa4\x42" + b"x" * 12, ("192.0.2.1", 1), 0.0)
    world.run(core)
    rep = core.report()
    assert rep.label is Label.OPEN_INTERNET
    assert rep.ignored_datagrams == 2


@pytest.mark.parametrize("timeout", [8.0, 25.0, 70.0])
def test_lifetime_brackets_the_binding_timeout(timeout: float) -> None:
    world = World(server(), SimNat("eim", "apdf", timeout=timeout))
    life = LifetimeMeasurement(SERVER, 0.0, max_idle=120.0)
    world.open(life.sockets)
    end = world.run(life)
    res = life.result()
    assert res.alive_for is not None and res.dead_after is not None
    assert res.alive_for < timeout <= res.dead_after
    assert res.keepalive < timeout
    # Longer idle times were cancelled as soon as one binding was found dead.
    assert end < res.dead_after + 5


def test_lifetime_longer_than_tested() -> None:
    world = World(server(), SimNat("eim", "eif", timeout=1000.0))
    life = LifetimeMeasurement(SERVER, 0.0, max_idle=30.0)
    world.open(life.sockets)
    world.run(life)
    res = life.result()
    assert res.alive_for == 30.0 and res.dead_after is None and res.keepalive == 24.0
