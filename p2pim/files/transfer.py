"""The file transfer core: chunks out, chunks in, resumed from what is on disk.

Sans-IO, with the project's verbs (:mod:`p2pim.sansio`):
``receive_datagram(road, data, peer, now)`` takes one serialized
:class:`~p2pim.wire.files_pb2.FileFrame` the shell has already authenticated
as ``peer``'s (over the relay: opened with the peer's key,
:mod:`p2pim.files.frames`); ``datagrams_to_send(now)`` gives
``Datagram(road, bytes, peer)`` for the shell to seal and send. The offer,
the accept and the final word are envelopes (exactly once, through the
messaging core); this core moves the bytes of transfers already accepted.

The receiver leads. Its ``Want`` says how far its disk has the file
(``durable``: fsynced and recorded, so it survives kill -9) and how far the
bytes have come (``expect``); the sender keeps at most :data:`WINDOW` bytes
in flight past ``expect``. Both sides start on their own when they run an
accepted transfer: the sender sends from the ``durable`` it last heard, the
receiver asks from its own; whatever arrives twice is dropped and counted
(``resent``), a gap (a chunk lost across a reconnect or a refused relay) is
answered with ``rewind``, and a silent side is asked again after
:data:`WANT_IDLE` / gone back to after :data:`STALL`. So a transfer goes on
after a path change, a disconnect or a restart of either side from the last
durable byte, never from zero; the whole file's BLAKE2b is checked before it
gets its name (:meth:`p2pim.files.disk.Disk.finish`).

Every frame is checked (its peer, its range, its chunk hash); a bad one is
counted and dropped, never trusted, never fatal to other transfers.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError

from ..wire import files_pb2 as fpb
from ..wire.limits import ID_SIZE
from .disk import CHUNK_HASH_SIZE, Disk, FileError, chunk_hash
from .events import FileDone, FileEvent, FileFailed, FileProgress
from .store import Transfer, TransferStore

CHUNK = 32 * 1024  # bytes per chunk: one relay frame (the relay takes up to 64 KiB)
MAX_CHUNK = 64 * 1024  # a bigger chunk from a peer is garbage
# Bytes in flight to one peer past what it has, per road. The rendezvous refuses relays
# to a recipient whose queue is half full (its bound is 1 MiB per connection), so more
# than that gains nothing there and only makes a rewind cost more. QUIC has congestion
# control of its own; the window only bounds what its send buffer holds and what a path
# change may cost (what was in flight on the old road is sent again).
WINDOW = 512 * 1024
QUIC_WINDOW = 4 * 1024 * 1024
ACK_EVERY = 256 * 1024  # the receiver fsyncs, records and says Want this often
WANT_IDLE = 2.0  # receiver: no chunk for this long -> ask again, from where it is
STALL = 5.0  # sender: no word for this long with bytes in flight -> go back to what it has
REWIND_EVERY = 0.5  # receiver: one rewind (or "you are behind") per this long, not one per chunk
STOP_EVERY = 1.0  # "not running here" answers per transfer, at most one per this long
PAUSE_ON_STOP = 30.0  # sender: the other side said it is not running this transfer
PROGRESS_EVERY = 0.5  # a progress event per transfer at most this often
MAX_ACTIVE = 32  # transfers running at once; later ones wait their turn
MAX_EVENTS = 10_000
MAX_STOPS = 1024  # remembered "not running here" answers (a stranger's ids must not grow us)
RELAY, QUIC = "relay", "quic"
WINDOWS = {RELAY: WINDOW, QUIC: QUIC_WINDOW}


class FrameOut(NamedTuple):
    """A :class:`~p2pim.sansio.Datagram` (road, serialized frame, peer) that also says which
    chunk it carries, so the shell can hand a chunk that did not go back to :meth:`Transfers.refused`
    without parsing the frame again."""

    sock: str
    data: bytes
    addr: str
    chunk: tuple[bytes, int] | None = None  # (file_id, offset) of a chunk frame


@dataclass
class _Out:
    t: Transfer
    expect: int  # the receiver has every byte below this (its last word)
    next: int  # the next byte we send
    heard: float  # when the receiver last said anything (or we started)
    paused: float = 0.0  # nothing sent before this (refused by the relay, or told to stop)
    sent_max: int = 0  # bytes below this went out before: sending them again counts as resent
    hold: int = 0  # after a road change, nothing new goes until the receiver has this much
    held: float = 0.0  # since when (a hold that outlives STALL is let go: what it waits for is lost)
    quiet: bool = False  # a road died: nothing goes until the receiver says where it is (or STALL)
    epoch: int = 0  # the receiver's run whose Wants we take, and the last one's number
    seq: int = -1
    direct: int = 0  # bytes sent over QUIC
    resent: int = 0
    shown: float = -1e18


@dataclass
class _In:
    t: Transfer
    expect: int  # the next byte we need
    durable: int  # fsynced and recorded: where a restart resumes
    heard: float  # when the last chunk came (or we started)
    asked: float = -1e18  # when we last said Want
    rewound: float = -1e18
    dup: int = 0  # bytes that came twice
    spoke: bool = False  # we have said Want at least once since we started running it
    epoch: int = field(default_factory=lambda: int.from_bytes(os.urandom(8), "big"))
    seq: int = 0
    direct: int = 0  # bytes taken in that came over QUIC
    shown: float = -1e18


@dataclass
class Transfers:
    """Every running transfer of one client, both ways."""

    store: TransferStore
    disk: Disk
    counters: dict[str, int] = field(default_factory=dict)
    clock_ms: Any = None  # () -> unix ms, for the database (default: time.time)

    def __post_init__(self) -> None:
        for key in ("file_frames_bad", "file_chunks_bad", "file_frames_unknown", "file_events_dropped"):
            self.counters.setdefault(key, 0)
        self._out: dict[bytes, _Out] = {}
        self._in: dict[bytes, _In] = {}
        self._waiting: deque[Transfer] = deque()
        self._online: set[str] = set()
        self._roads: dict[str, str] = {}  # peer -> QUIC while a link is up (default: the relay)
        self._send: list[FrameOut] = []
        self._events: deque[FileEvent] = deque()
        self._stops: dict[bytes, float] = {}
        if self.clock_ms is None:
            self.clock_ms = lambda: int(time.time() * 1000)

    # -- what the shell says ----------------------------------------------------------

    def run(self, t: Transfer, now: float) -> None:
        """Move the bytes of accepted transfer ``t`` (again, after a restart) when its peer is on."""
        if t.state != "accepted" or t.file_id in self._out or t.file_id in self._in:
            return
        if len(self._out) + len(self._in) >= MAX_ACTIVE:
            if all(w.file_id != t.file_id for w in self._waiting):
                self._waiting.append(t)
            return
        try:
            if t.outgoing:
                self.disk.check_source(t)
                self._out[t.file_id] = _Out(t, t.durable, t.durable, now, sent_max=t.durable)
            else:
                start = self.disk.resume(t)
                i = self._in[t.file_id] = _In(t, start, start, now - WANT_IDLE)  # say where we are at once
                if start == t.size:  # an empty file, or all of it on disk before a crash
                    self._complete(i, now)
        except FileError as exc:
            self._fail(t, str(exc), now)

    def online(self, peer: str, up: bool, now: float) -> None:
        """``peer`` can (or can no longer) be reached: transfers with them go on (or wait)."""
        if up and peer not in self._online:
            self._online.add(peer)
            for o in self._out.values():
                if o.t.peer == peer:
                    o.heard = now
                    if self._roads.get(peer) != QUIC:  # over QUIC, LinkDown says what is lost
                        o.next = o.expect  # what was in flight on the relay may be lost
            for i in self._in.values():
                if i.t.peer == peer:
                    i.heard, i.asked = now - WANT_IDLE, -1e18  # ask at once (a restarted sender waits)
        elif not up:
            self._online.discard(peer)

    def road(self, peer: str, road: str, lost: bool, now: float) -> None:
        """Frames to ``peer`` go by ``road`` from now on. ``lost``: the old road died with
        what was in flight on it, so the sender goes back to what the receiver has and
        the receiver says where it is on the new road (the sender waits for that word).
        Else (the relay still delivers) the sender waits until
        the receiver has what it sent on the old road before sending on the new one, so
        chunks do not overtake each other (the receiver takes them in order only)."""
        if self._roads.get(peer, RELAY) == road:
            return
        if road == RELAY:
            self._roads.pop(peer, None)
        else:
            self._roads[peer] = road
        for o in self._out.values():
            if o.t.peer == peer:
                o.heard = now
                if lost:
                    o.next, o.quiet = o.expect, True
                else:
                    o.hold, o.held = o.next, now
        for i in self._in.values():
            if i.t.peer == peer:
                self._ask(i, now, rewind=lost)  # where we are, on the new road

    def peers(self) -> set[str]:
        """Peers with a transfer running."""
        return {o.t.peer for o in self._out.values()} | {i.t.peer for i in self._in.values()}

    def drop(self, file_id: bytes, now: float) -> Transfer | None:
        """Stop running ``file_id`` (done, declined, cancelled, failed elsewhere); a receiver's
        ``.part`` is removed. Returns it (with what it resent) if it was running."""
        self._waiting = deque(w for w in self._waiting if w.file_id != file_id)
        item = self._out.pop(file_id, None) or self._in.pop(file_id, None)
        if item is None:
            return None
        self.disk.discard(item.t)
        self._next_waiting(now)
        resent = item.resent if isinstance(item, _Out) else item.dup
        self.store.add_resent(file_id, resent)
        return replace(item.t, resent=item.t.resent + resent)

    def refused(self, file_id: bytes, offset: int, retry_s: float, now: float) -> None:
        """The chunk at ``offset`` did not go (the relay refused it, or there was no road):
        send it again after ``retry_s``."""
        o = self._out.get(file_id)
        if o is not None:
            o.next = min(o.next, max(o.expect, offset))
            o.hold = min(o.hold, o.next)  # it never went: nothing to wait for on the old road
            o.paused = max(o.paused, now + retry_s)

    def running(self) -> list[tuple[Transfer, int]]:
        """(transfer, bytes the other side has) for each running transfer."""
        return [(o.t, o.expect) for o in self._out.values()] + [(i.t, i.expect) for i in self._in.values()]

    # -- the core verbs ---------------------------------------------------------------

    def receive_datagram(self, sock: Any, data: bytes, addr: Any, now: float) -> None:
        """A frame from peer ``addr`` (a name the road vouches for: the relay's sender, the
        QUIC link's authenticated buddy), on road ``sock`` (any: a frame is a frame)."""
        peer = str(addr)
        try:
            frame = fpb.FileFrame.FromString(data)
        except DecodeError:
            self.counters["file_frames_bad"] += 1
            return
        kind = frame.WhichOneof("kind")
        if kind == "chunk":
            self._chunk(peer, frame.chunk, now, sock == QUIC)
        elif kind == "want":
            self._want(peer, frame.want, now)
        elif kind == "stop":
            self._stop(peer, frame.stop, now)
        else:
            self.counters["file_frames_bad"] += 1

    def datagrams_to_send(self, now: float) -> list[FrameOut]:
        inflight: dict[str, int] = {}
        for o in self._out.values():
            inflight[o.t.peer] = inflight.get(o.t.peer, 0) + max(0, o.next - o.expect)
        for o in list(self._out.values()):
            peer = o.t.peer
            if peer not in self._online or now < o.paused or o.expect < o.hold or o.quiet:
                continue
            road = self._roads.get(peer, RELAY)
            while o.next < o.t.size and inflight[peer] < WINDOWS[road]:
                n = min(o.t.chunk_size, o.t.size - o.next)
                try:
                    data = self.disk.read(o.t, o.next, n)
                except FileError as exc:
                    self._fail(o.t, str(exc), now)
                    break
                chunk = fpb.Chunk(file_id=o.t.file_id, offset=o.next, data=data, hash=chunk_hash(data))
                frame = fpb.FileFrame(chunk=chunk).SerializeToString()
                self._send.append(FrameOut(road, frame, peer, (o.t.file_id, o.next)))
                if o.next < o.sent_max:
                    o.resent += n
                o.direct += n if road == QUIC else 0
                o.next += n
                o.sent_max = max(o.sent_max, o.next)
                inflight[peer] += n
        out, self._send = self._send, []
        return out

    def get_timer(self) -> float | None:
        dues = []
        for o in self._out.values():
            if o.t.peer in self._online:
                if o.paused:
                    dues.append(o.paused)
                if (o.next > o.expect and self._roads.get(o.t.peer) != QUIC) or o.quiet:
                    dues.append(o.heard + STALL)
                if o.expect < o.hold:
                    dues.append(o.held + STALL)
        for i in self._in.values():
            if i.t.peer in self._online:
                dues.append(max(i.heard, i.asked) + WANT_IDLE)
        return min(dues) if dues else None

    def handle_timer(self, now: float) -> None:
        for o in self._out.values():
            if o.paused and now >= o.paused:
                o.paused = 0.0
            if o.quiet and now >= o.heard + STALL:
                o.quiet = False  # the receiver never said: go on from what it last had
            if o.expect < o.hold and now >= o.held + STALL:
                o.hold, o.next = 0, o.expect  # what the old road had never came: send it again
            stalled = o.next > o.expect and now >= o.heard + STALL
            if o.t.peer in self._online and stalled and self._roads.get(o.t.peer) != QUIC:
                o.next, o.heard, o.hold = o.expect, now, 0  # the receiver went quiet: from what it has
        for i in self._in.values():
            if i.t.peer in self._online and now >= max(i.heard, i.asked) + WANT_IDLE:
                # The first word only says where we are (a sender ahead of it goes back by
                # itself); later ones, after silence, ask for what may have been lost.
                self._ask(i, now, rewind=i.spoke)

    def next_event(self) -> FileEvent | None:
        return self._events.popleft() if self._events else None

    # -- receiver ---------------------------------------------------------------------

    def _chunk(self, peer: str, c: fpb.Chunk, now: float, direct: bool) -> None:
        i = self._in.get(c.file_id)
        if i is None or i.t.peer != peer:
            self._not_running(peer, c.file_id, now)
            return
        n = len(c.data)
        if not 0 < n <= MAX_CHUNK or c.offset + n > i.t.size or len(c.hash) != CHUNK_HASH_SIZE:
            self.counters["file_frames_bad"] += 1
            return
        if chunk_hash(c.data) != c.hash:
            self.counters["file_chunks_bad"] += 1
            return
        i.heard = now
        if c.offset != i.expect:
            if c.offset < i.expect:
                i.dup += n
            if now - i.rewound >= REWIND_EVERY:  # a gap, or a sender behind us: say where we are
                i.rewound = now
                self._ask(i, now, rewind=c.offset > i.expect)
            return
        try:
            self.disk.write(i.t, c.offset, c.data)
            i.expect += n
            i.direct += n if direct else 0
            if i.expect - i.durable >= ACK_EVERY or i.expect == i.t.size:
                self.disk.sync(i.t)
                i.durable = i.expect
                self.store.set_durable(i.t.file_id, i.durable, self.clock_ms())
                self.store.add_resent(i.t.file_id, i.dup)
                i.t = replace(i.t, durable=i.durable, resent=i.t.resent + i.dup)
                i.dup = 0
                self._ask(i, now, rewind=False)
            if i.expect == i.t.size:
                self._complete(i, now)
                return
        except FileError as exc:
            self._fail(i.t, str(exc), now)
            return
        self._progress(i.t, i.expect, now, i)

    def _complete(self, i: _In, now: float) -> None:
        t = i.t
        del self._in[t.file_id]
        final = self.disk.finish(t)  # FileError: caught by the caller, the transfer fails
        self.store.move(t.file_id, "done", self.clock_ms(), path=final)
        self._frame(t.peer, fpb.FileFrame(stop=fpb.Stop(file_id=t.file_id, reason="done")))
        self._emit(FileDone(t.peer, t.file_id, t.name, False, final, t.size, t.resent, i.direct))
        self._next_waiting(now)

    def _ask(self, i: _In, now: float, rewind: bool) -> None:
        i.asked, i.spoke, i.seq = now, True, i.seq + 1
        want = fpb.Want(
            file_id=i.t.file_id, durable=i.durable, expect=i.expect, rewind=rewind, epoch=i.epoch, seq=i.seq
        )
        self._frame(i.t.peer, fpb.FileFrame(want=want))

    # -- sender -----------------------------------------------------------------------

    def _want(self, peer: str, w: fpb.Want, now: float) -> None:
        o = self._out.get(w.file_id)
        if o is None or o.t.peer != peer:
            self._not_running(peer, w.file_id, now)
            return
        if w.durable > w.expect or w.expect > o.t.size:
            self.counters["file_frames_bad"] += 1
            return
        if w.epoch == o.epoch and w.seq <= o.seq:
            return  # an older word that came by the slower road: we know better already
        o.epoch, o.seq = w.epoch, w.seq
        o.heard, o.quiet = now, False
        # QUIC delivers what it took, in order, or its link dies (and we go back then): a
        # receiver asking again only because chunks are slow to come must not make us queue
        # the window a second time. A receiver that has *less* than it said (it was
        # restarted) sends us back on any road, whether it asks to or not.
        reliable = self._roads.get(peer) == QUIC
        rewind = (w.rewind and not reliable) or w.expect < o.expect
        o.expect = w.expect if rewind else max(o.expect, w.expect)
        if w.durable > o.t.durable:
            self.store.set_durable(o.t.file_id, w.durable, self.clock_ms())
            o.t = replace(o.t, durable=w.durable)
        if rewind:
            o.hold = 0  # the receiver said where it is: nothing on an old road to wait for
        if rewind or o.next < o.expect:
            o.next = o.expect
        self._progress(o.t, o.expect, now, o)

    def _stop(self, peer: str, s: fpb.Stop, now: float) -> None:
        o = self._out.get(s.file_id)
        if o is not None and o.t.peer == peer:
            if s.reason == "done":  # the receiver checked the whole file: it is done
                del self._out[s.file_id]
                self.disk.close(o.t)
                self.store.add_resent(o.t.file_id, o.resent)
                self.store.move(o.t.file_id, "done", self.clock_ms())
                self._emit(
                    FileDone(peer, o.t.file_id, o.t.name, True, o.t.path, o.t.size, o.resent, o.direct)
                )
                self._next_waiting(now)
            else:  # the receiver is not running it (yet): its envelope will say why
                o.paused = now + PAUSE_ON_STOP
        elif (i := self._in.get(s.file_id)) is not None and i.t.peer == peer:
            i.heard = now + PAUSE_ON_STOP  # do not ask before the sender's envelope comes
        else:
            self.counters["file_frames_unknown"] += 1

    # -- helpers ----------------------------------------------------------------------

    def _not_running(self, peer: str, file_id: bytes, now: float) -> None:
        """A frame for a transfer not running here: say so, now and then, so the other side
        stops; a finished transfer says "done" (its Stop may have been lost)."""
        self.counters["file_frames_unknown"] += 1
        t = self.store.get(file_id) if len(file_id) == ID_SIZE else None
        if t is None or t.peer != peer or now - self._stops.get(file_id, -1e18) < STOP_EVERY:
            return
        if len(self._stops) >= MAX_STOPS:
            self._stops.clear()
        self._stops[file_id] = now
        self._frame(peer, fpb.FileFrame(stop=fpb.Stop(file_id=file_id, reason=t.state)))

    def _frame(self, peer: str, frame: fpb.FileFrame) -> None:
        if peer in self._online:
            self._send.append(FrameOut(self._roads.get(peer, RELAY), frame.SerializeToString(), peer))

    def _fail(self, t: Transfer, reason: str, now: float) -> None:
        """This side cannot go on with ``t``; the shell tells the peer (a FAILED envelope)."""
        self._out.pop(t.file_id, None)
        self._in.pop(t.file_id, None)
        self.disk.discard(t)
        if self.store.move(t.file_id, "failed", self.clock_ms(), reason):
            self._emit(FileFailed(t.peer, t.file_id, t.name, t.outgoing, reason))
        self._next_waiting(now)

    def _progress(self, t: Transfer, done: int, now: float, item: _Out | _In) -> None:
        if now - item.shown >= PROGRESS_EVERY:
            item.shown = now
            self._emit(FileProgress(t.peer, t.file_id, t.name, t.outgoing, done, t.size))

    def _next_waiting(self, now: float) -> None:
        while self._waiting and len(self._out) + len(self._in) < MAX_ACTIVE:
            t = self._waiting.popleft()
            current = self.store.get(t.file_id)
            if current is not None:
                self.run(current, now)

    def _emit(self, event: FileEvent) -> None:
        if len(self._events) >= MAX_EVENTS:
            self.counters["file_events_dropped"] += 1
            return
        self._events.append(event)
