"""Direct paths on loopback: punching, direct delivery, bad disco packets, `p2pim ping`."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pim.client import Message, PathUpdate
from p2pim.identity import Identity
from p2pim.paths.disco import DATA_MAGIC, DiscoBoxes, new_tx, ping, pong
from tests.conftest import RendezvousProcess, free_udp_ports, tool

from .chatutil import befriend, collect, new_user, until, wait_for


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RendezvousProcess]:
    stun, alt = free_udp_ports(2)
    srv = RendezvousProcess(
        tmp_path / "server.db",
        ("--heartbeat", "2", "--stun-ip", "127.0.0.1", "--stun-port", str(stun), "--stun-alt-port", str(alt)),
    )
    yield srv
    srv.stop()


def _direct(peer: str):  # type: ignore[no-untyped-def]
    return lambda ev: isinstance(ev, PathUpdate) and ev.peer == peer and ev.via == "direct"


def test_buddies_go_direct_and_messages_take_the_direct_path(
    server: RendezvousProcess, tmp_path: Path
) -> None:
    asyncio.run(_direct_delivery(server, tmp_path))


async def _direct_delivery(server: RendezvousProcess, tmp_path: Path) -> None:
    alice = await new_user(server.url, tmp_path, "alice")
    bob = await new_user(server.url, tmp_path, "bob")
    try:
        await befriend(alice, bob)
        up = await wait_for(alice, _direct("bob"), 10)
        assert isinstance(up, PathUpdate) and up.addr == f"127.0.0.1:{bob.paths.port}"  # type: ignore[union-attr]
        await wait_for(bob, _direct("alice"), 10)
        assert alice.path_to("bob")[0] == "direct"
        ids = [await alice.send("bob", f"m{i}") for i in range(30)]
        got = await collect(bob, Message, 30)
        assert sorted(m.text for m in got) == sorted(f"m{i}" for i in range(30))
        assert len({m.msg_id for m in got}) == 30
        for msg_id in ids:
            outcome = await alice.wait_outcome(msg_id, 10)
            assert outcome is not None and outcome.state == "delivered"
        assert alice.counters["sent_direct"] >= 30
        assert bob.counters["received_direct"] >= 30
        assert bob.counters["received_relay"] == 0
        # status reads what the session stored
        row = alice.store.paths()["bob"]
        assert row.via == "direct" and row.rtt_ms is not None
    finally:
        await alice.close()
        await bob.close()


def test_garbage_forged_and_replayed_disco_is_dropped(server: RendezvousProcess, tmp_path: Path) -> None:
    asyncio.run(_bad_disco(server, tmp_path))


async def _bad_disco(server: RendezvousProcess, tmp_path: Path) -> None:
    alice = await new_user(server.url, tmp_path, "alice")
    bob = await new_user(server.url, tmp_path, "bob")
    try:
        await befriend(alice, bob)
        await wait_for(bob, _direct("alice"), 10)
        assert bob.paths is not None and alice.paths is not None
        target = ("127.0.0.1", bob.paths.port)
        stranger = DiscoBoxes(Identity.generate())
        bob_key = bob.profile.identity.public_key
        packets = [
            b"",
            b"\x00\x01\x00\x00" + b"x" * 20,  # STUN-looking garbage
            b"P2Pd" + b"\x00" * 10,  # truncated disco
            stranger.seal(bob_key, ping(new_tx())),  # a key bob does not know
            alice.paths.boxes.seal(bob_key, ping(new_tx()))[:-1] + b"\x00",  # alice's, tampered
            DATA_MAGIC + b"not an envelope",
            alice.paths.boxes.seal(bob_key, pong(new_tx(), target)),  # a pong bob never asked for
        ]
        before = dict(bob.paths.counters)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for p in packets:
                s.sendto(p, target)
        c = bob.paths.counters
        await until(
            lambda: c["forged"] > before["forged"] and bob.counters["bad_envelopes"] >= 1,
            what="all 7 handled",
        )
        assert c["bad_packets"] >= before["bad_packets"] + 3
        assert c["unknown_sender"] == before["unknown_sender"] + 1
        assert c["forged"] == before["forged"] + 1
        assert bob.counters["bad_envelopes"] >= 1
        assert bob.path_to("alice")[0] == "direct"  # nothing of that changed the path
        await alice.send("bob", "still fine")
        got = await collect(bob, Message, 1)
        assert [m.text for m in got] == ["still fine"]
    finally:
        await alice.close()
        await bob.close()


def test_cli_ping_shows_relay_then_direct_and_status_shows_the_path(
    server: RendezvousProcess, tmp_path: Path
) -> None:
    env = dict(
        os.environ,
        XDG_DATA_HOME=str(tmp_path / "xdg"),
        P2PIM_SERVER=server.url,
        P2PIM_PASSWORD="pw-for-tests",
    )

    def p2pim(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("p2pim"), *args], env=env, capture_output=True, text=True, timeout=60)

    assert p2pim("register", "alice", "--profile", "a").returncode == 0
    assert p2pim("register", "bob", "--profile", "b").returncode == 0
    assert p2pim("register", "carol", "--profile", "c").returncode == 0
    assert p2pim("buddy", "add", "bob", "--profile", "a").returncode == 0
    assert p2pim("buddy", "accept", "alice", "--profile", "b").returncode == 0
    listener = subprocess.Popen(
        [tool("p2pim"), "listen", "--profile", "b", "--json"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        for _ in range(50):
            status = json.loads(p2pim("status", "--profile", "a", "--json").stdout)
            if any(b["username"] == "bob" and b["presence"] == "online" for b in status["buddies"]):
                break
            time.sleep(0.2)
        ping = p2pim("ping", "bob", "--profile", "a", "--json", "--interval", "0.3")
        assert ping.returncode == 0, ping.stderr
        out = json.loads(ping.stdout)
        assert out["probes"][0]["via"] == "relay" and out["probes"][0]["rtt_ms"] is not None
        assert out["path"] == "direct" and out["addr"].startswith("127.0.0.1:")
        assert out["probes"][-1]["via"] == "direct" and out["probes"][-1]["rtt_ms"] is not None
        status = json.loads(p2pim("status", "--profile", "a", "--json").stdout)
        bob = next(b for b in status["buddies"] if b["username"] == "bob")
        assert bob["path"]["via"] == "direct" and bob["path"]["addr"] == out["addr"]
        text = p2pim("status", "--profile", "a").stdout
        assert f"direct {out['addr']}" in text
        # Not a buddy: a clear error and exit code, no traceback.
        nope = p2pim("ping", "carol", "--profile", "a")
        assert nope.returncode == 5 and "not your buddy" in nope.stderr and "Traceback" not in nope.stderr
    finally:
        listener.terminate()
        listener.communicate(timeout=10)
