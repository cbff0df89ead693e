"""Groups through a real `rendezvous serve` on loopback: six members, two of them away,
each message exactly once and in order for everyone; a member removed mid-conversation
gets nothing after it and cannot open what follows even with the server's database in
hand; no plaintext on the server."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
from pathlib import Path

from natlab.classify import tool
from p2pim.client import Client, GroupChange, GroupMessage
from p2pim.groups import seal as gseal
from p2pim.groups.store import GroupStore
from p2pim.wire import envelope_pb2 as epb

from ..conftest import RendezvousProcess, free_udp_ports
from .chatutil import befriend, new_user, relogin, wait_for

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]


async def team(url: str, root: Path) -> dict[str, Client]:
    """alice's group "team" with the five others in it (they are her buddies)."""
    clients = {n: await new_user(url, root, n) for n in NAMES}
    alice = clients["alice"]
    for n in NAMES[1:]:
        await befriend(alice, clients[n])
    await alice.groups.create("team", NAMES[1:])
    for n in NAMES[1:]:
        c = clients[n]
        await wait_for(
            c, lambda e, me=n: isinstance(e, GroupChange) and e.kind == "invited" and e.subject == me
        )
        await c.groups.answer("team", True)
    for n in NAMES[1:]:  # everyone saw everyone join
        c = clients[n]
        await until(lambda c=c: len([m for m, r in c.groups.store.members(c.groups.find("team").gid).items()
                                     if r != "invited"]) == 6)  # fmt: skip
    return clients


async def until(probe, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    end = asyncio.get_running_loop().time() + timeout
    while not probe():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.02)


def texts(c: Client, gid: bytes) -> list[tuple[str, str]]:
    """(author, text) of the group's history on ``c``, ours as ``c.username``."""
    return [(r.author or c.username, r.text) for r in c.history(gseal.label(gid), 100)]


def by_sender(said: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Each sender's texts in order: the order a group keeps (senders interleave freely)."""
    out: dict[str, list[str]] = {}
    for who, text in said:
        out.setdefault(who, []).append(text)
    return out


async def messages(c: Client, n: int, timeout: float = 15.0) -> list[GroupMessage]:
    got: list[GroupMessage] = []
    while len(got) < n:
        ev = await wait_for(c, lambda e: isinstance(e, GroupMessage), timeout)
        assert isinstance(ev, GroupMessage)
        got.append(ev)
    return got


def test_six_members_two_away_each_message_once_and_in_order(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))

    async def main() -> None:
        clients = await team(srv.url, tmp_path)
        gid = clients["alice"].groups.find("#team").gid
        for away in ("dave", "erin"):
            await clients.pop(away).close()
        said = [("alice", f"a{i} secret words") for i in range(3)] + [
            ("bob", f"b{i} secret words") for i in range(2)
        ]
        for who, text in said[:3]:
            await clients[who].send("#team", text)
        for who, text in said[3:]:
            await clients[who].send("#team", text)
        for n in ("bob", "carol", "frank"):
            got = await messages(clients[n], len([s for s in said if s[0] != n]))
            assert by_sender([(m.sender, m.text) for m in got]) == by_sender([s for s in said if s[0] != n])
        for away in ("dave", "erin"):
            clients[away] = await relogin(srv.url, tmp_path, away)
            got = await messages(clients[away], len(said))
            assert by_sender([(m.sender, m.text) for m in got]) == by_sender(said)  # once, in order
        await asyncio.sleep(0.5)  # nothing comes twice
        for n, c in clients.items():
            assert by_sender(texts(c, gid)) == by_sender(said), n
            assert len(texts(c, gid)) == len(said), n
            await c.close()

    try:
        asyncio.run(main())
    finally:
        srv.stop()
    for f in tmp_path.glob("server.db*"):  # the server holds sealed copies only
        assert b"secret words" not in f.read_bytes()


