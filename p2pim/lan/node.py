"""The asyncio shell of LAN mode: sockets, broadcast addresses, time.

Three UDP sockets: the discovery port (shared by every p2pim on the host,
SO_REUSEADDR, so each one hears broadcasts), an own data port (envelopes and
direct answers; announced), and IP Messenger's 2425 (one program per host can
have it; if it is taken, IP Messenger compatibility is off with a warning).
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

from .core import LanCore, LanEvent, LanWarning, Send

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
        self.events: asyncio.Queue[LanEvent] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._socks: dict[str, socket.socket] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
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
            raise LanNodeError(
                f"cannot listen on the discovery port {self.discovery_port}: {exc.strerror}"
            ) from None
        if self.core.ipmsg_enabled:
            try:
                self._open("ipmsg", self.ipmsg_port, reuse=False)
            except OSError as exc:
                self.core.ipmsg_enabled = False
                self.events.put_nowait(
                    LanWarning(
                        f"IP Messenger port {self.ipmsg_port} is taken ({exc.strerror}): no IPMsg peers"
                    )
                )
        self.core.start(self._loop.time())
        self._flush()  # the ENTRY goes out now, not at the first timer
        self._task = asyncio.create_task(self._ticker())
        return self.core.data_port

    def _open(self, channel: str, port: int, reuse: bool) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if reuse:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if self.interface is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
            sock.bind(("0.0.0.0", port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._readable, channel, sock)
        self._socks[channel] = sock
        return sock

    async def close(self) -> None:
        """Say goodbye (EXIT, BR_EXIT), then close."""
        if self._task is not None:
            self.core.stop()
            self._flush()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sock in self._socks.values():
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()

    def send(self, to: str, text: str) -> str:
        msg_id = self.core.send(to, text, self._loop.time())
        self._flush()
        return msg_id

    def ask(self) -> None:
        self.core.ask()
        self._flush()

    def _readable(self, channel: str, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            # Replies to our broadcasts come to the data socket; it is the same protocol.
            self.core.datagram(
                "ipmsg" if channel == "ipmsg" else "discovery", data, addr[:2], self._loop.time()
            )
        self._flush()

    def _flush(self) -> None:
        """After an input: act on it now, and let the ticker re-arm for the new next timer."""
        self._drain()
        self._wake.set()

    def _drain(self) -> None:
        sends, events = self.core.poll(self._loop.time())
        for s in sends:
            self._send(s)
        for ev in events:
            self.events.put_nowait(ev)

    def _send(self, s: Send) -> None:
        sock = self._socks.get("ipmsg" if s.channel == "ipmsg" else "data")
        if sock is None:
            return
        port = self.ipmsg_port if s.channel == "ipmsg" else self.discovery_port
        dests = [s.dest] if s.dest is not None else [(b, port) for b in self.broadcasts]
        for dest in dests:
            with contextlib.suppress(OSError):  # a down interface, a full buffer: ARQ and timers cope
                sock.sendto(s.data, dest)

    async def _ticker(self) -> None:
        while True:
            timer = self._loop.call_at(self.core.next_timer(), self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
            self._wake.clear()
            self._drain()
