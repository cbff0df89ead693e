"""Files with IP Messenger clients (iptux, IP Messenger, FeiQ): their attachments, over TCP.

An IP Messenger client attaches files to a SENDMSG (FILEATTACHOPT); the
receiver connects to the sender's TCP port (the IP Messenger port number) and
asks for each file with GETFILEDATA; the sender writes the file's bytes and the
receiver closes when it has them all. The protocol has no encryption and no
hash: these transfers are shown as unencrypted, and what p2pim can check is the
size. Everything else is p2pim's own: the same transfers table, ``.part``
files, safe names, ``/files /accept /decline /cancel`` and events as
:mod:`p2pim.files` (an IP Messenger peer's rows are named ``ipmsg:nick@ip``).

* **In**: an offer is recorded and shown; nothing is fetched before it is
  accepted. The bytes go to a ``.part`` (fsynced as they come), renamed when the
  size is reached, never over another file. A download always starts at byte
  0: iptux answers GETFILEDATA from the start of the file whatever offset is
  asked, so a resumed download would splice the file's head into its middle. A
  broken download is tried again (:data:`TRIES`), also when p2pim starts again
  after a crash, while the sender still offers the file (an IP Messenger offer
  lasts as long as the sender's run); then it fails with the reason.
* **Out**: ``/send NAME PATH`` to an IP Messenger peer sends the offer, kept and
  resent until its RECVMSG like a text. The TCP server answers a GETFILEDATA
  only from the address the file was offered to and only for that file, from
  the offset asked (IP Messenger itself resumes). A transfer is done when all
  its bytes were written and the peer closed the connection; a RELEASEFILES
  declines it.

Anyone on the LAN can connect: at most :data:`MAX_CONNECTIONS` at once, a
request must arrive within :data:`REQUEST_S` and fit :data:`ipmsg.MAX_FILE_REQUEST`
bytes, and a connection that moves nothing for :data:`IDLE_S` is closed; bad
requests are counted (``ipmsg_file_requests_bad``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files.disk import Disk, FileError, download_dir, human_size, new_part, safe_name, source
from ..files.events import FileAnswered, FileDone, FileFailed, FileOffered, FileProgress
from ..files.service import MAX_OPEN_OFFERS, TransferError
from ..files.store import Transfer, TransferStore
from ..messaging.events import Problem
from ..messaging.ids import new_msg_id
from ..messaging.store import owned_by
from . import ipmsg
from .core import IpmsgFilesOffered, IpmsgFilesReleased
from .ipmsg_messages import PREFIX

if TYPE_CHECKING:
    from .node import LanNode

MAX_CONNECTIONS = 16
REQUEST_S = 5.0  # a connection says what it wants within this
CONNECT_S = 5.0
IDLE_S = 30.0  # a connection that moves no byte this long is closed
TRIES, RETRY_S = 3, 2.0  # a download broken off is tried again this often, this long apart
BLOCK = 256 * 1024
SYNC_EVERY = 4 * 1024 * 1024  # a download's .part is fsynced (and its progress stored) this often
PROGRESS_S = 0.5


class IpmsgFiles:
    """Attachments with the IP Messenger peers of one LAN node."""

    def __init__(self, node: LanNode, store: TransferStore, emit: Callable[[Any], None]) -> None:
        self.node = node
        self.core = node.core
        self.store = store
        self.emit = emit
        self.disk = Disk()
        self.counters = node.core.counters
        for key in ("ipmsg_file_requests_bad", "ipmsg_connections_refused", "ipmsg_offers_dropped"):
            self.counters.setdefault(key, 0)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._downloads: dict[bytes, asyncio.Task[None]] = {}
        self._uploads: dict[bytes, set[asyncio.StreamWriter]] = {}

    # -- life -------------------------------------------------------------------------

    async def start(self, sock: socket.socket | None) -> None:
        """Serve our offers on ``sock`` (the IP Messenger port's TCP socket; None: we cannot
        send files, only take them); go on with downloads accepted before a restart."""
        if sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=sock, limit=ipmsg.MAX_FILE_REQUEST)
        for t in self.store.list(active=True):
            if self.mine(t) and not t.outgoing and t.state == "accepted":
                self._download(t.file_id)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writers in self._uploads.values():
            for writer in writers:
                writer.close()
        tasks = [*self._downloads.values(), *self._connections]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.disk.close_all()

    def mine(self, t: Transfer) -> bool:
        return owned_by(t.peer, PREFIX)

    def peer_of(self, t: Transfer) -> str:
        return t.peer.removeprefix(PREFIX)

    # -- what the user does ---------------------------------------------------------------

    async def send(self, peer: str, path: str | Path) -> Transfer:
        try:
            src, st = source(path)
        except FileError as exc:
            raise TransferError(str(exc)) from None
        name = self.core.ipmsg_peer(peer)
        now_ms = _now_ms()
        file_id = new_msg_id(now_ms)
        t = Transfer(
            file_id, PREFIX + name, True, src.name, st.st_size, b"", 0, "offered",
            path=str(src), mtime_ns=st.st_mtime_ns, created_ms=now_ms, updated_ms=now_ms,
        )  # fmt: skip
        attachment = ipmsg.Attachment(
            _number(file_id), src.name, st.st_size, int(st.st_mtime), ipmsg.FILE_REGULAR
        )
        self.store.add(t)
        line = f"file: {t.name} ({human_size(t.size)})"
        self.core.ipmsg.attach(name, file_id, [attachment], line, asyncio.get_running_loop().time())
        self.node.kick()
        return t

    async def accept(self, file_id: bytes, directory: Path | None = None) -> Transfer:
        t = self._incoming(file_id)
        try:
            part = new_part(directory or download_dir(), t.name, t.size)
        except FileError as exc:
            raise TransferError(str(exc)) from None
        if not self.store.move(file_id, "accepted", _now_ms(), path=str(Path(part).parent), part=part):
            os.unlink(part)
            raise TransferError(f"{t.name} is no longer offered")
        self._download(file_id)
        return self.store.get(file_id) or t

    async def decline(self, file_id: bytes) -> Transfer:
        t = self._incoming(file_id)
        if self.store.move(file_id, "declined", _now_ms()):
            self._release(t)
        return self.store.get(file_id) or t

    async def cancel(self, file_id: bytes) -> Transfer:
        t = self.store.get(file_id)
        if t is None or t.final or not self.mine(t):
            raise TransferError("no such transfer in progress")
        if self.store.move(file_id, "cancelled", _now_ms(), "cancelled here"):
            if (task := self._downloads.pop(file_id, None)) is not None:
                task.cancel()
            for writer in self._uploads.pop(file_id, set()):
                writer.close()
            if not t.outgoing:
                self.disk.discard(t)
                self._release(t)
        return self.store.get(file_id) or t

    def _incoming(self, file_id: bytes) -> Transfer:
        t = self.store.get(file_id)
        if t is None or t.outgoing or not self.mine(t):
            raise TransferError("no such incoming file")
        if t.state != "offered":
            raise TransferError(f"{t.name} is {t.state}, not offered")
        return t

    def _release(self, t: Transfer) -> None:
        self.core.release((_ip(t), self.node.ipmsg_port), _packetno(t))
        self.node.kick()

    # -- what the peers say (events from the LAN core) -------------------------------------

    def on_event(self, event: IpmsgFilesOffered | IpmsgFilesReleased) -> None:
        if isinstance(event, IpmsgFilesReleased):
            t = self.store.get(event.file_id)
            if t is not None and self.store.move(
                t.file_id, "declined", _now_ms(), f"declined by {event.sender}"
            ):
                self.emit(FileAnswered(event.sender, t.file_id, t.name, "declined"))
            return
        row = PREFIX + event.sender
        for f in event.files:
            if event.packetno >= 2**32:
                self.counters["ipmsg_malformed"] += 1
                return
            if not f.regular:
                self.emit(Problem(f"{event.sender} offered the folder {f.name!r}: only files are taken"))
                continue
            file_id = _offer_id(event.digest, event.packetno, f.file_id)
            unfinished = self.store.count(row, "offered") + self.store.count(row, "accepted")
            if unfinished >= MAX_OPEN_OFFERS and self.store.get(file_id) is None:
                self.counters["ipmsg_offers_dropped"] += 1
                self.emit(
                    Problem(f"dropped a file offer from {event.sender}: {MAX_OPEN_OFFERS} of theirs wait")
                )
                continue
            now_ms = _now_ms()
            name = f.name[:1000]
            t = Transfer(
                file_id, row, False, name, f.size, b"", 0, "offered", created_ms=now_ms, updated_ms=now_ms
            )
            line = f"file: {safe_name(name)} ({human_size(f.size)})"
            if self.store.add(t, (file_id, line, now_ms)):  # else: that packet came again
                self.emit(FileOffered(event.sender, file_id, name, f.size, encrypted=False))

    # -- in: fetching an accepted file ---------------------------------------------------

    def _download(self, file_id: bytes) -> None:
        if file_id not in self._downloads:
            task = asyncio.get_running_loop().create_task(self._fetch_tries(file_id))
            self._downloads[file_id] = task
            task.add_done_callback(lambda _: self._downloads.pop(file_id, None))

    async def _fetch_tries(self, file_id: bytes) -> None:
        why = ""
        for attempt in range(TRIES):
            t = self.store.get(file_id)
            if t is None or t.state != "accepted":
                return
            try:
                await self._fetch(t)
                path = self.disk.finish(t, check=False)
            except (OSError, TimeoutError, EOFError) as exc:
                why = str(exc) or type(exc).__name__
                await asyncio.sleep(RETRY_S * (attempt + 1))
                continue
            except FileError as exc:  # our disk: trying again will not help
                why = str(exc)
                break
            if self.store.move(file_id, "done", _now_ms(), path=path):
                self.emit(FileDone(self.peer_of(t), file_id, t.name, False, path, t.size, encrypted=False))
            return
        t = self.store.get(file_id)
        if t is not None and self.store.move(file_id, "failed", _now_ms(), why):
            self.disk.discard(t)
            reason = (
                f"{self.peer_of(t)} did not send it ({why}); IP Messenger offers last while the sender runs"
            )
            self.emit(FileFailed(self.peer_of(t), file_id, t.name, False, reason))

    async def _fetch(self, t: Transfer) -> None:
        """Ask for the whole file and write it to ``t.part`` from byte 0; raises what broke it off."""
        self.disk.resume(replace(t, durable=0))  # from the start: the sender ignores offsets
        if t.size == 0:
            return
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(_ip(t), self.node.ipmsg_port), CONNECT_S
        )
        try:
            writer.write(self.core.file_request(_packetno(t), int.from_bytes(t.file_id[12:], "big")))
            got = synced = 0
            shown = time.monotonic()
            while got < t.size:
                data = await asyncio.wait_for(reader.read(min(BLOCK, t.size - got)), IDLE_S)
                if not data:
                    raise EOFError(f"the connection closed after {human_size(got)} of {human_size(t.size)}")
                self.disk.write(t, got, data)
                got += len(data)
                if got - synced >= SYNC_EVERY or got == t.size:
                    self.disk.sync(t)
                    synced = got
                    self.store.set_durable(t.file_id, got, _now_ms())
                if time.monotonic() - shown >= PROGRESS_S:
                    shown = time.monotonic()
                    self.emit(FileProgress(self.peer_of(t), t.file_id, t.name, False, got, t.size))
        finally:
            writer.close()

    # -- out: serving what we offered ----------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._connections) >= MAX_CONNECTIONS or task is None:
            self.counters["ipmsg_connections_refused"] += 1
            writer.close()
            return
        self._connections.add(task)
        try:
            await self._answer(reader, writer)
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ipmsg.IpmsgError,
        ):
            self.counters["ipmsg_file_requests_bad"] += 1
        finally:
            self._connections.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\0"), REQUEST_S)
        except asyncio.IncompleteReadError as exc:  # a client that sends no NUL, then waits
            raw = exc.partial
        pkt = ipmsg.parse(raw.rstrip(b"\0"))
        if pkt.mode != ipmsg.GETFILEDATA:
            raise ipmsg.IpmsgError("not a file request")
        _, number, offset = ipmsg.file_request(pkt)
        ip = writer.get_extra_info("peername")[0]
        t = self._offered_to(ip, number)
        if t is None or offset > t.size:
            raise ipmsg.IpmsgError("no such file offered to that address")
        peer = self.peer_of(t)
        try:
            self.disk.check_source(t)
        except FileError as exc:  # changed or gone since it was offered: it cannot be sent
            if self.store.move(t.file_id, "failed", _now_ms(), str(exc)):
                self.emit(FileFailed(peer, t.file_id, t.name, True, str(exc)))
            return
        if self.store.move(t.file_id, "accepted", _now_ms()):
            self.emit(FileAnswered(peer, t.file_id, t.name, "accepted"))
        self._uploads.setdefault(t.file_id, set()).add(writer)
        try:
            await self._stream(t, offset, writer)
            if await asyncio.wait_for(reader.read(1), IDLE_S):  # it closes once it has them all
                raise ipmsg.IpmsgError("bytes after a file request")
        finally:
            self._uploads.get(t.file_id, set()).discard(writer)
        if self.store.move(t.file_id, "done", _now_ms()):
            self.store.set_durable(t.file_id, t.size, _now_ms())
            self.emit(FileDone(peer, t.file_id, t.name, True, t.path, t.size, encrypted=False))

    async def _stream(self, t: Transfer, offset: int, writer: asyncio.StreamWriter) -> None:
        sent, shown = offset, time.monotonic()
        try:
            fd = os.open(t.path, os.O_RDONLY)
        except OSError as exc:
            raise FileError(f"{t.path}: {exc.strerror}") from None
        try:
            while sent < t.size:
                data = os.pread(fd, min(BLOCK, t.size - sent), sent)
                if not data:
                    raise FileError(f"{t.path} is shorter than when it was offered")
                writer.write(data)
                await asyncio.wait_for(writer.drain(), IDLE_S)
                sent += len(data)
                if time.monotonic() - shown >= PROGRESS_S:
                    shown = time.monotonic()
                    self.emit(FileProgress(self.peer_of(t), t.file_id, t.name, True, sent, t.size))
        except FileError as exc:
            if self.store.move(t.file_id, "failed", _now_ms(), str(exc)):
                self.emit(FileFailed(self.peer_of(t), t.file_id, t.name, True, str(exc)))
            raise OSError(str(exc)) from None
        finally:
            os.close(fd)

    def _offered_to(self, ip: str, number: int) -> Transfer | None:
        """Our open offer to the IP Messenger peer at ``ip`` that it calls file ``number``."""
        for t in self.store.list(active=True):
            if t.outgoing and self.mine(t) and _ip(t) == ip and _number(t.file_id) == number:
                return t
        return None


def _offer_id(digest: bytes, packetno: int, number: int) -> bytes:
    """A received offer's transfer id: unique (from the packet's id) and carrying what
    GETFILEDATA asks for, the sender's packet number and file number."""
    unique = hashlib.blake2b(digest + number.to_bytes(4, "big"), digest_size=8).digest()
    return unique + packetno.to_bytes(4, "big") + number.to_bytes(4, "big")


def _number(file_id: bytes) -> int:
    """The file number we give an offered file (decimal in the offer, 31 bits)."""
    return int.from_bytes(file_id[-4:], "big") & 0x7FFFFFFF


def _packetno(t: Transfer) -> int:
    """The sender's packet number in a received offer's id (see :func:`_offer_id`)."""
    return int.from_bytes(t.file_id[8:12], "big")


def _ip(t: Transfer) -> str:
    return t.peer.rsplit("@", 1)[1]


def _now_ms() -> int:
    return int(time.time() * 1000)
