"""Routers without an input firewall (plain masquerade), with a core router between the NATs.

First the ground truth natlab builds (an unsolicited packet is answered with ICMP and moves
the host's later mapping; the TTL ladder sees the NAT and the hop), then p2pim going direct
through such routers on every pair that is not symmetric on both sides.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from natlab.matrix import OPEN, Result, render, run_matrix, run_scenario
from natlab.profiles import NatProfile
from natlab.topology import Topology, standard
from tests.labutil import lab

pytestmark = lab
ROOT = Path(__file__).resolve().parents[2]
PEER_PORT = 40000
HOST_PORT = 41000

# One side sends to the other's mapped port before that host has sent anything: the
# router answers ICMP port unreachable (a connected socket sees ECONNREFUSED), and the
# host's own packet to that peer afterwards leaves from another port.
UNSOLICITED = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2]))); s.connect((sys.argv[1], int(sys.argv[3]))); s.settimeout(1.0)
s.send(b"early")
try:
    s.recv(100); print("data")
except ConnectionRefusedError:
    print("icmp")
except TimeoutError:
    print("silence")
"""
LISTEN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.settimeout(5.0)
print("ready", flush=True)
print(s.recvfrom(100)[1][1], flush=True)
"""
SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2]))); s.sendto(b"late", (sys.argv[1], int(sys.argv[3])))
"""
LADDER = """
import asyncio, json, socket, sys
from p2pim.driver import Driver
from p2pim.nat.hops import HopLadder

async def main():
    loop = asyncio.get_running_loop()
    ladder = HopLadder((sys.argv[1], 3478), loop.time(), frozenset({sys.argv[2]}), "main")
    driver = Driver(ladder)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    driver.attach("main", sock, icmp_errors=True)
    await asyncio.wait_for(driver.run(lambda: ladder.done), 10)
    print(json.dumps({"hops": ladder.hops, "open_ttl": ladder.open_ttl, "inside": ladder.inside}))

asyncio.run(main())
"""


def _py(topo: Topology, node: str, code: str, *args: str) -> str:
    proc = topo.run(node, [sys.executable, "-c", code, *args], timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("firewall", [False, True], ids=["no-input-firewall", "input-firewall"])
def test_an_early_packet_is_answered_and_moves_the_hosts_mapping_only_without_a_firewall(
    firewall: bool,
) -> None:
    with standard(None, [NatProfile("port-restricted", input_firewall=firewall)], hop=True) as topo:
        wan = topo.nodes["nat1"].ip
        answer = _py(topo, "rdv", UNSOLICITED, wan, str(PEER_PORT), str(HOST_PORT))
        listener = topo.popen("rdv", [sys.executable, "-c", LISTEN, str(PEER_PORT)], stdout=-1, stderr=-1)
        try:
            assert listener.stdout is not None
            assert listener.stdout.readline().strip() == "ready"  # bound: now the host may send
            _py(topo, "h1", SEND, topo.nodes["rdv"].ip, str(HOST_PORT), str(PEER_PORT))
            out, _ = listener.communicate(timeout=10)
        finally:
            if listener.poll() is None:
                listener.kill()
        seen_port = int(out.strip())
    if firewall:
        assert answer == "silence"
        assert seen_port == HOST_PORT  # port-preserving, nothing in the way
    else:
        assert answer == "icmp"
        assert seen_port != HOST_PORT  # SNAT found the tuple taken by the early packet's entry


@pytest.mark.parametrize("hop", [True, False], ids=["hop", "no-hop"])
def test_the_ttl_ladder_finds_the_nat_and_the_first_public_router(hop: bool) -> None:
    with standard(None, [NatProfile("port-restricted", input_firewall=False)], hop=hop) as topo:
        rdv, wan = topo.nodes["rdv"].ip, topo.nodes["nat1"].ip
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + LADDER
        result = json.loads(_py(topo, "h1", code, rdv, wan))
    assert result["inside"] == ["10.0.1.1"]
    assert result["open_ttl"] == 2
    # With the hop, the router at TTL 2 answers; without, the server's host is 2 hops away
    # (no STUN server runs here: its port unreachable says the ladder got there).
    assert result["hops"] == ["10.0.1.1", "203.0.113.1" if hop else rdv]


OPEN_PAIRS = [
    ("restricted", "port-restricted"),
    ("port-restricted", "port-restricted"),
    ("port-restricted", "symmetric"),
    ("full-cone", "symmetric"),
    ("symmetric", "symmetric"),
]


@pytest.fixture(scope="module")
def open_matrix() -> list[Result]:
    return run_matrix(OPEN_PAIRS, messages=60, routers=OPEN)


def test_without_input_firewalls_every_pair_but_symmetric_symmetric_goes_direct(
    open_matrix: list[Result],
) -> None:
    assert all(not r.error for r in open_matrix), render(open_matrix)
    assert all(r.exactly_once for r in open_matrix), render(open_matrix)
    for r in open_matrix:
        if {r.a, r.b} == {"symmetric"}:
            assert r.path_a == r.path_b == "relay", render([r])
            continue
        if {r.a, r.b} == {"symmetric", "port-restricted"} and not r.direct:
            r = run_scenario("port-restricted", "symmetric", messages=60, routers=OPEN)  # birthday: ~98%
        assert r.direct, render([r]) + "\n" + "\n".join(r.path_log)
        assert r.fallbacks == 0, "\n".join(r.path_log)
