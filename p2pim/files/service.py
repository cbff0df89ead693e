"""File transfers for one session: the words through the messaging core, the bytes
through the transfer core, over whatever roads the session's host has.

The host (:class:`FileHost`) is the internet client (:mod:`p2pim.client.files`:
relay, direct paths, buddies) or the LAN node (:mod:`p2pim.lan.files`: the LAN
data socket, LAN peers); this module is the same for both.

An offer, an accept, a decline, a cancel and the final "done" or "failed" are
envelope bodies (:class:`~p2pim.wire.envelope_pb2.FileOffer`,
:class:`~p2pim.wire.envelope_pb2.FileAnswer`): they go exactly once, wait in
the offline store for a buddy who is away, and appear in the history. Once a
transfer is accepted, :class:`p2pim.files.transfer.Transfers` moves its bytes:
over a QUIC link on the punched path while there is one
(:mod:`p2pim.quic.links`: TLS with the identity keys, QUIC's congestion
control), else over the relay, each frame sealed between the two identity keys
(:mod:`p2pim.files.frames`), so the server sees sizes and timing, never
content. A transfer follows the path as it comes and goes.

Only one session per profile moves bytes (it holds a lock file in the profile
directory): the server hands a relayed frame to every session of a user, and
two writers on one ``.part`` file would spoil it. The others record
offers and answers in the shared database; the one that holds the lock picks
up accepted transfers from there (:data:`RESCAN_S`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from ..driver import Driver
from ..identity import Identity
from ..messaging.core import Opened
from ..messaging.delivery import Via
from ..messaging.ids import new_msg_id
from ..messaging.store import ClientStore, owned_by
from ..profile import try_lock
from ..quic.links import FrameIn, LinkEvent, LinkUp, QuicLinks
from ..sansio import Datagram
from ..wire import envelope_pb2 as epb
from ..wire.limits import ID_SIZE
from .disk import HASH_SIZE, Disk, FileError, download_dir, file_hash, human_size, new_part, safe_name, source
from .events import FileAnswered, FileDone, FileEvent, FileFailed, FileOffered
from .frames import FrameBoxes, FrameError
from .store import Transfer, TransferStore
from .transfer import CHUNK, MAX_CHUNK, QUIC, RELAY, FrameOut, Transfers

RESCAN_S = 3.0  # the lock holder looks for transfers accepted by another session this often
NO_ROAD_RETRY_S = 1.0  # a chunk with no road to go by (no relay, no link yet) is tried again then
FILE_REQS_KEPT = 4096  # relay request ids of recent chunks, to match a refusal to its offset
MAX_FILE_SIZE = 1 << 40  # an offer beyond 1 TiB is a lie
MAX_OPEN_OFFERS = 64  # offers one buddy may have waiting for our answer or running; more are dropped
ANSWERS = {
    epb.FileAnswer.ACCEPT: "accepted",
    epb.FileAnswer.DECLINE: "declined",
    epb.FileAnswer.CANCEL: "cancelled",
    epb.FileAnswer.DONE: "done",
    epb.FileAnswer.FAILED: "failed",
}


class TransferError(Exception):
    """What the user asked for cannot be done (no such transfer, no space, ...): say why."""


class FileHost(Protocol):
    """What a session gives its file transfers. Peer names here are the host's own (no
    prefix); the transfers table stores them with the service's ``prefix``."""

    identity: Identity
    store: ClientStore
    counters: dict[str, int]
    lock_dir: Path  # where the one-mover-per-profile lock lives

    async def check_peer(self, peer: str) -> bytes:
        """The key to seal for ``peer``, if we may send to them; else raise with why."""
        ...

    def send_body(self, peer: str, key: bytes, body: epb.Body, line: str) -> None:
        """Into the outbox (exactly once), with ``line`` in the history."""
        ...

    def problem(self, peer: str, message: str) -> None: ...

    def peer_key(self, peer: str) -> bytes | None:
        """The key ``peer``'s frames and QUIC link must prove (None: not someone we take files from)."""
        ...

    def reachable(self, peer: str) -> bool: ...

    def direct(self, peer: str) -> tuple[Any, tuple[str, int]] | None:
        """The socket label and address of a direct path to ``peer`` (QUIC goes there)."""
        ...

    def send_raw(self, sock: Any, data: bytes, addr: tuple[str, int]) -> None: ...

    def relay(self, peer: str, data: bytes) -> int | None:
        """Send sealed bytes through the server; the request id (None: no relay here)."""
        ...


