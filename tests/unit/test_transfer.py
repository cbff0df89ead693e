"""The file transfer core on a fake clock: two cores, real files and real SQLite in a
temporary directory, frames moved between them by the test (lost, bad, or cut off by a
"crash" that rebuilds a side from its database and disk)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from p2pim.files.disk import PART, Disk, chunk_hash, file_hash, safe_name, unique_path
from p2pim.files.events import FileDone, FileFailed
from p2pim.files.store import Transfer, TransferStore
from p2pim.files.transfer import ACK_EVERY, CHUNK, QUIC_WINDOW, STALL, WANT_IDLE, WINDOW, Transfers
from p2pim.messaging.ids import new_msg_id
from p2pim.messaging.store import ClientStore
from p2pim.wire import files_pb2 as fpb

SIZE = 3 * 1024 * 1024 + 12345  # not a multiple of anything


class Side:
    """One client's transfer core, rebuilt from its database and disk by :meth:`crash`."""

    def __init__(self, db: Path, name: str) -> None:
        self.db, self.name = db, name
        self.start()

    def start(self) -> None:
        self.store = ClientStore(self.db)
        self.transfers = TransferStore(self.store.conn)
        self.core = Transfers(self.transfers, Disk())
        self.events: list[object] = []

    def crash(self, now: float, peer: str) -> None:
        """kill -9: what was not committed is gone; start again from the database."""
        self.core.disk.close_all()
        self.store.close()
        self.start()
        for t in self.transfers.list(active=True):
            self.core.run(t, now)
        self.core.online(peer, True, now)

    def drain(self) -> None:
        while (e := self.core.next_event()) is not None:
            self.events.append(e)


def pair(tmp_path: Path, size: int = SIZE, data: bytes | None = None) -> tuple[Side, Side, Transfer]:
    src = tmp_path / "photo.jpg"
    src.write_bytes(data if data is not None else os.urandom(size))
    (tmp_path / "dl").mkdir()
    alice, bob = Side(tmp_path / "a.db", "alice"), Side(tmp_path / "b.db", "bob")
    fid = new_msg_id()
    st = src.stat()
    offer = Transfer(
        fid,
        "bob",
        True,
        "photo.jpg",
        st.st_size,
        file_hash(src),
        CHUNK,
        "accepted",
        path=str(src),
        mtime_ns=st.st_mtime_ns,
        created_ms=1,
        updated_ms=1,
    )
    alice.transfers.add(offer)
    part = str(unique_path(tmp_path / "dl", "photo.jpg")) + PART
    bob.transfers.add(replace(offer, peer="alice", outgoing=False, path=str(tmp_path / "dl"), part=part))
    for side, peer in ((alice, "bob"), (bob, "alice")):
        t = side.transfers.get(fid)
        assert t is not None
        side.core.online(peer, True, 0.0)
        side.core.run(t, 0.0)
    return alice, bob, offer


def run(
    alice: Side,
    bob: Side,
    until: float = 120.0,
    drop=lambda frame, n: False,
    now: float = 0.0,
    step: float = 0.01,
) -> float:
    """Move frames both ways until both sides are quiet and nothing is due (or ``until``)."""
    n = 0
    while now < until:
        moved = False
        for src, dst in ((alice, bob), (bob, alice)):
            for dg in src.core.datagrams_to_send(now):
                n += 1
                moved = True
                if not drop(fpb.FileFrame.FromString(dg.data), n):
                    dst.core.receive_datagram(dg.sock, dg.data, src.name, now)
            src.drain()
        if not moved:
            due = [t for t in (alice.core.get_timer(), bob.core.get_timer()) if t is not None]
            if not due:
                return now
            now = max(now + step, min(due))
            alice.core.handle_timer(now)
            bob.core.handle_timer(now)
    return now


def done(side: Side) -> FileDone:
    found = [e for e in side.events if isinstance(e, FileDone)]
    assert len(found) == 1, side.events
    return found[0]


def test_whole_file_arrives_under_its_name_and_both_sides_say_done(tmp_path: Path) -> None:
    alice, bob, offer = pair(tmp_path)
    run(alice, bob)
    got = done(bob)
    assert got.path == str(tmp_path / "dl" / "photo.jpg")
    assert file_hash(got.path) == offer.blake2b
    assert not Path(got.path + PART).exists()
    assert done(alice).resent == 0 and got.resent == 0
    assert bob.transfers.get(offer.file_id).state == "done"  # type: ignore[union-attr]
    assert alice.transfers.get(offer.file_id).state == "done"  # type: ignore[union-attr]
    assert alice.core.running() == [] and bob.core.running() == []


def test_lost_chunks_and_lost_wants_are_sent_again(tmp_path: Path) -> None:
    alice, bob, offer = pair(tmp_path)
    # every 13th frame lost, either way (chunks, wants, stops)
    run(alice, bob, drop=lambda frame, n: n % 13 == 0)
    assert file_hash(done(bob).path) == offer.blake2b
    assert bob.core.counters["file_chunks_bad"] == 0


