"""A hostile buddy or a hostile network against a real ``rendezvous serve`` on loopback.

Each test is one abuse (issue 10) done for real, and checks that the people not doing it
carry on: their sessions answer, their messages arrive, their logins go through. Other
source addresses are other 127.x addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from p2pim.client import Client, ConnectionState, Message, PresenceChange, Problem, Unreachable
from p2pim.identity import Identity, login_message
from p2pim.messaging.envelope import seal, text_body
from p2pim.messaging.ids import new_msg_id
from p2pim.profile import Profile
from p2pim.wire import control_pb2 as pb
from rendezvous.db import Database
from rendezvous.passwords import PasswordHasher
from tests.conftest import RendezvousProcess, free_udp_ports, tool
from tests.mixedkey import MixedKey

from .chatutil import (
    PASSWORD,
    Raw,
    Recorder,
    befriend,
    collect,
    gather_for,
    new_user,
    relogin,
    until,
    users,
    wait_for,
)


def _serve(tmp_path: Path, *extra: str, files: int | None = None) -> RendezvousProcess:
    return RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "30", *extra), files=files)


def _run(srv: RendezvousProcess, test: Coroutine[Any, Any, None]) -> str:
    """Run the test's coroutine against ``srv``, stop the server (also on failure), return its output."""
    try:
        asyncio.run(test)
    finally:
        out = srv.stop()
    return out


def _counters(output: str) -> dict[str, int]:
    line = next(x for x in output.splitlines() if x.startswith("rendezvous: stopped; "))
    return dict(json.loads(line.removeprefix("rendezvous: stopped; ")))


def _offline_rows(db: Path, recipient: str) -> int:
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM offline o JOIN users u ON u.id = o.recipient_id WHERE u.username = ?",
            (recipient,),
        ).fetchone()
        return int(row[0])


def _identity(tmp_path: Path, name: str) -> Identity:
    return Profile(name, tmp_path / "profiles").identity


def _presence(peer: str, status: str):  # type: ignore[no-untyped-def]
    return lambda e: isinstance(e, PresenceChange) and e.peer == peer and e.status == status


# -- 1, 2: one connection's trouble is its own ------------------------------------------------


def test_a_buddy_that_stops_reading_stalls_nobody(tmp_path: Path) -> None:
    """bob stops reading while alice floods him: alice's session answers, carol sees bob go."""
    srv = _serve(tmp_path)

    async def go() -> None:
        alice, bob, carol = await users(srv.url, tmp_path, "alice", "bob", "carol")
        await befriend(alice, bob)
        await befriend(carol, bob)
        await befriend(alice, carol)
        await bob.close()
        await wait_for(carol, _presence("bob", "offline"))
        stalled = await Raw.open(srv.url, rcvbuf=4096)  # reads its login reply, then nothing more
        assert (await stalled.login("bob", _identity(tmp_path, "bob"))).HasField("login_ok")
        await wait_for(carol, _presence("bob", "online"))
        flood = await Raw.open(srv.url)  # a second session of alice, to push fast
        assert (await flood.login("alice", _identity(tmp_path, "alice"))).HasField("login_ok")
        blob = os.urandom(60_000)
        for i in range(150):  # 9 MB at a reader that takes nothing: past the kernel's buffers
            frame = pb.Frame(id=10_000 + i, relay=pb.Relay(to="bob", data=blob))
            await flood.ws.send(frame.SerializeToString())
        # alice's session still answers (before: it hung in bob's drain and timed out) ...
        reply = await flood.request(buddy_list=pb.BuddyListRequest())
        assert reply.WhichOneof("body") == "buddies"
        # ... bob is dropped, and his buddies see it now, not a minute of heartbeats later.
        await wait_for(carol, _presence("bob", "offline"), timeout=10)
        msg = await alice.send("carol", "still here")
        outcome = await alice.wait_outcome(msg, 10)
        assert outcome is not None and outcome.state == "delivered"
        for c in (alice, carol):
            await c.close()
        await flood.ws.close()
        stalled.ws.transport.abort()

    out = _run(srv, go())
    assert _counters(out)["slow_consumers"] >= 1


