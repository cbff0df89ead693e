"""Several devices per account through a real `rendezvous serve` on loopback: a second
profile cannot log in with the right password until it is linked (a clear error, not
"wrong password"); linking with a code (SPAKE2 through the server); every device gets
every message exactly once, an offline one at its next login; what one device sends is
in the others' history; a device removed mid-session is cut off at once; a wrong code
and a code guessed by a third party fail without leaking the account; `--new-key`."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from p2pim.client import (
    Client,
    ClientError,
    DeviceChange,
    GroupChange,
    GroupMessage,
    KeyChanged,
    Message,
    Problem,
    SentElsewhere,
)
from p2pim.client.devices import LinkError, parse_code
from p2pim.profile import Profile
from p2pim.wire import control_pb2 as pb

from ..conftest import RendezvousProcess, tool
from .chatutil import PASSWORD, befriend, collect, new_user, relogin, until, wait_for


async def device(url: str, root: Path, profile: str) -> Client:
    client = Client(url, Profile(profile, root / "profiles"))
    await client.connect()
    return client


async def link(a: Client, url: str, root: Path, profile: str) -> Client:
    """Link a new device (``profile``) to ``a``'s account; returns it logged in."""
    shown: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    linking = asyncio.create_task(a.devices.link(shown.set_result))
    code = await asyncio.wait_for(shown, 10)
    new = await device(url, root, profile)
    assert await new.devices.join(code) == a.username
    await linking
    await new.close()
    again = await device(url, root, profile)
    await again.login(a.username)  # with the token the link brought
    return again


def history(c: Client, peer: str) -> list[tuple[bool, str]]:
    return [(r.outgoing, r.text) for r in c.history(peer, 100)]


def test_a_second_device_is_linked_and_every_device_gets_every_message(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))

    async def main() -> None:
        desk = await new_user(srv.url, tmp_path, "alice")
        bob = await new_user(srv.url, tmp_path, "bob")
        await befriend(desk, bob)
        # a new profile with the right password: told what to do, not "wrong password"
        laptop = await device(srv.url, tmp_path, "alice-laptop")
        with pytest.raises(ClientError) as refused:
            await laptop.login("alice", PASSWORD)
        assert refused.value.code == pb.DEVICE_NOT_LINKED and "p2pim device link" in str(refused.value)
        await laptop.close()
        with pytest.raises(ClientError) as wrong:  # the wrong password still says only that
            probe = await device(srv.url, tmp_path, "alice-laptop")
            try:
                await probe.login("alice", "not the password")
            finally:
                await probe.close()
        assert wrong.value.code == pb.AUTH_FAILED

        laptop = await link(desk, srv.url, tmp_path, "alice-laptop")
        assert laptop.profile.identity.public_key == desk.profile.identity.public_key
        assert laptop.store.contact("bob") is not None  # the pinned keys came along
        added = await wait_for(desk, lambda e: isinstance(e, DeviceChange) and e.kind == "added")
        assert isinstance(added, DeviceChange) and added.devices == 2
        phone = await link(laptop, srv.url, tmp_path, "alice-phone")  # a third, linked from the second
        rows = await desk.devices.list()
        assert len(rows) == 3 and [r.this for r in rows].count(True) == 1

        # bob writes: every device shows it, once each
        for i in range(5):
            await bob.send("alice", f"hi {i}")
        for c in (desk, laptop, phone):
            got = await collect(c, Message, 5)
            assert sorted(m.text for m in got) == [f"hi {i}" for i in range(5)]
        await phone.close()  # the phone is off for the rest: it gets all of it at its next login
        # the laptop answers: bob gets it, the desk's history has it too
        await laptop.send("bob", "from the laptop")
        assert [m.text for m in await collect(bob, Message, 1)] == ["from the laptop"]
        elsewhere = await wait_for(desk, lambda e: isinstance(e, SentElsewhere))
        assert isinstance(elsewhere, SentElsewhere) and elsewhere.peer == "bob"
        assert (True, "from the laptop") in history(desk, "bob")

        # the desk goes away; what bob says meanwhile reaches it at its next login, once
        await desk.close()
        for i in range(3):
            await bob.send("alice", f"while away {i}")
        got = await collect(laptop, Message, 3)
        assert [m.text for m in got] == [f"while away {i}" for i in range(3)]
        desk = await relogin(srv.url, tmp_path, "alice")
        got = await collect(desk, Message, 3)
        assert sorted(m.text for m in got) == [f"while away {i}" for i in range(3)]
        phone = await device(srv.url, tmp_path, "alice-phone")
        await phone.login("alice")
        got = await collect(phone, Message, 3)
        assert sorted(m.text for m in got) == [
            f"while away {i}" for i in range(3)
        ]  # once, though two took them
        await until(lambda: (True, "from the laptop") in history(phone, "bob"))
        said = sorted([f"hi {i}" for i in range(5)] + [f"while away {i}" for i in range(3)])
        for c in (desk, laptop, phone):
            assert sorted(t for out, t in history(c, "bob") if not out) == said
        await phone.close()

        # the laptop is removed from the desk: its session ends at once, its token is void
        laptop_id = next(r.device_id for r in await desk.devices.list() if not r.this)
        await desk.devices.remove(laptop_id)
        told = await wait_for(laptop, lambda e: isinstance(e, Problem) and "removed" in e.message, 10)
        assert "this device was removed" in str(told)
        await bob.send("alice", "after the removal")
        assert [m.text for m in await collect(desk, Message, 1)] == ["after the removal"]
        assert not laptop.connected and "after the removal" not in [t for _, t in history(laptop, "bob")]
        phone = await device(srv.url, tmp_path, "alice-phone")  # the phone was off: it gets it now
        await phone.login("alice")
        assert [m.text for m in await collect(phone, Message, 1)] == ["after the removal"]
        await phone.close()
        with pytest.raises(ClientError):
            again = await device(srv.url, tmp_path, "alice-laptop")
            try:
                await again.login("alice")
            finally:
                await again.close()
        for c in (desk, bob, laptop):
            await c.close()

    try:
        asyncio.run(main())
    finally:
        srv.stop()
    db = sqlite3.connect(tmp_path / "server.db")
    assert db.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == 3  # alice's desk and phone, bob's
    assert db.execute("SELECT COUNT(*) FROM offline").fetchone()[0] == 0  # every copy was taken


