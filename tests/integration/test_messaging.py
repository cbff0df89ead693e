"""Accounts, buddies, presence and E2E messages through a real ``rendezvous serve`` on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from p2pim.client import (
    BuddyChange,
    ClientError,
    KeyChanged,
    Message,
    Outcome,
    PresenceChange,
    Receipt,
)
from p2pim.identity import Identity
from p2pim.profile import Profile
from p2pim.wire import control_pb2 as pb
from p2pim.wire import nat_pb2
from tests.conftest import RendezvousProcess, tool

from .chatutil import PASSWORD, Raw, befriend, collect, new_user, relogin, until, wait_for


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_buddy_lifecycle_and_presence(rendezvous: RendezvousProcess, tmp_path: Path) -> None:
    async def go() -> None:
        a = await new_user(rendezvous.url, tmp_path, "alice")
        b = await new_user(rendezvous.url, tmp_path, "bob")
        c = await new_user(rendezvous.url, tmp_path, "carol")
        await a.buddy_add("bob")
        assert await wait_for(b, lambda e: isinstance(e, BuddyChange)) == BuddyChange("alice", "requested")
        [row] = await b.buddies()
        assert (row.username, row.state) == ("alice", "asks to be your buddy")
        assert row.fingerprint == Profile("alice", tmp_path / "profiles").identity.fingerprint
        await b.buddy_accept("alice")
        assert await wait_for(a, lambda e: isinstance(e, BuddyChange)) == BuddyChange("bob", "accepted")
        [row] = await a.buddies()
        assert (row.state, row.presence) == ("buddy", "online")

        # Presence: status change, then logout, are pushed with last-seen.
        await b.set_status("away")
        ev = await wait_for(a, lambda e: isinstance(e, PresenceChange) and e.status == "away")
        assert ev.peer == "bob"
        await b.logout()
        ev = await wait_for(a, lambda e: isinstance(e, PresenceChange) and e.status == "offline")
        assert ev.peer == "bob" and ev.last_seen_ms > 0
        [row] = await a.buddies()
        assert row.presence == "offline" and row.last_seen_ms > 0

        # Decline and remove.
        await c.buddy_add("alice")
        await a.buddy_decline("carol")
        assert await wait_for(c, lambda e: isinstance(e, BuddyChange)) == BuddyChange("alice", "declined")
        assert await c.buddies() == []
        await a.buddy_remove("bob")
        assert await a.buddies() == []
        with pytest.raises(ClientError) as err:
            await a.buddy_add("nobody")
        assert err.value.code == pb.NO_SUCH_USER
        for x in (a, b, c):
            await x.close()

    run(go())


def test_messages_both_ways_with_receipts(rendezvous: RendezvousProcess, tmp_path: Path) -> None:
    async def go() -> None:
        a = await new_user(rendezvous.url, tmp_path, "alice")
        b = await new_user(rendezvous.url, tmp_path, "bob")
        await befriend(a, b)
        mid = await a.send("bob", "hello bob")
        assert (await a.wait_outcome(mid, 5)) == Outcome("bob", mid, "delivered")
        msg = await wait_for(b, lambda e: isinstance(e, Message))
        assert (msg.peer, msg.text, msg.msg_id, msg.offline) == ("alice", "hello bob", mid, False)
        assert await b.mark_read("alice") == 1
        receipt = await wait_for(a, lambda e: isinstance(e, Receipt) and e.kind == "read")
        assert receipt.msg_ids == (mid,)
        reply = await b.send("alice", "hi alice ✓ ünïcode")
        back = await wait_for(a, lambda e: isinstance(e, Message))
        assert (back.text, back.msg_id) == ("hi alice ✓ ünïcode", reply)
        assert [(h.outgoing, h.text, h.state) for h in a.history("bob")] == [
            (True, "hello bob", "read"),
            (False, "hi alice ✓ ünïcode", "received"),
        ]
        await a.close()
        await b.close()

    run(go())


def test_offline_store_in_order_and_deleted_after_ack(rendezvous: RendezvousProcess, tmp_path: Path) -> None:
    async def go() -> None:
        a = await new_user(rendezvous.url, tmp_path, "alice")
        b = await new_user(rendezvous.url, tmp_path, "bob")
        await befriend(a, b)
        await b.close()
        await wait_for(a, lambda e: isinstance(e, PresenceChange) and e.status == "offline")
        ids = [await a.send("bob", f"note {i}") for i in range(5)]
        for mid in ids:
            outcome = await a.wait_outcome(mid, 5)
            assert outcome is not None and outcome.state == "stored"
        assert _offline_rows(rendezvous.db) == 5
        b = await relogin(rendezvous.url, tmp_path, "bob")
        got = await collect(b, Message, 5)
        assert [m.text for m in got] == [f"note {i}" for i in range(5)]
        assert all(m.offline for m in got)
        await until(lambda: _offline_rows(rendezvous.db) == 0, what="acknowledged, then deleted")
        delivered = await collect(a, Receipt, 5)
        assert sorted(m for r in delivered for m in r.msg_ids) == sorted(ids)
        await a.close()
        await b.close()

    run(go())


def _offline_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM offline").fetchone()[0])


def test_heartbeat_loss_is_pushed_as_offline(rendezvous: RendezvousProcess, tmp_path: Path) -> None:
    """A client that stops answering (SIGSTOP) is declared offline after the heartbeat timeout."""

    async def go() -> None:
        a = await new_user(rendezvous.url, tmp_path, "alice")
        b = await new_user(rendezvous.url, tmp_path, "bob")
        await befriend(a, b)
        await b.close()
        env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"))
        prof = ["--profile", "bob"]
        root = tmp_path / "xdg" / "p2pim" / "profiles"
        root.mkdir(parents=True)
        os.symlink(tmp_path / "profiles" / "bob", root / "bob")
        listener = subprocess.Popen(
            [tool("p2pim"), "listen", *prof, "--server", rendezvous.url], env=env, stdout=subprocess.PIPE
        )
        try:
            await wait_for(a, lambda e: isinstance(e, PresenceChange) and e.status == "online")
            listener.send_signal(signal.SIGSTOP)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await wait_for(a, lambda e: isinstance(e, PresenceChange) and e.status == "offline", timeout=15)
            assert loop.time() - t0 < 10  # heartbeat 2 s: ping every 2 s, 2 s to answer
        finally:
            listener.send_signal(signal.SIGCONT)
            listener.kill()
            listener.communicate()
        await a.close()

    run(go())


def test_wrong_password_unknown_user_duplicate_name(rendezvous: RendezvousProcess, tmp_path: Path) -> None:
    async def go() -> None:
        a = await new_user(rendezvous.url, tmp_path, "alice")
        await a.close()
        ident = Profile("alice", tmp_path / "profiles").identity
        raw = await Raw.open(rendezvous.url)
        wrong = await raw.login("alice", ident, password="not the password")
        unknown = await raw.login("mallory", ident)
        assert wrong.error.code == unknown.error.code == pb.AUTH_FAILED
        assert wrong.error.message == unknown.error.message  # nothing tells the two apart
        # Right password, wrong key: the signature check fails the same way.
        raw2 = await Raw.open(rendezvous.url)
        assert (await raw2.login("alice", Identity.generate())).error.code == pb.AUTH_FAILED
        dup = await raw.request(
            register=pb.Register(
                username="alice", password=PASSWORD, identity_key=Identity.generate().public_key
            )
        )
        assert dup.error.code == pb.USERNAME_TAKEN
        await raw.ws.close()
        await raw2.ws.close()

    run(go())


def test_login_brute_force_is_throttled(rendezvous: RendezvousProcess, tmp_path: Path) -> None:
    async def go() -> None:
        a = await new_user(rendezvous.url, tmp_path, "alice")
        await a.close()
        ident = Profile("alice", tmp_path / "profiles").identity
        raw = await Raw.open(rendezvous.url)
        codes = [(await raw.login("alice", ident, password=f"guess {i}")).error.code for i in range(12)]
        assert codes[:9] == [pb.AUTH_FAILED] * 9  # the first login used one token of the burst of 10
        assert codes[-1] == pb.RATE_LIMITED
        right = await raw.login("alice", ident)
        assert right.error.code == pb.RATE_LIMITED and right.error.retry_after_ms > 0
        await raw.ws.close()

    run(go())


def test_relay_store_and_send_to_non_buddy_refused(rendezvous: RendezvousProcess, tmp_path: Path) -> None:
    async def go() -> None:
        a = await new_user(rendezvous.url, tmp_path, "alice")
        b = await new_user(rendezvous.url, tmp_path, "bob")
        await a.buddy_add("bob")  # asked, not accepted: still not buddies
        with pytest.raises(ClientError) as err:
            await a.send("bob", "hi")
        assert err.value.code == pb.NOT_A_BUDDY
        await a.close()
        raw = await Raw.open(rendezvous.url)
        assert (await raw.login("alice", Profile("alice", tmp_path / "profiles").identity)).login_ok
        relay = await raw.request(relay=pb.Relay(to="bob", data=b"x"))
        store = await raw.request(store=pb.Store(to="bob", msg_id=b"\0" * 16, envelope=b"x"))
        assert relay.error.code == store.error.code == pb.NOT_A_BUDDY
        await raw.ws.close()
        await b.close()

    run(go())


@pytest.mark.parametrize(
    "garbage",
    [
        os.urandom(200),
        pb.Frame(id=7, buddy_list=pb.BuddyListRequest()).SerializeToString()[:-1] + b"\x8a",  # truncated
        b"\x0a" * 300_000,  # oversized
        pb.Frame(id=9).SerializeToString() + b"\xfa\x3f\x01\x00",  # no body, unknown field 999
        pb.Frame(id=3, ok=pb.Ok()).SerializeToString(),  # a server-only body
        "a text frame",
    ],
    ids=["random", "truncated", "oversized", "unknown-type", "server-only-body", "text"],
)
def test_malformed_frames_close_only_that_connection(
    rendezvous: RendezvousProcess, tmp_path: Path, garbage: bytes | str
) -> None:
    async def go() -> None:
        a = await new_user(rendezvous.url, tmp_path, "alice")
        b = await new_user(rendezvous.url, tmp_path, "bob")
        await befriend(a, b)
        raw = await Raw.open(rendezvous.url)
        await raw.ws.send(garbage)
        reply = await raw.recv()
        assert reply.error.code == pb.BAD_FRAME
        with pytest.raises(ConnectionClosed):
            await raw.recv()
        mid = await a.send("bob", "still here")
        outcome = await a.wait_outcome(mid, 5)
        assert outcome is not None and outcome.state == "delivered"
        await a.close()
        await b.close()

    run(go())


def test_no_plaintext_in_server_database_or_relayed_bytes(
    rendezvous: RendezvousProcess, tmp_path: Path
) -> None:
    secret = "the eagle lands at midnight"

    async def go() -> None:
        a = await new_user(rendezvous.url, tmp_path, "alice")
        b = await new_user(rendezvous.url, tmp_path, "bob")
        await befriend(a, b)
        await b.close()
        await wait_for(a, lambda e: isinstance(e, PresenceChange) and e.status == "offline")
        mid = await a.send("bob", secret + " (stored)")
        assert (await a.wait_outcome(mid, 5)) is not None
        # bob, online through a raw connection, sees exactly the bytes the server relays.
        raw = await Raw.open(rendezvous.url)
        assert (await raw.login("bob", Profile("bob", tmp_path / "profiles").identity)).login_ok
        await wait_for(a, lambda e: isinstance(e, PresenceChange) and e.status == "online")  # so: relay
        await a.send("bob", secret + " (relayed)")
        seen = b""
        while b"relayed" not in seen and len(seen) < 100_000:
            frame = await raw.recv()
            seen += frame.SerializeToString()
            if frame.WhichOneof("body") == "relay_in":
                break
        assert frame.relay_in.sender == "alice" and frame.relay_in.data
        assert secret.encode() not in seen
        await raw.ws.close()
        await a.close()

    run(go())
    blob = b"".join(p.read_bytes() for p in rendezvous.db.parent.glob(rendezvous.db.name + "*"))
    assert b"alice" in blob  # we are reading the right files
    assert secret.encode() not in blob
    assert PASSWORD.encode() not in blob  # argon2id hashes only


def test_changed_key_is_a_warning_never_silent(rendezvous: RendezvousProcess, tmp_path: Path) -> None:
    async def go() -> None:
        a = await new_user(rendezvous.url, tmp_path, "alice")
        b = await new_user(rendezvous.url, tmp_path, "bob")
        await befriend(a, b)
        await a.close()
        # The server (here: its database) now claims another key for bob.
        with sqlite3.connect(rendezvous.db) as conn:
            conn.execute(
                "UPDATE users SET identity_key = ? WHERE username = 'bob'", (Identity.generate().public_key,)
            )
        a = await relogin(rendezvous.url, tmp_path, "alice")
        warn = await wait_for(a, lambda e: isinstance(e, KeyChanged))
        assert warn.peer == "bob" and warn.pinned == b.profile.identity.fingerprint != warn.offered
        with pytest.raises(ClientError) as err:
            await a.send("bob", "to whom?")
        assert "key changed" in err.value.message
        assert a.trust("bob")
        await a.close()
        await b.close()

    run(go())


def test_second_session_of_a_user_keeps_the_first(rendezvous: RendezvousProcess, tmp_path: Path) -> None:
    """`p2pim listen` in one terminal and `p2pim send` in another: both work, presence stays steady."""

    async def go() -> None:
        a = await new_user(rendezvous.url, tmp_path, "alice")
        b = await new_user(rendezvous.url, tmp_path, "bob")
        await befriend(a, b)
        from p2pim.client import Client

        one_shot = Client(rendezvous.url, Profile("bob", tmp_path / "profiles"), quiet=True)
        await one_shot.connect()
        await one_shot.login("bob")
        mid = await one_shot.send("alice", "from the other terminal")
        assert (await one_shot.wait_outcome(mid, 5)) is not None
        await one_shot.close()
        got = await wait_for(a, lambda e: isinstance(e, Message))
        assert got.text == "from the other terminal"
        # The long-lived session is still there, and alice never saw bob flicker.
        mid = await a.send("bob", "to the listener")
        assert (await wait_for(b, lambda e: isinstance(e, Message))).msg_id == mid
        flicker = [e for e in await _drain(a) if isinstance(e, PresenceChange)]
        assert flicker == []
        await a.close()
        await b.close()

    run(go())


async def _drain(client: object) -> list[object]:
    from .chatutil import gather_for

    return await gather_for(client, object, 0.3)  # type: ignore[arg-type]


def test_endpoint_publication_only_for_buddies(rendezvous: RendezvousProcess, tmp_path: Path) -> None:
    async def go() -> None:
        a = await new_user(rendezvous.url, tmp_path, "alice")
        b = await new_user(rendezvous.url, tmp_path, "bob")
        c = await new_user(rendezvous.url, tmp_path, "carol")
        await befriend(a, b)
        eps = pb.PublishEndpoints(host=[nat_pb2.Address(ip="192.168.1.20", port=40000)])
        eps.mapped.ip, eps.mapped.port = "203.0.113.101", 40000
        eps.nat.mapping = nat_pb2.ENDPOINT_INDEPENDENT
        eps.nat.label = "port-restricted cone"
        await a.publish_endpoints(eps)
        got = await b.lookup_endpoints("alice")
        assert [(h.ip, h.port) for h in got.host] == [("192.168.1.20", 40000)]
        assert (got.mapped.ip, got.nat.mapping, got.nat.label) == (
            "203.0.113.101",
            nat_pb2.ENDPOINT_INDEPENDENT,
            "port-restricted cone",
        )
        assert got.observed.ip == "127.0.0.1" and got.observed.port > 0
        with pytest.raises(ClientError) as err:
            await c.lookup_endpoints("alice")
        assert err.value.code == pb.NOT_A_BUDDY
        for x in (a, b, c):
            await x.close()

    run(go())


def test_serve_includes_the_stun_service(tmp_path: Path) -> None:
    from tests.conftest import free_udp_ports, run_p2pim

    port, alt = free_udp_ports(2)
    srv = RendezvousProcess(tmp_path / "s.db", ("--stun-port", str(port), "--stun-alt-port", str(alt)))
    try:
        proc = run_p2pim("nat", "--server", f"127.0.0.1:{port}", "--json")
    finally:
        out = srv.stop()
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["mapped"] == report["local"]  # loopback: no NAT between us
    assert '"stun_' in out  # the STUN counters are part of the server's report
