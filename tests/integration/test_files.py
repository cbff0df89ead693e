"""File transfer between real clients through a real `rendezvous serve` on loopback:
an offer to a buddy who is away, accept and decline, the file arriving whole (hash,
name, no `.part` left), the server never holding its bytes, and kill -9 of the
receiver mid-transfer resuming from its disk, not from zero."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from pathlib import Path

from p2pim.files.disk import PART, file_hash
from p2pim.files.events import FileAnswered, FileDone, FileFailed, FileOffered
from p2pim.files.transfer import ACK_EVERY, CHUNK, QUIC_WINDOW, WINDOW

from ..conftest import RendezvousProcess, small_disk
from .chatutil import befriend, new_user, relogin, wait_for

PEER = Path(__file__).with_name("filepeer.py")


def test_an_offer_waits_for_an_away_buddy_and_the_file_arrives_whole(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))
    src = tmp_path / "holiday photos.tar"
    src.write_bytes(os.urandom(6 * 1024 * 1024 + 321))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "holiday photos.tar").write_bytes(b"an older file: never overwritten")

    async def main() -> tuple[FileDone, FileDone]:
        a = await new_user(srv.url, tmp_path, "alice")
        b = await new_user(srv.url, tmp_path, "bob")
        await befriend(a, b)
        await b.close()  # bob is away when alice sends
        offer = await a.send_file("bob", src)
        b = await relogin(srv.url, tmp_path, "bob")
        offered = await wait_for(b, lambda e: isinstance(e, FileOffered), 10)
        assert isinstance(offered, FileOffered)
        assert (offered.name, offered.size, offered.file_id) == (src.name, src.stat().st_size, offer.file_id)
        assert list(downloads.iterdir()) == [downloads / "holiday photos.tar"]  # nothing before accepting
        await b.accept_file(offered.file_id, downloads)
        got = await wait_for(b, lambda e: isinstance(e, FileDone), 60)
        sent = await wait_for(a, lambda e: isinstance(e, FileDone), 20)
        assert isinstance(got, FileDone) and isinstance(sent, FileDone)
        assert [t.state for t in a.transfers()] == ["done"]
        assert [t.state for t in b.transfers()] == ["done"]
        history = [r.text for r in a.history("bob")]
        assert history[0].startswith("file: holiday photos.tar (6.3 MB)")
        await a.close()
        await b.close()
        return got, sent

    try:
        got, sent = asyncio.run(main())
    finally:
        srv.stop()
    assert got.path == str(downloads / "holiday photos (1).tar")
    assert file_hash(got.path) == file_hash(src)
    assert (downloads / "holiday photos.tar").read_bytes() == b"an older file: never overwritten"
    assert not any(p.name.endswith(PART) for p in downloads.iterdir())
    assert got.resent == 0 and sent.resent == 0
    # The server relayed the bytes sealed and kept none of them.
    sample = src.read_bytes()[4096:4160]
    for f in tmp_path.glob("server.db*"):
        assert sample not in f.read_bytes()


def test_a_disk_that_fills_up_mid_transfer_fails_it_clearly_on_both_sides(tmp_path: Path) -> None:
    # 512 KiB/s through the relay: the receiver's disk fills up while bytes are still coming
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2", "--relay-kbps", "512"))
    src = tmp_path / "movie.mkv"
    src.write_bytes(os.urandom(3 * 1024 * 1024))

    async def main(disk: Path) -> tuple[FileFailed, FileAnswered]:
        a = await new_user(srv.url, tmp_path, "alice")
        b = await new_user(srv.url, tmp_path, "bob")
        await befriend(a, b)
        await a.send_file("bob", src)
        offered = await wait_for(b, lambda e: isinstance(e, FileOffered))
        assert isinstance(offered, FileOffered)
        await b.accept_file(offered.file_id, disk)  # 3 MiB fit in 4 MiB when it is accepted
        (disk / "something else").write_bytes(b"x" * (3 * 1024 * 1024))  # and then they do not
        failed = await wait_for(b, lambda e: isinstance(e, FileFailed), 30)
        told = await wait_for(a, lambda e: isinstance(e, FileAnswered) and e.kind == "failed", 10)
        assert isinstance(failed, FileFailed) and isinstance(told, FileAnswered)
        assert [t.state for t in a.transfers()] == ["failed"] == [t.state for t in b.transfers()]
        await a.close()
        await b.close()
        return failed, told

    try:
        with small_disk(tmp_path / "small", "4m") as disk:
            failed, told = asyncio.run(main(disk))
            assert sorted(p.name for p in disk.iterdir()) == ["something else"]  # no .part, no movie
    finally:
        srv.stop()
    assert "No space left on device" in failed.reason
    assert "No space left on device" in told.reason  # the sender hears why


def test_a_declined_offer_writes_nothing_and_the_sender_hears_it(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))
    src = tmp_path / "x.bin"
    src.write_bytes(b"secret" * 1000)

    async def main() -> FileAnswered:
        a = await new_user(srv.url, tmp_path, "alice")
        b = await new_user(srv.url, tmp_path, "bob")
        await befriend(a, b)
        await a.send_file("bob", src)
        offered = await wait_for(b, lambda e: isinstance(e, FileOffered))
        assert isinstance(offered, FileOffered)
        await b.decline_file(offered.file_id)
        answer = await wait_for(a, lambda e: isinstance(e, FileAnswered))
        assert isinstance(answer, FileAnswered)
        assert [t.state for t in a.transfers()] == ["declined"] == [t.state for t in b.transfers()]
        await a.close()
        await b.close()
        return answer

    try:
        answer = asyncio.run(main())
    finally:
        srv.stop()
    assert answer.kind == "declined"


def test_receiver_killed_mid_transfer_resumes_from_its_disk(tmp_path: Path) -> None:
    # 4 MiB/s per user through the relay (the operator's limit): a transfer long enough to kill
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2", "--relay-kbps", "4096"))
    src = tmp_path / "big.bin"
    size = 48 * 1024 * 1024
    src.write_bytes(os.urandom(size))
    downloads = tmp_path / "dl"

    async def main() -> tuple[str, int, int]:
        a = await new_user(srv.url, tmp_path, "alice")
        b = await new_user(srv.url, tmp_path, "bob")
        await befriend(a, b)
        await b.close()
        await a.send_file("bob", src)
        argv = [sys.executable, str(PEER), srv.url, str(tmp_path), "bob", str(downloads)]
        peer = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        assert peer.stdout is not None
        line = (await asyncio.wait_for(peer.stdout.readline(), 60)).decode()
        assert line.startswith("have"), line
        db = sqlite3.connect(tmp_path / "profiles" / "bob" / "p2pim.db")
        have = 0
        while have < size // 4:  # a quarter safe on its disk, then kill -9
            await asyncio.sleep(0.005)
            have = db.execute("SELECT durable FROM transfers").fetchone()[0]
        peer.kill()
        db.close()
        await peer.wait()
        again = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        assert again.stdout is not None
        last = ""
        while not last.startswith(("done", "failed")):
            last = (await asyncio.wait_for(again.stdout.readline(), 90)).decode()
            assert last, "the restarted receiver ended early"
        await asyncio.wait_for(again.wait(), 20)
        sent = await wait_for(a, lambda e: isinstance(e, FileDone), 20)
        assert isinstance(sent, FileDone)
        await a.close()
        return last, have, sent.resent

    try:
        last, have, resent_by_sender = asyncio.run(main())
    finally:
        srv.stop()
    assert have < size  # killed mid-transfer
    assert last.startswith("done"), last
    _, path, resent = last.split()
    assert file_hash(path) == file_hash(src)
    assert not any(p.name.endswith(PART) for p in downloads.iterdir())
    # Resumed, not restarted: what went twice is at most what was in flight on each road
    # when the receiver died, plus what it had taken but not yet fsynced.
    assert resent_by_sender + int(resent) <= QUIC_WINDOW + WINDOW + ACK_EVERY


def test_cli_send_file_to_a_listener_that_auto_accepts(tmp_path: Path) -> None:
    """`p2pim send-file` waits until the file is whole at `p2pim listen --auto-accept`; `p2pim files`
    lists it on both sides."""
    import json
    import subprocess

    from natlab.classify import tool

    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))
    src = tmp_path / "notes.txt"
    src.write_bytes(os.urandom(300_000))
    dl = tmp_path / "dl"
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"))
    root = tmp_path / "xdg" / "p2pim" / "profiles"
    root.mkdir(parents=True)

    async def setup() -> None:
        a = await new_user(srv.url, tmp_path, "alice")
        b = await new_user(srv.url, tmp_path, "bob")
        await befriend(a, b)
        await a.close()
        await b.close()
        for name in ("alice", "bob"):
            os.symlink(tmp_path / "profiles" / name, root / name)

    def p2pim(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("p2pim"), *argv], env=env, capture_output=True, text=True, timeout=60)

    listener = None
    try:
        asyncio.run(setup())
        listener = subprocess.Popen(
            [tool("p2pim"), "listen", "--profile", "bob", "--auto-accept", "--dir", str(dl), "--json"],
            env=env, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert listener.stdout is not None
        for _ in range(200):  # until alice's buddy list shows bob's listener online
            buddies = json.loads(p2pim("buddy", "list", "--profile", "alice", "--json").stdout)
            if any(b["username"] == "bob" and b["presence"] == "online" for b in buddies):
                break
        sent = p2pim("send-file", "--profile", "alice", "bob", str(src))
        assert sent.returncode == 0, sent.stderr
        assert "offered notes.txt" in sent.stdout and "sent notes.txt to bob" in sent.stdout
        events = []
        while not any(e.get("event") == "file_done" for e in events):
            line = listener.stdout.readline()
            assert line, "listen ended"
            events.append(json.loads(line))
        done = next(e for e in events if e["event"] == "file_done")
        assert file_hash(done["path"]) == file_hash(src)
        assert any(e["event"] == "file_offered" and e["name"] == "notes.txt" for e in events)
        mine = json.loads(p2pim("files", "--profile", "alice", "--json").stdout)
        assert [(t["name"], t["state"], t["outgoing"]) for t in mine] == [("notes.txt", "done", True)]
        # the same from inside `p2pim chat`: /send, and the transfer shows in the chat
        chat = subprocess.Popen(
            [tool("p2pim"), "chat", "bob", "--profile", "alice", "--json"],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert chat.stdin is not None and chat.stdout is not None
        chat.stdin.write(f"/send {src}\n")
        chat.stdin.flush()
        seen = []
        while not any(e.get("event") == "file_done" for e in seen):
            line = chat.stdout.readline()
            assert line, "chat ended"
            seen.append(json.loads(line))
        chat.stdin.write("/files\n")
        chat.stdin.close()
        rest = [json.loads(x) for x in chat.stdout.read().splitlines()]
        chat.wait(20)
        assert any(e.get("event") == "offered" and e.get("name") == "notes.txt" for e in seen)
        listing = next(e for e in rest if e.get("event") == "files")
        assert [t["state"] for t in listing["transfers"]] == ["done", "done"]
    finally:
        if listener is not None:
            listener.terminate()
            listener.communicate(timeout=10)
        srv.stop()


def test_with_a_direct_path_the_bytes_go_over_quic(tmp_path: Path) -> None:
    """Both online with a direct path (loopback): a QUIC link authenticated by the identity
    keys carries the chunks; the relay carries the words and at most the first chunks."""
    from p2pim.client import PathUpdate

    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))
    src = tmp_path / "video.mkv"
    src.write_bytes(os.urandom(32 * 1024 * 1024))

    async def main() -> tuple[dict[str, int], dict[str, int], FileDone]:
        a = await new_user(srv.url, tmp_path, "alice")
        b = await new_user(srv.url, tmp_path, "bob")
        await befriend(a, b)
        await wait_for(a, lambda e: isinstance(e, PathUpdate) and e.via == "direct", 15)
        await a.send_file("bob", src)
        offered = await wait_for(b, lambda e: isinstance(e, FileOffered))
        assert isinstance(offered, FileOffered)
        await b.accept_file(offered.file_id, tmp_path / "dl")
        got = await wait_for(b, lambda e: isinstance(e, FileDone), 60)
        assert isinstance(got, FileDone)
        await wait_for(a, lambda e: isinstance(e, FileDone), 20)
        counters = dict(a.counters), dict(b.counters)
        await a.close()
        await b.close()
        return counters[0], counters[1], got

    try:
        sender, receiver, got = asyncio.run(main())
    finally:
        out = srv.stop()
    assert file_hash(got.path) == file_hash(src)
    chunks = 32 * 1024 * 1024 // CHUNK
    # the first chunks may go by the relay while the QUIC handshake runs; then QUIC takes them
    assert receiver["quic_frames_in"] >= chunks * 0.9
    assert sender["quic_links"] == receiver["quic_links"] == 1  # ... on one link (its two ends)
    assert receiver["quic_bad"] == sender["quic_bad"] == 0
    line = next(x for x in out.splitlines() if x.startswith("rendezvous: stopped; "))
    relayed = json.loads(line.removeprefix("rendezvous: stopped; "))["relayed"]
    assert relayed < chunks // 4  # the relay took the words (offer, accept, done), not the bytes


def test_a_buddy_flooding_offers_fills_a_bounded_table(tmp_path: Path) -> None:
    """80 offers from one buddy: 64 wait for an answer, the rest are dropped (counted, shown
    once), and a text still gets through; malformed offers are acknowledged and dropped."""
    from p2pim.client import Message
    from p2pim.files.service import MAX_OPEN_OFFERS
    from p2pim.messaging.ids import new_msg_id
    from p2pim.wire import envelope_pb2 as epb

    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))

    async def main() -> tuple[int, int, dict[str, int]]:
        a = await new_user(srv.url, tmp_path, "alice")
        b = await new_user(srv.url, tmp_path, "bob")
        await befriend(a, b)
        key = await a._check_peer("bob")
        for i in range(80):
            offer = epb.FileOffer(
                file_id=new_msg_id(), name=f"f{i}", size=10, blake2b=b"h" * 32, chunk_size=1024
            )
            a._send_body("bob", key, epb.Body(file_offer=offer), f"file: f{i}")
        for bad in (
            epb.FileOffer(file_id=b"short", name="x", size=1, blake2b=b"h" * 32, chunk_size=1024),
            epb.FileOffer(file_id=new_msg_id(), name="x", size=1 << 50, blake2b=b"h" * 32, chunk_size=1024),
            epb.FileOffer(file_id=new_msg_id(), name="x", size=1, blake2b=b"", chunk_size=1024),
        ):
            a._send_body("bob", key, epb.Body(file_offer=bad), "file: bad")
        await a.send("bob", "still talking")
        await wait_for(b, lambda e: isinstance(e, Message) and e.text == "still talking", 20)
        offered = len(b.transfers())
        while a.delivery.items:  # every offer acknowledged, dropped ones too
            await asyncio.sleep(0.05)
        counters = dict(b.counters)
        events = len([t for t in b.transfers() if t.state == "offered"])
        await a.close()
        await b.close()
        return offered, events, counters

    try:
        offered, waiting, counters = asyncio.run(main())
    finally:
        srv.stop()
    assert offered == waiting == MAX_OPEN_OFFERS
    assert counters["file_offers_dropped"] == 80 - MAX_OPEN_OFFERS