class FileService:
    """Offers, answers and running transfers for one session."""

    def __init__(
        self,
        host: FileHost,
        emit: Callable[[Any], None],
        *,
        run: bool = True,
        auto_accept: Path | None = None,
        prefix: str = "",
    ) -> None:
        """``run``: this session may move bytes (if it gets the profile's lock);
        ``auto_accept``: accept every offer into this directory; ``prefix``: how this
        host's peers are named in the shared database ("lan:")."""
        self.host = host
        self.emit = emit
        self.auto_accept = auto_accept
        self.prefix = prefix
        self.store = TransferStore(host.store.conn)
        self.boxes = FrameBoxes(host.identity)
        self.core = Transfers(self.store, Disk(), host.counters)
        self.driver = Driver(self.core, self._transmit, self._on_event)
        self.links = QuicLinks(host.identity, host.peer_key, host.counters)
        self.quic = Driver(self.links, self._quic_send, self._on_link)
        self._reqs: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._lock_fd: int | None = None
        self._want_run = run
        self._rescan: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # auto-accepts under way
        for key in ("file_frames_refused", "file_frames_bad", "file_offers_dropped"):
            host.counters.setdefault(key, 0)

    def _row(self, peer: str) -> str:
        """The name the transfers table keeps for the host's ``peer``."""
        return self.prefix + peer

    def _peer(self, row: str) -> str:
        """The host's name for a table row's peer."""
        return row.removeprefix(self.prefix)

    def peer_of(self, t: Transfer) -> str:
        """The host's name for ``t``'s peer."""
        return self._peer(t.peer)

    def mine(self, t: Transfer) -> bool:
        """A transfer with one of this host's peers (the table is shared by internet and LAN)."""
        return owned_by(t.peer, self.prefix)

    @property
    def moving(self) -> bool:
        """This session moves bytes (it holds the profile's transfer lock)."""
        return self._lock_fd is not None

    def start(self) -> None:
        if self._want_run and self._lock_fd is None:
            lock = (
                f"transfers{'.' + self.prefix.rstrip(':') if self.prefix else ''}.lock"  # one per host kind
            )
            self._lock_fd = try_lock(self.host.lock_dir / lock)  # None: another session moves the bytes
            if self._lock_fd is not None:
                self._rescan = asyncio.create_task(self._rescan_loop())
        self.driver.start()
        self.quic.start()

    async def close(self) -> None:
        if self._rescan is not None:
            self._rescan.cancel()
        await self.driver.close()
        self.links.close_all(self._now())
        self.quic.kick()  # the CONNECTION_CLOSEs leave before the socket closes
        await self.quic.close()
        self.core.disk.close_all()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    # -- what the user does -------------------------------------------------------------

    async def send(self, peer: str, path: str | Path) -> Transfer:
        """Offer ``path`` to ``peer`` (also an offline buddy: the offer waits on the server)."""
        try:
            src, st = source(path)
        except FileError as exc:
            raise TransferError(str(exc)) from None
        key = await self.host.check_peer(peer)
        digest = await asyncio.to_thread(file_hash, src)
        if os.stat(src).st_mtime_ns != st.st_mtime_ns:
            raise TransferError(f"{src} changed while it was read; try again")
        now_ms = _now_ms()
        t = Transfer(
            new_msg_id(now_ms), self._row(peer), True, src.name, st.st_size, digest, CHUNK, "offered",
            path=str(src), mtime_ns=st.st_mtime_ns, created_ms=now_ms, updated_ms=now_ms,
        )  # fmt: skip
        offer = epb.FileOffer(file_id=t.file_id, name=t.name, size=t.size, blake2b=digest, chunk_size=CHUNK)
        self.store.add(t)
        self.host.send_body(peer, key, epb.Body(file_offer=offer), f"file: {t.name} ({human_size(t.size)})")
        return t

    async def accept(self, file_id: bytes, directory: Path | None = None) -> Transfer:
        t = self._incoming(file_id, "offered")
        where = (directory or download_dir()).expanduser().absolute()
        try:
            part = new_part(where, t.name, t.size)
        except FileError as exc:
            raise TransferError(str(exc)) from None
        try:
            key = await self.host.check_peer(self._peer(t.peer))
        except Exception:
            os.unlink(part)
            raise
        if not self.store.move(file_id, "accepted", _now_ms(), path=str(where), part=part):
            os.unlink(part)
            raise TransferError(f"{t.name} is no longer offered")
        self._answer(t.peer, key, file_id, epb.FileAnswer.ACCEPT, f"accepted {t.name}")
        self._run(file_id)
        return self.store.get(file_id) or t

    async def decline(self, file_id: bytes) -> Transfer:
        t = self._incoming(file_id, "offered")
        key = await self.host.check_peer(self._peer(t.peer))
        if self.store.move(file_id, "declined", _now_ms()):
            self._answer(t.peer, key, file_id, epb.FileAnswer.DECLINE, f"declined {t.name}")
        return self.store.get(file_id) or t

    async def cancel(self, file_id: bytes) -> Transfer:
        t = self.store.get(file_id)
        if t is None or t.final or not self.mine(t):
            raise TransferError("no such transfer in progress")
        key = await self.host.check_peer(self._peer(t.peer))
        if self.store.move(file_id, "cancelled", _now_ms(), "cancelled here"):
            self.core.drop(file_id, self._now())
            if not t.outgoing and t.part:
                Path(t.part).unlink(missing_ok=True)
            self._answer(t.peer, key, file_id, epb.FileAnswer.CANCEL, f"cancelled {t.name}")
        return self.store.get(file_id) or t

    def find(self, prefix: str) -> Transfer:
        return find_one(self.store, prefix, self.mine, "p2pim files")

    def _incoming(self, file_id: bytes, state: str) -> Transfer:
        t = self.store.get(file_id)
        if t is None or t.outgoing or not self.mine(t):
            raise TransferError("no such incoming file")
        if t.state != state:
            raise TransferError(f"{t.name} is {t.state}, not {state}")
        return t

    def _answer(self, row: str, key: bytes, file_id: bytes, kind: int, line: str, reason: str = "") -> None:
        body = epb.Body(file_answer=epb.FileAnswer(file_id=file_id, kind=kind, reason=reason))  # type: ignore[arg-type]
        self.host.send_body(self._peer(row), key, body, line)

    # -- what the peer says (envelopes, from the messaging core) --------------------------

    def on_body(self, peer: str, opened: Opened, via: Via) -> bool:
        """A file offer or answer arrived from the host's ``peer``; committed here before its
        receipt goes. False: seen before."""
        body = opened.body
        if body.WhichOneof("kind") == "file_offer":
            return self._offered(peer, body.file_offer, opened)
        return self._answered(peer, body.file_answer, opened)

    def _offered(self, peer: str, offer: epb.FileOffer, opened: Opened) -> bool:
        now_ms = _now_ms()
        if (
            len(offer.file_id) != ID_SIZE
            or offer.size > MAX_FILE_SIZE
            or not 0 < offer.chunk_size <= MAX_CHUNK
        ):
            self.host.problem(peer, f"dropped a malformed file offer from {peer}")
            return True  # acknowledged, and nothing more: it will not get better
        if len(offer.blake2b) != HASH_SIZE:
            self.host.problem(peer, f"dropped a file offer without a hash from {peer}")
            return True
        row = self._row(peer)
        unfinished = self.store.count(row, "offered") + self.store.count(row, "accepted")
        if unfinished >= MAX_OPEN_OFFERS and self.store.get(offer.file_id) is None:
            self.host.counters["file_offers_dropped"] += 1
            self.host.problem(peer, f"dropped a file offer from {peer}: {MAX_OPEN_OFFERS} of theirs wait")
            return True
        name = offer.name[:1000]
        t = Transfer(
            offer.file_id, row, False, name, offer.size, offer.blake2b, offer.chunk_size, "offered",
            created_ms=now_ms, updated_ms=now_ms,
        )  # fmt: skip
        line = f"file: {safe_name(name)} ({human_size(offer.size)})"
        if not self.store.add(t, (opened.envelope.msg_id, line, opened.envelope.sent_at_ms)):
            return False
        self.emit(FileOffered(peer, t.file_id, name, t.size))
        if self.auto_accept is not None:
            task = asyncio.get_running_loop().create_task(self._auto(t))
            self._tasks.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)
        return True

    async def _auto(self, t: Transfer) -> None:
        try:
            await self.accept(t.file_id, self.auto_accept)
        except Exception as exc:  # no space, a peer no longer a buddy: say so, the offer stays
            self.host.problem(
                self._peer(t.peer), f"could not accept {t.name}: {getattr(exc, 'message', exc)}"
            )

    def _answered(self, peer: str, answer: epb.FileAnswer, opened: Opened) -> bool:
        kind = ANSWERS.get(answer.kind)
        t = self.store.get(answer.file_id)
        if kind is None or t is None or t.peer != self._row(peer):
            return True  # not ours to act on; acknowledged all the same
        line = f"{kind} {t.name}" + (f": {answer.reason[:200]}" if answer.reason else "")
        new = self.host.store.add_incoming(
            opened.envelope.msg_id, t.peer, line, opened.envelope.sent_at_ms, _now_ms()
        )
        if not new:
            return False
        reason = answer.reason[:500]
        if kind == "accepted" and t.outgoing:
            if self.store.move(t.file_id, "accepted", _now_ms()):
                self.emit(FileAnswered(peer, t.file_id, t.name, kind))
            self._run(t.file_id)
        elif kind == "done" and t.outgoing:
            if self.store.move(t.file_id, "done", _now_ms()):
                ran = self.core.drop(t.file_id, self._now()) or t
                self.emit(FileDone(peer, t.file_id, t.name, True, t.path, t.size, ran.resent))
        elif (
            kind in ("declined", "cancelled", "failed")
            and (kind != "declined" or t.outgoing)
            and self.store.move(t.file_id, kind, _now_ms(), reason or f"{kind} by {peer}")
        ):
            self.core.drop(t.file_id, self._now())
            if not t.outgoing and t.part:
                Path(t.part).unlink(missing_ok=True)
            self.emit(FileAnswered(peer, t.file_id, t.name, kind, reason))
        return True

    # -- bytes ------------------------------------------------------------------------------

    def _run(self, file_id: bytes) -> None:
        t = self.store.get(file_id)
        if self.moving and t is not None and t.state == "accepted":
            # Reachable first: a transfer that is complete at once (an empty file) says so.
            self.core.online(t.peer, self.host.reachable(self._peer(t.peer)), self._now())
            self.core.run(t, self._now())
            self.path_changed(self._peer(t.peer))
            self.driver.kick()

    async def _rescan_loop(self) -> None:
        """Run accepted transfers this session is not running yet (accepted before a restart,
        or by another session of this profile)."""
        while True:
            running = {t.file_id for t, _ in self.core.running()}
            for t in self.store.list(active=True):
                if t.state == "accepted" and t.file_id not in running and self.mine(t):
                    self._run(t.file_id)
            for row in self.core.peers():
                self.path_changed(self._peer(row))
            await asyncio.sleep(RESCAN_S)

    def all_offline(self) -> None:
        """The connection to the server is gone: nobody is reachable until we are back."""
        for t, _ in self.core.running():
            self.core.online(t.peer, False, self._now())

    def online(self, peer: str, up: bool) -> None:
        self.core.online(self._row(peer), up, self._now())
        self.driver.kick()

    def on_relay(self, sender: str, data: bytes) -> None:
        """A sealed file frame the relay brought from ``sender`` (only mutual buddies relay)."""
        key = self.host.peer_key(sender)
        if key is None or not self.moving:
            return
        try:
            plain = self.boxes.open(key, data)
        except FrameError:
            self.host.counters["file_frames_bad"] += 1
            return
        self.links.lost_by_peer(sender, self._now())  # it would use our link if it had one
        self.quic.kick()
        self.core.receive_datagram(RELAY, plain, self._row(sender), self._now())
        self.driver.kick()

    def refused(self, req_id: int, slow_down: bool, retry_after_s: float) -> bool:
        """The server refused one of our chunk relays (slow down, or the peer went away)."""
        if req_id not in self._reqs:
            return False
        file_id, offset = self._reqs.pop(req_id)
        self.host.counters["file_frames_refused"] += 1
        retry = max(0.05, retry_after_s) if slow_down else 1.0
        self.core.refused(file_id, offset, retry, self._now())
        self.driver.kick()
        return True

    # -- the QUIC road ----------------------------------------------------------------------

    def path_changed(self, peer: str) -> None:
        """The direct path to ``peer`` came, moved or went: a QUIC link follows it while
        transfers with ``peer`` run (the relay carries them meanwhile)."""
        if not self.moving:
            return
        direct = self.host.direct(peer) if self._row(peer) in self.core.peers() else None
        if direct is None:
            self.links.path(peer, None, None, self._now())
        else:
            self.links.path(peer, direct[0], direct[1], self._now())
        self.quic.kick()

    def on_quic(self, label: Any, data: bytes, addr: tuple[str, int]) -> None:
        """A QUIC packet on the paths socket (see :meth:`PathManager._divert`)."""
        self.links.receive_datagram(label, data, addr, self._now())
        self.quic.kick()

    def _quic_send(self, dg: Datagram) -> None:
        self.host.send_raw(dg.sock, dg.data, dg.addr)

    def _on_link(self, event: LinkEvent) -> None:
        now = self._now()
        row = self._row(event.peer)
        if isinstance(event, FrameIn):
            self.core.receive_datagram(QUIC, event.data, row, now)
        elif isinstance(event, LinkUp):
            self.core.road(row, QUIC, lost=False, now=now)
        else:
            self.core.road(row, RELAY, lost=True, now=now)
        self.driver.kick()

    def _transmit(self, dg: FrameOut) -> None:
        peer = self._peer(dg.addr)
        if dg.sock == QUIC and self.links.send(peer, dg.data):
            self.quic.kick()
            return
        key = self.host.peer_key(peer)
        if key is None:
            return
        frame_id = self.host.relay(peer, self.boxes.seal(key, dg.data))
        if frame_id is None:  # no relay now (or here, on the LAN): this chunk did not go
            if dg.chunk is not None:
                self.core.refused(*dg.chunk, NO_ROAD_RETRY_S, self._now())
            return
        if dg.chunk is not None:
            self._reqs[frame_id] = dg.chunk
            if len(self._reqs) > FILE_REQS_KEPT:
                self._reqs.popitem(last=False)

    def _on_event(self, event: FileEvent) -> None:
        """The transfer core's events; a receiver's done and either side's failure are told
        to the peer by envelope (exactly once, also if it is away now)."""
        if isinstance(event, (FileDone, FileFailed)) and (
            event.outgoing is False or isinstance(event, FileFailed)
        ):
            key = self.host.peer_key(self._peer(event.peer))
            if key is not None:
                kind = epb.FileAnswer.DONE if isinstance(event, FileDone) else epb.FileAnswer.FAILED
                reason = "" if isinstance(event, FileDone) else event.reason
                line = f"{'received' if isinstance(event, FileDone) else 'failed'} {event.name}"
                self._answer(event.peer, key, event.file_id, kind, line, reason)
        self.emit(replace(event, peer=self._peer(event.peer)))


def find_one(store: TransferStore, prefix: str, mine: Callable[[Transfer], bool], listing: str) -> Transfer:
    """The one transfer of ``mine`` whose id starts with ``prefix`` (how people name them);
    else say there is none or more than one, and where they are listed."""
    found = [t for t in store.find(prefix) if mine(t)]
    if len(found) != 1:
        what = "no transfer" if not found else f"{len(found)} transfers"
        raise TransferError(f"{what} with an id starting {prefix!r} (see {listing})")
    return found[0]


def _now_ms() -> int:
    return int(time.time() * 1000)
