"""Sans-IO STUN server core: RFC 8489 Binding, RFC 5780 behaviour discovery, RFC 3489.

It speaks the common core verbs (:mod:`p2pim.sansio`): feed it
``receive_datagram(local, data, remote, now)`` for every datagram that reached
one of our sockets (``local`` names the socket); ``datagrams_to_send`` gives at
most one answer per request, as a :class:`~p2pim.sansio.Datagram` whose
``sock`` is the socket that must send it. :meth:`StunServerCore.handle` is the
same decision for one datagram. It never touches a socket or a clock.

Sockets: the primary and alternate IP, each on the primary and alternate port
(RFC 5780 §3). CHANGE-REQUEST is resolved relative to the socket the request
arrived on, so a client that sends to the alternate address with "change port"
(as RFC 3489 test III and pystun3 do) gets an answer from alternate IP, primary port.

Requests handled (everything else is counted and dropped, or answered with an
error where RFC 8489 says so):

==================  ===========================================================
Binding request     XOR-MAPPED-ADDRESS, MAPPED-ADDRESS, RESPONSE-ORIGIN and,
                    with an alternate address, OTHER-ADDRESS (RFC 5780 §6.1)
classic request     (RFC 3489, no cookie) MAPPED-ADDRESS, SOURCE-ADDRESS and
                    CHANGED-ADDRESS; the 16-byte transaction id echoed
CHANGE-REQUEST      answer from the other IP and/or port; 420 when we have no
                    such address, never a silent answer from the wrong one
RESPONSE-PORT       answer to the request's source IP at that port (RFC 5780 §7.5)
RESPONSE-ADDRESS,   420: both let a spoofed request aim our answers at a third
PADDING             party or inflate them, so they are not implemented
other methods       400 Bad Request
==================  ===========================================================

Abuse limits: a per-source-IP token bucket, and every answer is at most
``AMPLIFICATION_FACTOR`` times the size of its request (optional attributes are
shed to fit; an answer that still does not fit is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from p2pim.ratelimit import RateLimiter
from p2pim.sansio import Datagram
from p2pim.stun import codec
from p2pim.stun.codec import CHANGE_IP, CHANGE_PORT, Addr, Class, Message, Method

#: An answer is never more than this many times the size of its request.
AMPLIFICATION_FACTOR = 4
#: Per source IP. `p2pim nat` sends ~10 requests, a lifetime run a few dozen, so
#: this leaves room for several clients behind one NAT and stops floods.
DEFAULT_RATE = 50.0
DEFAULT_BURST = 100.0
SOFTWARE = "p2pim rendezvous"

# Optional attributes, shed in this order when an answer would be too large.
_SHEDDABLE = ("SOFTWARE", "MAPPED-ADDRESS", "FINGERPRINT", "RESPONSE-ORIGIN")
# Comprehension-required attributes we recognise but refuse with 420 (see above).
_REFUSED = {0x0002: "RESPONSE-ADDRESS", 0x0026: "PADDING"}


@dataclass
class StunCounters:
    """What the service has seen; every dropped datagram lands in one bucket."""

    received: int = 0
    answered: int = 0
    errors_sent: int = 0
    malformed: int = 0
    not_request: int = 0
    rate_limited: int = 0
    too_large_to_answer: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class StunServerCore:
    """Decides the answer to each datagram; see the module docstring."""

    ip: str
    port: int
    alt_ip: str | None = None
    alt_port: int | None = None
    rate: float = DEFAULT_RATE
    burst: float = DEFAULT_BURST
    software: str = SOFTWARE
    counters: StunCounters = field(default_factory=StunCounters)

    _out: list[Datagram] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._limiter = RateLimiter(self.rate, self.burst)

    # -- the core verbs ---------------------------------------------------------------

    def receive_datagram(self, sock: Addr, data: bytes, addr: Addr, now: float) -> None:
        answer = self.handle(data, sock, addr, now)
        if answer is not None:
            self._out.append(answer)

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> None:
        return None  # it only ever answers

    def handle_timer(self, now: float) -> None:
        """No timers."""

    def next_event(self) -> None:
        return None

    def local_addresses(self) -> list[Addr]:
        """Every (ip, port) the shell must bind."""
        ips = [self.ip] + ([self.alt_ip] if self.alt_ip else [])
        ports = [self.port] + ([self.alt_port] if self.alt_port else [])
        return [(ip, port) for ip in ips for port in ports]

    def _other(self, local: Addr, change: int) -> Addr | None:
        """The socket that answers a request that arrived on ``local``."""
        ip, port = local
        if change & CHANGE_IP:
            if not self.alt_ip:
                return None
            ip = self.alt_ip if ip == self.ip else self.ip
        if change & CHANGE_PORT:
            if not self.alt_port:
                return None
            port = self.alt_port if port == self.port else self.port
        return (ip, port)

    def handle(self, data: bytes, local: Addr, remote: Addr, now: float) -> Datagram | None:
        """Answer one datagram that arrived on our socket ``local`` from ``remote``."""
        self.counters.received += 1
        if not self._limiter.allow(remote[0], now):
            self.counters.rate_limited += 1
            return None
        try:
            decoded = codec.decode(data)
        except codec.StunDecodeError:
            self.counters.malformed += 1
            return None
        msg = decoded.message
        if msg.message_class != Class.REQUEST:
            # Responses and indications need no answer (RFC 8489 §6.3.2, §6.3.3).
            self.counters.not_request += 1
            return None

        def error(code: int, reason: str, unknown: list[int] | None = None) -> Datagram | None:
            reply = Message(Method(msg.message_method), Class.ERROR, msg.transaction_id)
            reply.attributes["ERROR-CODE"] = (code, reason)
            if unknown:
                reply.attributes["UNKNOWN-ATTRIBUTES"] = unknown
            self.counters.errors_sent += 1
            return self._finish(reply, decoded, data, local, remote)

        if msg.message_method != Method.BINDING:
            return error(400, "Only Binding")
        refused = list(decoded.unknown_required)
        refused += [t for t, name in _REFUSED.items() if name in msg.attributes]
        if refused:
            return error(420, "Unknown Attribute", sorted(set(refused)))

        change = int(msg.attributes.get("CHANGE-REQUEST", 0)) & (CHANGE_IP | CHANGE_PORT)
        source = self._other(local, change)
        if source is None:
            # RFC 5780 §6.1: we cannot answer from the address asked for; say so
            # rather than answer from the wrong one and mislead the client.
            return error(420, "Cannot change address", [0x0003])
        destination = remote
        if "RESPONSE-PORT" in msg.attributes:
            port = int(msg.attributes["RESPONSE-PORT"])
            if port == 0:
                return error(400, "Bad RESPONSE-PORT")
            destination = (remote[0], port)

        reply = Message(Method.BINDING, Class.RESPONSE, msg.transaction_id)
        other = self._other(local, CHANGE_IP | CHANGE_PORT)
        if decoded.classic:
            # RFC 3489 §11.1: MAPPED, SOURCE and CHANGED; all 8-byte values, so
            # clients that ignore attribute padding (pystun3) parse them right.
            reply.attributes["MAPPED-ADDRESS"] = remote
            reply.attributes["SOURCE-ADDRESS"] = source
            if other:
                reply.attributes["CHANGED-ADDRESS"] = other
        else:
            reply.attributes["XOR-MAPPED-ADDRESS"] = remote
            reply.attributes["MAPPED-ADDRESS"] = remote
            reply.attributes["RESPONSE-ORIGIN"] = source
            if other:
                reply.attributes["OTHER-ADDRESS"] = other
            if self.software:
                reply.attributes["SOFTWARE"] = self.software
        return self._finish(reply, decoded, data, source, destination)

    def _finish(
        self, reply: Message, decoded: codec.Decoded, request: bytes, source: Addr, dest: Addr
    ) -> Datagram | None:
        """Encode within the amplification limit, shedding optional attributes."""
        limit = AMPLIFICATION_FACTOR * len(request)
        shed = list(_SHEDDABLE)
        fingerprint = not decoded.classic  # FINGERPRINT is computed over the cookie
        while True:
            reply.attributes.pop("FINGERPRINT", None)
            if fingerprint:
                reply.add_fingerprint()
            out = codec.encode(reply, decoded.transaction_id16 if decoded.classic else None)
            if len(out) <= limit:
                if reply.message_class == Class.RESPONSE:
                    self.counters.answered += 1
                return Datagram(source, out, dest)
            present = [a for a in shed if a in reply.attributes or (a == "FINGERPRINT" and fingerprint)]
            if not present:
                self.counters.too_large_to_answer += 1
                return None
            shed.remove(present[0])
            if present[0] == "FINGERPRINT":
                fingerprint = False
            else:
                del reply.attributes[present[0]]
