"""A file through real kernel NATs (natlab.transfer): every pair of NAT types, loss, the
NAT's state flushed mid-transfer (the path changes under it), and kill -9 of either
client. Each file is checked byte for byte against the original here.

256 MiB each, as users send them, except over 10% loss: Python QUIC (qh3's congestion
control reads random loss as congestion) moves about 0.5 MB/s when each NAT drops 10%,
so 256 MiB would take 9 minutes there; 16 MiB proves the same thing."""

from __future__ import annotations

import itertools

import pytest

from natlab.matrix import profile
from natlab.topology import Topology
from natlab.transfer import TransferResult, run_transfer
from p2pim.files.transfer import ACK_EVERY, QUIC_WINDOW, WINDOW
from tests.labutil import lab

pytestmark = lab
MiB = 1024 * 1024
KINDS = ["none", "full-cone", "restricted", "port-restricted", "symmetric"]
# What a path change or a kill may cost: what was in flight on each road, and what the
# receiver had taken but not yet fsynced.
ONE_WINDOW = QUIC_WINDOW + WINDOW + ACK_EVERY


def _ok(r: TransferResult) -> None:
    assert not r.error, r.as_dict()
    assert r.arrived, r.as_dict()


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations_with_replacement(KINDS, 2)))
def test_every_nat_pair_gets_the_file_whole(a: str, b: str) -> None:
    # The server as an operator runs it (the relay shaped to 8 MiB/s per user)
    r = run_transfer(a, b, size=256 * MiB)
    _ok(r)
    assert r.resent_sender == r.resent_receiver == 0, r.as_dict()
    if a == b == "symmetric":
        assert r.direct_bytes == 0 and r.path == "relay", r.as_dict()  # no direct path: all relayed
    elif "symmetric" not in (a, b):
        # punched at once: QUIC takes all but what went before its handshake
        assert r.direct_bytes >= 0.5 * r.size, r.as_dict()


def test_ten_percent_loss_on_both_nats() -> None:
    # The relay kept to 512 KiB/s (an operator's modest budget): under this much loss the
    # punch can take seconds, and an unshaped loopback relay would finish 16 MiB before it.
    lossy = (profile("port-restricted", loss=10), profile("full-cone", loss=10))
    r = run_transfer(*lossy, size=16 * MiB, server_args=("--relay-kbps", "512"))
    _ok(r)
    assert r.direct_bytes > 0, r.as_dict()  # QUIC's loss recovery, not the relay, carried it


def test_the_nat_forgets_everything_mid_transfer() -> None:
    """conntrack flushed at 30% on alice's symmetric NAT: her mappings (the QUIC path's and
    her server connection's) get new ports, the link dies, alice reconnects, a new path is
    punched and a new link takes over; nothing restarts from zero."""

    def flush(topo: Topology, fraction: float) -> None:
        topo.flush_conntrack("nat1")

    r = run_transfer(
        "symmetric", "full-cone", size=256 * MiB, during=flush, server_args=("--relay-kbps", "2048")
    )
    _ok(r)
    assert r.direct_bytes > 0 and r.path == "direct", r.as_dict()
    assert r.resent_sender + r.resent_receiver <= ONE_WINDOW, r.as_dict()


@pytest.mark.parametrize("who", ["receiver", "sender"])
def test_kill_9_mid_transfer_resumes(who: str) -> None:
    def kill(topo: Topology, fraction: float) -> str:
        return f"kill-{who}"

    r = run_transfer("port-restricted", "restricted", size=256 * MiB, during=kill)
    _ok(r)
    assert r.kills == 1
    assert r.resent_sender + r.resent_receiver <= ONE_WINDOW, r.as_dict()