def test_a_stalled_reader_is_dropped_by_the_watchdog(tmp_path: Path) -> None:
    """Its queue may have room (a large bound here), but a write blocked for a heartbeat ends it."""
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2", "--send-queue-kb", "65536"))

    async def go() -> None:
        bob, carol = await users(srv.url, tmp_path, "bob", "carol")
        await befriend(carol, bob)
        await bob.close()
        stalled = await Raw.open(srv.url, rcvbuf=4096)
        assert (await stalled.login("bob", _identity(tmp_path, "bob"))).HasField("login_ok")
        await wait_for(carol, _presence("bob", "online"))
        flood = await Raw.open(srv.url)
        assert (await flood.login("carol", _identity(tmp_path, "carol"))).HasField("login_ok")
        blob = os.urandom(60_000)
        for i in range(200):  # 12 MB: far more than the kernel buffers, well inside the queue bound
            await flood.ws.send(pb.Frame(id=i + 1, relay=pb.Relay(to="bob", data=blob)).SerializeToString())
        await wait_for(carol, _presence("bob", "offline"), timeout=15)
        await carol.close()
        await flood.ws.close()
        stalled.ws.transport.abort()

    out = _run(srv, go())
    assert _counters(out)["slow_consumers"] >= 1


def test_a_long_backlog_read_at_full_speed_while_buddies_relay_is_never_cut(tmp_path: Path) -> None:
    srv = _serve(tmp_path)

    async def go() -> None:
        alice, bob, carol = await users(srv.url, tmp_path, "alice", "bob", "carol")
        await befriend(alice, bob)
        await befriend(carol, bob)
        bob_key = bob.profile.identity.public_key
        await bob.close()
        await wait_for(carol, _presence("bob", "offline"))
        # 190 envelopes of 16 KB (3.1 MB) wait for bob, stored straight from a raw session of alice
        # (under the per-user request burst of 200).
        raw = await Raw.open(srv.url)
        assert (await raw.login("alice", alice.profile.identity)).HasField("login_ok")
        backlog = []
        for i in range(190):
            env = seal(alice.profile.identity, "alice", "bob", bob_key, text_body(f"{i:03d} " + "x" * 16_000))
            backlog.append(env.msg_id)
            reply = await raw.request(
                store=pb.Store(to="bob", msg_id=env.msg_id, envelope=env.SerializeToString())
            )
            assert reply.HasField("ok"), reply
        await raw.ws.close()
        bob = await relogin(srv.url, tmp_path, "bob")
        sent = []
        for i in range(50):  # carol relays meanwhile: before, this got bob closed as "not reading"
            sent.append(await carol.send("bob", f"live {i}"))
            await asyncio.sleep(0.02)
        got = await collect(bob, Message, 240, timeout=60)
        assert sorted(m.msg_id for m in got if m.peer == "alice") == sorted(backlog)
        assert sorted(m.msg_id for m in got if m.peer == "carol") == sorted(sent)
        drops = [e for e in await gather_for(bob, ConnectionState, 0.5) if not e.up]
        assert drops == [] and bob.counters["reconnects"] == 0
        for c in (alice, bob, carol):
            await c.close()

    out = _run(srv, go())
    assert _counters(out)["slow_consumers"] == 0


# -- 3, 4: one odd input ------------------------------------------------------------------


