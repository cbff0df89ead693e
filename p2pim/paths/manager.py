"""The paths shell: the client's UDP socket(s) around the sans-IO :class:`PathEndpoint`.

It owns the client's UDP socket (plus, briefly, the extra sockets of a
birthday dance, opened when the endpoint first sends from one and closed when
it says so) and tells apart what arrives by its first bytes (RFC 9443 style):
a direct envelope goes straight to the messaging core (``on_data``); disco and
STUN go to the endpoint, run by the shared :class:`p2pim.driver.Driver`.
Everything it decides comes from the endpoint; this module only moves bytes
and time.

The client gives it four callables: ``keys()`` (pinned identity key ->
username), ``relay(peer, data)`` (send bytes through the rendezvous),
``on_data(data, addr)`` (a direct envelope arrived) and ``on_change(peer,
path, reason)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

from .. import icmp
from ..driver import Driver
from ..identity import Identity
from ..messaging.delivery import MAX_DIRECT
from ..nat import portmap
from ..nat.portmap import Mapping, TryUpnp
from ..nat.runner import global_ipv6, source_ip_for
from ..sansio import Datagram, ShortDatagram
from .disco import DATA_MAGIC, Addr, is_data, is_disco
from .endpoint import (
    MAIN,
    MAIN6,
    PORTMAP,
    RELAY,
    Label,
    Local,
    LocalKnown,
    PathChanged,
    PathEndpoint,
    PortMapped,
    ProbeAnswered,
    SocketsDone,
)
from .peer import DEFAULT_KEEPALIVE, Path, PeerPath

__all__ = ["MAX_DIRECT", "Local", "PathManager"]


class PathManager:
    def __init__(
        self,
        identity: Identity,
        keys: Callable[[], dict[bytes, str]],
        relay: Callable[[str, bytes], None],
        on_data: Callable[[bytes, Addr], None],
        on_change: Callable[[str, Path | None, str], None],
        keepalive: float = DEFAULT_KEEPALIVE,
        port_mapping: bool = True,
        on_portmap: Callable[[Mapping | None, tuple[str, ...]], None] | None = None,
        on_quic: Callable[[Any, bytes, Addr], None] | None = None,
    ) -> None:
        """``port_mapping``: ask the router to forward our port (PCP, NAT-PMP, UPnP);
        ``on_portmap(mapping, tried)`` hears what it gave; ``on_quic(label, data, addr)``
        takes QUIC packets (file transfer on the punched path)."""
        self.endpoint = PathEndpoint(identity, keys, keepalive)
        self.port_mapping = port_mapping
        self.portmap: Mapping | None = None  # what the router gave us, if anything
        self.portmap_tried: tuple[str, ...] = ()
        self._upnp: asyncio.Task[None] | None = None
        self._on_portmap = on_portmap
        self._relay = relay
        self._on_data = on_data
        self._on_change = on_change
        self.on_quic = on_quic
        self.counters = self.endpoint.counters
        self.counters.update({"direct_in": 0, "direct_out": 0, "send_errors": 0, "quic_in": 0})
        self.local_known = asyncio.Event()
        self._driver = Driver(self.endpoint, self._send, self._event, bufsize=2048)
        self._driver.divert = self._divert
        self._probes: dict[bytes, asyncio.Future[float]] = {}
        self._loop = asyncio.get_running_loop()

    @property
    def boxes(self) -> Any:
        return self.endpoint.boxes

    @property
    def local(self) -> Local | None:
        return self.endpoint.local

    @property
    def peers(self) -> dict[str, PeerPath]:
        return self.endpoint.peers

    # -- life cycle ----------------------------------------------------------------

    def start(self, port: int = 0) -> int:
        """Bind the UDP socket (all IPv4 addresses), and an IPv6 one on the same port where
        the machine has IPv6; returns the port."""
        self._driver.attach(MAIN, _udp(port), icmp_errors=True)
        for want in (self.port, 0):
            try:
                self._driver.attach(MAIN6, _udp6(want), icmp_errors=True)
                break
            except OSError:  # no IPv6 here, or that port is taken on it
                continue
        self._driver.start()
        return self.port

    @property
    def port(self) -> int:
        sock = self._driver.sockets.get(MAIN)
        return int(sock.getsockname()[1]) if sock else 0

    async def close(self) -> None:
        """Give a port mapping back to the router, then close the sockets."""
        for dg in self.endpoint.release_port(self._loop.time()):
            self._sendto(dg.sock, dg.data, dg.addr)
        self._driver.kick()  # a UPnP mapping: its release is a TryUpnp event, run below
        if self._upnp is not None:
            # The router may be gone: then its mapping expires by itself.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._upnp), 3.0)
        await self._driver.close()

    async def discover(self, stun: list[Addr]) -> Local:
        """Host address towards the server, STUN-mapped address, and whether mapping varies."""
        try:
            host = (source_ip_for(stun[0]) if stun else "127.0.0.1", self.port)
        except OSError:  # no route to the STUN server: STUN will not answer either
            host = ("127.0.0.1", self.port)
        sock6 = self._driver.sockets.get(MAIN6)
        ip6 = global_ipv6() if sock6 is not None and not host[0].startswith("127.") else None
        host6 = (ip6, int(sock6.getsockname()[1])) if ip6 and sock6 is not None else None
        self.endpoint.discover(host, stun, self._loop.time(), host6)
        gateway = portmap.default_gateway() if self.port_mapping else None
        if gateway is not None:
            try:
                sock = _udp(0)
                sock.connect((gateway, portmap.PORT))  # so that "nothing listens" comes back
            except OSError:
                sock = None
            if sock is not None:
                self._driver.attach(PORTMAP, sock)
                internal = (sock.getsockname()[0], self.port)
                self.endpoint.map_port(gateway, internal, portmap.has_upnp())
        self._driver.kick()
        await self.local_known.wait()
        assert self.endpoint.local is not None
        return self.endpoint.local

    # -- what the client tells us --------------------------------------------------------

    def want(self, peer: str) -> None:
        """``peer`` is online and we talk to it: try for a direct path."""
        self.endpoint.want(peer, self._loop.time())
        self._driver.kick()

    def offline(self, peer: str) -> None:
        self.endpoint.offline(peer)
        self._driver.kick()

    def suspect(self, peer: str) -> None:
        self.endpoint.suspect(peer, self._loop.time())
        self._driver.kick()

    def forget_keys(self) -> None:
        """Buddies or keys changed: read the pinned keys of buddies again."""
        self.endpoint.forget_keys(self._loop.time())

    def route(self, peer: str) -> Path | None:
        """Where to send to ``peer`` directly now; None: use the relay."""
        return self.endpoint.route(peer)

    def send_direct(self, peer: str, envelope: bytes) -> bool:
        """Send an envelope on the direct path; False if there is none (use the relay)."""
        path = self.endpoint.route(peer)
        if path is None or len(envelope) > MAX_DIRECT:
            return False
        label = self.endpoint.label(peer, path.sock)
        if not self._sendto(label, DATA_MAGIC + envelope, path.addr):
            return False
        self.counters["direct_out"] += 1
        return True

    def direct(self, peer: str) -> tuple[Label, Addr] | None:
        """The socket (its label) and address of ``peer``'s direct path, if there is one."""
        path = self.endpoint.route(peer)
        return None if path is None else (self.endpoint.label(peer, path.sock), path.addr)

    def send_on(self, label: Label, data: bytes, addr: Addr) -> bool:
        """Send raw bytes (a QUIC packet) from the socket ``label`` names."""
        return self._sendto(label, data, addr)

    def on_relay(self, peer: str, data: bytes) -> None:
        """A disco packet that came through the relay from ``peer``."""
        self.endpoint.receive_datagram(RELAY, data, peer, self._loop.time())
        self._driver.kick()

    async def probe(self, peer: str, timeout: float = 2.0) -> tuple[str, float | None]:
        """One ping on the current path: ("relay" or the direct address, RTT or None)."""
        sent = self.endpoint.probe(peer, self._loop.time())
        if sent is None:
            return ("unknown", None)
        tx, via = sent
        future = self._probes[tx] = self._loop.create_future()
        self._driver.kick()
        try:
            return (via, await asyncio.wait_for(future, timeout))
        except TimeoutError:
            return (via, None)
        finally:
            self._probes.pop(tx, None)

    # -- the socket side -----------------------------------------------------------------

    def _divert(self, label: Any, data: bytes, addr: Addr) -> bool:
        """RFC 9443 demultiplexing: a direct envelope goes to the messaging core and a QUIC
        packet (the fixed bit set, once the 4-byte magics are ruled out) to its links; STUN
        (first byte 0-3) and disco stay with the endpoint."""
        if is_data(data):
            self.counters["direct_in"] += 1
            self._on_data(data[len(DATA_MAGIC) :], addr)
            return True
        if data[:1] and data[0] & 0x40 and not is_disco(data) and self.on_quic is not None:
            self.counters["quic_in"] += 1
            self.on_quic(label, data, addr)
            return True
        return False

    def _send(self, dg: Datagram | ShortDatagram) -> None:
        if dg.sock == RELAY:
            self._relay(str(dg.addr), dg.data)
        else:
            self._sendto(dg.sock, dg.data, dg.addr, getattr(dg, "ttl", None))

    def _sendto(self, label: Label, data: bytes, addr: Addr, ttl: int | None = None) -> bool:
        sock = self._driver.sockets.get(label)
        if sock is None and label != MAIN:
            try:  # a birthday socket, opened on first use
                sock = _udp(0)
            except OSError:  # out of file descriptors: fewer birthday mappings this time
                self.counters["send_errors"] += 1
                return False
            self._driver.attach(label, sock)
        if sock is None:
            return False
        try:
            icmp.send(sock, data, addr, ttl)
            return True
        except OSError:  # unreachable network, full buffer: the ARQ above copes
            self.counters["send_errors"] += 1
            return False

    def _event(self, event: Any) -> None:
        if isinstance(event, PathChanged):
            self._on_change(event.peer, event.path, event.reason)
        elif isinstance(event, SocketsDone):
            labels: list[Any] = list(self._driver.sockets)
            for label in [s for s in labels if s[0] == event.peer and s[1] not in event.keep]:
                sock = self._driver.detach(label)
                if sock is not None:
                    sock.close()
        elif isinstance(event, ProbeAnswered):
            future = self._probes.get(event.tx)
            if future is not None and not future.done():
                future.set_result(event.rtt)
        elif isinstance(event, LocalKnown):
            self.local_known.set()
        elif isinstance(event, PortMapped):
            self.portmap, self.portmap_tried = event.mapping, event.tried
            if self._on_portmap is not None:
                self._on_portmap(event.mapping, event.tried)
        elif isinstance(event, TryUpnp):
            previous = self._upnp
            self._upnp = asyncio.ensure_future(self._run_upnp(event, previous))

    async def _run_upnp(self, ask: TryUpnp, previous: asyncio.Task[None] | None) -> None:
        """UPnP IGD is SSDP and HTTP: miniupnpc does it, blocking, so in a thread."""
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        try:
            external, lifetime = await asyncio.to_thread(portmap.upnp_map, ask)
        except Exception:  # no IGD, refused, or miniupnpc missing: no mapping this way
            external, lifetime = None, 0
        if not ask.release:
            self.endpoint.upnp_result(external, lifetime, self._loop.time())
            self._driver.kick()


def _udp6(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::", port))
    except OSError:
        sock.close()
        raise
    return sock


def _udp(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    return sock
