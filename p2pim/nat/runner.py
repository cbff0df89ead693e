"""The shell of the probe cores (discovery, lifetime): sockets, then the shared driver.

Opens one fresh UDP socket per label the core names, bound to the address the
kernel would use to reach the server (so "local address" in the report is the
real one, not 0.0.0.0); :class:`p2pim.driver.Driver` feeds every datagram and
ICMP error to the core, sends what it asks, and sleeps until its next timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from p2pim.driver import Driver
from p2pim.stun.codec import Addr

from .discovery import NatDiscovery, Timings
from .hops import HopLadder
from .lifetime import LifetimeMeasurement
from .portmap import PORT, Mapping, PortMapper, TryUpnp, default_gateway, has_upnp, upnp_map
from .probes import ProbePlanner
from .report import NatReport


async def _port_mapping(report: NatReport, socks: _Sockets, ip: str, loop: asyncio.AbstractEventLoop) -> None:
    """Does the router map ports (PCP, NAT-PMP, UPnP)? Ask for one for the ladder's socket,
    for a short while, and give it back at once."""
    gateway = default_gateway()
    if gateway is None:
        return
    internal = (ip, socks.local["hops"][1])
    socks.open(["portmap"], ip)
    try:
        socks.socks["portmap"].connect((gateway, PORT))  # "nothing listens" then comes back at once
    except OSError:
        return
    mapper = PortMapper(gateway, internal, loop.time(), "portmap", lifetime=120, upnp=False)
    await socks.drive(mapper, ("portmap",))
    mapping, tried = mapper.mapping, list(mapper.tried)
    if mapping is not None:
        for dg in mapper.release(loop.time()):
            socks.socks["portmap"].sendto(dg.data, dg.addr)
    elif has_upnp():
        tried.append("UPnP")
        ask = TryUpnp(internal, 120)
        with contextlib.suppress(Exception):
            external, lifetime = await asyncio.to_thread(upnp_map, ask)
            if external is not None:
                mapping = Mapping("UPnP", external, lifetime, loop.time())
                await asyncio.to_thread(upnp_map, TryUpnp(internal, 0, release=True))
    report.port_mapping, report.port_mapping_tried = mapping, tried


#: Any global IPv6 destination serves to ask the kernel which source address it would
#: use (connect() on a UDP socket sends nothing); this one is the documentation prefix.
IPV6_PROBE_DEST = ("2001:db8::1", 9)


def global_ipv6() -> str | None:
    """Our global IPv6 address (the kernel's source address for a route out), or None."""
    from ..icmp import is_public

    try:
        ip = source_ip_for(IPV6_PROBE_DEST)
    except OSError:  # no IPv6 route
        return None
    return ip if is_public(ip) and ":" in ip else None


def source_ip_for(server: Addr) -> str:
    """The local address the kernel routes from towards ``server`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(server)
        return str(s.getsockname()[0])


class _Sockets:
    """Fresh sockets by label, kept across the cores run one after the other."""

    def __init__(self) -> None:
        self.socks: dict[str, socket.socket] = {}
        self.local: dict[str, Addr] = {}

    def open(self, labels: list[str] | tuple[str, ...], ip: str) -> None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        for label in labels:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((ip, 0))
            self.socks[label] = sock
            name = sock.getsockname()
            self.local[label] = (name[0], name[1])

    async def drive(
        self, core: ProbePlanner | HopLadder | PortMapper, labels: tuple[str, ...] | None = None
    ) -> None:
        """Run ``core`` until it is done (on the sockets ``labels``, default all; the
        TTL ladder also hears the ICMP errors about what it sent)."""
        driver = Driver(core)
        ladder = isinstance(core, HopLadder)
        for label, sock in self.socks.items():
            if labels is None or label in labels:
                driver.attach(label, sock, icmp_errors=ladder)
        await driver.run(lambda: bool(core.done))

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()


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
        # First the routers between us and the Internet (how many NATs, a carrier-grade
        # one?): before the tests below make routers send ICMP, which they rate-limit.
        socks.open(["hops"], ip)
        ladder = HopLadder(server, loop.time(), frozenset({ip}), "hops")
        await socks.drive(ladder, ("hops",))
        socks.open(NatDiscovery.sockets, ip)
        core = NatDiscovery(server, socks.local, loop.time(), timings)
        await socks.drive(core, NatDiscovery.sockets)
        report = core.report()
        if report.mapped is not None:
            ladder.ours = frozenset({ip, report.mapped[0]})  # our NAT's WAN address is still ours
            report.route = ladder.inside if ladder.open_ttl is not None else None
        if report.nat_present:
            await _port_mapping(report, socks, ip, loop)
        if not ip.startswith("127.") and ":" not in ip:
            report.ipv6 = global_ipv6()
        if lifetime_max and report.responded:
            life = LifetimeMeasurement(
                server,
                loop.time(),
                lifetime_max,
                wait=max(0.5, timings.negative_wait(core.rtt)),
                timings=timings,
            )
            socks.open(life.sockets, ip)
            await socks.drive(life, tuple(life.sockets))
            report.lifetime = life.result()
            report.notes += life.notes
            report.elapsed_s = loop.time() - core.started_at
        return report
    finally:
        socks.close()
