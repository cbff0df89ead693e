"""Port mapping: ask the router to forward a port to us (PCP, then NAT-PMP, then UPnP IGD).

A router that speaks one of these opens an external port that reaches our
UDP socket from anywhere, whatever its mapping and filtering: with it even a
symmetric NAT is easy to reach. Tailscale's portmapper asks the same three.

:class:`PortMapper` is sans-IO with the common core verbs: it sends PCP
(RFC 6887, MAP opcode) to the gateway's port 5351, falls back to NAT-PMP
(RFC 6886: external address, then a UDP mapping) when the gateway says PCP is
an unsupported version or does not answer, and last asks its shell to try
UPnP IGD (:class:`TryUpnp`; SSDP and SOAP, done with the ``miniupnpc``
library, which the shell runs in a thread and answers with
:meth:`PortMapper.upnp_result`). A mapping is renewed at half its lifetime
and released with :meth:`PortMapper.release` (lifetime 0). The small binary
codecs are here too; a reply that does not parse or does not match our
request (nonce, port, opcode) is dropped and counted.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass, field

from ..sansio import Datagram

Addr = tuple[str, int]
PORT = 5351  # PCP and NAT-PMP, on the gateway
SENDS_AT = (0.0, 0.25, 0.75)  # a LAN round trip is short: give up on a protocol after GIVE_UP
GIVE_UP = 1.5
LIFETIME = 7200  # seconds asked for (routers may grant less)
RETRY_RENEW = 30.0  # a failed renewal is tried again this often until the mapping expires
UDP = 17

PCP_VERSION = 2
PCP_MAP = 1
PCP_SUCCESS = 0
PCP_UNSUPP_VERSION = 1
NATPMP_VERSION = 0
NATPMP_ADDRESS = 0
NATPMP_MAP_UDP = 1
NATPMP_UNSUPPORTED_VERSION = 1


@dataclass(frozen=True)
class Mapping:
    protocol: str  # "PCP", "NAT-PMP" or "UPnP"
    external: Addr
    lifetime: float  # seconds granted
    at: float  # when it was granted (the core's clock)


@dataclass(frozen=True)
class MappingChanged:
    """The mapping we hold now (None: none, or it was lost); ``tried`` says what was asked."""

    mapping: Mapping | None
    tried: tuple[str, ...]


@dataclass(frozen=True)
class TryUpnp:
    """The shell should try UPnP IGD for ``internal`` (in a thread) and answer with
    :meth:`PortMapper.upnp_result`; ``release``: delete that mapping instead."""

    internal: Addr
    lifetime: int
    release: bool = False


Event = MappingChanged | TryUpnp


# -- codecs --------------------------------------------------------------------------------


def _v4mapped(ip: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{ip}").packed


def pcp_map_request(
    client_ip: str, internal_port: int, lifetime: int, nonce: bytes, suggest: int = 0
) -> bytes:
    head = struct.pack("!BBHI16s", PCP_VERSION, PCP_MAP, 0, lifetime, _v4mapped(client_ip))
    body = struct.pack("!12sB3xHH16s", nonce, UDP, internal_port, suggest, _v4mapped("0.0.0.0"))
    return head + body


@dataclass(frozen=True)
class PcpAnswer:
    result: int
    lifetime: int
    nonce: bytes = b""
    internal_port: int = 0
    external: Addr | None = None


def parse_pcp(data: bytes) -> PcpAnswer | None:
    """A PCP MAP response, or a bare error header (e.g. UNSUPP_VERSION); None: not one."""
    if len(data) < 24 or data[0] != PCP_VERSION or data[1] != 0x80 | PCP_MAP:
        return None
    result, lifetime = data[3], struct.unpack_from("!I", data, 4)[0]
    if len(data) < 60:
        return PcpAnswer(result, lifetime) if result != PCP_SUCCESS else None
    nonce, proto, internal, external, ext_ip = struct.unpack_from("!12sB3xHH16s", data, 24)
    if proto != UDP:
        return None
    addr = ipaddress.IPv6Address(ext_ip)
    ip = str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr)
    return PcpAnswer(result, lifetime, nonce, internal, (ip, external))


def natpmp_address_request() -> bytes:
    return struct.pack("!BB", NATPMP_VERSION, NATPMP_ADDRESS)


def natpmp_map_request(internal_port: int, lifetime: int, suggest: int = 0) -> bytes:
    return struct.pack("!BBHHHI", NATPMP_VERSION, NATPMP_MAP_UDP, 0, internal_port, suggest, lifetime)


def parse_natpmp(data: bytes) -> tuple[int, int, object] | None:
    """(opcode, result, payload): the external IP for opcode 0, (internal, external, lifetime)
    for a UDP mapping; a version-1 PCP "unsupported" answer from an old box is (op, result, None)."""
    if len(data) < 8 or data[0] != NATPMP_VERSION or data[1] < 128:
        return None
    op, result = data[1] - 128, struct.unpack_from("!H", data, 2)[0]
    if op == NATPMP_ADDRESS and len(data) >= 12:
        return op, result, ".".join(str(b) for b in data[8:12])
    if op == NATPMP_MAP_UDP and len(data) >= 16:
        internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
        return op, result, (internal, external, lifetime)
    return op, result, None


# -- the core ------------------------------------------------------------------------------


@dataclass
class PortMapper:
    gateway: str
    internal: Addr  # our address on the LAN and the port to map (the client's UDP socket)
    start: float
    sock: object = "portmap"
    lifetime: int = LIFETIME
    upnp: bool = True  # the shell can do UPnP
    #: Which of PCP and NAT-PMP to ask, in this order (UPnP comes after them, if ``upnp``).
    protocols: tuple[str, ...] = ("PCP", "NAT-PMP")
    mapping: Mapping | None = None
    tried: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=lambda: {"bad_replies": 0, "renewals": 0})
    _step: str = "start"  # pcp, natpmp-address, natpmp-map, upnp, idle
    _step_at: float = 0.0
    _sends: int = 0
    _nonce: bytes = field(default_factory=lambda: os.urandom(12))
    _external_ip: str | None = None
    _renew_at: float | None = None
    _out: list[Datagram] = field(default_factory=list)
    _events: deque[Event] = field(default_factory=deque)
    done: bool = False  # the first answer is in (a mapping, or none anywhere)

    def __post_init__(self) -> None:
        self._next_protocol(self.start)

    # -- inputs -----------------------------------------------------------------------

    def receive_datagram(self, sock: object, data: bytes, addr: Addr, now: float) -> None:
        if addr[0] != self.gateway or addr[1] != PORT:
            self.counters["bad_replies"] += 1
            return
        if self._step == "pcp" or (self._step == "idle" and self.mapping and self.mapping.protocol == "PCP"):
            self._on_pcp(data, now)
        elif self._step.startswith("natpmp") or self._step == "idle":
            self._on_natpmp(data, now)
        else:
            self.counters["bad_replies"] += 1

    def socket_error(self, sock: object, now: float) -> None:
        """ICMP port unreachable from the gateway (the shell's socket is connected to it):
        nothing listens on 5351, so neither PCP nor NAT-PMP; no need to wait them out."""
        if self.mapping is None and self._step in ("pcp", "natpmp-address", "natpmp-map"):
            for name in ("PCP", "NAT-PMP"):
                if name in self.protocols and name not in self.tried:
                    self.tried.append(name)
            self._step = "natpmp-map"  # the last of the two
            self._timed_out(now)

    def upnp_result(self, external: Addr | None, lifetime: float, now: float) -> None:
        """What the shell's UPnP attempt gave (None: no IGD, or it refused)."""
        if self._step != "upnp":
            return
        if external is None:
            self._finish(None, now)
        else:
            self._granted(Mapping("UPnP", external, lifetime, now), now)

    def release(self, now: float) -> list[Datagram]:
        """Datagrams that delete our mapping (send them before closing); UPnP is an event."""
        m, self.mapping = self.mapping, None
        self._step, self._renew_at = "idle", None
        if m is None:
            return []
        if m.protocol == "PCP":
            data = pcp_map_request(self.internal[0], self.internal[1], 0, self._nonce, m.external[1])
            return [Datagram(self.sock, data, (self.gateway, PORT))]
        if m.protocol == "NAT-PMP":
            return [Datagram(self.sock, natpmp_map_request(self.internal[1], 0), (self.gateway, PORT))]
        self._events.append(TryUpnp(self.internal, 0, release=True))
        return []

    # -- the core verbs ---------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        self.handle_timer(now)
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        if self._step in ("pcp", "natpmp-address", "natpmp-map"):
            if self._sends < len(SENDS_AT):
                return self._step_at + SENDS_AT[self._sends]
            return self._step_at + GIVE_UP
        return self._renew_at

    def handle_timer(self, now: float) -> None:
        if self._step not in ("pcp", "natpmp-address", "natpmp-map"):
            if self._renew_at is None or now < self._renew_at:
                return
            self._renew(now)  # may start a request step: its first send is due now
        if self._step in ("pcp", "natpmp-address", "natpmp-map"):
            while self._sends < len(SENDS_AT) and now >= self._step_at + SENDS_AT[self._sends]:
                self._sends += 1
                self._out.append(Datagram(self.sock, self._request(), (self.gateway, PORT)))
            if now >= self._step_at + GIVE_UP:
                self._timed_out(now)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # -- internals ----------------------------------------------------------------------

    def _begin(self, step: str, now: float) -> None:
        self._step, self._step_at, self._sends = step, now, 0
        name = {"pcp": "PCP", "natpmp-address": "NAT-PMP", "upnp": "UPnP"}.get(step)
        if name and name not in self.tried:
            self.tried.append(name)
        if step == "upnp":
            self._events.append(TryUpnp(self.internal, self.lifetime))

    def _request(self) -> bytes:
        suggest = self.mapping.external[1] if self.mapping else self.internal[1]
        if self._step == "pcp":
            return pcp_map_request(self.internal[0], self.internal[1], self.lifetime, self._nonce, suggest)
        if self._step == "natpmp-address":
            return natpmp_address_request()
        return natpmp_map_request(self.internal[1], self.lifetime, suggest)

    def _timed_out(self, now: float) -> None:
        renewing = self.mapping is not None
        if renewing:  # the router stopped answering: try again later, until the mapping expires
            self._step = "idle"
            self._retry_renewal(now)
        else:
            self._next_protocol(now)

    def _next_protocol(self, now: float) -> None:
        after = {"pcp": 1, "natpmp-address": 2, "natpmp-map": 2}.get(self._step, 0)
        for name, step in (("PCP", "pcp"), ("NAT-PMP", "natpmp-address"))[after:]:
            if name in self.protocols:
                self._begin(step, now)
                return
        if self.upnp:
            self._begin("upnp", now)
        else:
            self._finish(None, now)

    def _on_pcp(self, data: bytes, now: float) -> None:
        answer = parse_pcp(data)
        if answer is None:
            # A NAT-PMP-only box answers a PCP request with its own "unsupported version".
            pmp = parse_natpmp(data)
            if pmp is not None and pmp[1] == NATPMP_UNSUPPORTED_VERSION and self.mapping is None:
                self._next_protocol(now)
                return
            self.counters["bad_replies"] += 1
            return
        if answer.result == PCP_UNSUPP_VERSION and self.mapping is None:
            self._next_protocol(now)
            return
        if answer.nonce != self._nonce or answer.internal_port != self.internal[1] or answer.external is None:
            self.counters["bad_replies"] += 1
            return
        if answer.result != PCP_SUCCESS:
            self._refused(now)
            return
        self._granted(Mapping("PCP", answer.external, answer.lifetime, now), now)

    def _on_natpmp(self, data: bytes, now: float) -> None:
        parsed = parse_natpmp(data)
        if parsed is None:
            self.counters["bad_replies"] += 1
            return
        op, result, payload = parsed
        if self._step == "natpmp-address" and op == NATPMP_ADDRESS:
            if result != 0 or not isinstance(payload, str):
                self._refused(now)
                return
            self._external_ip = payload
            self._begin("natpmp-map", now)
            self.handle_timer(now)
        elif self._step == "natpmp-map" and op == NATPMP_MAP_UDP and isinstance(payload, tuple):
            internal, external, lifetime = payload
            if internal != self.internal[1]:
                self.counters["bad_replies"] += 1
            elif result != 0 or external == 0 or self._external_ip is None:
                self._refused(now)
            else:
                self._granted(Mapping("NAT-PMP", (self._external_ip, external), lifetime, now), now)
        else:
            self.counters["bad_replies"] += 1

    def _refused(self, now: float) -> None:
        """The router answered but will not map: another protocol will not do better."""
        if self.mapping is not None:
            self._step = "idle"
            self._retry_renewal(now)
        else:
            self._finish(None, now)

    def _granted(self, mapping: Mapping, now: float) -> None:
        changed = self.mapping is None or self.mapping.external != mapping.external
        self.mapping = mapping
        self._step = "idle"
        self._renew_at = now + max(1.0, mapping.lifetime / 2)
        self.done = True
        if changed:
            self._events.append(MappingChanged(mapping, tuple(self.tried)))

    def _finish(self, mapping: Mapping | None, now: float) -> None:
        self._step, self._renew_at, self.done = "idle", None, True
        self._events.append(MappingChanged(mapping, tuple(self.tried)))

    def _renew(self, now: float) -> None:
        m = self.mapping
        assert m is not None
        if now >= m.at + m.lifetime:  # expired without a renewal
            self.mapping = None
            self._finish(None, now)
            return
        self.counters["renewals"] += 1
        if m.protocol == "UPnP":
            self._step = "upnp"
            self._events.append(TryUpnp(self.internal, self.lifetime))
            self._retry_renewal(now)
            return
        self._begin("pcp" if m.protocol == "PCP" else "natpmp-address", now)

    def _retry_renewal(self, now: float) -> None:
        self._renew_at = now + RETRY_RENEW


# -- for the shells: the gateway, and UPnP IGD (blocking: run it in a thread) ------------------


def default_gateway() -> str | None:
    """The IPv4 default gateway (from /proc/net/route), where PCP and NAT-PMP are asked."""
    try:
        with open("/proc/net/route") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    for row in rows:
        if len(row) > 3 and row[1] == "00000000" and int(row[3], 16) & 0x2:  # RTF_GATEWAY
            return socket.inet_ntoa(int(row[2], 16).to_bytes(4, "little"))
    return None


def has_upnp() -> bool:
    try:
        import miniupnpc  # noqa: F401
    except ImportError:
        return False
    return True


UPNP_DESCRIPTION = "p2pim"


SSDP = ("239.255.255.250", 1900)
SSDP_WAIT = 0.6
M_SEARCH = (
    b'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\nMX: 1\r\n'
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n"
)


def igd_location(source_ip: str, wait: float = SSDP_WAIT) -> str | None:
    """The description URL of the Internet Gateway Device that answers one SSDP search from
    ``source_ip`` (None: none did). miniupnpc's own discovery waits seconds for every kind
    of device; with the URL it goes straight to the router."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(source_ip))
        s.settimeout(wait)
        try:
            s.sendto(M_SEARCH, SSDP)
            data = s.recv(2048)
        except OSError:
            return None
    if not data.startswith(b"HTTP/1.1 200"):
        return None
    for line in data.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "location" and value.strip().startswith("http://"):
            return value.strip()[:512]
    return None


def upnp_map(ask: TryUpnp) -> tuple[Addr | None, float]:
    """Map (or with ``ask.release``, unmap) ``ask.internal``'s port as UDP on the IGD that
    SSDP finds: (external address, lifetime) or (None, 0)."""
    import miniupnpc

    location = igd_location(ask.internal[0])
    if location is None:
        return None, 0
    upnp = miniupnpc.UPnP()
    upnp.selectigd(location)
    ip, port = ask.internal
    if ask.release:
        upnp.deleteportmapping(port, "UDP")
        return None, 0
    external_ip = upnp.externalipaddress()
    if not external_ip:
        return None, 0
    args = ("UDP", ip, port, UPNP_DESCRIPTION, "", ask.lifetime)
    for external_port in (port, 0):
        try:
            if external_port:
                ok = upnp.addportmapping(external_port, *args)
            else:  # IGDv2: the router picks a free port
                external_port = int(upnp.addanyportmapping(port, *args))
                ok = external_port > 0
        except Exception:  # ConflictInMappingEntry and the like: try the next way
            continue
        if ok:
            return (str(external_ip), external_port), float(ask.lifetime)
    return None, 0
