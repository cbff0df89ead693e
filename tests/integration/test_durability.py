"""kill -9 the server or a client at a bad moment: every message arrives exactly once."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from p2pim.client import Message

from ..conftest import RendezvousProcess
from .chatutil import befriend, collect, gather_for, new_user, relogin

SENDER = Path(__file__).with_name("sender.py")


def test_server_killed_with_offline_envelopes_pending(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))

    async def before_crash() -> list[bytes]:
        a = await new_user(srv.url, tmp_path, "alice")
        b = await new_user(srv.url, tmp_path, "bob")
        await befriend(a, b)
        await b.close()
        ids = [await a.send("bob", f"pending {i}") for i in range(20)]
        for mid in ids:
            outcome = await a.wait_outcome(mid, 5)
            assert outcome is not None and outcome.state == "stored"
        await a.close()
        return ids

    async def after_restart() -> list[Message]:
        b = await relogin(srv.url, tmp_path, "bob")
        got = await collect(b, Message, 20)
        await b.close()
        # A second login must not bring any of them again.
        b = await relogin(srv.url, tmp_path, "bob")
        again = await gather_for(b, Message, 1.5)
        await b.close()
        return got + again

    try:
        ids = asyncio.run(before_crash())
        srv.kill()  # kill -9: acknowledged stores must already be on disk
        srv.start()
        got = asyncio.run(after_restart())
    finally:
        srv.stop()
    assert [m.msg_id for m in got] == ids  # each once, in order
    assert [m.text for m in got] == [f"pending {i}" for i in range(20)]


def test_client_killed_with_outbox_not_empty(tmp_path: Path) -> None:
    """The sender dies mid-burst; a restarted sender finishes; the receiver sees each message once."""
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))

    async def setup() -> None:
        a = await new_user(srv.url, tmp_path, "alice")
        b = await new_user(srv.url, tmp_path, "bob")
        await befriend(a, b)
        await a.close()
        await b.close()

    async def receive(proc_args: list[str]) -> tuple[list[Message], int]:
        b = await relogin(srv.url, tmp_path, "bob")
        sender = await asyncio.create_subprocess_exec(
            sys.executable, str(SENDER), *proc_args, stdout=asyncio.subprocess.PIPE
        )
        assert sender.stdout is not None
        queued = -1
        while queued < 60:  # let some messages go out, then kill mid-burst
            line = (await sender.stdout.readline()).decode()
            assert line, "sender ended early"
            queued = int(line.split()[1])
        sender.kill()
        await sender.wait()
        rest = await sender.stdout.read()
        queued = max(
            [queued] + [int(x.split()[1]) for x in rest.decode().splitlines() if x.startswith("queued")]
        )
        # Restart: only drain the outbox left behind.
        again = await asyncio.create_subprocess_exec(
            sys.executable, str(SENDER), *proc_args[:4], "0", stdout=asyncio.subprocess.PIPE
        )
        try:
            await asyncio.wait_for(again.wait(), 30)
        except TimeoutError:
            again.kill()
            await again.wait()
        assert again.stdout is not None
        out = await again.stdout.read()  # small: fits the pipe buffer
        assert b"drained" in out, out.decode()
        got = await collect(b, Message, queued + 1, timeout=20)
        await b.close()
        return got, queued

    try:
        asyncio.run(setup())
        args = [srv.url, str(tmp_path), "alice", "bob", "200"]
        got, queued = asyncio.run(receive(args))
    finally:
        srv.stop()
    texts = [m.text for m in got]
    assert len(texts) == len(set(texts)), "a message was shown twice"
    # Everything whose send() returned arrived; at most the one in flight at the kill comes too.
    numbers = sorted(int(t.split()[1]) for t in texts)
    assert numbers[: queued + 1] == list(range(queued + 1))
    assert len(numbers) <= queued + 2