def test_identity_keys_with_a_small_order_component_are_refused_and_stop_nobody(tmp_path: Path) -> None:
    mallory = MixedKey()  # libsodium verifies its signatures, but it is no box key
    db = Database(tmp_path / "server.db")  # an account made before keys were checked at register
    assert db.add_user("mallory", PasswordHasher("min").hash(PASSWORD), mallory.public_key, 0)
    db.close()
    stun, alt = free_udp_ports(2)
    srv = RendezvousProcess(
        tmp_path / "server.db",
        ("--heartbeat", "2", "--stun-ip", "127.0.0.1", "--stun-port", str(stun), "--stun-alt-port", str(alt)),
    )

    async def go() -> None:
        raw = await Raw.open(srv.url)
        refused = await raw.request(
            register=pb.Register(username="trudy", password=PASSWORD, identity_key=mallory.public_key)
        )
        assert refused.error.code == pb.BAD_REQUEST and "prime-order" in refused.error.message
        alice, bob = await users(srv.url, tmp_path, "alice", "bob")
        await befriend(alice, bob)
        await alice.close()
        with sqlite3.connect(srv.db) as conn:  # mallory became alice's buddy back then
            ids = dict(conn.execute("SELECT username, id FROM users").fetchall())
            conn.execute("INSERT INTO relations VALUES (?, ?, 'mutual')", (ids["alice"], ids["mallory"]))
            conn.execute("INSERT INTO relations VALUES (?, ?, 'mutual')", (ids["mallory"], ids["alice"]))
        alice = await relogin(srv.url, tmp_path, "alice")  # a long-running session: it punches
        await asyncio.wait_for(alice.local_ready.wait(), 10)
        listed = {b.username: b for b in await alice.buddies()}
        assert listed["mallory"].key_warning
        assert alice.store.contact("mallory") is None  # never pinned
        assert any("unusable key for mallory" in p.message for p in await gather_for(alice, Problem, 0.5))
        # mallory's login (signed for real) is refused: buddies never see that key online.
        nonce = raw.nonce
        sig = mallory.sign(login_message(nonce, "mallory"))
        login = await raw.request(login=pb.Login(username="mallory", password=PASSWORD, signature=sig))
        assert login.error.code == pb.AUTH_FAILED
        # alice's session still serves everyone else.
        await bob.send("alice", "are you there?")
        got = await collect(alice, Message, 1)
        assert [m.text for m in got] == ["are you there?"]
        await raw.ws.close()
        await alice.close()
        await bob.close()

    _run(srv, go())


def test_an_out_of_range_store_id_is_a_bad_request_not_a_broken_connection(tmp_path: Path) -> None:
    srv = _serve(tmp_path)

    async def go() -> None:
        a = await new_user(srv.url, tmp_path, "alice")
        await a.close()
        raw = await Raw.open(srv.url)
        assert (await raw.login("alice", _identity(tmp_path, "alice"))).HasField("login_ok")
        for ids in ([2**63], [2**64 - 1], [1, 2**63 + 5]):
            reply = await raw.request(offline_ack=pb.OfflineAck(store_ids=ids))
            assert reply.error.code == pb.BAD_REQUEST, reply
        reply = await raw.request(offline_ack=pb.OfflineAck(keep_ids=[2**63]))
        assert reply.error.code == pb.BAD_REQUEST
        assert (await raw.request(buddy_list=pb.BuddyListRequest())).WhichOneof("body") == "buddies"
        await raw.ws.close()

    out = _run(srv, go())
    assert "Traceback" not in out
    assert _counters(out)["internal_errors"] == 0


# -- 5: connections ------------------------------------------------------------------------


