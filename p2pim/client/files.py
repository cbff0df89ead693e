"""The internet client as a :class:`~p2pim.files.service.FileHost`: its buddies, its
relay through the rendezvous and its direct paths (QUIC goes on the paths socket)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..wire import control_pb2 as pb
from ..wire import envelope_pb2 as epb

if TYPE_CHECKING:
    from .facade import Client


class ClientHost:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.identity = client.profile.identity
        self.store = client.store
        self.counters = client.counters
        self.lock_dir: Path = client.profile.path

    async def check_peer(self, peer: str) -> bytes:
        return await self.client._check_peer(peer)

    def send_body(self, peer: str, key: bytes, body: epb.Body, line: str) -> None:
        self.client._send_body(peer, key, body, line)

    def problem(self, peer: str, message: str) -> None:
        self.client.messenger.problem(peer, message, asyncio.get_running_loop().time())
        self.client._driver.kick()

    def peer_key(self, peer: str) -> bytes | None:
        return self.client.keys.direct_key(peer)

    def reachable(self, peer: str) -> bool:
        return peer in self.client.messenger.delivery.online

    def direct(self, peer: str) -> tuple[Any, tuple[str, int]] | None:
        paths = self.client.paths
        return paths.direct(peer) if paths is not None else None

    def send_raw(self, sock: Any, data: bytes, addr: tuple[str, int]) -> None:
        if self.client.paths is not None:
            self.client.paths.send_on(sock, data, addr)

    def relay(self, peer: str, data: bytes) -> int | None:
        control = self.client.control
        if not self.client.messenger.delivery.connected:
            return None
        frame_id = control.take_id()
        control.post(pb.Frame(id=frame_id, relay=pb.Relay(to=peer, data=data)))
        return frame_id
