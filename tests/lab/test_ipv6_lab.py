"""IPv6 behind stateful firewalls (global addresses, no NAT): p2pim punches over IPv6 and
prefers it, so even symmetric/symmetric (over IPv4) goes direct."""

from __future__ import annotations

from natlab.classify import run_nat, stun_server
from natlab.matrix import Routers, render, run_matrix
from natlab.profiles import NatProfile
from natlab.topology import standard
from tests.labutil import lab

pytestmark = lab


def test_p2pim_nat_reports_the_global_ipv6_address() -> None:
    with standard(None, [NatProfile("symmetric")], ipv6=True) as topo, stun_server(topo):
        (code, rep, _, err) = run_nat(topo, ["h1"])["h1"]
        expected = topo.nodes["h1"].ipv6
    assert code == 0 and rep is not None, err
    assert rep["ipv6"] == expected and expected.startswith("2001:db8:")
    assert rep["label"] == "symmetric"  # IPv4 is still behind its NAT


def test_every_pair_goes_direct_over_ipv6_even_symmetric_symmetric() -> None:
    pairs = [("symmetric", "symmetric"), ("port-restricted", "symmetric"), ("none", "port-restricted")]
    results = run_matrix(pairs, messages=40, routers=Routers(ipv6=True))
    assert all(not r.error and r.exactly_once for r in results), render(results)
    for r in results:
        assert r.direct, render([r]) + "\n" + "\n".join(r.path_log)
        assert r.addr_a.startswith("[2001:db8:") and r.addr_b.startswith("[2001:db8:"), r.path_log
