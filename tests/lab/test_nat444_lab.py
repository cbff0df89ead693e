"""NAT444: home NATs behind a carrier-grade NAT (100.64.0.0/10). `p2pim nat` names the
double NAT, and buddies go direct wherever the topology allows."""

from __future__ import annotations

import pytest

from natlab.classify import run_nat, stun_server
from natlab.matrix import NAT444, Result, nat444_scenario, render
from natlab.profiles import NatProfile
from natlab.topology import nat444
from tests.labutil import lab

pytestmark = lab


def test_p2pim_nat_reports_the_carrier_nat_and_the_double_nat() -> None:
    carrier = NatProfile("port-restricted", hairpin=True)
    homes = [NatProfile("port-restricted"), NatProfile("port-restricted")]
    with nat444(None, homes, carrier, same_carrier=False) as topo, stun_server(topo):
        results = run_nat(topo, ["h1", "h2"])
        home_lan = topo.nodes["nat1"].addresses[1]
        carrier_lan = topo.nodes["cgn"].addresses[1]
    (code1, behind_cgn, _, err1), (code2, plain, _, err2) = results["h1"], results["h2"]
    assert code1 == 0 and behind_cgn is not None, err1
    assert code2 == 0 and plain is not None, err2
    assert behind_cgn["route"] == [home_lan, carrier_lan]
    assert behind_cgn["nat_layers"] == 2 and behind_cgn["carrier_grade_nat"] is True
    assert behind_cgn["label"] == "port-restricted cone"  # EIM inside EIM: still a cone
    assert plain["nat_layers"] == 1 and plain["carrier_grade_nat"] is False


@pytest.fixture(scope="module")
def nat444_results() -> list[Result]:
    return [nat444_scenario(name, messages=60) for name in NAT444]


def test_nat444_pairs_deliver_exactly_once_and_go_direct_where_the_topology_allows(
    nat444_results: list[Result],
) -> None:
    assert all(not r.error for r in nat444_results), render(nat444_results)
    assert all(r.exactly_once for r in nat444_results), render(nat444_results)
    by_name = {r.a: r for r in nat444_results}
    for name in ("nat444/home", "nat444/same-carrier", "nat444/home-symmetric"):
        r = by_name[name]
        if name == "nat444/home-symmetric" and not r.direct:
            r = nat444_scenario(name, messages=60)  # the birthday dance: ~98% per round
        assert r.direct, render([r]) + "\n" + "\n".join(r.path_log)
    # Both behind one carrier, they meet on its public address (the carrier hairpins).
    same = by_name["nat444/same-carrier"]
    assert same.addr_a.split(":")[0] == same.addr_b.split(":")[0] == "203.0.113.101", same.path_log