def test_a_wrong_code_or_a_guessed_channel_links_nothing(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))

    async def main() -> None:
        desk = await new_user(srv.url, tmp_path, "alice")
        for attempt in ("wrong words", "guessed channel"):
            shown: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            linking = asyncio.create_task(desk.devices.link(shown.set_result))
            code = await asyncio.wait_for(shown, 10)
            channel, _ = parse_code(code)
            # mallory (or a typo) has the channel number but not the words
            bad = f"{channel}-acid-acorn" if not code.endswith("-acid-acorn") else f"{channel}-acid-actor"
            thief = await device(srv.url, tmp_path, f"mallory-{attempt.split()[0]}")
            with pytest.raises(LinkError):
                await thief.devices.join(bad)
            with pytest.raises(LinkError):
                await linking
            assert thief.store.account() is None
            assert not (thief.profile.path / "identity.key.unlinked").exists()  # nothing came
            await thief.close()
            # the code is burnt: the real device cannot use it any more either
            late = await device(srv.url, tmp_path, f"late-{attempt.split()[0]}")
            with pytest.raises(ClientError):
                await late.devices.join(code)
            await late.close()
        assert len(await desk.devices.list()) == 1
        await desk.close()

    try:
        asyncio.run(main())
    finally:
        srv.stop()


