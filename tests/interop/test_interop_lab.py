"""Other people's STUN software, behind real kernel NATs.

* pystun3 (an RFC 3489 client) against our server reports the matching type.
* `p2pim nat` against vovida's stund (Debian's stun-server, an RFC 3489 server)
  classifies every profile: `--server` is not tied to our own server.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from natlab.classify import STUN_IP, STUN_PORT, run_nat, stun_server, tool
from natlab.profiles import NatProfile
from natlab.topology import standard
from tests.labutil import lab

pytestmark = lab
NATS = ("full-cone", "restricted", "port-restricted", "symmetric")
PYSTUN3_NAMES = {
    "full-cone": "Full Cone",
    "restricted": "Restric NAT",
    "port-restricted": "Restric Port NAT",
    "symmetric": "Symmetric NAT",
}


def test_pystun3_against_our_server_reports_the_nat_type() -> None:
    with standard(None, [NatProfile(k) for k in NATS]) as topo, stun_server(topo):
        procs = {}
        for i, kind in enumerate(NATS, 1):
            argv = [tool("pystun3"), "-H", STUN_IP, "-P", str(STUN_PORT), "-p", str(50000 + i)]
            procs[kind] = topo.popen(f"h{i}", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        outputs = {kind: p.communicate(timeout=120)[0] for kind, p in procs.items()}
    for kind, out in outputs.items():
        assert f"NAT Type: {PYSTUN3_NAMES[kind]}\n" in out, (kind, out)


@pytest.mark.skipif(shutil.which("stund") is None, reason="stund not installed (apt-get install stun-server)")
def test_p2pim_nat_against_rfc3489_stund() -> None:
    profiles = [NatProfile(k, hairpin=(k == "full-cone")) for k in NATS]
    with standard(None, profiles) as topo:
        rdv = topo.nodes["rdv"]
        server = topo.popen("rdv", ["stund", "-h", rdv.addresses[0], "-a", rdv.addresses[1]])
        try:
            results = run_nat(topo, [f"h{i}" for i in range(1, len(NATS) + 1)])
        finally:
            server.terminate()
            server.wait(5)
    for i, prof in enumerate(profiles, 1):
        code, rep, _, err = results[f"h{i}"]
        assert code == 0 and rep is not None, err
        assert rep["server_kind"] == "rfc3489"
        for k, v in prof.expected().items():
            assert rep[k] == v, (prof.kind, k, rep)
