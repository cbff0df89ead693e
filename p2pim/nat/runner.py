"""asyncio shell for the sans-IO probe cores (discovery, lifetime).

Opens one fresh UDP socket per label the core names, bound to the address the
kernel would use to reach the server (so "local address" in the report is the
real one, not 0.0.0.0), feeds every datagram and ICMP error to the core, sends
what it asks, and sleeps until its next timer or the next datagram.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Protocol

from p2pim.stun.codec import Addr

from .discovery import NatDiscovery, Timings
from .lifetime import LifetimeMeasurement
from .report import NatReport


class ProbeCore(Protocol):
    @property
    def done(self) -> bool: ...
    def receive(self, sock: str, data: bytes, source: Addr, now: float) -> None: ...
    def socket_error(self, sock: str, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[str, bytes, Addr]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...


def source_ip_for(server: Addr) -> str:
    """The local address the kernel routes from towards ``server`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(server)
        return str(s.getsockname()[0])


class _Sock(asyncio.DatagramProtocol):
    def __init__(self, label: str, sink: _Sockets) -> None:
        self.label = label
        self.sink = sink

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sink.on_datagram(self.label, data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self.sink.on_error(self.label)


class _Sockets:
    """Fresh sockets by label; routes events to whichever core is attached."""

    def __init__(self) -> None:
        self.transports: dict[str, asyncio.DatagramTransport] = {}
        self.local: dict[str, Addr] = {}
        self.core: ProbeCore | None = None
        self.wake = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    async def open(self, labels: list[str] | tuple[str, ...], ip: str) -> None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        for label in labels:
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda label=label: _Sock(label, self),  # type: ignore[misc]
                local_addr=(ip, 0),
                family=family,
            )
            self.transports[label] = transport
            sockname = transport.get_extra_info("sockname")
            self.local[label] = (sockname[0], sockname[1])

    def on_datagram(self, label: str, data: bytes, source: Addr) -> None:
        if self.core is not None:
            self.core.receive(label, data, source, self.loop.time())
            self.wake.set()

    def on_error(self, label: str) -> None:
        if self.core is not None:
            self.core.socket_error(label, self.loop.time())
            self.wake.set()

    async def drive(self, core: ProbeCore) -> None:
        """Run ``core`` until it is done."""
        self.core = core
        while True:
            now = self.loop.time()
            core.handle_timer(now)
            for label, data, dest in core.datagrams_to_send(now):
                try:
                    self.transports[label].sendto(data, dest)
                except OSError:
                    core.socket_error(label, now)
            if core.done:
                break
            timer = core.get_timer()
            self.wake.clear()
            timeout = None if timer is None else max(0.0, timer - self.loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)
        self.core = None

    def close(self) -> None:
        for t in self.transports.values():
            t.close()


async def discover(
    server: Addr,
    timings: Timings = Timings(),
    lifetime_max: float | None = None,
) -> NatReport:
    """Run NAT discovery (and, if ``lifetime_max``, the binding lifetime test)."""
    loop = asyncio.get_running_loop()
    ip = source_ip_for(server)
    socks = _Sockets()
    try:
        await socks.open(NatDiscovery.sockets, ip)
        core = NatDiscovery(server, socks.local, loop.time(), timings)
        await socks.drive(core)
        report = core.report()
        if lifetime_max and report.responded:
            life = LifetimeMeasurement(
                server,
                loop.time(),
                lifetime_max,
                wait=max(0.5, timings.negative_wait(core.rtt)),
                timings=timings,
            )
            await socks.open(life.sockets, ip)
            await socks.drive(life)
            report.lifetime = life.result()
            report.notes += life.notes
            report.elapsed_s = loop.time() - core.started_at
        return report
    finally:
        socks.close()