def test_every_device_lost_a_new_key_and_the_buddy_is_warned(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))

    async def main() -> None:
        old = await new_user(srv.url, tmp_path, "alice")
        bob = await new_user(srv.url, tmp_path, "bob")
        await befriend(old, bob)
        old_key = old.profile.identity.public_key
        await old.close()  # the machine is lost
        fresh = await device(srv.url, tmp_path, "alice-new")
        await fresh.login("alice", PASSWORD, new_key=True)
        assert fresh.profile.identity.public_key != old_key
        warned = await wait_for(bob, lambda e: isinstance(e, KeyChanged) and e.peer == "alice")
        assert isinstance(warned, KeyChanged)
        with pytest.raises(ClientError) as refused:  # bob does not seal to the new key unasked
            await bob.send("alice", "is it you?")
        assert "key changed" in str(refused.value)
        lost = await device(srv.url, tmp_path, "alice")  # the old profile, if it comes back
        with pytest.raises(ClientError):
            await lost.login("alice")
        for c in (lost, fresh, bob):
            await c.close()

    try:
        asyncio.run(main())
    finally:
        srv.stop()


def test_groups_with_two_devices_each_posts_and_each_gets_every_post(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))

    async def main() -> None:
        desk = await new_user(srv.url, tmp_path, "alice")
        bob = await new_user(srv.url, tmp_path, "bob")
        await befriend(desk, bob)
        await desk.groups.create("team", ["bob"])
        await wait_for(bob, lambda e: isinstance(e, GroupChange) and e.kind == "invited")
        await bob.groups.answer("team", True)
        laptop = await link(desk, srv.url, tmp_path, "alice-laptop")
        gid = desk.groups.find("team").gid
        assert laptop.groups.find("team").gid == gid  # the membership came with the login
        await desk.send("#team", "from the desk")
        await laptop.send("#team", "from the laptop")  # its own sender key: both open at bob's
        got = await collect(bob, GroupMessage, 2)
        assert sorted(m.text for m in got) == ["from the desk", "from the laptop"]
        await bob.send("#team", "hi both")
        for c in (desk, laptop):
            assert [m.text for m in await collect(c, GroupMessage, 1)] == ["hi both"]
        want = ["from the desk", "from the laptop", "hi both"]
        for c in (desk, laptop):  # each history has the whole conversation (the other's posts as copies)
            await until(lambda c=c: sorted(r.text for r in c.history("#" + gid.hex(), 50)) == want)
        for c in (desk, laptop, bob):
            await c.close()

    try:
        asyncio.run(main())
    finally:
        srv.stop()


def test_the_device_commands_link_join_list_remove(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"), P2PIM_SERVER=srv.url)
    root = tmp_path / "xdg" / "p2pim" / "profiles"
    root.mkdir(parents=True)

    async def setup() -> None:
        alice = await new_user(srv.url, tmp_path, "alice")
        await alice.close()
        os.symlink(tmp_path / "profiles" / "alice", root / "alice")

    def p2pim(who: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("p2pim"), *argv, "--profile", who], env=env, capture_output=True, text=True, timeout=60
        )

    linker = None
    try:
        asyncio.run(setup())
        refused = subprocess.run(
            [tool("p2pim"), "login", "alice", "--profile", "laptop", "--password-stdin"],
            input=PASSWORD, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode != 0 and "not linked to alice" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        linker = subprocess.Popen(
            [tool("p2pim"), "device", "link", "--profile", "alice", "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert linker.stdout is not None
        code = json.loads(linker.stdout.readline())["code"]
        bad = p2pim("mallory", "device", "join", "12-not-a-code")
        assert bad.returncode == 2 and "is not a link code" in bad.stderr
        joined = p2pim("laptop", "device", "join", code)
        assert joined.returncode == 0 and "alice" in joined.stdout, joined.stderr
        assert json.loads(linker.stdout.readline())["linked"] > 0
        assert linker.wait(30) == 0
        listed = json.loads(p2pim("laptop", "device", "list", "--json").stdout)
        assert len(listed) == 2 and [d["this"] for d in listed].count(True) == 1
        other = next(d["device_id"] for d in listed if not d["this"])
        assert p2pim("laptop", "send", "alice", "hello me").returncode != 0  # no buddy of oneself
        assert p2pim("laptop", "device", "remove", str(other)).returncode == 0
        gone = p2pim("alice", "status")
        assert gone.returncode != 0 and "Traceback" not in gone.stderr
    finally:
        if linker is not None and linker.poll() is None:
            linker.kill()
        srv.stop()