def test_a_chunk_with_a_wrong_hash_is_dropped_and_counted(tmp_path: Path) -> None:
    alice, bob, offer = pair(tmp_path, size=200_000)
    original = alice.core.datagrams_to_send

    def tamper(now: float):
        out = original(now)
        for i, dg in enumerate(out):
            frame = fpb.FileFrame.FromString(dg.data)
            if frame.HasField("chunk") and frame.chunk.offset == CHUNK and not tamper.done:
                frame.chunk.data = b"x" * len(frame.chunk.data)  # the hash no longer fits
                out[i] = dg._replace(data=frame.SerializeToString())
                tamper.done = True
        return out

    tamper.done = False
    alice.core.datagrams_to_send = tamper  # type: ignore[method-assign]
    run(alice, bob)
    assert bob.core.counters["file_chunks_bad"] == 1
    assert file_hash(done(bob).path) == offer.blake2b


@pytest.mark.parametrize("who", ["receiver", "sender"])
def test_a_crash_mid_transfer_resumes_from_the_disk_not_from_zero(tmp_path: Path, who: str) -> None:
    alice, bob, offer = pair(tmp_path)
    now = 0.0

    def mid_window() -> bool:  # half the file safe on bob's disk, and more arrived since
        ((t, expect),) = bob.core.running()
        return t.durable >= SIZE // 2 and expect > t.durable

    while not mid_window():  # one frame at a time, so the "kill" can land between two
        for src, dst in ((alice, bob), (bob, alice)):
            for dg in src.core.datagrams_to_send(now):
                dst.core.receive_datagram(dg.sock, dg.data, src.name, now)
                if mid_window():
                    break
            if mid_window():
                break
        now += 0.001
    durable = bob.transfers.get(offer.file_id).durable  # type: ignore[union-attr]
    assert 0 < durable < SIZE
    side, peer = (bob, "alice") if who == "receiver" else (alice, "bob")
    side.crash(now, peer)
    if who == "receiver":
        assert os.path.getsize(bob.transfers.get(offer.file_id).part) == durable  # type: ignore[union-attr]
    run(alice, bob, now=now)
    got = done(bob)
    assert file_hash(got.path) == offer.blake2b
    # what resuming cost: at most what was in flight past the last durable mark
    assert 0 < got.resent + done(alice).resent <= WINDOW + ACK_EVERY + CHUNK


def test_a_silent_sender_is_asked_again_and_goes_back_to_what_the_receiver_has(tmp_path: Path) -> None:
    alice, bob, offer = pair(tmp_path, size=WINDOW * 3)
    lost = {"n": 0}

    def lose_a_window(frame: fpb.FileFrame, n: int) -> bool:  # one whole window vanishes
        if frame.HasField("chunk") and frame.chunk.offset >= WINDOW and lost["n"] < WINDOW:
            lost["n"] += len(frame.chunk.data)
            return True
        return False

    end = run(alice, bob, drop=lose_a_window)
    assert file_hash(done(bob).path) == offer.blake2b
    assert end >= WANT_IDLE  # recovered by the receiver asking again, not by luck


def test_a_file_that_does_not_match_its_offer_fails_and_leaves_nothing(tmp_path: Path) -> None:
    alice, bob, offer = pair(tmp_path, size=300_000)
    # the offer's hash is for other bytes: a lying or broken sender
    bob.transfers.conn.execute(
        "UPDATE transfers SET blake2b = ? WHERE file_id = ?", (b"\0" * 32, offer.file_id)
    )
    bob.core.drop(offer.file_id, 0.0)
    bob.core.run(bob.transfers.get(offer.file_id), 0.0)  # type: ignore[arg-type]
    run(alice, bob, until=20)
    failed = [e for e in bob.events if isinstance(e, FileFailed)]
    assert len(failed) == 1 and "does not match" in failed[0].reason
    assert list((tmp_path / "dl").iterdir()) == []
    assert bob.transfers.get(offer.file_id).state == "failed"  # type: ignore[union-attr]


def test_a_source_changed_since_the_offer_fails_the_sender(tmp_path: Path) -> None:
    alice, _bob, offer = pair(tmp_path, size=100_000)
    alice.core.drop(offer.file_id, 0.0)
    Path(offer.path).write_bytes(b"other")
    alice.core.run(alice.transfers.get(offer.file_id), 1.0)  # type: ignore[arg-type]
    alice.drain()
    assert [type(e) for e in alice.events] == [FileFailed]
    assert "changed" in alice.events[0].reason  # type: ignore[attr-defined]


def test_frames_for_unknown_or_foreign_transfers_are_counted_and_answered_sparingly(tmp_path: Path) -> None:
    _alice, bob, offer = pair(tmp_path, size=100_000)
    data = b"x" * 100
    stray = fpb.FileFrame(chunk=fpb.Chunk(file_id=offer.file_id, offset=0, data=data, hash=chunk_hash(data)))
    for k in range(50):  # mallory is not the sender of this transfer
        bob.core.receive_datagram("relay", stray.SerializeToString(), "mallory", k * 0.001)
    bob.core.receive_datagram("relay", b"\xff\xff garbage", "alice", 0.0)
    assert bob.core.counters["file_frames_unknown"] == 50
    assert bob.core.counters["file_frames_bad"] == 1
    assert [d for d in bob.core.datagrams_to_send(0.1) if d.addr == "mallory"] == []


