"""`rendezvous stun` and `p2pim nat` together on loopback (127.0.0.1 + 127.0.0.2):
real processes, real sockets."""

from __future__ import annotations

import json
import os
import socket
import time

from aioice import stun as aioice_stun

from p2pim.stun import codec
from tests.conftest import StunProcess, free_udp_ports, run_p2pim


def test_open_internet_on_loopback(stun_server: StunProcess) -> None:
    proc = run_p2pim("nat", "--json", "--server", stun_server.server)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["server_kind"] == "rfc5780"
    assert rep["alternate"] == f"127.0.0.2:{stun_server.alt_port}"
    assert rep["label"] == "open internet"
    assert rep["mapping"] == rep["filtering"] == "endpoint-independent"
    assert rep["nat_present"] is False
    assert rep["mapped"] == rep["local"]
    counters = json.loads(stun_server.stop().splitlines()[-1].split("stopped; ")[1])
    assert counters["answered"] >= 5 and counters["malformed"] == 0


def test_table_output_is_readable(stun_server: StunProcess) -> None:
    proc = run_p2pim("nat", "--server", stun_server.server)
    assert proc.returncode == 0
    for row in ("NAT type", "open internet", "Mapping", "Filtering", "Hairpinning", "Binding lifetime"):
        assert row in proc.stdout


def test_single_address_mode_says_what_is_unknown(single_address_server: StunProcess) -> None:
    proc = run_p2pim("nat", "--json", "--server", single_address_server.server)
    assert proc.returncode == 0
    rep = json.loads(proc.stdout)
    assert rep["server_kind"] == "single-address"
    assert rep["mapping"] == "unknown" and rep["filtering"] == "unknown" and rep["label"] == "unknown"
    assert any("no alternate address" in n for n in rep["notes"])
    # A raw change-IP request is refused with 420, from the address it was sent to.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(
            codec.encode(codec.binding_request(change=codec.CHANGE_IP)),
            ("127.0.0.1", single_address_server.port),
        )
        data, src = s.recvfrom(2048)
    assert src == ("127.0.0.1", single_address_server.port)
    assert codec.decode(data).message.error_code == 420


def test_no_server_is_blocked_quickly_with_exit_code_3() -> None:
    (port,) = free_udp_ports(1)
    t0 = time.monotonic()
    proc = run_p2pim("nat", "--json", "--server", f"127.0.0.1:{port}", "--give-up", "1")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 3
    rep = json.loads(proc.stdout)
    assert rep["label"] == "blocked" and rep["mapped"] is None
    assert elapsed < 5


def test_bad_server_argument_is_one_line_exit_2() -> None:
    for arg in ("no.such.host.invalid", "127.0.0.1:99999", "[::1", "host:port"):
        proc = run_p2pim("nat", "--server", arg)
        assert proc.returncode == 2, arg
        assert proc.stderr.startswith("p2pim: ") and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_garbage_flood_is_counted_and_service_keeps_answering(stun_server: StunProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(60):
            s.sendto(os.urandom(i % 50 + 1), ("127.0.0.1", stun_server.port))
        s.sendto(b"\x00\x01\x00\x00" + b"\x00" * 15, ("127.0.0.1", stun_server.port))  # truncated
        s.sendto(b"\x00" * 1400, ("127.0.0.1", stun_server.port))  # wrong length field
    # The service reads in order: by the time it answers `p2pim nat`, the garbage is counted.
    proc = run_p2pim("nat", "--json", "--server", stun_server.server)
    assert json.loads(proc.stdout)["label"] == "open internet"
    assert stun_server.proc.poll() is None
    counters = json.loads(stun_server.stop().splitlines()[-1].split("stopped; ")[1])
    assert counters["malformed"] >= 60


def test_flood_from_one_source_is_rate_limited(stun_server: StunProcess) -> None:
    req = codec.encode(codec.binding_request())
    answers = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        for _ in range(400):
            s.sendto(req, ("127.0.0.1", stun_server.port))
        try:
            while True:
                s.recvfrom(2048)
                answers += 1
        except TimeoutError:
            pass
    # The default burst is 100 per source, refilled at 50/s while we send.
    assert 100 <= answers <= 150
    counters = json.loads(stun_server.stop().splitlines()[-1].split("stopped; ")[1])
    # Some of the 400 may die in the kernel's socket buffer; the rest are refused.
    assert counters["rate_limited"] >= 100
    assert counters["answered"] == answers


def test_aioice_client_interoperates(stun_server: StunProcess) -> None:
    """Someone else's STUN client (aioice's codec) parses our answer."""
    req = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
        s.sendto(bytes(req), ("127.0.0.1", stun_server.port))
        data, _ = s.recvfrom(2048)
        local = s.getsockname()
    resp = aioice_stun.parse_message(data)
    assert resp.transaction_id == req.transaction_id
    assert resp.attributes["XOR-MAPPED-ADDRESS"] == local
    assert "FINGERPRINT" in resp.attributes  # parse_message verified it


def test_lifetime_on_loopback_has_no_binding_to_expire(stun_server: StunProcess) -> None:
    proc = run_p2pim("nat", "--json", "--server", stun_server.server, "--lifetime", "3")
    rep = json.loads(proc.stdout)
    assert rep["lifetime"]["alive_for"] == 3.0 and rep["lifetime"]["dead_after"] is None
