"""How many hops our NATs are: a TTL ladder towards the STUN server (sans-IO).

A traceroute of a few steps: a STUN Binding request with TTL 1, then 2, ...,
each sent when the one before was answered by an ICMP time exceeded (from
the router at that hop, the *offender*) or stayed silent for
:data:`STEP_WAIT`, until the STUN server itself answers, a public router
answers, or :data:`MAX_HOPS`.

What it is for: :attr:`HopLadder.open_ttl`, the TTL that takes a packet
through every NAT of ours and no further (it dies at the first router with a
public address). Hole punching sends its first packets with it, so they open
our mappings without reaching the peer's router, where a router without an
input firewall would answer them and spoil the peer's mapping (see
``natlab.profiles``). The hops before the Internet also tell ``p2pim nat``
about a double NAT and a carrier-grade NAT (RFC 6598 addresses).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..icmp import IcmpError, is_public
from ..sansio import ShortDatagram
from ..stun import codec
from ..stun.codec import Addr

MAX_HOPS = 6
STEP_WAIT = 0.3  # no ICMP from a hop within this: it is silent, go on
MAX_SILENT = 3  # ... but this many silent hops in a row: ICMP is filtered, give up (0.9 s)


@dataclass
class HopLadder:
    server: Addr
    start: float
    #: Addresses that are ours although public (our NAT's WAN address, our host
    #: address when we have no NAT): an ICMP from one of them is still inside.
    ours: frozenset[str] = frozenset()
    sock: object = "main"
    #: offender per TTL (index 0 is TTL 1); None: silent; the server's address once it answered.
    hops: list[str | None] = field(default_factory=list)
    reached: int | None = None  # the TTL at which the server answered
    done: bool = False
    _tx: bytes = b""
    _due: float = 0.0
    _sent_at: float = 0.0
    _out: list[ShortDatagram] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._due = self.start

    # -- inputs -----------------------------------------------------------------------

    def stun_answer(self, data: bytes, now: float) -> bool:
        """True if ``data`` (a decoded-clean STUN packet) answers the ladder's request."""
        if self.done or len(data) < 20 or data[8:20] != self._tx[-12:] or not self._tx:
            return False
        self.hops.append(self.server[0])
        self.reached = len(self.hops)
        self.done = True
        return True

    def icmp(self, err: IcmpError, now: float) -> bool:
        """True if the error is about the ladder's current request."""
        if self.done or not self._tx or err.dest != self.server:
            return False
        if err.payload[8:20] not in (b"", self._tx[-12:]) and len(err.payload) >= 20:
            return False  # a router that quoted another datagram of ours
        if not err.time_exceeded:
            if err.offender != self.server[0]:
                return False
            # The server's host itself refused (no STUN there): reached all the same.
            self.hops.append(err.offender)
            self.reached, self.done = len(self.hops), True
            return True
        self._record(err.offender, now)
        return True

    # -- the core verbs (so the shared driver runs it alone, for `p2pim nat`) -------------

    def receive_datagram(self, sock: object, data: bytes, addr: Addr, now: float) -> None:
        self.stun_answer(data, now)

    def icmp_error(self, sock: object, err: IcmpError, now: float) -> None:
        self.icmp(err, now)

    def next_event(self) -> None:
        return None

    def datagrams_to_send(self, now: float) -> list[ShortDatagram]:
        self.handle_timer(now)
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return None if self.done else self._due

    def handle_timer(self, now: float) -> None:
        if self.done or now < self._due:
            return
        if self._tx:  # the step before stayed silent
            self._record(None, now)
            if self.done:
                return
        ttl = len(self.hops) + 1
        request = codec.binding_request()
        self._tx = request.transaction_id
        self._sent_at, self._due = now, now + STEP_WAIT
        self._out.append(ShortDatagram(self.sock, codec.encode(request), self.server, ttl))

    def _record(self, offender: str | None, now: float) -> None:
        self.hops.append(offender)
        self._tx = b""
        self._due = now
        silent = len(self.hops) - max((i + 1 for i, h in enumerate(self.hops) if h is not None), default=0)
        outside = offender is not None and self._outside(offender)
        self.done = outside or len(self.hops) >= MAX_HOPS or silent >= MAX_SILENT

    # -- results ------------------------------------------------------------------------

    def _outside(self, ip: str) -> bool:
        return is_public(ip) and ip not in self.ours

    @property
    def open_ttl(self) -> int | None:
        """The TTL that leaves our NATs and dies at the first public router (None: unknown)."""
        for ttl, hop in enumerate(self.hops, 1):
            if hop is not None and (self._outside(hop) or ttl == self.reached):
                return ttl
        return None

    @property
    def inside(self) -> list[str | None]:
        """The hops before the Internet (private, shared or our own addresses; None: silent)."""
        ttl = self.open_ttl
        return self.hops[: ttl - 1] if ttl is not None else list(self.hops)
