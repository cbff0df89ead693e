"""`p2pim nat` behind real kernel NATs (nftables in network namespaces)."""

from __future__ import annotations

import pytest

from natlab import netns
from natlab.classify import classify, render, run_nat, stun_server
from natlab.profiles import NatProfile
from natlab.topology import standard
from tests.labutil import lab

pytestmark = lab
NATS = ("full-cone", "restricted", "port-restricted", "symmetric")


def test_every_profile_gives_the_right_mapping_filtering_and_label() -> None:
    rows = classify([NatProfile(k) for k in ("none", *NATS)])
    assert all(r.ok for r in rows), render(rows)
    by_kind = {r.profile.kind: r.observed for r in rows}
    assert by_kind["symmetric"]["port_preserved"] is False
    assert by_kind["full-cone"]["mapped"].startswith("203.0.113.")


def test_hairpinning_is_detected_when_on() -> None:
    rows = classify([NatProfile(k, hairpin=True) for k in NATS])
    assert all(r.observed.get("hairpin") is True for r in rows), render(rows)
    assert all(r.ok for r in rows), render(rows)


def test_blocked_udp_gives_blocked_within_seconds() -> None:
    rows = classify([NatProfile("full-cone", block_udp=True), NatProfile("symmetric", block_udp=True)])
    assert all(r.ok for r in rows), render(rows)
    assert all(r.exit_code == 3 for r in rows)
    assert all(r.seconds < 6 for r in rows)


def test_ten_percent_loss_does_not_flip_verdicts() -> None:
    rows = classify([NatProfile(k, hairpin=True, loss=10) for k in NATS])
    assert all(r.ok for r in rows), render(rows)


def test_binding_lifetime_brackets_the_nat_timeout() -> None:
    timeout = 6
    profiles = [
        NatProfile("port-restricted", udp_timeout=timeout),
        NatProfile("full-cone", udp_timeout=timeout),
    ]
    with standard(None, profiles) as topo, stun_server(topo):
        results = run_nat(topo, ["h1", "h2"], ["--lifetime", "12"])
    for host, (code, rep, secs, err) in results.items():
        assert code == 0 and rep is not None, err
        life = rep["lifetime"]
        assert life["alive_for"] < timeout <= life["dead_after"], (host, life)
        assert life["keepalive"] < timeout
        assert secs < 20  # stopped at the first dead binding, not at 12 s + ...


def test_topology_is_removed_also_when_the_test_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"), standard(None, [NatProfile("symmetric")]) as topo:
        prefix = topo.prefix
        assert any(ns.startswith(prefix) for ns in netns.namespaces())
        raise RuntimeError("boom")
    assert not any(ns.startswith(prefix) for ns in netns.namespaces())