def test_a_removed_member_gets_nothing_after_and_cannot_open_what_follows(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))

    async def main() -> tuple[dict[bytes, bytes], bytes]:
        clients = await team(srv.url, tmp_path)
        alice, carol, frank = clients["alice"], clients["carol"], clients["frank"]
        gid = alice.groups.find("team").gid
        await alice.send("#team", "before: carol may read this")
        assert [m.text for m in await messages(carol, 1)] == ["before: carol may read this"]
        assert [m.text for m in await messages(frank, 1)] == ["before: carol may read this"]
        await frank.close()  # frank is away: what follows waits on the server for him
        await alice.groups.remove("team", "carol")
        await wait_for(carol, lambda e: isinstance(e, GroupChange) and e.kind == "removed", 10)
        await wait_for(alice, lambda e: isinstance(e, GroupChange) and e.kind == "removed", 10)
        await alice.send("#team", "after: not for carol")
        await clients["bob"].send("#team", "after, from bob: not for carol")
        got = await messages(clients["dave"], 3)
        assert by_sender([(m.sender, m.text) for m in got]) == {
            "alice": ["before: carol may read this", "after: not for carol"],
            "bob": ["after, from bob: not for carol"],
        }
        await asyncio.sleep(0.5)
        assert [r.text for r in carol.history(gseal.label(gid), 100)] == ["before: carol may read this"]
        with_keys = {
            (owner, epoch): key
            for owner in NAMES
            for epoch in range(1, 5)
            if (key := GroupStore(carol.store.conn).key(gid, owner, epoch)) is not None
        }
        assert carol.groups.store.group(gid).role == "gone"  # type: ignore[union-attr]
        for c in clients.values():
            if c is not frank:
                await c.close()
        return {k[0].encode() + bytes([k[1]]): v for k, v in with_keys.items()}, gid

    try:
        carols_keys, gid = asyncio.run(main())
    finally:
        srv.stop()
    # Carol with every key she ever had and the server's database (frank's copies wait there):
    db = sqlite3.connect(tmp_path / "server.db")
    rows = db.execute(
        "SELECT sender, envelope FROM offline WHERE grp = ? AND sender != ''", (gid,)
    ).fetchall()
    assert len(rows) >= 2
    opened = 0
    for _, data in rows:
        env = epb.Envelope.FromString(data)
        for key in carols_keys.values():
            try:
                gseal.open_body(env, key)
                opened += 1
            except gseal.GroupSealError:
                pass
    assert opened == 0  # every key she ever had opens none of what followed her removal
    assert all(b"not for carol" not in d for _, d in rows)


