"""The rendezvous as a cluster: real PostgreSQL and nats-server (Debian's), three real nodes.

Users are spread over the nodes (each client is given its node first); every flow a user
has crosses nodes. Then the failures: kill -9 of a node mid-burst, of the bus, of the
database. Clients run without direct paths (``direct=False``), so every message really
goes through the nodes and the bus.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bench.services import Nats, Postgres
from p2pim.client import BuddyChange, Client, ClientError, ConnectionState, Message, PresenceChange
from p2pim.client.events import GroupChange, GroupMessage
from p2pim.files.events import FileDone, FileOffered
from p2pim.profile import Profile
from p2pim.wire import control_pb2 as pb

from ..conftest import RendezvousProcess, free_tcp_port, tool
from .chatutil import befriend, collect, gather_for, new_user, relogin, until, wait_for
from .test_devices import device

SENDER = Path(__file__).with_name("sender.py")


class Nodes:
    """``count`` nodes of one cluster on one database and one bus."""

    def __init__(self, db: str, bus: str, count: int = 3) -> None:
        self.ops = [free_tcp_port() for _ in range(count)]
        self.nodes = [
            RendezvousProcess(
                db,
                (
                    "--bus",
                    bus,
                    "--node",
                    f"n{i}",
                    "--heartbeat",
                    "2",
                    "--ops-port",
                    str(self.ops[i]),
                    "--drain-s",
                    "5",
                ),
            )
            for i in range(count)
        ]

    def urls(self, first: int) -> str:
        """Every node's URL, starting with node ``first`` (where that client lands)."""
        n = len(self.nodes)
        return ",".join(self.nodes[(first + i) % n].url for i in range(n))

    def ready(self, i: int) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ops[i]}/readyz", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self, i: int) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ops[i]}/metrics", timeout=5) as r:
            lines = r.read().decode().splitlines()
        return {
            ln.split("{")[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if ln and not ln.startswith("#")
        }

    def stop(self) -> list[str]:
        return [n.stop() for n in self.nodes if n.proc is not None and n.proc.poll() is None]


async def nodes_see_each_other(nodes: Nodes) -> None:
    await until(lambda: all(nodes.metrics(i)["p2pim_nodes_seen"] == len(nodes.nodes) - 1 for i in range(3)))


def test_every_flow_crosses_nodes(tmp_path: Path, postgres: Postgres, nats: Nats) -> None:
    nodes = Nodes(postgres.new_database(), nats.url)

    async def main() -> None:
        await nodes_see_each_other(nodes)
        a = await new_user(nodes.urls(0), tmp_path, "alice", direct=False)
        b = await new_user(nodes.urls(1), tmp_path, "bob", direct=False)
        c = await new_user(nodes.urls(2), tmp_path, "carol", direct=False)
        assert nodes.metrics(0)["p2pim_users_here"] == 1 and nodes.metrics(0)["p2pim_users_elsewhere"] == 2
        # buddies across nodes: the request, the answer, each other's presence
        await a.buddy_add("bob")
        await wait_for(b, lambda e: isinstance(e, BuddyChange) and e.peer == "alice")
        await b.buddy_accept("alice")
        await wait_for(
            a, lambda e: isinstance(e, PresenceChange) and e.peer == "bob" and e.status == "online"
        )
        await befriend(c, a)
        # messages live (relayed node to node over the bus), each way, once each
        sent = [await a.send("bob", f"a->b {i}") for i in range(20)]
        got = await collect(b, Message, 20)
        assert [m.msg_id for m in got] == sent
        await b.send("alice", "b->a")
        assert [m.text for m in await collect(a, Message, 1)] == ["b->a"]
        await b.set_status("away")
        await wait_for(a, lambda e: isinstance(e, PresenceChange) and e.peer == "bob" and e.status == "away")
        # endpoints: asked on node 0 about a user on node 1
        reply = await a.control.request("lookup_endpoints", pb.LookupEndpoints(username="bob"))
        assert reply.endpoints.observed.port == b.control.ws.local_address[1]  # type: ignore[union-attr]
        # offline: stored through node 0, taken at carol's next login on node 2
        await c.close()
        await wait_for(
            a, lambda e: isinstance(e, PresenceChange) and e.peer == "carol" and e.status == "offline"
        )
        for i in range(5):
            mid = await a.send("carol", f"later {i}")
            outcome = await a.wait_outcome(mid, 10)
            assert outcome is not None and outcome.state == "stored"
        c = await relogin(nodes.urls(2), tmp_path, "carol", direct=False)
        assert [m.text for m in await collect(c, Message, 5)] == [f"later {i}" for i in range(5)]
        # a file from node 0 to node 2: offer, answer and every chunk through the bus
        src = tmp_path / "notes.bin"
        src.write_bytes(os.urandom(1024 * 1024 + 17))
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        await a.send_file("carol", src)
        offered = await wait_for(c, lambda e: isinstance(e, FileOffered), 10)
        assert isinstance(offered, FileOffered)
        await c.accept_file(offered.file_id, downloads)
        got = await wait_for(c, lambda e: isinstance(e, FileDone), 60)
        assert isinstance(got, FileDone) and Path(got.path).read_bytes() == src.read_bytes()
        await wait_for(a, lambda e: isinstance(e, FileDone), 20)
        # a group on three nodes: every post is stored once and pushed by each member's node
        await a.groups.create("team", ["bob", "carol"])
        for x in (b, c):
            await wait_for(x, lambda e: isinstance(e, GroupChange) and e.kind == "invited")
            await x.groups.answer("team", True)
            # the owner posts once it knows (its key is made for the members it knows of)
            await wait_for(
                a,
                lambda e, x=x: isinstance(e, GroupChange) and e.kind == "joined" and e.subject == x.username,
            )
        await a.send("#team", "hello team")
        for x in (b, c):
            assert [m.text for m in await collect(x, GroupMessage, 1)] == ["hello team"]
        # a buddy removed on node 1: alice, on node 0, is told
        await b.buddy_remove("alice")
        await wait_for(a, lambda e: isinstance(e, BuddyChange) and e.peer == "bob")
        listed = await a.control.request("buddy_list", pb.BuddyListRequest())
        assert [x.username for x in listed.buddies.buddies] == ["carol"]
        # a device linked across nodes: the new device joins through node 1 a link opened on node 0
        shown: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        linking = asyncio.create_task(a.devices.link(shown.set_result))
        code = await asyncio.wait_for(shown, 10)
        laptop = await device(nodes.urls(1), tmp_path, "alice-laptop")
        assert await laptop.devices.join(code) == "alice"
        await linking
        await laptop.close()
        laptop = await device(nodes.urls(1), tmp_path, "alice-laptop")
        await laptop.login("alice")
        assert laptop.device_count == 2
        for x in (a, b, c, laptop):
            await x.close()

    try:
        asyncio.run(main())
    finally:
        nodes.stop()


def test_a_node_killed_mid_burst_loses_and_repeats_nothing(
    tmp_path: Path, postgres: Postgres, nats: Nats
) -> None:
    """The sender's node is kill -9'd, then the receiver's: every message whose send returned
    arrives once (the clients move to the nodes left, and resume)."""
    nodes = Nodes(postgres.new_database(), nats.url)

    async def setup() -> None:
        await nodes_see_each_other(nodes)
        a = await new_user(nodes.urls(0), tmp_path, "alice", direct=False)
        b = await new_user(nodes.urls(1), tmp_path, "bob", direct=False)
        await befriend(a, b)
        await a.close()
        await b.close()

    async def run() -> tuple[list[Message], int]:
        b = await relogin(nodes.urls(1), tmp_path, "bob", direct=False)
        args = [nodes.urls(0), str(tmp_path), "alice", "bob", "300", "relay"]
        sender = await asyncio.create_subprocess_exec(
            sys.executable, str(SENDER), *args, stdout=asyncio.subprocess.PIPE
        )
        assert sender.stdout is not None
        queued, killed = -1, 0
        got: list[Message] = []
        reader = asyncio.create_task(collect(b, Message, 300, timeout=90))
        while True:
            line = (await asyncio.wait_for(sender.stdout.readline(), 60)).decode()
            assert line, "sender ended early"
            if line.startswith("queued"):
                queued = int(line.split()[1])
            if line.startswith("drained"):
                break
            if queued >= 80 and killed == 0:
                nodes.nodes[0].kill()  # the sender's node
                killed = 1
            elif queued >= 180 and killed == 1:
                nodes.nodes[1].kill()  # the receiver's node
                killed = 2
        await asyncio.wait_for(sender.wait(), 30)
        got = await reader
        await b.close()
        return got, queued

    try:
        asyncio.run(setup())
        got, queued = asyncio.run(run())
    finally:
        nodes.stop()
    texts = [m.text for m in got]
    assert len(texts) == len(set(texts)), "a message was shown twice"
    assert sorted(int(t.split()[1]) for t in texts) == list(range(queued + 1))


def test_bus_and_database_killed_and_back(tmp_path: Path, postgres: Postgres, nats: Nats) -> None:
    """kill -9 of nats-server, then of PostgreSQL: clear errors meanwhile, nothing acknowledged
    is lost, and everything flows again when they return."""
    pg = Postgres()  # its own server: this test kills it
    nodes = Nodes(pg.new_database(), nats.url, count=3)

    async def main() -> None:
        await nodes_see_each_other(nodes)
        a = await new_user(nodes.urls(0), tmp_path, "alice", direct=False)
        b = await new_user(nodes.urls(1), tmp_path, "bob", direct=False)
        await befriend(a, b)
        # -- the bus goes: the nodes lose sight of each other; messages are stored instead
        nats.kill()
        await wait_for(
            a, lambda e: isinstance(e, PresenceChange) and e.peer == "bob" and e.status == "offline"
        )
        assert nodes.ready(0)[0] == 503 and "bus" in nodes.ready(0)[1]
        sent = [await a.send("bob", f"no bus {i}") for i in range(10)]
        for mid in sent:
            outcome = await a.wait_outcome(mid, 20)
            assert outcome is not None and outcome.state == "stored"
        nats.start()  # same port: the nodes reconnect, meet again, and push what was stored
        got = await collect(b, Message, 10, timeout=30)
        assert [m.msg_id for m in got] == sent
        await wait_for(
            a, lambda e: isinstance(e, PresenceChange) and e.peer == "bob" and e.status == "online"
        )
        assert nodes.ready(0)[0] == 200
        # -- the database goes: live relays still pass; what needs it is refused, clearly
        pg.kill()
        live = [await a.send("bob", f"no db {i}") for i in range(5)]
        assert [m.msg_id for m in await collect(b, Message, 5, timeout=20)] == live
        await until(lambda: nodes.ready(1)[0] == 503)
        assert "database" in nodes.ready(1)[1]
        await b.close()  # bob away: alice's next messages must be stored, which waits for the database
        late = Client(nodes.urls(2), Profile("bob", tmp_path / "profiles"), direct=False)
        await late.connect()
        with pytest.raises(ClientError) as refused:  # a login needs the database
            await late.login("bob")
        assert refused.value.code == pb.UNAVAILABLE and "database" in refused.value.message
        await late.close()
        offline = [await a.send("bob", f"stored later {i}") for i in range(5)]
        await asyncio.sleep(0.5)
        pg.start()
        for mid in offline:
            outcome = await a.wait_outcome(mid, 30)
            assert outcome is not None and outcome.state == "stored"
        b = await relogin(nodes.urls(1), tmp_path, "bob", direct=False)
        assert [m.msg_id for m in await collect(b, Message, 5, timeout=30)] == offline
        assert not await gather_for(b, Message, 1.0)  # and nothing twice
        for x in (a, b):
            await x.close()

    try:
        asyncio.run(main())
    finally:
        for out in nodes.stop():
            print(out)  # shown if the test failed: each node's log
        pg.stop()


def test_drain_moves_clients_to_another_node(tmp_path: Path, postgres: Postgres, nats: Nats) -> None:
    """SIGTERM: the node stops taking connections, tells its clients to move (1012), they do,
    and their messages keep flowing."""
    nodes = Nodes(postgres.new_database(), nats.url, count=3)

    async def main() -> None:
        await nodes_see_each_other(nodes)
        a = await new_user(nodes.urls(0), tmp_path, "alice", direct=False)
        b = await new_user(nodes.urls(1), tmp_path, "bob", direct=False)
        await befriend(a, b)
        stopping = asyncio.get_running_loop().run_in_executor(None, nodes.nodes[0].stop)
        await wait_for(a, lambda e: isinstance(e, ConnectionState) and e.up, timeout=20)
        out = await stopping
        assert "stopped" in out
        assert a.control.server != nodes.nodes[0].url
        mid = await a.send("bob", "after the move")
        assert [m.msg_id for m in await collect(b, Message, 1)] == [mid]
        for x in (a, b):
            await x.close()

    try:
        asyncio.run(main())
    finally:
        nodes.stop()


def test_workers_share_one_port_and_a_killed_one_comes_back(
    tmp_path: Path, postgres: Postgres, nats: Nats
) -> None:
    """``--workers 2``: both take connections on one port (the kernel spreads them), users on
    different workers talk; a worker killed -9 is started again and its clients come back."""
    port, ops = free_tcp_port(), free_tcp_port()
    argv = [
        tool("rendezvous"), "serve", "--port", str(port), "--db", postgres.new_database(), "--bus", nats.url,
        "--workers", "2", "--no-stun", "--kdf-cost", "min", "--heartbeat", "2", "--ops-port", str(ops),
        "--register-ip-burst", "100",
    ]  # fmt: skip
    sup = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"ws://127.0.0.1:{port}"

    def here(worker: int) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops + worker}/metrics", timeout=5) as r:
            line = next(x for x in r.read().decode().splitlines() if x.startswith("p2pim_users_here"))
        return float(line.rsplit(" ", 1)[1])

    def workers() -> list[int]:
        return [int(p) for p in Path(f"/proc/{sup.pid}/task/{sup.pid}/children").read_text().split()]

    async def main() -> None:
        await until(lambda: len(workers()) == 2 and _answers(ops) and _answers(ops + 1), 30)
        users = [await new_user(url, tmp_path, f"u{i}", direct=False) for i in range(16)]
        await until(lambda: here(0) > 0 and here(1) > 0, what="users on both workers")
        for i in range(0, 16, 2):
            await befriend(users[i], users[i + 1])
        for i in range(0, 16, 2):
            mid = await users[i].send(users[i + 1].username, "across the workers")
            assert [m.msg_id for m in await collect(users[i + 1], Message, 1)] == [mid]
        before = workers()
        os.kill(before[0], signal.SIGKILL)
        await until(lambda: len(workers()) == 2 and workers() != before, 30, "the worker started again")
        await until(lambda: all(u.connected for u in users), 30, "every client back")
        for i in range(0, 16, 2):
            mid = await users[i].send(users[i + 1].username, "after the kill")
            got = await collect(users[i + 1], Message, 1)
            assert [m.msg_id for m in got if m.text == "after the kill"] == [mid]
        for u in users:
            await u.close()

    try:
        asyncio.run(main())
    finally:
        sup.send_signal(signal.SIGTERM)
        out, _ = sup.communicate(timeout=30)
    assert sup.returncode == 0, out
    assert out.count("rendezvous: stopped") == 2  # each worker drained and said so


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False