def test_a_connection_that_does_not_log_in_is_closed_at_the_deadline(tmp_path: Path) -> None:
    srv = _serve(tmp_path, "--login-deadline", "1")

    async def go() -> None:
        raw = await Raw.open(srv.url)
        first = await raw.recv(5)
        assert first.error.code == pb.NOT_LOGGED_IN and "log in within 1 s" in first.error.message
        with pytest.raises(ConnectionClosed) as closed:
            await raw.recv(5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        # Keepalive pings do not keep it up either: an idle connection is gone (closed above).
        # Logging in well inside the deadline is unaffected: once a connection opened after
        # alice's has been cut at its deadline, alice's deadline has passed too.
        a = await new_user(srv.url, tmp_path, "alice")
        later = await Raw.open(srv.url)
        assert (await later.recv(5)).error.code == pb.NOT_LOGGED_IN
        with pytest.raises(ConnectionClosed):
            await later.recv(5)
        assert a.connected
        await a.close()

    out = _run(srv, go())
    assert _counters(out)["login_timeouts"] == 2


def test_many_idle_connections_from_one_address_lock_nobody_out(tmp_path: Path) -> None:
    srv = _serve(tmp_path)

    async def go() -> None:
        held: list[Raw] = []
        refusals: list[str] = []
        dropped = 0
        for _ in range(40):
            try:
                held.append(await Raw.open(srv.url, local="127.0.0.5"))
            except InvalidStatus as exc:  # refused with the reason (a few per second) ...
                assert exc.response.status_code == 503
                refusals.append(exc.response.body.decode())
            except (InvalidMessage, OSError):  # ... and past that, the socket is just closed
                dropped += 1
        assert len(held) == 16 and len(refusals) + dropped == 24 and len(refusals) >= 5
        assert "waiting to log in" in refusals[0]
        # Everyone else connects, logs in and talks as usual.
        alice, bob = await users(srv.url, tmp_path, "alice", "bob")
        await befriend(alice, bob)
        msg = await alice.send("bob", "hi")
        outcome = await alice.wait_outcome(msg, 10)
        assert outcome is not None and outcome.state == "delivered"
        # Logging in frees the slot: a real user behind that address can still come in.
        reg = await held[0].request(
            register=pb.Register(
                username="dave", password=PASSWORD, identity_key=Identity.generate().public_key
            )
        )
        assert reg.HasField("ok")
        for r in held:
            await r.ws.close()
        for c in (alice, bob):
            await c.close()

    _run(srv, go())


def test_out_of_descriptors_the_server_refuses_clearly_and_logs_little(tmp_path: Path) -> None:
    srv = _serve(tmp_path, files=160)  # 160 descriptors: at most 96 connections
    socks: list[socket.socket] = []

    def attack(count: int, first_ip: int) -> None:
        for i in range(count):  # raw TCP, never a byte: as cheap as an attack gets
            s = socket.socket()
            s.bind((f"127.0.1.{first_ip + i // 12}", 0))
            with contextlib.suppress(OSError):
                s.connect(("127.0.0.1", srv.port))
            socks.append(s)

    async def go() -> None:
        attack(144, 1)  # 12 addresses, 12 each: under every per-address cap, over the total
        client = Client(srv.url, Profile("alice", tmp_path / "profiles"))
        with pytest.raises(Unreachable, match="refused the connection: the server is full"):
            await client.connect()
        for s in socks:
            s.close()
        socks.clear()
        for _ in range(100):  # the server notices the closes at once; wait for that, not a fixed time
            try:
                await client.connect()
                break
            except Unreachable:
                await asyncio.sleep(0.1)
        await client.register("alice", PASSWORD)
        await client.close()

    try:
        asyncio.run(go())
    finally:
        for s in socks:
            s.close()
        out = srv.stop()
    assert "Traceback" not in out
    assert _counters(out)["connections_refused"] >= 1


def test_accept_failures_are_logged_once_in_a_while_not_per_attempt(tmp_path: Path) -> None:
    # Told to take more connections than it has descriptors for, accept() fails (EMFILE).
    srv = _serve(tmp_path, "--max-connections", "100000", "--max-pending-per-ip", "1000", files=160)
    socks = []
    try:
        for i in range(300):
            s = socket.socket()
            s.bind((f"127.0.1.{1 + i // 30}", 0))  # 30 an address: under every per-address bound
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError, OSError):
                s.connect(("127.0.0.1", srv.port))
            socks.append(s)
        asyncio.run(asyncio.sleep(3.5))  # asyncio retries a failed accept every second
        for s in socks:
            s.close()
    finally:
        out = srv.stop()
    assert "Traceback" not in out
    assert 1 <= out.count("cannot accept connections") <= 2, out[-2000:]


# -- 6: the offline store ---------------------------------------------------------------------


