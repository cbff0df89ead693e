"""The path to one peer: relay until a direct path is proven, and back when it dies.

Sans-IO. The path manager (``p2pim.paths.manager``) feeds what happens
(traffic wanted, a call-me-maybe, a ping or pong, time passing) and sends
what :meth:`PeerPath.poll` returns. Sockets are small integers: 0 is the
client's one UDP socket; 1..N are extra sockets used only for the birthday
dance with this peer, which the shell opens on first use; ``RELAY`` (-1)
means "through the rendezvous".

A punching round starts when both sides have exchanged call-me-maybes (each
carries the sender's candidates): every candidate is pinged from socket 0 on
a short schedule; a ping from an address we did not know (a peer-reflexive
candidate: the peer's NAT picked a new port for us) is answered and pinged
back. The first valid pong makes the path direct.

Who pings first matters. A router without an input firewall answers an
unsolicited packet itself (ICMP) and conntrack keeps an entry for it; when
its host then sends to that address, SNAT finds the tuple taken and maps to
another port, which the peer never hears of (natlab measures this: such
pairs stayed on the relay). So no packet may reach the peer's router before
the peer has sent towards us. The side that answers a call-me-maybe goes
first: it *opens* its NAT with pings whose TTL (``open_ttl``, from the
endpoint's TTL ladder) passes its own NATs and dies at the first public
router, then answers; the asker, when the answer comes, opens too, says so
through the relay (:class:`SendOpened`) and pings at full TTL at once (the
answerer is open by then). The answerer's own full-TTL pings wait for that
word (or for an answer to a call-me-maybe of its own, when both asked at
once), or :data:`FIRST_SIDE_WAIT` if neither comes (a ping from the asker is
answered at once anyway). With ``open_ttl`` unknown, both ping at once.

If one side maps per destination (symmetric) and the other
does not, the birthday dance follows: the hard side opens
:data:`BIRTHDAY_SOCKETS` mappings towards the easy side's mapped address,
and the easy side probes random ports on the hard side's address until one
of its probes lands on one of those mappings (1 - (1 - 256/64512)^1024 is
about 98%). Both are bounded in packets, rate and time.

A direct path is kept alive by a heartbeat every ``keepalive`` seconds (from
the measured NAT binding lifetime). A heartbeat is missed when none of its
:data:`HEARTBEAT_TRIES` pings is answered; after :data:`MISSES_TO_FALLBACK`
misses in a row traffic goes back to the relay and punching starts again
after a back-off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .disco import Addr, Candidates, is_v6, new_tx

RELAY = -1
MAIN = 0
MAIN6 = -3  # the client's IPv6 socket
PREFER_V6 = 1.5  # an IPv6 path replaces an IPv4 one unless this much slower (no NAT state to keep)

PUNCH_AT = (0.0, 0.25, 0.6, 1.2, 2.0, 3.0)  # seconds into a round: ping every candidate
FIRST_SIDE_WAIT = 1.0  # the answering side's full-TTL pings start at most this far into its round
ROUND_LENGTH = 3.5
BIRTHDAY_AFTER = 1.5  # seconds into a round with no direct path
BIRTHDAY_WINDOW = 6.0
BIRTHDAY_SOCKETS = 256
BIRTHDAY_PROBES = 1024
BIRTHDAY_RATE = 300.0  # probes per second from the easy side
BIRTHDAY_REOPEN = 2.0  # the hard side sends its 256 opening pings twice (loss)
PORT_RANGE = (1024, 65535)
RETRY_BACKOFF = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0)
CMM_QUIET = 2.0  # do not ask a peer to punch more often than this
HEARTBEAT_RETRY = 1.0
HEARTBEAT_TRIES = 3
MISSES_TO_FALLBACK = 2
DEFAULT_KEEPALIVE = 25.0
MAX_PRFLX = 32
PING_BACK_GAP = 0.5  # answer-pings to one address at most this often
PENDING_LIFETIME = 10.0
BETTER = 0.5  # switch direct paths only for a path this much faster


@dataclass(frozen=True)
class Path:
    sock: int
    addr: Addr
    rtt: float  # seconds


# -- outputs ---------------------------------------------------------------------


@dataclass(frozen=True)
class SendPing:
    """The same sealed ping (``tx``) from ``sock`` to each of ``addrs``; with ``ttl``, an
    opening ping that is meant to die on the way."""

    sock: int
    addrs: tuple[Addr, ...]
    tx: bytes
    ttl: int | None = None


@dataclass(frozen=True)
class SendPong:
    sock: int
    addr: Addr
    tx: bytes


@dataclass(frozen=True)
class SendCallMeMaybe:
    """Over the relay, with our current candidates."""

    reply: bool


@dataclass(frozen=True)
class SendOpened:
    """Over the relay: our NAT is open towards the peer (our opening pings went)."""


@dataclass(frozen=True)
class PathChanged:
    path: Path | None  # None: back to the relay
    reason: str


@dataclass(frozen=True)
class CloseSockets:
    """Birthday sockets for this peer other than ``keep`` may be closed."""

    keep: frozenset[int]


Output = SendPing | SendPong | SendCallMeMaybe | SendOpened | PathChanged | CloseSockets


@dataclass
class _Pending:
    targets: set[tuple[int, Addr]]
    sent_at: float
    heartbeat: bool = False


@dataclass
class PeerPath:
    peer: str
    keepalive: float = DEFAULT_KEEPALIVE
    rng: random.Random = field(default_factory=random.Random)
    local: Candidates | None = None  # ours, set by the manager once STUN has answered
    open_ttl: int | None = None  # passes our NATs, dies before the peer's (None: unknown)
    has_v6: bool = False  # we have an IPv6 socket and a global address
    remote: Candidates | None = None
    path: Path | None = None
    counters: dict[str, int] = field(
        default_factory=lambda: {"rounds": 0, "birthday_rounds": 0, "fallbacks": 0}
    )
    _out: list[Output] = field(default_factory=list)
    _pending: dict[bytes, _Pending] = field(default_factory=dict)
    _prflx: dict[tuple[int, Addr], float] = field(default_factory=dict)  # learned -> last ping-back
    _round: float | None = None  # start of the current punching round
    _answer_due: bool = False  # a call-me-maybe to answer (after our opening pings)
    _deferred: bool | None = None  # a round asked for before we knew ourselves (its ``first``)
    _full_from: float = 0.0  # full-TTL pings of this round from then (the peer has opened)
    _punches: int = 0
    _birthday: str | None = None  # "hard" or "easy" during a birthday round
    _bday_tx: bytes = b""
    _bday_opened: int = 0
    _bday_probed: set[int] = field(default_factory=set)
    _bday_next: float = 0.0
    _retry_at: float | None = None
    _failures: int = 0
    _cmm_at: float = -1e9
    _hb_due: float | None = None
    _hb_tries: int = 0
    _misses: int = 0
    suspected: bool = False  # something sent direct went unanswered; a heartbeat is checking

    @property
    def usable(self) -> Path | None:
        """The direct path, unless it is under suspicion (then the relay carries traffic)."""
        return None if self.suspected else self.path

    # -- inputs -------------------------------------------------------------------

    def set_local(self, local: Candidates, open_ttl: int | None, now: float | None) -> None:
        """Our candidates (STUN and the TTL ladder have answered); a round the peer asked
        for meanwhile starts now, so that its first pings know how to open our NAT."""
        self.local, self.open_ttl = local, open_ttl
        self.has_v6 = any(is_v6(a) for a in local.endpoints)
        if self._deferred is not None and now is not None:
            first, self._deferred = self._deferred, None
            if self.path is None and self._round is None:
                self._start_round(now, first)

    def activate(self, now: float) -> bool:
        """We want a direct path (traffic, or the peer came online): ask the peer to punch.

        True if that asked (a call-me-maybe is waiting in :meth:`poll`). Called for every
        message sent, so the common case (a path, or punching under way) does nothing.
        """
        if self.path is not None or self._round is not None:
            return False
        if self._retry_at is not None and now < self._retry_at:
            return False
        return self._ask(now)

    def _ask(self, now: float) -> bool:
        if now - self._cmm_at < CMM_QUIET:
            return False
        self._cmm_at = now
        self._retry_at = now + RETRY_BACKOFF[min(self._failures, len(RETRY_BACKOFF) - 1)]
        self._out.append(SendCallMeMaybe(reply=False))
        return True

    def call_me_maybe(self, now: float, cands: Candidates, reply: bool) -> None:
        """The peer's candidates: answer (unless this is an answer) and punch."""
        self.remote = cands
        if not reply:
            self._answer_due = True  # sent by poll, after this round's opening pings
        if self.path is not None:
            # They lost the path (restart, NAT flush) while ours still looks fine: check it now.
            self._hb_due = now
            return
        if self.local is None:
            self._deferred = not reply  # our answer waits for STUN too (the endpoint holds it)
        elif self._round is None or now - self._round > 1.0:
            # An answer means the peer opened before sending it: ping at once. Answering,
            # we open first, and ping at full TTL once the asker has opened too.
            self._start_round(now, first=not reply)
        elif reply:
            # Both asked at once, so both answered and wait: an answer says its sender
            # opened first, which is what we wait for.
            self.opened(now)

    def candidates_changed(self, now: float) -> None:
        """Our candidates got better (a port mapping): a peer we have no path to hears them
        now, also during a round (its pings then go to the new ones too)."""
        if self.path is None and self.remote is not None:
            self._cmm_at = -1e9
            self._ask(now)

    def opened(self, now: float) -> None:
        """The peer's NAT is open towards us: our full-TTL pings may go now."""
        if self._round is not None and self._full_from > now:
            self._full_from = now
            # The next scheduled ping slot is the earliest full ping; do not wait for it.
            self._ping_each_family(now, tuple(self.candidates()))

    def offline(self) -> None:
        """The peer went offline: forget everything (its next session has new addresses)."""
        had = self.path is not None
        self.remote, self.path, self._round, self._birthday = None, None, None, None
        self._deferred = None
        self.suspected = False
        self._pending.clear()
        self._prflx.clear()
        self._retry_at, self._failures, self._hb_due, self._misses = None, 0, None, 0
        self._cmm_at = -1e9
        if had:
            self._out.append(PathChanged(None, "peer offline"))
        self._out.append(CloseSockets(frozenset()))

    def suspect(self, now: float) -> None:
        """Something sent on the direct path went unanswered: check the path now."""
        if self.path is not None:
            self.suspected = True
            if self._hb_tries == 0:
                self._hb_due = now

    def ping(self, now: float, sock: int, addr: Addr, tx: bytes) -> None:
        self._out.append(SendPong(sock, addr, tx))
        if sock == RELAY or self.path is not None:
            return
        key = (sock, addr)
        last = self._prflx.get(key)
        if last is None and len(self._prflx) >= MAX_PRFLX:
            return
        if last is None or now - last >= PING_BACK_GAP:
            self._prflx[key] = now
            self._send_ping(now, sock, (addr,))

    def pong(self, now: float, sock: int, addr: Addr, tx: bytes) -> float | None:
        """A pong that opened with the peer's key; returns its RTT if it answered our ping."""
        pending = self._pending.get(tx)
        if pending is None or (sock, addr) not in pending.targets:
            return None  # replayed, or from an address we never pinged
        del self._pending[tx]
        rtt = max(0.0, now - pending.sent_at)
        if self.path is not None and (sock, addr) == (self.path.sock, self.path.addr):
            self.path = Path(sock, addr, 0.8 * self.path.rtt + 0.2 * rtt)
            self._misses, self._hb_tries, self._hb_due = 0, 0, now + self.keepalive
            self.suspected = False
            return rtt
        current = self.path
        ipv6_first = (
            current is not None and is_v6(addr) and not is_v6(current.addr) and rtt < PREFER_V6 * current.rtt
        )
        # An IPv6 path is not left for a faster-looking IPv4 one: such a pong can only be
        # one still in flight from the punching round, whose first IPv6 sample carries the
        # neighbour discovery and firewall set-up of a fresh path (Karn's caution); IPv4
        # brings NAT state to keep. IPv6 is left when it fails.
        keep_v6 = current is not None and is_v6(current.addr) and not is_v6(addr)
        faster = current is not None and rtt < BETTER * current.rtt and not keep_v6
        if self.path is None or faster or ipv6_first:
            reason = "punched" if self.path is None else "IPv6" if ipv6_first else "faster path"
            self.path = Path(sock, addr, rtt)
            self._misses, self._hb_tries, self._hb_due = 0, 0, now + self.keepalive
            self.suspected = False
            self._end_round(success=True)
            self._out.append(PathChanged(self.path, reason))
            self._out.append(CloseSockets(frozenset({sock})))
        return rtt

    # -- outputs ------------------------------------------------------------------

    def poll(self, now: float) -> list[Output]:
        self._expire(now)
        if self._round is not None:
            self._punch(now)
        elif self.path is None and self._retry_at is not None and now >= self._retry_at:
            self._ask(now)
        if self.path is not None and self._hb_due is not None and now >= self._hb_due:
            self._heartbeat(now)
        if self._answer_due:
            self._answer_due = False
            self._out.append(SendCallMeMaybe(reply=True))
        out, self._out = self._out, []
        return out

    def next_timer(self) -> float | None:
        dues: list[float] = []
        if self._round is not None:
            if self._punches < len(PUNCH_AT):
                dues.append(self._round + PUNCH_AT[self._punches])
            dues.append(self._round_end())
            if self._birthday is None and self._birthday_wanted():
                dues.append(self._round + BIRTHDAY_AFTER)
            elif self._birthday is not None:
                dues.append(self._bday_next)
        elif self.path is None and self._retry_at is not None:
            dues.append(self._retry_at)
        if self.path is not None and self._hb_due is not None:
            dues.append(self._hb_due)
        return min(dues) if dues else None

    def candidates(self) -> list[Addr]:
        """Where to ping: the peer's endpoints, our LAN-looking ones first."""
        if self.remote is None:
            return []
        seen: list[Addr] = []
        for addr in self.remote.endpoints + ((self.remote.mapped,) if self.remote.mapped else ()):
            if addr not in seen:
                seen.append(addr)
        return seen

    # -- internals ----------------------------------------------------------------

    def _start_round(self, now: float, first: bool = False) -> None:
        self.counters["rounds"] += 1
        self._round, self._punches, self._birthday = now, 0, None
        self._full_from = now + (FIRST_SIDE_WAIT if first and self.open_ttl is not None else 0.0)
        self._bday_probed.clear()
        self._bday_opened = 0

    def _round_end(self) -> float:
        assert self._round is not None
        if self._birthday is not None or self._birthday_wanted():
            return self._round + BIRTHDAY_AFTER + BIRTHDAY_WINDOW
        return self._round + ROUND_LENGTH

    def _end_round(self, success: bool) -> None:
        if self._round is None:
            return
        self._round, self._birthday = None, None
        if success:
            self._failures, self._retry_at = 0, None
        else:
            self._failures += 1
            self._out.append(CloseSockets(frozenset()))

    def _birthday_wanted(self) -> bool:
        loc, rem = self.local, self.remote
        return (
            loc is not None
            and rem is not None
            and loc.hard != rem.hard
            and loc.mapped is not None
            and rem.mapped is not None
            and loc.mapped[0] != rem.mapped[0]  # behind the same NAT: LAN addresses do it
        )

    def _punch(self, now: float) -> None:
        assert self._round is not None
        while self._punches < len(PUNCH_AT) and now >= self._round + PUNCH_AT[self._punches]:
            at = self._round + PUNCH_AT[self._punches]
            self._punches += 1
            targets = tuple(self.candidates())
            if not targets:
                continue
            if self.open_ttl is not None and (self._punches == 1 or at < self._full_from):
                self._ping_each_family(now, targets, ttl=self.open_ttl)
                if self._punches == 1 and at >= self._full_from:
                    self._out.append(SendOpened())  # we asked: the answerer waits for this
            if at >= self._full_from:
                self._ping_each_family(now, targets)
        if self._birthday is None and self._birthday_wanted() and now >= self._round + BIRTHDAY_AFTER:
            assert self.local is not None
            self._birthday = "hard" if self.local.hard else "easy"
            self._bday_tx, self._bday_next = new_tx(), now
            self._pending[self._bday_tx] = _Pending(set(), now)
            self.counters["birthday_rounds"] += 1
        if self._birthday is not None and now >= self._bday_next:
            self._birthday_step(now)
        if now >= self._round_end():
            self._end_round(success=False)

    def _birthday_step(self, now: float) -> None:
        assert self.remote is not None and self.remote.mapped is not None
        pending = self._pending.get(self._bday_tx)
        if pending is None:  # expired: a fresh tx for the rest of the window
            self._bday_tx = new_tx()
            pending = self._pending[self._bday_tx] = _Pending(set(), now)
        pending.sent_at = now
        target = self.remote.mapped
        if self._birthday == "hard":
            # Each extra socket's first packet to the easy side makes a new NAT mapping
            # that lets the easy side's packets (from its one mapped address) back in.
            # Opening pings: they must not reach the easy side's router (see above), only
            # make the mappings its probes will find.
            for sock in range(1, BIRTHDAY_SOCKETS + 1):
                pending.targets.add((sock, target))
                self._out.append(SendPing(sock, (target,), self._bday_tx, self.open_ttl))
            self._bday_opened += 1
            self._bday_next = now + BIRTHDAY_REOPEN if self._bday_opened < 2 else now + BIRTHDAY_WINDOW
            return
        # Easy side: random ports on the hard side's address, at a bounded rate.
        lo, hi = PORT_RANGE
        batch = max(1, int(BIRTHDAY_RATE * 0.05))
        addrs: list[Addr] = []
        while len(addrs) < batch and len(self._bday_probed) < min(BIRTHDAY_PROBES, hi - lo):
            port = self.rng.randint(lo, hi)
            if port in self._bday_probed:
                continue
            self._bday_probed.add(port)
            addrs.append((target[0], port))
        if addrs:
            pending.targets.update((MAIN, a) for a in addrs)
            self._out.append(SendPing(MAIN, tuple(addrs), self._bday_tx))
        self._bday_next = now + batch / BIRTHDAY_RATE
        if len(self._bday_probed) >= BIRTHDAY_PROBES:
            self._bday_next = now + BIRTHDAY_WINDOW

    def _heartbeat(self, now: float) -> None:
        assert self.path is not None
        if self._hb_tries >= HEARTBEAT_TRIES:
            self._misses += 1
            self._hb_tries = 0
            if self._misses >= MISSES_TO_FALLBACK:
                self.counters["fallbacks"] += 1
                self.path, self._hb_due, self._misses, self.suspected = None, None, 0, False
                self._prflx.clear()
                self._out.append(PathChanged(None, "heartbeats missed"))
                self._out.append(CloseSockets(frozenset()))
                self._retry_at, self._cmm_at = now, -1e9  # punch again now (via a new call-me-maybe)
                return
        self._hb_tries += 1
        self._send_ping(now, self.path.sock, (self.path.addr,), heartbeat=True)
        self._hb_due = now + HEARTBEAT_RETRY

    def _ping_each_family(self, now: float, targets: tuple[Addr, ...], ttl: int | None = None) -> None:
        """IPv4 candidates from the main socket, IPv6 ones from the IPv6 socket (if we have one)."""
        v4 = tuple(a for a in targets if not is_v6(a))
        v6 = tuple(a for a in targets if is_v6(a)) if self.has_v6 else ()
        for sock, addrs in ((MAIN6, v6), (MAIN, v4)):
            if addrs:
                self._send_ping(now, sock, addrs, ttl=ttl)

    def _send_ping(
        self,
        now: float,
        sock: int,
        addrs: tuple[Addr, ...],
        heartbeat: bool = False,
        ttl: int | None = None,
    ) -> None:
        tx = new_tx()
        self._pending[tx] = _Pending({(sock, a) for a in addrs}, now, heartbeat)
        self._out.append(SendPing(sock, addrs, tx, ttl))

    def _expire(self, now: float) -> None:
        old = [tx for tx, p in self._pending.items() if now - p.sent_at > PENDING_LIFETIME]
        for tx in old:
            del self._pending[tx]
