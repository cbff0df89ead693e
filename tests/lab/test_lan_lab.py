"""`p2pim lan` on a real LAN: three hosts on one bridge, one more on another LAN behind
another router (it must not be seen), and an IP Messenger client written from the protocol
document (tests/lab/ipmsg_peer.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from natlab.classify import tool
from natlab.matrix import JsonProcess
from natlab.profiles import NatProfile
from natlab.topology import Topology, new_prefix
from tests.labutil import lab

pytestmark = lab
INTERVAL = "1"  # announcements every second: a silent peer is gone after 3.5 s
PEER_SCRIPT = str(Path(__file__).with_name("ipmsg_peer.py"))


@pytest.fixture
def lan() -> Iterator[tuple[Topology, str]]:
    topo = Topology(new_prefix())
    tmp = tempfile.mkdtemp(prefix="p2pim-lan-")
    try:
        topo.add_nat("nat1", NatProfile("port-restricted"))
        for h in ("h1", "h1b", "h1c"):
            topo.add_host(h, "nat1")
        topo.add_nat("nat2", NatProfile("port-restricted"))
        topo.add_host("h2", "nat2")
        yield topo, tmp
    finally:
        topo.down()
        subprocess.run(["rm", "-rf", tmp], check=False)


def _lan(topo: Topology, tmp: str, node: str, name: str, interval: str = INTERVAL) -> JsonProcess:
    env = {**os.environ, "XDG_DATA_HOME": f"{tmp}/{name}"}
    argv = [tool("p2pim"), "lan", "--json", "--name", name, "--interval", interval, "--linger", "5"]
    proc = JsonProcess(topo, node, argv, env)
    assert proc.wait(lambda e: e.get("event") == "ready", 15) is not None, "p2pim lan did not start"
    return proc


def _up(name: str, again: bool | None = None):  # type: ignore[no-untyped-def]
    return lambda e: (
        e.get("event") == "peer" and e.get("up") is True and e.get("name") == name
        and (again is None or e.get("again") is again)
    )  # fmt: skip


def _recvmsgs(proc: JsonProcess, packetno: int) -> int:
    return sum(1 for _, e in proc.log if e.get("event") == "recvmsg" and e.get("packetno") == packetno)


def _texts(proc: JsonProcess, sender: str) -> list[str]:
    return [str(e["text"]) for _, e in proc.log if e.get("event") == "message" and e.get("from") == sender]


def test_discovery_messages_leave_restart_and_the_other_lan(lan: tuple[Topology, str]) -> None:
    topo, tmp = lan
    procs: list[JsonProcess] = []
    try:
        alice = _lan(topo, tmp, "h1", "alice")
        procs.append(alice)
        carol = _lan(topo, tmp, "h2", "carol")  # behind another router: another LAN
        procs.append(carol)
        # bob announces every 3 s: seeing him within 1 s means his ENTRY at start did it.
        bob = _lan(topo, tmp, "h1b", "bob", interval="3")
        procs.append(bob)
        ready = bob.log[0][0]
        seen = alice.wait(_up("bob"), 5)
        assert seen is not None and seen - ready < 1.0, "alice did not discover bob within 1 s"
        assert bob.wait(_up("alice"), 2) is not None
        for i in range(20):
            alice.type(f"bob: a2b {i}")
            bob.type(f"alice: b2a {i}")
        for proc, sender, prefix in ((bob, "alice", "a2b"), (alice, "bob", "b2a")):
            end = time.monotonic() + 10
            while len(_texts(proc, sender)) < 20 and time.monotonic() < end:
                time.sleep(0.1)
            got = _texts(proc, sender)
            assert sorted(got) == sorted(f"{prefix} {i}" for i in range(20)), got  # each exactly once
            assert all(e.get("encrypted") for _, e in proc.log if e.get("event") == "message")
        # A peer that dies without a word (kill -9) is gone after 3.5 of its intervals ...
        bob.proc.send_signal(signal.SIGKILL)
        gone = alice.wait(
            lambda e: e.get("event") == "peer" and e.get("up") is False and e.get("name") == "bob", 14
        )
        assert gone is not None
        reasons = [e.get("reason") for _, e in alice.log if e.get("event") == "peer" and e.get("up") is False]
        assert reasons[-1] == "timeout"
        # ... a message written meanwhile waits, and goes out once bob is back (a restart).
        alice.type("bob: while you were away")
        time.sleep(0.5)
        bob2 = _lan(topo, tmp, "h1b", "bob")
        procs.append(bob2)
        assert alice.wait(_up("bob", again=True), 5) is not None
        assert bob2.wait(lambda e: e.get("event") == "message" and e.get("text") == "while you were away", 10)
        time.sleep(1.5)  # retransmissions, if any, would show up as a second copy
        assert _texts(bob2, "alice") == ["while you were away"]
        # A clean exit (end of input) says goodbye: "left", well before any timeout.
        bob2.proc.stdin.close()  # type: ignore[union-attr]
        t = time.monotonic()
        left = alice.wait(
            lambda e: e.get("event") == "peer" and e.get("up") is False and e.get("reason") == "left", 10
        )
        assert left is not None and left - t < 3.0
        # The other LAN saw nothing and was not seen.
        assert not any(e.get("name") == "carol" for _, e in alice.log if e.get("event") == "peer")
        assert not any(e.get("event") == "peer" for _, e in carol.log)
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(5)


def test_ip_messenger_peer_entries_messages_and_exit(lan: tuple[Topology, str]) -> None:
    topo, tmp = lan
    alice = _lan(topo, tmp, "h1", "alice")
    peer = JsonProcess(
        topo, "h1c", [sys.executable, PEER_SCRIPT, "10.0.1.255", "ipmsguser"], dict(os.environ)
    )
    try:
        assert peer.wait(lambda e: e.get("event") == "ready", 10) is not None
        # Its BR_ENTRY reached alice, who answered (ANSENTRY) and lists it as unencrypted.
        up = alice.wait(lambda e: e.get("event") == "peer" and e.get("kind") == "ipmsg", 5)
        assert up is not None
        entry = next(e for _, e in alice.log if e.get("event") == "peer" and e.get("kind") == "ipmsg")
        assert entry["name"] == "ipmsguser@10.0.1.4" and entry["encrypted"] is False
        assert peer.wait(lambda e: e.get("event") == "ansentry" and e.get("nick") == "alice", 5) is not None
        # A message with SENDCHECKOPT: shown once (also when the peer resends it), answered by RECVMSG.
        peer.type("send 10.0.1.2 4242 héllo from IPMsg ✓")
        assert peer.wait(lambda e: e.get("event") == "recvmsg" and e.get("packetno") == 4242, 5) is not None
        peer.type(
            "raw 10.0.1.2 " + b"1:4242:tester:testhost:8388896:h\xc3\xa9llo from IPMsg \xe2\x9c\x93\0".hex()
        )
        # alice answers the resend too (it was lost, as far as the peer knows), and shows nothing new
        assert peer.wait(lambda e: _recvmsgs(peer, 4242) == 2, 5) is not None
        # (alice prints the message just after its RECVMSG leaves: wait for it, count at the end)
        assert alice.wait(lambda e: e.get("event") == "message", 5) is not None
        # alice writes to it by nickname; it answers RECVMSG, alice marks it delivered.
        alice.type("ipmsguser: hi there")
        assert peer.wait(lambda e: e.get("event") == "message" and e.get("text") == "hi there", 5) is not None
        assert alice.wait(
            lambda e: (
                e.get("event") == "outcome"
                and e.get("state") == "delivered"
                and e.get("to") == "ipmsguser@10.0.1.4"
            ),
            5,
        )
        # BR_EXIT: gone.
        peer.proc.stdin.close()  # type: ignore[union-attr]
        gone = alice.wait(
            lambda e: e.get("event") == "peer" and e.get("up") is False and e.get("kind") == "ipmsg", 5
        )
        assert gone is not None
        msgs = [e for _, e in alice.log if e.get("event") == "message"]
        assert [(m["text"], m["encrypted"]) for m in msgs] == [("héllo from IPMsg ✓", False)]
    finally:
        for p in (alice, peer):
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(5)


def test_garbage_on_every_port_is_counted_and_chat_goes_on(lan: tuple[Topology, str]) -> None:
    topo, tmp = lan
    alice = _lan(topo, tmp, "h1", "alice")
    bob = _lan(topo, tmp, "h1b", "bob")
    try:
        assert alice.wait(_up("bob"), 5) is not None
        port = next(e["port"] for _, e in alice.log if e.get("event") == "ready")
        junk = [
            b"",
            b"\x00" * 40,
            b"P2PL" + os.urandom(100),  # an announcement that does not parse
            b"P2PL\x0a\x05hello\x12\x40" + b"s" * 64,  # parses, signature is not one
            b"P2Pe" + os.urandom(200),  # envelope garbage
            b"1:x:u:h:32:text",  # IPMsg: packet number not a number
            b"1:1:u:h:32",  # five fields
            b"2:1:u:h:32:wrong version",
            b"1:1:" + b"u" * 500 + b":h:32:long user",
            b"1:1:u:h:99999999999:command too big",
        ]
        sender = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_BROADCAST,1)\n"
            "for h in sys.argv[2:]:\n"
            "  b=bytes.fromhex(h)\n"
            "  for d in (('10.0.1.2',int(sys.argv[1])),('10.0.1.255',2426),('10.0.1.2',2425)):\n"
            "    s.sendto(b,d)\n"
        )
        done = topo.run("h1c", [sys.executable, "-c", sender, str(port), *(j.hex() for j in junk)])
        assert done.returncode == 0, done.stderr
        alice.type("bob: still here")
        assert (
            bob.wait(lambda e: e.get("event") == "message" and e.get("text") == "still here", 5) is not None
        )
        alice.proc.stdin.close()  # type: ignore[union-attr]
        assert alice.wait(lambda e: e.get("event") == "stats", 10) is not None
        stats = next(e for _, e in alice.log if e.get("event") == "stats")
        assert stats["garbage"] >= 2 and stats["bad_announcements"] >= 2
        assert stats["bad_envelopes"] >= 1 and stats["ipmsg_malformed"] >= 4, json.dumps(stats)
        assert alice.proc.wait(10) == 0
    finally:
        for p in (alice, bob):
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(5)


FORGER = """
import socket, sys, time
from p2pim.identity import Identity
from p2pim.lan import announce
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for i in range(int(sys.argv[1])):
    # a fresh key each time, validly signed, claiming to announce once a year
    data = announce.make(Identity.generate(), announce.ALIVE, f"forged{i}", 7000, 10**13 + i, 365 * 86400)
    s.sendto(data, ("10.0.1.255", 2426))
    if i % 100 == 99:
        time.sleep(0.02)
