"""The LAN node as a :class:`~p2pim.files.service.FileHost`: files between `p2pim lan`
peers, over a QUIC link on the LAN data sockets (no server, so no relay: a peer that is
not here waits, and its transfers go on when it is back)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..messaging.events import Problem
from ..wire import envelope_pb2 as epb
from .core import LanError

if TYPE_CHECKING:
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