def test_one_sender_cannot_fill_a_store_and_garbage_is_discarded(tmp_path: Path) -> None:
    srv = _serve(tmp_path, "--offline-quota", "20", "--offline-sender-quota", "5")

    async def go() -> None:
        alice, bob, mallory = await users(srv.url, tmp_path, "alice", "bob", "mallory")
        await befriend(alice, bob)
        await befriend(mallory, bob)
        await bob.close()
        await wait_for(alice, _presence("bob", "offline"))
        raw = await Raw.open(srv.url)
        assert (await raw.login("mallory", mallory.profile.identity)).HasField("login_ok")

        async def garbage() -> pb.Frame:
            return await raw.request(store=pb.Store(to="bob", msg_id=new_msg_id(), envelope=os.urandom(300)))

        for _ in range(5):
            assert (await garbage()).HasField("ok")
        full = await garbage()
        assert full.error.code == pb.QUOTA_EXCEEDED and "the most one sender may leave" in full.error.message
        real = await alice.send("bob", "for bob")  # the store still has room for others
        outcome = await alice.wait_outcome(real, 10)
        assert outcome is not None and outcome.state == "stored"
        assert _offline_rows(srv.db, "bob") == 6
        # bob reads his backlog: the real message shows, the garbage is acknowledged away
        # (before, it stayed for 30 days), and the flood is one warning, not five.
        bob = await relogin(srv.url, tmp_path, "bob")
        seen = Recorder(bob)
        await until(lambda: seen.of(Message) and _offline_rows(srv.db, "bob") == 0, what="backlog read")
        seen.stop()
        assert [m.text for m in seen.of(Message)] == ["for bob"]
        assert bob.counters["bad_envelopes"] == 5
        assert len([p for p in seen.of(Problem) if "mallory" in p.message]) == 1
        await bob.close()
        # Removing a buddy drops what they left: no waiting for the month to pass.
        for _ in range(3):
            assert (await garbage()).HasField("ok")
        assert _offline_rows(srv.db, "bob") == 3
        bob = await relogin(srv.url, tmp_path, "bob")
        await bob.buddy_remove("mallory")
        assert _offline_rows(srv.db, "bob") == 0
        for c in (alice, bob, mallory):
            await c.close()
        await raw.ws.close()

    _run(srv, go())


# -- 8: load shedding and the rest ----------------------------------------------------------------


def test_a_login_flood_is_shed_and_an_honest_login_goes_through(tmp_path: Path) -> None:
    # The real argon2id cost (64 MiB, about 0.1 s a hash): 600 queued hashes are a minute.
    srv = RendezvousProcess(
        tmp_path / "server.db",
        ("--kdf-cost", "interactive", "--login-ip-rate", "1000", "--login-ip-burst", "1000"),
    )  # (the helper passes --kdf-cost min first: the last one given counts)

    async def flood_from(ip: str) -> list[int]:
        codes: list[int] = []
        conns = [await Raw.open(srv.url, local=ip) for _ in range(10)]
        for c in conns:  # 5 logins each, all sent at once: 50 per address
            for i in range(5):
                frame = pb.Frame(
                    id=100 + i, login=pb.Login(username="nobody", password="x" * 12, signature=b"")
                )
                await c.ws.send(frame.SerializeToString())
        for c in conns:
            for _ in range(5):
                reply = await c.recv(120)
                codes.append(reply.error.code)
            await c.ws.close()
        return codes

    async def go() -> None:
        alice = await new_user(srv.url, tmp_path, "alice")
        await alice.close()
        floods = [asyncio.create_task(flood_from(f"127.0.3.{i}")) for i in range(1, 13)]
        await asyncio.sleep(0.5)  # the flood is queued
        honest = Client(srv.url, Profile("alice", tmp_path / "profiles"))
        await honest.connect()
        await honest.login("alice", PASSWORD)  # before: waited behind 600 hashes and timed out
        await honest.close()
        codes = [c for f in await asyncio.gather(*floods) for c in f]
        assert codes.count(pb.RATE_LIMITED) > len(codes) // 2
        assert set(codes) <= {pb.RATE_LIMITED, pb.AUTH_FAILED}

    out = _run(srv, go())
    assert _counters(out)["hashing_shed"] > 0


def test_registrations_have_their_own_stricter_bucket(tmp_path: Path) -> None:
    srv = _serve(tmp_path)

    async def go() -> None:
        raw = await Raw.open(srv.url)
        codes, idents = [], []
        for i in range(11):
            idents.append(Identity.generate())
            reply = await raw.request(
                register=pb.Register(
                    username=f"user{i}", password=PASSWORD, identity_key=idents[i].public_key
                )
            )
            codes.append(reply.error.code if reply.HasField("error") else 0)
        assert codes[:10] == [0] * 10
        assert codes[10] == pb.RATE_LIMITED
        assert (await raw.login("user0", idents[0])).HasField("login_ok")  # logins are not held back
        await raw.ws.close()

    _run(srv, go())