"""


def test_thousands_of_forged_peers_are_bounded_and_real_peers_still_chat(lan: tuple[Topology, str]) -> None:
    topo, tmp = lan
    alice = _lan(topo, tmp, "h1", "alice")
    bob: JsonProcess | None = None
    try:
        done = topo.run("h1c", [sys.executable, "-c", FORGER, "3000"])
        assert done.returncode == 0, done.stderr
        bob = _lan(topo, tmp, "h1b", "bob")
        assert alice.wait(_up("bob"), 5) is not None
        alice.type("bob: through the noise")
        assert bob.wait(lambda e: e.get("event") == "message" and e.get("text") == "through the noise", 5)
        assert (
            alice.wait(lambda e: e.get("event") == "outcome" and e.get("state") == "delivered", 5) is not None
        )
        listed, most = 0, 0
        for _, e in alice.log:
            if e.get("event") == "peer":
                listed += 1 if e.get("up") else -1
                most = max(most, listed)
        assert most <= 256  # never more peers than the bound, whatever the LAN says
        alice.proc.stdin.close()  # type: ignore[union-attr]
        assert alice.wait(lambda e: e.get("event") == "stats", 10) is not None
        stats = next(e for _, e in alice.log if e.get("event") == "stats")
        assert int(stats["evicted"]) >= 2000, json.dumps(stats)  # most of 3000 arrived and made room
        # Nothing of the flood reached the disk: only bob, with whom a message was exchanged.
        db = Path(tmp) / "alice" / "p2pim" / "profiles" / "default" / "lan.db"
        with sqlite3.connect(db) as conn:
            rows = [r[0] for r in conn.execute("SELECT username FROM contacts WHERE username LIKE 'lan:%'")]
        assert rows == ["lan:bob"]
    finally:
        for p in (alice, bob):
            if p is not None and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(5)


def test_a_file_between_lan_peers_over_quic_also_across_a_restart(lan: tuple[Topology, str]) -> None:
    """/send in `p2pim lan`: bob auto-accepts, the bytes go over QUIC on the LAN data sockets
    (no server anywhere), the receiver is killed mid-file and resumes, the file is whole."""
    import hashlib

    topo, tmp = lan
    src = Path(tmp) / "slides.pdf"
    src.write_bytes(os.urandom(48 * 1024 * 1024))
    dl = Path(tmp) / "dl"
    env_b = {**os.environ, "XDG_DATA_HOME": f"{tmp}/bob"}
    bob_argv = [tool("p2pim"), "lan", "--json", "--name", "bob", "--interval", INTERVAL, "--auto-accept",
                "--dir", str(dl)]  # fmt: skip
    procs: list[JsonProcess] = []
    try:
        alice = _lan(topo, tmp, "h1", "alice")
        procs.append(alice)
        bob = JsonProcess(topo, "h1b", bob_argv, env_b)
        procs.append(bob)
        assert alice.wait(_up("bob"), 10) is not None
        alice.type(f"/send bob {src}")
        assert bob.wait(lambda e: e.get("event") == "file_offered", 10) is not None
        db = Path(tmp) / "bob" / "p2pim" / "profiles" / "default" / "lan.db"
        durable = 0
        deadline = time.monotonic() + 30
        while durable < 8 * 1024 * 1024 and time.monotonic() < deadline:  # 8 MiB safe, then kill -9
            time.sleep(0.01)
            with contextlib.suppress(sqlite3.Error, TypeError):
                durable = sqlite3.connect(db).execute("SELECT durable FROM transfers").fetchone()[0]
        assert 0 < durable < src.stat().st_size
        bob.proc.kill()
        bob.proc.wait(5)
        bob = JsonProcess(topo, "h1b", bob_argv, env_b)
        procs.append(bob)
        assert bob.wait(lambda e: e.get("event") == "file_done", 60) is not None, bob.log[-5:]
        done = next(e for _, e in bob.log if e.get("event") == "file_done")
        assert alice.wait(lambda e: e.get("event") == "file_done", 20) is not None
        sent = next(e for _, e in alice.log if e.get("event") == "file_done")
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(5)
    got = Path(str(done["path"]))
    assert got.parent == dl
    assert hashlib.blake2b(got.read_bytes()).digest() == hashlib.blake2b(src.read_bytes()).digest()
    assert int(done["direct"]) > 0  # QUIC carried it: on the LAN there is no other road
    assert int(sent["resent"]) + int(done["resent"]) <= 5 * 1024 * 1024  # resumed, not restarted