@pytest.mark.parametrize(
    ("offered", "saved"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("/abs/path/x.txt", "x.txt"),
        (".bashrc", "bashrc"),
        ("..", "file"),
        ("", "file"),
        ("a\x00b\x1b[31mc.txt", "ab[31mc.txt"),  # escape and NUL gone: nothing a terminal obeys
        ("\u202eevil.exe", "evil.exe"),
    ],
)
def test_offered_names_are_made_safe(offered: str, saved: str) -> None:
    assert safe_name(offered) == saved


def test_names_never_overwrite(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("1")
    (tmp_path / "a (1).txt.part").write_text("2")
    assert unique_path(tmp_path, "a.txt").name == "a (2).txt"
    assert unique_path(tmp_path, "b").name == "b"
    assert len(safe_name("x" * 500 + ".pdf")) <= 200 and safe_name("x" * 500 + ".pdf").endswith(".pdf")


def _deliver(src: Side, dst: Side, now: float, relay_lag: list, lose_quic: bool = False) -> bool:
    """QUIC frames arrive at once; relayed ones a round later (the relay is slower)."""
    moved = False
    for dg in src.core.datagrams_to_send(now):
        moved = True
        if dg.sock == "relay":
            relay_lag.append((dst, dg, src.name))
        elif not lose_quic:
            dst.core.receive_datagram(dg.sock, dg.data, src.name, now)
    src.drain()
    return moved


def run_two_roads(
    alice: Side, bob: Side, file_id: bytes, at: int, change: Callable[[float, list], None]
) -> float:
    """Both ways until both sides are done (or 60 s), the relay a round slower than QUIC;
    ``change(now, lag)`` once, when bob has more than ``at`` bytes on disk. Returns the time."""
    lag: list = []
    now, changed = 0.0, False
    while not all(any(isinstance(e, FileDone) for e in x.events) for x in (alice, bob)) and now < 60:
        if not changed and (bob.transfers.get(file_id).durable or 0) > at:  # type: ignore[union-attr]
            change(now, lag)
            changed = True
        due, lag[:] = list(lag), []
        for dst, dg, name in due:
            dst.core.receive_datagram(dg.sock, dg.data, name, now)
        moved = _deliver(alice, bob, now, lag) | _deliver(bob, alice, now, lag)
        if not moved and not due:
            now += 0.01
            alice.core.handle_timer(now)
            bob.core.handle_timer(now)
    assert changed
    return now


def test_a_new_faster_road_does_not_let_chunks_overtake_those_on_the_old_one(tmp_path: Path) -> None:
    alice, bob, offer = pair(tmp_path)

    def link_up(now: float, lag: list) -> None:
        for side, peer in ((alice, "bob"), (bob, "alice")):
            side.core.road(peer, "quic", lost=False, now=now)

    run_two_roads(alice, bob, offer.file_id, SIZE // 4, link_up)
    assert file_hash(done(bob).path) == offer.blake2b
    assert done(bob).resent == 0 and done(alice).resent == 0  # nothing sent twice


def test_a_road_that_dies_with_chunks_on_it_costs_at_most_its_window(tmp_path: Path) -> None:
    alice, bob, offer = pair(tmp_path, size=QUIC_WINDOW * 3)
    for side, peer in ((alice, "bob"), (bob, "alice")):
        side.core.road(peer, "quic", lost=False, now=0.0)

    def link_dies(now: float, lag: list) -> None:
        for _ in range(3):  # what is in flight on the link now is lost with it
            _deliver(alice, bob, now, lag, lose_quic=True)
        for side, peer in ((alice, "bob"), (bob, "alice")):
            side.core.road(peer, "relay", lost=True, now=now)

    now = run_two_roads(alice, bob, offer.file_id, QUIC_WINDOW, link_dies)
    assert file_hash(done(bob).path) == offer.blake2b
    assert 0 < done(alice).resent <= QUIC_WINDOW
    assert now < STALL  # the lost window was sent again at once, not after a stall


def test_an_empty_file_arrives_too(tmp_path: Path) -> None:
    alice, bob, offer = pair(tmp_path, size=0, data=b"")
    run(alice, bob)
    assert Path(done(bob).path).read_bytes() == b""
    assert done(alice).path == offer.path


def test_a_receiver_says_where_it_is_as_soon_as_its_sender_is_back(tmp_path: Path) -> None:
    # A restarted sender starts from the durable it last recorded, which may lag: the
    # receiver's word (not a timer WANT_IDLE later) is what sends it to the right place.
    _, bob, _ = pair(tmp_path)
    bob.core.datagrams_to_send(0.0)  # its first word, at start
    bob.core.online("alice", False, 10.0)
    bob.core.online("alice", True, 10.0)
    assert bob.core.get_timer() == 10.0  # due now: the driver runs it at once
    bob.core.handle_timer(10.0)
    frames = [fpb.FileFrame.FromString(d.data) for d in bob.core.datagrams_to_send(10.0)]
    assert [f.WhichOneof("kind") for f in frames] == ["want"]
