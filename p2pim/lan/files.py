"""Files on the LAN: the LAN node as a :class:`~p2pim.files.service.FileHost` (files
between `p2pim lan` peers, over a QUIC link on the LAN data sockets; no server, so no
relay: a peer that is not here waits, and its transfers go on when it is back), and
:class:`LanFiles`, which puts those and IP Messenger attachments
(:mod:`p2pim.lan.ipmsg_files`) behind one face for ``/send /accept /decline /cancel /files``."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files.service import FileService, TransferError, find_one
from ..files.store import Transfer
from ..messaging.events import Problem
from ..wire import envelope_pb2 as epb
from .core import LanCore, LanError

if TYPE_CHECKING:
    from .ipmsg_files import IpmsgFiles
    from .node import LanNode


class LanHost:
    def __init__(self, node: LanNode, lock_dir: Path) -> None:
        self.node = node
        self.core = node.core
        self.identity = node.core.identity
        self.store = node.core.store
        self.counters = node.core.counters
        self.lock_dir = lock_dir

    async def check_peer(self, peer: str) -> bytes:
        key = self.core.key_of(peer)
        if key is None:
            raise LanError(f"no p2pim peer called {peer!r} here (p2pim lan peers); files go encrypted only")
        here = self.core.find(peer)
        if here is not None and here.key_changed:
            raise LanError(f"{peer}'s key changed; check it, then: p2pim lan trust {peer}")
        if here is not None:
            self.core._pin(here)
        return key

    def send_body(self, peer: str, key: bytes, body: epb.Body, line: str) -> None:
        self.core.messenger.send(peer, key, body, line, asyncio.get_running_loop().time())
        self.node.kick()

    def problem(self, peer: str, message: str) -> None:
        self.node.events.put_nowait(Problem(message))

    def peer_key(self, peer: str) -> bytes | None:
        return self.core.key_of(peer)

    def reachable(self, peer: str) -> bool:
        here = self.core.peers.get(peer)
        return here is not None and here.kind == "p2pim"

    def direct(self, peer: str) -> tuple[Any, tuple[str, int]] | None:
        here = self.core.peers.get(peer)
        return ("data", here.addr) if here is not None and here.kind == "p2pim" else None

    def send_raw(self, sock: Any, data: bytes, addr: tuple[str, int]) -> None:
        socket = self.node.socket("data")
        if socket is not None:
            with contextlib.suppress(OSError):
                socket.sendto(data, addr)

    def relay(self, peer: str, data: bytes) -> int | None:
        return None  # no server on the LAN


class LanFiles:
    """p2pim peers' transfers (:attr:`p2p`) and IP Messenger peers' (:attr:`ipmsg`, None
    with IP Messenger off): which one a command is for follows from the peer it names."""

    def __init__(self, core: LanCore, p2p: FileService, ipmsg: IpmsgFiles | None) -> None:
        self.core = core
        self.p2p = p2p
        self.ipmsg = ipmsg
        self.store = p2p.store  # one table for both

    def _of(self, t: Transfer) -> FileService | IpmsgFiles:
        return self.ipmsg if self.ipmsg is not None and self.ipmsg.mine(t) else self.p2p

    def mine(self, t: Transfer) -> bool:
        return self.p2p.mine(t) or (self.ipmsg is not None and self.ipmsg.mine(t))

    def peer_of(self, t: Transfer) -> str:
        return self._of(t).peer_of(t)

    async def send(self, peer: str, path: str | Path) -> Transfer:
        here = self.core.find(peer)
        p2pim = here.kind == "p2pim" if here is not None else self.core.key_of(peer) is not None
        if p2pim or self.ipmsg is None:
            return await self.p2p.send(peer, path)
        return await self.ipmsg.send(peer, path)

    def find(self, prefix: str) -> Transfer:
        return find_one(self.store, prefix, self.mine, "/files")

    async def accept(self, file_id: bytes, directory: Path | None = None) -> Transfer:
        return await self._for(file_id).accept(file_id, directory)

    async def decline(self, file_id: bytes) -> Transfer:
        return await self._for(file_id).decline(file_id)

    async def cancel(self, file_id: bytes) -> Transfer:
        return await self._for(file_id).cancel(file_id)

    def _for(self, file_id: bytes) -> FileService | IpmsgFiles:
        t = self.store.get(file_id)
        if t is None:
            raise TransferError("no such transfer")
        return self._of(t)

    async def close(self) -> None:
        if self.ipmsg is not None:
            await self.ipmsg.close()
        await self.p2p.close()