def test_garbage_relayed_by_a_buddy_is_one_warning_not_one_each(tmp_path: Path) -> None:
    srv = _serve(tmp_path)

    async def go() -> None:
        alice, mallory = await users(srv.url, tmp_path, "alice", "mallory")
        await befriend(alice, mallory)
        raw = await Raw.open(srv.url)
        assert (await raw.login("mallory", mallory.profile.identity)).HasField("login_ok")
        for i in range(50):
            await raw.ws.send(
                pb.Frame(id=i + 1, relay=pb.Relay(to="alice", data=os.urandom(100))).SerializeToString()
            )
        await until(lambda: alice.counters["bad_envelopes"] >= 50, what="50 bad envelopes")
        assert alice.counters["bad_envelopes"] == 50
        problems = await gather_for(alice, Problem, 0.5)
        assert len(problems) == 1 and "mallory" in problems[0].message
        await raw.ws.close()
        await alice.close()
        await mallory.close()

    _run(srv, go())


def test_a_one_shot_send_leaves_the_backlog_for_listen(tmp_path: Path) -> None:
    srv = _serve(tmp_path)
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), "P2PIM_PASSWORD": PASSWORD}

    def p2pim(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("p2pim"), *args, "--server", srv.url, "--profile", "bob"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    async def go() -> None:
        assert p2pim("register", "bob").returncode == 0
        alice = await new_user(srv.url, tmp_path, "alice")
        assert p2pim("buddy", "add", "alice").returncode == 0
        await alice.buddy_accept("bob")
        ids = [await alice.send("bob", f"while away {i}") for i in range(3)]
        for m in ids:
            outcome = await alice.wait_outcome(m, 10)
            assert outcome is not None and outcome.state == "stored"
        sent = await asyncio.to_thread(p2pim, "send", "alice", "quick note")
        assert sent.returncode == 0 and "delivered to alice" in sent.stdout, sent.stdout + sent.stderr
        # the one-shot session took none of them (only its receipt, whose row goes with the
        # server's next batch of acknowledged ones)
        for _ in range(100):
            if _offline_rows(srv.db, "bob") == 3:
                break
            await asyncio.sleep(0.05)
        assert _offline_rows(srv.db, "bob") == 3
        heard = await asyncio.to_thread(p2pim, "listen", "--json", "--exit-after", "3")
        texts = [json.loads(x).get("text") for x in heard.stdout.splitlines() if '"message"' in x]
        assert texts == [f"while away {i}" for i in range(3)]
        await alice.close()

    _run(srv, go())


def test_requests_past_the_budget_slow_a_client_down_and_lose_nothing(tmp_path: Path) -> None:
    srv = _serve(tmp_path)

    async def go() -> None:
        alice, bob = await users(srv.url, tmp_path, "alice", "bob")
        await befriend(alice, bob)
        await bob.close()
        await wait_for(alice, _presence("bob", "offline"))
        # A script writes 260 messages at once: past the burst of 200 store requests, the
        # server answers RATE_LIMITED and the client waits and sends again; none fails.
        ids = [await alice.send("bob", f"batch {i}") for i in range(260)]
        outcomes = [await alice.wait_outcome(m, 30) for m in ids]
        assert [o.state if o else None for o in outcomes] == ["stored"] * 260
        # A raw session that ignores retry_after gets refusals, and the rest of the server
        # carries on (alice's own session keeps its answers coming).
        raw = await Raw.open(srv.url)
        assert (await raw.login("bob", _identity(tmp_path, "bob"))).HasField("login_ok")
        codes = [(await raw.request(buddy_list=pb.BuddyListRequest())).WhichOneof("body") for _ in range(230)]
        assert codes.count("error") >= 10 and codes[0] == "buddies"
        assert len(await alice.buddies()) == 1
        await raw.ws.close()
        await alice.close()

    out = _run(srv, go())
    assert _counters(out)["requests_throttled"] >= 10
