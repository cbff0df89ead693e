"""Port mapping against Debian's miniupnpd on natlab routers: `p2pim nat` reports what the
router offers, and symmetric/symmetric goes direct when one router maps a port."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from natlab.classify import run_nat, stun_server
from natlab.matrix import Result, Routers, render, run_scenario
from natlab.profiles import NatProfile
from natlab.topology import Topology, standard
from tests.labutil import lab

pytestmark = [*lab, pytest.mark.skipif("not __import__('shutil').which('miniupnpd')", reason="no miniupnpd")]


ROOT = Path(__file__).resolve().parents[2]
# Our NAT-PMP alone against miniupnpd (it answers PCP first, so the client never falls back
# to NAT-PMP there): the address request, the mapping, and its release.
NATPMP = """
import asyncio, json, socket, sys
sys.path.insert(0, sys.argv[1])
from p2pim.driver import Driver
from p2pim.nat.portmap import PORT, PortMapper

async def main():
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((sys.argv[2], PORT))
    mapper = PortMapper(sys.argv[2], (sock.getsockname()[0], 40123), loop.time(), "pm",
                        lifetime=120, upnp=False, protocols=("NAT-PMP",))
    driver = Driver(mapper)
    driver.attach("pm", sock)
    await asyncio.wait_for(driver.run(lambda: mapper.done), 10)
    m = mapper.mapping
    print(json.dumps({"protocol": m.protocol, "external": list(m.external)} if m else None), flush=True)
    for dg in mapper.release(loop.time()):
        sock.send(dg.data)
    await asyncio.sleep(0.3)

asyncio.run(main())
"""


def _mappings(topo: Topology, router: str) -> str:
    """miniupnpd's DNAT rules on ``router`` (one per mapping it holds)."""
    proc = topo.run(router, ["nft", "list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd"])
    assert proc.returncode == 0, proc.stderr
    return "\n".join(line for line in proc.stdout.splitlines() if "dnat" in line)


def test_p2pim_nat_reports_pcp_upnp_or_none_and_gives_the_mapping_back() -> None:
    profiles = [
        NatProfile("symmetric", portmap="all"),
        NatProfile("port-restricted", portmap="upnp"),
        NatProfile("port-restricted"),
    ]
    with standard(None, profiles) as topo, stun_server(topo):
        results = run_nat(topo, ["h1", "h2", "h3"])
        left = {r: _mappings(topo, r) for r in ("nat1", "nat2")}
    reports = {h: rep for h, (code, rep, _secs, err) in results.items()}
    for h, (code, rep, _secs, err) in results.items():
        assert code == 0 and rep is not None, (h, err)
    assert reports["h1"]["port_mapping"]["protocol"] == "PCP"
    assert reports["h1"]["port_mapping"]["external"].startswith("11.0.113.101:")
    assert reports["h1"]["port_mapping_tried"] == ["PCP"]
    assert reports["h2"]["port_mapping"]["protocol"] == "UPnP"
    assert reports["h2"]["port_mapping_tried"] == ["PCP", "NAT-PMP", "UPnP"]
    assert reports["h3"]["port_mapping"] is None
    assert reports["h3"]["port_mapping_tried"] == ["PCP", "NAT-PMP", "UPnP"]
    assert left == {"nat1": "", "nat2": ""}, left  # given back


@pytest.mark.parametrize("kind", ["all", "upnp"])
def test_symmetric_symmetric_goes_direct_when_one_router_maps_and_the_mapping_is_released(kind: str) -> None:
    held: dict[str, str] = {}

    def during(topo: Topology, i: int) -> None:
        if i == 30:
            held["mid"] = _mappings(topo, "nat2")

    def after(topo: Topology, result: Result) -> None:
        held["end"] = _mappings(topo, "nat2")

    routers = Routers(hop=True, portmap="b", portmap_kind=kind)
    r = run_scenario("symmetric", "symmetric", messages=40, routers=routers, during=during, after=after)
    assert not r.error, r.error
    assert r.exactly_once, render([r])
    assert r.direct, render([r]) + "\n" + "\n".join(r.path_log)
    assert r.addr_a.startswith("11.0.113.102:"), r.path_log  # alice reaches bob on his mapped port
    assert held["mid"].count("dnat") == 1, held  # bob's client held one mapping ...
    assert held["end"] == "", held  # ... and gave it back when it ended


def test_nat_pmp_alone_maps_and_releases_against_miniupnpd() -> None:
    with standard(None, [NatProfile("symmetric", portmap="all")]) as topo:
        gateway = topo.nodes["nat1"].addresses[1]
        proc = topo.run("h1", [sys.executable, "-c", NATPMP, str(ROOT), gateway], timeout=30)
        left = _mappings(topo, "nat1")
    assert proc.returncode == 0, proc.stderr
    mapping = json.loads(proc.stdout.splitlines()[0])
    assert mapping is not None and mapping["protocol"] == "NAT-PMP"
    assert mapping["external"][0] == topo.nodes["nat1"].ip
    assert left == "", left  # lifetime 0 took it away
