"""The asyncio shell of LAN mode: sockets, broadcast addresses, time.

Three UDP sockets: the discovery port (shared by every p2pim on the host,
SO_REUSEADDR, so each one hears broadcasts), an own data port (envelopes and
direct answers; announced), and IP Messenger's 2425 (one program per host can
have it; if it is taken, IP Messenger compatibility is off with a warning);
with files, also IP Messenger's TCP 2425, where its clients fetch what we
attached (:mod:`p2pim.lan.ipmsg_files`).
Broadcasts go to each interface's subnet broadcast address and to
255.255.255.255; ``interface`` limits all of it to one interface
(SO_BINDTODEVICE).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..driver import Driver
from ..files.service import FileService
from ..messaging.events import Problem
from ..sansio import Datagram
from .core import PREFIX, IpmsgFilesOffered, IpmsgFilesReleased, LanCore, LanEvent, PeerGone, PeerUp

if TYPE_CHECKING:
    from .files import LanFiles

SIOCGIFFLAGS, SIOCGIFADDR, SIOCGIFBRDADDR = 0x8913, 0x8915, 0x8919
IFF_UP, IFF_BROADCAST = 0x1, 0x2


@dataclass(frozen=True)
class Interface:
    name: str
    address: str
    broadcast: str


class LanNodeError(Exception):
    """Cannot start LAN mode (no such interface, port taken)."""


def interfaces() -> list[Interface]:
    """Up, broadcast-capable IPv4 interfaces with their address and broadcast address."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack("H", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req)[16:18])[0]
                if not flags & IFF_UP or not flags & IFF_BROADCAST:
                    continue
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])
                bcast = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFBRDADDR, req)[20:24])
            except OSError:
                continue  # no IPv4 address
            out.append(Interface(name, addr, bcast))
    return out


class LanNode:
    def __init__(self, core: LanCore, interface: str | None, discovery_port: int, ipmsg_port: int) -> None:
        self.core = core
        self.interface = interface
        self.discovery_port = discovery_port
        self.ipmsg_port = ipmsg_port
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self._driver = Driver(core, self._send, self._on_event)
        self.files: LanFiles | None = None
        self._started = False
        ifaces = interfaces()
        if interface is not None:
            ifaces = [i for i in ifaces if i.name == interface]
            if not ifaces:
                names = ", ".join(i.name for i in interfaces()) or "none"
                raise LanNodeError(f"no broadcast-capable IPv4 interface {interface!r} (have: {names})")
        self.broadcasts = sorted({i.broadcast for i in ifaces} | {"255.255.255.255"})
        self.addresses = [i.address for i in ifaces]

    def start(self, data_port: int = 0) -> int:
        """Open the sockets and announce ourselves; returns the data port."""
        try:
            data = self._open("data", data_port, reuse=False)
        except OSError as exc:
            raise LanNodeError(f"cannot open UDP port {data_port}: {exc.strerror}") from None
        self.core.data_port = int(data.getsockname()[1])
        try:
            self._open("discovery", self.discovery_port, reuse=True)
        except OSError as exc:
            self._driver.close_sockets()
            raise LanNodeError(
                f"cannot listen on the discovery port {self.discovery_port}: {exc.strerror}"
            ) from None
        if self.core.ipmsg_enabled:
            try:
                self._open("ipmsg", self.ipmsg_port, reuse=False)
            except OSError as exc:
                self.core.ipmsg_enabled = False
                self.events.put_nowait(
                    Problem(f"IP Messenger port {self.ipmsg_port} is taken ({exc.strerror}): no IPMsg peers")
                )
        self.core.start(asyncio.get_running_loop().time())
        self._driver.start()  # the ENTRY goes out now, not at the first timer
        self._started = True
        return self.core.data_port

    def _open(self, channel: str, port: int, reuse: bool) -> socket.socket:
        sock = self._socket(socket.SOCK_DGRAM, port, reuse)
        # Replies to our broadcasts come to the data socket; it is the same protocol as discovery.
        self._driver.attach(channel, sock)
        return sock

    def _socket(self, kind: int, port: int, reuse: bool) -> socket.socket:
        sock = socket.socket(socket.AF_INET, kind)
        try:
            if reuse:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if kind == socket.SOCK_DGRAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if self.interface is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
            sock.bind(("0.0.0.0", port))
        except OSError:
            sock.close()
            raise
        return sock

    async def enable_files(self, lock_dir: Path, auto_accept: Path | None = None) -> LanFiles:
        """Take file offers and move files: with p2pim peers (QUIC on the data socket;
        ``auto_accept`` theirs) and with IP Messenger peers (TCP; always asked)."""
        from .files import LanFiles, LanHost
        from .ipmsg_files import IpmsgFiles

        p2p = FileService(
            LanHost(self, lock_dir), self.events.put_nowait, auto_accept=auto_accept, prefix=PREFIX
        )
        self.core.messenger.bodies = p2p.on_body
        self.core.on_quic = lambda data, src: p2p.on_quic("data", data, src)
        p2p.start()
        ipmsg = None
        if self.core.ipmsg_enabled:
            ipmsg = IpmsgFiles(self, p2p.store, self.events.put_nowait)
            await ipmsg.start(self._tcp_listener())
        self.files = LanFiles(self.core, p2p, ipmsg)
        return self.files

    def _tcp_listener(self) -> socket.socket | None:
        """IP Messenger's TCP port, where its clients fetch the files we offer them."""
        try:
            sock = self._socket(socket.SOCK_STREAM, self.ipmsg_port, reuse=True)
        except OSError as exc:
            self.events.put_nowait(
                Problem(
                    f"IP Messenger's TCP port {self.ipmsg_port} is taken ({exc.strerror}): no files to them"
                )
            )
            return None
        sock.listen(16)
        return sock

    def _on_event(self, event: LanEvent) -> None:
        if isinstance(event, (IpmsgFilesOffered, IpmsgFilesReleased)):
            if self.files is not None and self.files.ipmsg is not None:
                self.files.ipmsg.on_event(event)
            return  # not taking files in this mode (lan send, lan peers): not kept
        if self.files is not None and isinstance(event, (PeerUp, PeerGone)) and event.peer.kind == "p2pim":
            self.files.p2p.online(event.peer.name, isinstance(event, PeerUp))
            self.files.p2p.path_changed(event.peer.name)
        self.events.put_nowait(event)

    async def close(self) -> None:
        """Say goodbye (EXIT, BR_EXIT), then close."""
        if self.files is not None:
            await self.files.close()
        if self._started:
            self.core.stop()
            self._driver.kick()
        await self._driver.close()

    def kick(self) -> None:
        """The core was fed from outside (a file offer queued): send what it has now."""
        self._driver.kick()

    def socket(self, channel: str) -> socket.socket | None:
        return self._driver.sockets.get(channel)

    def send(self, to: str, text: str) -> bytes:
        msg_id = self.core.send(to, text, asyncio.get_running_loop().time())
        self._driver.kick()
        return msg_id

    def ask(self) -> None:
        self.core.ask()
        self._driver.kick()

    def _send(self, dg: Datagram) -> None:
        sock = self._driver.sockets.get("ipmsg" if dg.sock == "ipmsg" else "data")
        if sock is None:
            return
        port = self.ipmsg_port if dg.sock == "ipmsg" else self.discovery_port
        dests = [dg.addr] if dg.addr is not None else [(b, port) for b in self.broadcasts]
        for dest in dests:
            with contextlib.suppress(OSError):  # a down interface, a full buffer: ARQ and timers cope
                sock.sendto(dg.data, dest)
