"""The client's file transfers: the words through the messaging core, the bytes
through the transfer core.

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

Only one session per profile moves bytes (it holds ``transfers.lock`` in the
profile directory): the server hands a relayed frame to every session of a
user, and two writers on one ``.part`` file would spoil it. The others record
offers and answers in the shared database; the one that holds the lock picks
up accepted transfers from there (:data:`RESCAN_S`).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..driver import Driver
from ..files.disk import PART, Disk, FileError, file_hash, free_space, safe_name, unique_path
from ..files.events import FileAnswered, FileDone, FileEvent, FileFailed, FileOffered
from ..files.frames import FrameBoxes, FrameError
from ..files.store import Transfer, TransferStore
from ..files.transfer import CHUNK, QUIC, RELAY, Transfers
from ..messaging.core import Opened
from ..messaging.delivery import Via
from ..messaging.ids import new_msg_id
from ..quic.links import FrameIn, LinkEvent, LinkUp, QuicLinks
from ..sansio import Datagram
from ..wire import control_pb2 as pb
from ..wire import envelope_pb2 as epb
from ..wire import files_pb2 as fpb
from .control import ClientError

RESCAN_S = 3.0  # the lock holder looks for transfers accepted by another session this often
FILE_REQS_KEPT = 4096  # relay request ids of recent chunks, to match a refusal to its offset
MAX_FILE_SIZE = 1 << 40  # an offer beyond 1 TiB is a lie
MAX_OPEN_OFFERS = 64  # offers one buddy may have waiting for our answer; more are dropped
ANSWERS = {
    epb.FileAnswer.ACCEPT: "accepted",
    epb.FileAnswer.DECLINE: "declined",
    epb.FileAnswer.CANCEL: "cancelled",
    epb.FileAnswer.DONE: "done",
    epb.FileAnswer.FAILED: "failed",
}


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def download_dir() -> Path:
    """``$XDG_DOWNLOAD_DIR``, else ``~/Downloads``."""
    return Path(os.environ.get("XDG_DOWNLOAD_DIR") or Path.home() / "Downloads")


class FileService:
    """Offers, answers and running transfers for one client session."""

    def __init__(
        self,
        client: Any,  # p2pim.client.facade.Client (not imported: it imports us)
        emit: Callable[[Any], None],
        *,
        run: bool = True,
        auto_accept: Path | None = None,
    ) -> None:
        """``run``: this session may move bytes (if it gets the profile's lock);
        ``auto_accept``: accept every buddy's offer into this directory."""
        self.client = client
        self.emit = emit
        self.auto_accept = auto_accept
        self.store = TransferStore(client.store.conn)
        self.boxes = FrameBoxes(client.profile.identity)
        self.core = Transfers(self.store, Disk(), client.counters)
        self.driver = Driver(self.core, self._transmit, self._on_event)
        self.links = QuicLinks(client.profile.identity, self._quic_key, client.counters)
        self.quic = Driver(self.links, self._quic_send, self._on_link)
        self._reqs: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._lock_fd: int | None = None
        self._want_run = run
        self._rescan: asyncio.Task[None] | None = None
        client.counters.setdefault("file_frames_refused", 0)

    @property
    def moving(self) -> bool:
        """This session moves bytes (it holds the profile's transfer lock)."""
        return self._lock_fd is not None

    def start(self) -> None:
        if self._want_run and self._lock_fd is None:
            fd = os.open(self.client.profile.path / "transfers.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # another session of this profile moves the bytes
            else:
                self._lock_fd = fd
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
        src = Path(path).expanduser().absolute()
        try:
            st = src.stat()
            if not src.is_file():
                raise ClientError(pb.BAD_REQUEST, f"{src} is not a regular file")
            with open(src, "rb"):
                pass
        except OSError as exc:
            raise ClientError(pb.BAD_REQUEST, f"{src}: {exc.strerror}") from None
        digest = await asyncio.to_thread(file_hash, src)
        if os.stat(src).st_mtime_ns != st.st_mtime_ns:
            raise ClientError(pb.BAD_REQUEST, f"{src} changed while it was read; try again")
        now_ms = _now_ms()
        t = Transfer(
            new_msg_id(now_ms), peer, True, src.name, st.st_size, digest, CHUNK, "offered",
            path=str(src), mtime_ns=st.st_mtime_ns, created_ms=now_ms, updated_ms=now_ms,
        )  # fmt: skip
        offer = epb.FileOffer(file_id=t.file_id, name=t.name, size=t.size, blake2b=digest, chunk_size=CHUNK)
        key = await self.client._check_peer(peer)
        self.store.add(t)
        self.client._send_body(
            peer, key, epb.Body(file_offer=offer), f"file: {t.name} ({human_size(t.size)})"
        )
        return t

    async def accept(self, file_id: bytes, directory: Path | None = None) -> Transfer:
        t = self._incoming(file_id, "offered")
        where = (directory or download_dir()).expanduser().absolute()
        try:
            where.mkdir(parents=True, exist_ok=True)
            if free_space(where) < t.size:
                raise ClientError(
                    pb.BAD_REQUEST, f"not enough space in {where} for {t.name} ({human_size(t.size)})"
                )
            part = str(unique_path(where, safe_name(t.name))) + PART
            os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # the name is ours
        except (OSError, FileError) as exc:
            raise ClientError(pb.BAD_REQUEST, f"{where}: {getattr(exc, 'strerror', None) or exc}") from None
        key = await self.client._check_peer(t.peer)
        if not self.store.move(file_id, "accepted", _now_ms(), path=str(where), part=part):
            os.unlink(part)
            raise ClientError(pb.BAD_REQUEST, f"{t.name} is no longer offered")
        self._answer(t.peer, key, file_id, epb.FileAnswer.ACCEPT, f"accepted {t.name}")
        self._run(file_id)
        return self.store.get(file_id) or t

    async def decline(self, file_id: bytes) -> Transfer:
        t = self._incoming(file_id, "offered")
        key = await self.client._check_peer(t.peer)
        if self.store.move(file_id, "declined", _now_ms()):
            self._answer(t.peer, key, file_id, epb.FileAnswer.DECLINE, f"declined {t.name}")
        return self.store.get(file_id) or t

    async def cancel(self, file_id: bytes) -> Transfer:
        t = self.store.get(file_id)
        if t is None or t.final:
            raise ClientError(pb.BAD_REQUEST, "no such transfer in progress")
        key = await self.client._check_peer(t.peer)
        if self.store.move(file_id, "cancelled", _now_ms(), "cancelled here"):
            self.core.drop(file_id, self._now())
            if not t.outgoing and t.part:
                Path(t.part).unlink(missing_ok=True)
            self._answer(t.peer, key, file_id, epb.FileAnswer.CANCEL, f"cancelled {t.name}")
        return self.store.get(file_id) or t

    def find(self, prefix: str) -> Transfer:
        found = self.store.find(prefix)
        if len(found) != 1:
            what = "no transfer" if not found else f"{len(found)} transfers"
            raise ClientError(pb.BAD_REQUEST, f"{what} with an id starting {prefix!r} (see p2pim files)")
        return found[0]

    def _incoming(self, file_id: bytes, state: str) -> Transfer:
        t = self.store.get(file_id)
        if t is None or t.outgoing:
            raise ClientError(pb.BAD_REQUEST, "no such incoming file")
        if t.state != state:
            raise ClientError(pb.BAD_REQUEST, f"{t.name} is {t.state}, not {state}")
        return t

    def _answer(self, peer: str, key: bytes, file_id: bytes, kind: int, line: str, reason: str = "") -> None:
        body = epb.Body(file_answer=epb.FileAnswer(file_id=file_id, kind=kind, reason=reason))  # type: ignore[arg-type]
        self.client._send_body(peer, key, body, line)

    # -- what the peer says (envelopes, from the messaging core) --------------------------

    def on_body(self, peer: str, opened: Opened, via: Via) -> bool:
        """A file offer or answer arrived; committed here before its receipt goes. False: seen."""
        body = opened.body
        if body.WhichOneof("kind") == "file_offer":
            return self._offered(peer, body.file_offer, opened)
        return self._answered(peer, body.file_answer, opened)

    def _offered(self, peer: str, offer: epb.FileOffer, opened: Opened) -> bool:
        now_ms = _now_ms()
        if len(offer.file_id) != 16 or offer.size > MAX_FILE_SIZE or not 0 < offer.chunk_size <= 64 * 1024:
            self.client.messenger.problem(peer, f"dropped a malformed file offer from {peer}", self._now())
            return True  # acknowledged, and nothing more: it will not get better
        if len(offer.blake2b) != 32:
            self.client.messenger.problem(
                peer, f"dropped a file offer without a hash from {peer}", self._now()
            )
            return True
        open_offers = sum(1 for x in self.store.list(active=True) if x.peer == peer and x.state == "offered")
        if open_offers >= MAX_OPEN_OFFERS and self.store.get(offer.file_id) is None:
            self.client.counters["file_offers_dropped"] = (
                self.client.counters.get("file_offers_dropped", 0) + 1
            )
            self.client.messenger.problem(
                peer,
                f"dropped a file offer from {peer}: {MAX_OPEN_OFFERS} of theirs wait for an answer",
                self._now(),
            )
            return True
        name = offer.name[:1000]
        t = Transfer(
            offer.file_id, peer, False, name, offer.size, offer.blake2b, offer.chunk_size, "offered",
            created_ms=now_ms, updated_ms=now_ms,
        )  # fmt: skip
        line = f"file: {safe_name(name)} ({human_size(offer.size)})"
        if not self.store.add(t, (opened.envelope.msg_id, line, opened.envelope.sent_at_ms)):
            return False
        self.emit(FileOffered(peer, t.file_id, name, t.size))
        if self.auto_accept is not None:
            asyncio.get_running_loop().create_task(self._auto(t))
        return True

    async def _auto(self, t: Transfer) -> None:
        try:
            await self.accept(t.file_id, self.auto_accept)
        except ClientError as exc:
            self.client.messenger.problem(t.peer, f"could not accept {t.name}: {exc.message}", self._now())
            self.client._driver.kick()

    def _answered(self, peer: str, answer: epb.FileAnswer, opened: Opened) -> bool:
        kind = ANSWERS.get(answer.kind)
        t = self.store.get(answer.file_id)
        if kind is None or t is None or t.peer != peer:
            return True  # not ours to act on; acknowledged all the same
        line = f"{kind} {t.name}" + (f": {answer.reason[:200]}" if answer.reason else "")
        new = self.client.store.add_incoming(
            opened.envelope.msg_id, peer, line, opened.envelope.sent_at_ms, _now_ms()
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
            self.core.run(t, self._now())
            self.core.online(t.peer, t.peer in self.client.messenger.delivery.online, self._now())
            self.path_changed(t.peer)
            self.driver.kick()

    async def _rescan_loop(self) -> None:
        """Run accepted transfers this session is not running yet (accepted before a restart,
        or by another session of this profile)."""
        while True:
            running = {t.file_id for t, _ in self.core.running()}
            for t in self.store.list(active=True):
                if t.state == "accepted" and t.file_id not in running:
                    self._run(t.file_id)
            for peer in self.core.peers():
                self.path_changed(peer)
            await asyncio.sleep(RESCAN_S)

    def all_offline(self) -> None:
        """The connection to the server is gone: nobody is reachable until we are back."""
        for t, _ in self.core.running():
            self.core.online(t.peer, False, self._now())

    def online(self, peer: str, up: bool) -> None:
        self.core.online(peer, up, self._now())
        self.driver.kick()

    def on_relay(self, sender: str, data: bytes) -> None:
        """A sealed file frame the relay brought from ``sender`` (only mutual buddies relay)."""
        contact = self.client.store.contact(sender)
        if contact is None or not self.moving:
            return
        try:
            plain = self.boxes.open(contact.identity_key, data)
        except FrameError:
            self.client.counters["file_frames_bad"] = self.client.counters.get("file_frames_bad", 0) + 1
            return
        self.core.receive_datagram(Via.RELAY, plain, sender, self._now())
        self.driver.kick()

    def refused(self, req_id: int, error: pb.Error) -> bool:
        """The server refused one of our chunk relays (slow down, or the peer went away)."""
        if req_id not in self._reqs:
            return False
        file_id, offset = self._reqs.pop(req_id)
        self.client.counters["file_frames_refused"] += 1
        retry = max(0.05, error.retry_after_ms / 1000) if error.code == pb.RATE_LIMITED else 1.0
        self.core.refused(file_id, offset, retry, self._now())
        self.driver.kick()
        return True

    # -- the QUIC road ----------------------------------------------------------------------

    def path_changed(self, peer: str) -> None:
        """The direct path to ``peer`` came, moved or went: a QUIC link follows it while
        transfers with ``peer`` run (the relay carries them meanwhile)."""
        paths = self.client.paths
        if not self.moving or paths is None:
            return
        direct = paths.direct(peer) if peer in self.core.peers() else None
        if direct is None:
            self.links.path(peer, None, None, self._now())
        else:
            self.links.path(peer, direct[0], direct[1], self._now())
        self.quic.kick()

    def on_quic(self, label: Any, data: bytes, addr: tuple[str, int]) -> None:
        """A QUIC packet on the paths socket (see :meth:`PathManager._divert`)."""
        self.links.receive_datagram(label, data, addr, self._now())
        self.quic.kick()

    def _quic_key(self, peer: str) -> bytes | None:
        contact = self.client.store.contact(peer)
        if contact is None or contact.offered_key is not None or peer not in self.client.keys.mutual:
            return None
        return contact.identity_key

    def _quic_send(self, dg: Datagram) -> None:
        if self.client.paths is not None:
            self.client.paths.send_on(dg.sock, dg.data, dg.addr)

    def _on_link(self, event: LinkEvent) -> None:
        now = self._now()
        if isinstance(event, FrameIn):
            self.core.receive_datagram(QUIC, event.data, event.peer, now)
        elif isinstance(event, LinkUp):
            self.core.road(event.peer, QUIC, lost=False, now=now)
        else:
            self.core.road(event.peer, RELAY, lost=True, now=now)
        self.driver.kick()

    def _transmit(self, dg: Datagram) -> None:
        if dg.sock == QUIC and self.links.send(dg.addr, dg.data):
            self.quic.kick()
            return
        peer = dg.addr
        contact = self.client.store.contact(peer)
        if contact is None or not self.client.messenger.delivery.connected:
            return  # the receiver asks again when we are back
        frame_id = self.client.control.take_id()
        frame = fpb.FileFrame.FromString(dg.data)
        if frame.HasField("chunk"):
            self._reqs[frame_id] = (frame.chunk.file_id, frame.chunk.offset)
            if len(self._reqs) > FILE_REQS_KEPT:
                self._reqs.popitem(last=False)
        sealed = self.boxes.seal(contact.identity_key, dg.data)
        self.client.control.post(pb.Frame(id=frame_id, relay=pb.Relay(to=peer, data=sealed)))

    def _on_event(self, event: FileEvent) -> None:
        """The transfer core's events; a receiver's done and either side's failure are told
        to the peer by envelope (exactly once, also if it is away now)."""
        if isinstance(event, (FileDone, FileFailed)) and (
            event.outgoing is False or isinstance(event, FileFailed)
        ):
            contact = self.client.store.contact(event.peer)
            if contact is not None and contact.offered_key is None:
                kind = epb.FileAnswer.DONE if isinstance(event, FileDone) else epb.FileAnswer.FAILED
                reason = "" if isinstance(event, FileDone) else event.reason
                line = f"{'received' if isinstance(event, FileDone) else 'failed'} {event.name}"
                self._answer(event.peer, contact.identity_key, event.file_id, kind, line, reason)
                self.client._driver.kick()
        self.emit(event)


def _now_ms() -> int:
    return int(time.time() * 1000)