def test_the_group_commands_from_create_to_history(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"))
    root = tmp_path / "xdg" / "p2pim" / "profiles"
    root.mkdir(parents=True)

    async def setup() -> None:
        a, b, c = [await new_user(srv.url, tmp_path, n) for n in ("alice", "bob", "carol")]
        await befriend(a, b)
        await befriend(a, c)
        for x in (a, b, c):
            await x.close()
            os.symlink(tmp_path / "profiles" / x.username, root / x.username)

    def p2pim(who: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("p2pim"), *argv, "--profile", who], env=env, capture_output=True, text=True, timeout=60
        )

    listener = None
    try:
        asyncio.run(setup())
        made = p2pim("alice", "group", "create", "team", "bob", "carol")
        assert made.returncode == 0 and made.stdout.startswith("created #team"), made.stderr
        early = p2pim("bob", "group", "invite", "team", "carol")  # invited, not in yet
        assert early.returncode == 2 and "not in it yet: p2pim group accept team" in early.stderr, (
            early.stderr
        )
        listed = json.loads(p2pim("bob", "group", "list", "--json").stdout)
        assert [(g["name"], g["role"]) for g in listed] == [("team", "invited")]
        assert p2pim("bob", "group", "accept", "team").returncode == 0
        assert p2pim("carol", "group", "accept", "#team").returncode == 0
        members = json.loads(p2pim("alice", "group", "members", "team", "--json").stdout)["members"]
        assert sorted((m["username"], m["role"]) for m in members) == [
            ("alice", "owner"), ("bob", "member"), ("carol", "member"),
        ]  # fmt: skip
        assert "cannot remove" in p2pim("bob", "group", "remove", "team", "carol").stderr
        listener = subprocess.Popen(
            [tool("p2pim"), "listen", "--profile", "carol", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        sent = p2pim("alice", "send", "#team", "lunch at noon?")
        assert sent.returncode == 0 and "kept on the server for every member" in sent.stdout, sent
        assert p2pim("bob", "send", "#team", "yes").returncode == 0
        assert listener.stdout is not None
        got = []
        while len(got) < 2:
            line = listener.stdout.readline()
            assert line, "listen ended"
            event = json.loads(line)
            if event.get("event") == "group_message":
                got.append((event["group"], event["from"], event["text"]))
        assert sorted(got) == [("team", "alice", "lunch at noon?"), ("team", "bob", "yes")]
        history = json.loads(p2pim("carol", "history", "#team", "--json").stdout)
        assert sorted((h["from"], h["text"]) for h in history) == [
            ("alice", "lunch at noon?"),
            ("bob", "yes"),
        ]
        assert "no group called #nope" in p2pim("carol", "history", "#nope").stderr
        want = [("lunch at noon?", 2, 1, 1)]  # kept for bob and carol; carol's listener took and showed it
        for _ in range(100):
            sent_list = json.loads(p2pim("alice", "group", "sent", "team", "--json").stdout)
            if [(x["text"], x["members"], x["delivered"], x["read"]) for x in sent_list] == want:
                break
        assert [(x["text"], x["members"], x["delivered"], x["read"]) for x in sent_list] == want
        assert "delivered to 1 of 2, read by 1" in p2pim("alice", "group", "sent", "team").stdout
        chat = subprocess.run(
            [tool("p2pim"), "chat", "#team", "--profile", "bob", "--json", "--linger", "10"],
            env=env, input="from the chat\n", capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        said = [json.loads(x) for x in chat.stdout.splitlines()]
        assert chat.returncode == 0 and any(
            e.get("event") == "group_sent" and e["state"] == "stored" for e in said
        )
        assert [e["text"] for e in said if e.get("event") == "group_message"] == [
            "lunch at noon?"
        ]  # what waited
        assert "no group called '#nope'" in p2pim("bob", "chat", "#nope").stderr
        status = json.loads(p2pim("carol", "status", "--json").stdout)
        assert [(g["name"], g["role"], g["members"]) for g in status["groups"]] == [("team", "member", 3)]
        assert "#team" in p2pim("carol", "status").stdout
    finally:
        if listener is not None:
            listener.terminate()
            listener.communicate(timeout=10)
        srv.stop()


def test_the_server_killed_mid_fan_out_loses_nothing_and_shows_nothing_twice(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))
    n = 40

    async def main() -> None:
        clients = await team(srv.url, tmp_path)
        alice = clients["alice"]
        gid = alice.groups.find("team").gid
        ids = [await alice.send("#team", f"burst {i}") for i in range(n)]  # all queued at once

        def taken() -> int:
            return sum(1 for r in alice.history(gseal.label(gid), 100) if r.state == "stored")

        await until(lambda: taken() >= 5)
        srv.kill()  # kill -9 mid-burst: what it said Ok to is on disk; the rest comes again
        assert taken() < n, "the burst ended before the kill: make it longer"
        srv.start()
        for name, c in clients.items():
            if name == "alice":
                continue
            got = await messages(c, n, timeout=60)
            assert [m.text for m in got] == [f"burst {i}" for i in range(n)], name  # once, in order
        await until(lambda: taken() == n, 30)
        assert [await alice.groups.wait_sent(i, 1) for i in ids] == ["stored"] * n
        await asyncio.sleep(0.5)
        for name, c in clients.items():
            assert len(c.history(gseal.label(gid), 100)) == n, name
            await c.close()

    try:
        asyncio.run(main())
    finally:
        srv.stop()


def test_members_with_a_direct_path_get_posts_directly_also_while_the_server_is_down(tmp_path: Path) -> None:
    """alice and bob are buddies with a direct path, carol is alice's buddy only. alice's
    posts reach bob straight away (shown in order, once: the server's copies are dropped as
    duplicates) and carol through the server. With the server killed, bob still gets what
    alice says; carol gets it once the server is back, and nobody sees anything twice."""
    stun, alt = free_udp_ports(2)
    srv = RendezvousProcess(
        tmp_path / "server.db",
        ("--heartbeat", "2", "--stun-ip", "127.0.0.1", "--stun-port", str(stun), "--stun-alt-port", str(alt)),
    )
    n, m = 30, 5

    async def main() -> None:
        alice, bob, carol = [await new_user(srv.url, tmp_path, name) for name in ("alice", "bob", "carol")]
        await befriend(alice, bob)
        await befriend(alice, carol)
        await until(lambda: alice.path_to("bob")[0] == "direct" and bob.path_to("alice")[0] == "direct")
        await alice.groups.create("team", ["bob", "carol"])
        for c in (bob, carol):
            await wait_for(c, lambda e: isinstance(e, GroupChange) and e.kind == "invited")
            await c.groups.answer("team", True)
        gid = alice.groups.find("team").gid
        await until(lambda: len(alice.groups.core.active_members(gid)) == 3)
        await alice.send("#team", "hello")  # the first post carries the new key
        for c in (bob, carol):
            assert [x.text for x in await messages(c, 1)] == ["hello"]

        for i in range(n):
            await alice.send("#team", f"m{i}")
        got = await messages(bob, n)
        assert [x.text for x in got] == [f"m{i}" for i in range(n)]  # once, in alice's order
        assert any(x.via == "direct" for x in got), "no post came on the direct path"
        assert [x.text for x in await messages(carol, n)] == [f"m{i}" for i in range(n)]
        assert {x.via for x in got} <= {"direct", "server"}
        assert alice.counters["group_direct_out"] >= n

        srv.kill()  # the rendezvous is gone; the direct path is not
        for i in range(m):
            await alice.send("#team", f"down{i}")
        got = await messages(bob, m)
        assert [(x.text, x.via) for x in got] == [(f"down{i}", "direct") for i in range(m)]
        srv.start()  # alice's outbox goes on its way; carol gets it all, once
        assert [x.text for x in await messages(carol, m, timeout=40)] == [f"down{i}" for i in range(m)]
        await until(
            lambda: bob.counters["group_duplicates"] >= n + m - sum(1 for x in got if x.via != "direct")
        )
        for c in (alice, bob, carol):
            lines = [r.text for r in c.history(gseal.label(gid), 100)]
            assert lines == ["hello", *(f"m{i}" for i in range(n)), *(f"down{i}" for i in range(m))], (
                c.username
            )
            await c.close()

    try:
        asyncio.run(main())
    finally:
        srv.stop()
