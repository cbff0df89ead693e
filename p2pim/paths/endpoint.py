"""The paths endpoint: every buddy's path, our own candidates, disco in and out (sans-IO).

One :class:`PeerPath` per buddy decides when to punch, which path is best
and when it died; this module is everything around them that is still
protocol, not I/O:

* **our candidates**: the host address, the STUN-mapped address, and whether
  the NAT maps per destination (RFC 5780's first mapping test, run with
  :mod:`p2pim.nat`'s probes on the client's own socket), plus peer-reflexive
  addresses buddies' pongs report (after a NAT rebinding they are fresher than
  what STUN said at login); then how many hops our NATs are (a short TTL
  ladder, :mod:`p2pim.nat.hops`), for punches that must not reach the peer's
  router (the peers' :class:`PeerPath` explains why);
* **call-me-maybe**: one asked for before STUN has answered waits for it, so
  it carries our real candidates;
* **keys**: which buddy a disco packet's key belongs to, re-read from the
  pinned keys at most once a second (packets under strangers' keys must not
  each cost a query);
* **disco dispatch**: ping, pong and call-me-maybe to the right
  :class:`PeerPath`, by a table;
* **probes** (``p2pim ping``): one ping on the current path, its RTT as an event.

It speaks the common core verbs (:mod:`p2pim.sansio`). Sockets are labels
``(owner, id)``: :data:`MAIN` is the client's one UDP socket, ``(peer, n)``
the extra sockets of a birthday dance with ``peer`` (the shell opens them on
first use), and :data:`RELAY` means "through the rendezvous" (``addr`` is
then the peer's name). Direct envelopes never come here: the shell hands
them to the messaging core by their first bytes.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..icmp import IcmpError
from ..identity import Identity
from ..nat.discovery import binding_probe
from ..nat.hops import HopLadder
from ..nat.portmap import Mapping, PortMapper, TryUpnp
from ..nat.probes import Outcome, Probe, ProbeSet
from ..sansio import Datagram, ShortDatagram
from ..stun import codec
from ..wire import disco_pb2 as dpb
from ..wire import nat_pb2 as npb
from . import peer as pp
from .disco import (
    Addr,
    Candidates,
    DiscoBoxes,
    DiscoError,
    call_me_maybe,
    is_disco,
    new_tx,
    opened,
    parse_call_me_maybe,
    ping,
    pong,
    sender_key,
    show,
)
from .peer import DEFAULT_KEEPALIVE, Path, PeerPath

Label = tuple[str, int]  # (owner, socket id): ("", 0) is the main socket
MAIN: Label = ("", pp.MAIN)
RELAY: Label = ("", pp.RELAY)
PORTMAP: Label = ("", -2)  # the socket that asks the router for a port mapping
MAIN6: Label = ("", pp.MAIN6)  # the client's IPv6 socket (global addresses: no NAT, no STUN)
NOWHERE: Addr = ("0.0.0.0", 0)  # the "address" of a packet that came through the relay

STUN_RTO = 0.25  # first retransmission; doubles (RFC 8489): sends at 0, 0.25, 0.75, 1.75, 3.75 s
STUN_SENDS = 5
STUN_GIVE_UP = 4.0
MAX_REFLEXIVE = 4
KEYS_EVERY_S = 1.0
MAX_PROBES = 64  # `p2pim ping` probes in flight


@dataclass(frozen=True)
class Local:
    """What we found out about ourselves."""

    host: Addr
    mapped: Addr | None
    hard: bool  # the mapping changed with the destination
    reflexive: tuple[Addr, ...] = ()  # our address as buddies' pongs reported it, newest last
    #: The TTL that passes our NATs and dies at the first public router (None: unknown).
    open_ttl: int | None = None
    #: The routers between us and the Internet, as the TTL ladder found them.
    inside: tuple[str | None, ...] = ()
    #: A port the router forwards to our socket (PCP, NAT-PMP or UPnP), if it gave one.
    portmap: Mapping | None = None
    #: Our global IPv6 address and the IPv6 socket's port (None: no IPv6 here).
    host6: Addr | None = None

    def candidates(self) -> Candidates:
        """IPv6 first (no NAT in the way, only a firewall that opens when we send). With a
        port mapping, its address is the IPv4 one to reach us by (from anywhere: we are as
        easy as a full cone there, so no birthday dance for our sake)."""
        forwarded = self.portmap.external if self.portmap else None
        endpoints: list[Addr] = []
        for addr in (self.host6, forwarded, self.host, self.mapped, *reversed(self.reflexive)):
            if addr is not None and addr not in endpoints:
                endpoints.append(addr)
        if forwarded is not None:
            return Candidates(tuple(endpoints), forwarded, False)
        return Candidates(tuple(endpoints), self.mapped, self.hard)


# -- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PathChanged:
    """Traffic to ``peer`` now goes over ``path`` (None: the relay)."""

    peer: str
    path: Path | None
    reason: str


@dataclass(frozen=True)
class SocketsDone:
    """Birthday sockets for ``peer`` other than ``keep`` may be closed."""

    peer: str
    keep: frozenset[int]


@dataclass(frozen=True)
class ProbeAnswered:
    tx: bytes
    rtt: float


@dataclass(frozen=True)
class LocalKnown:
    """Our candidates are known (STUN answered or gave up)."""

    local: Local


@dataclass(frozen=True)
class PortMapped:
    """The router's port mapping for us changed (None: none, or lost); ``tried``: protocols asked."""

    mapping: Mapping | None
    tried: tuple[str, ...]


PathsEvent = PathChanged | SocketsDone | ProbeAnswered | LocalKnown | PortMapped | TryUpnp


class PathEndpoint:
    def __init__(
        self,
        identity: Identity,
        keys: Callable[[], dict[bytes, str]],
        keepalive: float = DEFAULT_KEEPALIVE,
    ) -> None:
        """``keys()``: pinned identity key -> username of every buddy that may reach us."""
        self.boxes = DiscoBoxes(identity)
        self._keys = keys
        self.keepalive = keepalive
        self.local: Local | None = None
        self.peers: dict[str, PeerPath] = {}
        self.counters = {
            "bad_packets": 0,
            "unknown_sender": 0,
            "forged": 0,
            "stun_unmatched": 0,
            "icmp_errors": 0,
        }
        self._key_cache: dict[bytes, str] = {}
        self._keys_loaded = -1e9
        self._cmm_waiting: dict[str, bool] = {}  # call-me-maybes held until STUN answers (peer: reply)
        self._probes: OrderedDict[bytes, tuple[str, float]] = OrderedDict()  # tx -> (peer, sent at)
        self._stun = ProbeSet()
        self._stun_servers: list[Addr] = []
        self._ladder: HopLadder | None = None
        self.mapper: PortMapper | None = None
        self._pending_local: tuple[Addr | None, bool] = (None, False)  # while the ladder runs
        self._portmap_early: Mapping | None = None  # a mapping granted before the ladder ended
        self._portmap_ask: tuple[str, Addr, bool] | None = None
        self._host: Addr = NOWHERE
        self._host6: Addr | None = None
        self._out: list[Datagram | ShortDatagram] = []
        self._events: deque[PathsEvent] = deque()
        self._dirty: set[str] = set()  # peers fed since their last poll, or whose timer is due
        self._dispatch: dict[str, Callable[[str, dpb.Disco, Label, Addr, float], None]] = {
            "ping": self._on_ping,
            "pong": self._on_pong,
            "call_me_maybe": self._on_call_me_maybe,
            "opened": self._on_opened,
        }

    # -- our own candidates -----------------------------------------------------------

    def discover(self, host: Addr, stun: list[Addr], now: float, host6: Addr | None = None) -> None:
        """Find our candidates: ``host`` is our address towards the server and our port;
        ``host6`` our global IPv6 address and the IPv6 socket's port, if we have them.

        The mapping test is RFC 5780's first step: the same socket asks the
        primary and the alternate STUN address; two different mapped addresses
        mean the NAT maps per destination.
        """
        self._host, self._stun_servers, self._host6 = host, stun, host6
        if not stun:
            self._found(None, False, now)
            return
        self._stun.add(self._binding("primary", stun[0], now))

    def map_port(self, gateway: str, internal: Addr, upnp: bool = True) -> None:
        """May ask the router ``gateway`` to forward a port to ``internal`` (our socket): it is
        asked once STUN shows a NAT (nowhere else: no packet to a gateway that is not a NAT's),
        in parallel with the TTL ladder; a mapping that comes later is offered to buddies
        then. The shell's :data:`PORTMAP` socket is connected to the gateway (a refusal counts)."""
        self._portmap_ask = (gateway, internal, upnp)

    def upnp_result(self, external: Addr | None, lifetime: float, now: float) -> None:
        if self.mapper is not None:
            self.mapper.upnp_result(external, lifetime, now)
            self._mapper_events(now)

    def release_port(self, now: float) -> list[Datagram]:
        """Datagrams that give the mapping back (the shell sends them before closing)."""
        if self.mapper is None:
            return []
        out = self.mapper.release(now)
        self._mapper_events(now)
        return out

    def _mapper_events(self, now: float) -> None:
        assert self.mapper is not None
        while (ev := self.mapper.next_event()) is not None:
            if isinstance(ev, TryUpnp):
                self._events.append(ev)
                continue
            self._events.append(PortMapped(ev.mapping, ev.tried))
            if self.local is not None and self.local.portmap != ev.mapping:
                self.local = replace(self.local, portmap=ev.mapping)
                self._set_local(now)
                for core in self.peers.values():
                    core.candidates_changed(now)
            elif self.local is None:
                self._portmap_early = ev.mapping

    @staticmethod
    def _binding(name: str, server: Addr, now: float) -> Probe:
        return binding_probe(name, "main", server, now, STUN_RTO, STUN_GIVE_UP, STUN_SENDS)

    def _advance_discovery(self, now: float) -> None:
        if self.local is not None or not self._stun_servers:
            return
        if self._ladder is not None:
            if self._ladder.done:
                self._found(*self._pending_local, now)
            return
        probes = {p.name: p for p in self._stun.probes}
        first = probes.get("primary")
        if first is None or not first.done:
            return
        mapped = first.mapped if first.outcome is Outcome.ANSWERED else None
        second = probes.get("alternate")
        if second is None:
            response = first.tx.response if first.outcome is Outcome.ANSWERED else None
            alt = (codec.other_address(response) if response else None) or (
                self._stun_servers[1] if len(self._stun_servers) > 1 else None
            )
            if alt is not None and mapped is not None:
                self._stun.add(self._binding("alternate", alt, now))
                return
            self._found(mapped, False, now)
        elif second.done:
            other = second.mapped if second.outcome is Outcome.ANSWERED else None
            self._found(mapped, other is not None and other != mapped, now)

    def _found(self, mapped: Addr | None, hard: bool, now: float) -> None:
        if mapped is not None and mapped != self._host and self._portmap_ask and self.mapper is None:
            gateway, internal, upnp = self._portmap_ask
            self.mapper = PortMapper(gateway, internal, now, PORTMAP, upnp=upnp)
        if mapped is not None and self._ladder is None:
            # Before anyone punches: how far our NATs reach (the TTL of opening pings).
            ours = frozenset({mapped[0], self._host[0]})
            self._ladder = HopLadder(self._stun_servers[0], now, ours, MAIN)
            self._pending_local = (mapped, hard)
            return
        ladder = self._ladder
        self.local = Local(
            self._host,
            mapped,
            hard,
            open_ttl=ladder.open_ttl if ladder else None,
            inside=tuple(ladder.inside) if ladder else (),
            portmap=self._portmap_early,
            host6=self._host6,
        )
        self._set_local(now)
        self._events.append(LocalKnown(self.local))
        waiting, self._cmm_waiting = self._cmm_waiting, {}
        for peer, reply in waiting.items():
            self._send_cmm(peer, reply, now)

    def _set_local(self, now: float) -> None:
        assert self.local is not None
        cands = self.local.candidates()
        for peer, core in self.peers.items():
            core.set_local(cands, self.local.open_ttl, now)
            self._dirty.add(peer)

    def _learn_reflexive(self, src: npb.Address, now: float) -> None:
        if self.local is None:
            return
        ip, port = src.ip, src.port
        if not 0 < port < 65536 or (ip, port) in (self.local.host, self.local.mapped, *self.local.reflexive):
            return
        if len(ip.split(".")) != 4:
            return
        self.local = replace(self.local, reflexive=(*self.local.reflexive, (ip, port))[-MAX_REFLEXIVE:])
        self._set_local(now)

    # -- what the client tells us ---------------------------------------------------------

    def want(self, peer: str, now: float) -> None:
        """``peer`` is online and we talk to it: try for a direct path."""
        self._core(peer).activate(now)

    def offline(self, peer: str) -> None:
        core = self.peers.get(peer)
        if core is not None:
            core.offline()
            self._dirty.add(peer)

    def suspect(self, peer: str, now: float) -> None:
        core = self.peers.get(peer)
        if core is not None:
            core.suspect(now)
            self._dirty.add(peer)

    def route(self, peer: str) -> Path | None:
        """Where to send to ``peer`` directly now; None: use the relay."""
        core = self.peers.get(peer)
        return core.usable if core is not None else None

    def probe(self, peer: str, now: float) -> tuple[bytes, str] | None:
        """One ping on the current path: its tx (the answer comes as :class:`ProbeAnswered`)
        and where it went ("relay" or the address); None for a peer whose key we lack."""
        key = self._key_of(peer, now)
        if key is None:
            return None
        tx = new_tx()
        self._probes[tx] = (peer, now)
        while len(self._probes) > MAX_PROBES:
            self._probes.popitem(last=False)
        packet = self.boxes.seal(key, ping(tx))
        path = self.route(peer)
        if path is None:
            self._out.append(Datagram(RELAY, packet, peer))
            return tx, "relay"
        self._out.append(Datagram(self._label(peer, path.sock), packet, path.addr))
        return tx, show(path.addr)

    def forget_keys(self, now: float) -> None:
        """Buddies or keys changed: read the pinned keys of buddies again."""
        self._key_cache, self._keys_loaded = self._keys(), now

    # -- the core verbs ----------------------------------------------------------------

    def receive_datagram(self, sock: Label, data: bytes, addr: Any, now: float) -> None:
        """A disco or STUN packet on ``sock``; through the relay, ``addr`` is the sender's name."""
        if sock == PORTMAP:
            if self.mapper is not None:
                self.mapper.receive_datagram(sock, data, addr, now)
                self._mapper_events(now)
            return
        if sock == RELAY:
            self._from_relay(str(addr), data, now)
        elif is_disco(data):
            self._from_socket(sock, data, addr, now)
        elif sock == MAIN and codec.is_stun(data):
            try:
                codec.decode(data)
            except Exception:
                self.counters["bad_packets"] += 1
                return
            if self._ladder is not None and self._ladder.stun_answer(data, now):
                self._advance_discovery(now)
            elif self._stun.receive("main", data, addr, now) is None:
                self.counters["stun_unmatched"] += 1
            self._advance_discovery(now)
        else:
            self.counters["bad_packets"] += 1

    def socket_error(self, sock: Label, now: float) -> None:
        """An error on a socket the kernel reports it for (the port-mapping one is connected)."""
        if sock == PORTMAP and self.mapper is not None:
            self.mapper.socket_error(sock, now)
            self._mapper_events(now)

    def icmp_error(self, sock: Label, err: IcmpError, now: float) -> None:
        """An ICMP error about something we sent (the TTL ladder's, or a punch's)."""
        if self._ladder is not None and sock == MAIN and self._ladder.icmp(err, now):
            self._advance_discovery(now)
        else:
            self.counters["icmp_errors"] += 1

    def datagrams_to_send(self, now: float) -> list[Any]:
        for dg in self._stun.datagrams_to_send(now):
            self._out.append(Datagram(MAIN, dg.data, dg.addr))
        if self._ladder is not None and not self._ladder.done:
            self._out.extend(self._ladder.datagrams_to_send(now))
        if self.mapper is not None:
            self._out.extend(self.mapper.datagrams_to_send(now))
            self._mapper_events(now)
        self._advance_discovery(now)
        dirty, self._dirty = self._dirty, set()
        for peer in dirty:
            core = self.peers.get(peer)
            for output in core.poll(now) if core is not None else ():
                self._do(peer, output, now)
        sends, self._out = self._out, []
        return sends

    def get_timer(self) -> float | None:
        if self._dirty or self._out:
            return 0.0  # fed outside the driver and not polled yet: at once
        dues = [d for d in (c.next_timer() for c in self.peers.values()) if d is not None]
        for timer in (
            self._stun.get_timer(),
            self._ladder.get_timer() if self._ladder else None,
            self.mapper.get_timer() if self.mapper else None,
        ):
            if timer is not None:
                dues.append(timer)
        return min(dues) if dues else None

    def handle_timer(self, now: float) -> None:
        self._stun.handle_timer(now)
        if self._ladder is not None:
            self._ladder.handle_timer(now)
        if self.mapper is not None:
            self.mapper.handle_timer(now)
            self._mapper_events(now)
        self._advance_discovery(now)
        for peer, core in self.peers.items():
            due = core.next_timer()
            if due is not None and due <= now:
                self._dirty.add(peer)

    def next_event(self) -> PathsEvent | None:
        return self._events.popleft() if self._events else None

    # -- packets in ----------------------------------------------------------------------

    def _from_relay(self, peer: str, data: bytes, now: float) -> None:
        key = self._key_of(peer, now)
        if key is None:
            self.counters["unknown_sender"] += 1
            return
        try:
            msg = self.boxes.open(data, key)  # also refuses a packet claiming another key
        except DiscoError:
            self.counters["forged"] += 1
            return
        self._disco(peer, msg, RELAY, NOWHERE, now)

    def _from_socket(self, sock: Label, data: bytes, addr: Addr, now: float) -> None:
        try:
            key = sender_key(data)
        except DiscoError:
            self.counters["bad_packets"] += 1
            return
        peer = self._peer_of(key, now)
        owner = sock[0]
        if peer is None or (owner and peer != owner):
            self.counters["unknown_sender"] += 1
            return
        try:
            msg = self.boxes.open(data, key)
        except DiscoError:
            self.counters["forged"] += 1
            return
        self._disco(peer, msg, sock, addr, now)

    def _disco(self, peer: str, msg: dpb.Disco, sock: Label, addr: Addr, now: float) -> None:
        handler = self._dispatch.get(msg.WhichOneof("kind") or "")
        if handler is None:
            self.counters["bad_packets"] += 1
            return
        handler(peer, msg, sock, addr, now)

    def _on_ping(self, peer: str, msg: dpb.Disco, sock: Label, addr: Addr, now: float) -> None:
        self._core(peer).ping(now, sock[1], addr, msg.ping.tx_id)

    def _on_pong(self, peer: str, msg: dpb.Disco, sock: Label, addr: Addr, now: float) -> None:
        probe = self._probes.get(msg.pong.tx_id)
        if probe is not None and probe[0] == peer:
            del self._probes[msg.pong.tx_id]
            self._events.append(ProbeAnswered(msg.pong.tx_id, now - probe[1]))
        elif sock != RELAY:
            rtt = self._core(peer).pong(now, sock[1], addr, msg.pong.tx_id)
            if rtt is not None and sock == MAIN:
                self._learn_reflexive(msg.pong.src, now)

    def _on_call_me_maybe(self, peer: str, msg: dpb.Disco, sock: Label, addr: Addr, now: float) -> None:
        cands = parse_call_me_maybe(msg.call_me_maybe)
        self._core(peer).call_me_maybe(now, cands, msg.call_me_maybe.reply)

    def _on_opened(self, peer: str, msg: dpb.Disco, sock: Label, addr: Addr, now: float) -> None:
        core = self.peers.get(peer)
        if core is not None and sock == RELAY:
            core.opened(now)
            self._dirty.add(peer)

    # -- packets out -----------------------------------------------------------------------

    def _core(self, peer: str) -> PeerPath:
        self._dirty.add(peer)
        core = self.peers.get(peer)
        if core is None:
            core = self.peers[peer] = PeerPath(peer, self.keepalive)
            if self.local is not None:
                core.set_local(self.local.candidates(), self.local.open_ttl, None)
        return core

    @staticmethod
    def _label(peer: str, sock_id: int) -> Label:
        """The shell's socket for a :class:`PeerPath` socket id."""
        shared = {pp.MAIN: MAIN, pp.RELAY: RELAY, pp.MAIN6: MAIN6}
        return shared.get(sock_id, (peer, sock_id))

    def label(self, peer: str, sock_id: int) -> Label:
        return self._label(peer, sock_id)

    def _do(self, peer: str, out: pp.Output, now: float) -> None:
        if isinstance(out, pp.PathChanged):
            self._events.append(PathChanged(peer, out.path, out.reason))
            return
        if isinstance(out, pp.CloseSockets):
            self._events.append(SocketsDone(peer, out.keep))
            return
        key = self._key_of(peer, now)
        if key is None:
            return
        if isinstance(out, pp.SendPing):
            packet = self.boxes.seal(key, ping(out.tx))
            label = self._label(peer, out.sock)
            for addr in out.addrs:
                if out.ttl is not None and label != RELAY:
                    self._out.append(ShortDatagram(label, packet, addr, out.ttl))
                else:
                    self._out.append(Datagram(label, packet, peer if label == RELAY else addr))
        elif isinstance(out, pp.SendPong):
            packet = self.boxes.seal(key, pong(out.tx, out.addr))
            label = self._label(peer, out.sock)
            self._out.append(Datagram(label, packet, peer if label == RELAY else out.addr))
        elif isinstance(out, pp.SendOpened):
            self._out.append(Datagram(RELAY, self.boxes.seal(key, opened()), peer))
        elif isinstance(out, pp.SendCallMeMaybe):
            if self.local is None:
                # STUN has not answered yet: send it (with the candidates) when it has.
                self._cmm_waiting[peer] = self._cmm_waiting.get(peer, True) and out.reply
                return
            self._send_cmm(peer, out.reply, now)

    def _send_cmm(self, peer: str, reply: bool, now: float) -> None:
        key = self._key_of(peer, now)
        if key is not None and self.local is not None:
            self._out.append(
                Datagram(RELAY, self.boxes.seal(key, call_me_maybe(self.local.candidates(), reply)), peer)
            )

    def _key_of(self, peer: str, now: float) -> bytes | None:
        for key, name in self._key_cache.items():
            if name == peer:
                return key
        self._reload_keys(now)
        return next((k for k, n in self._key_cache.items() if n == peer), None)

    def _peer_of(self, key: bytes, now: float) -> str | None:
        name = self._key_cache.get(key)
        if name is None:
            self._reload_keys(now)
            name = self._key_cache.get(key)
        return name

    def _reload_keys(self, now: float) -> None:
        # At most once a second: packets under strangers' keys must not each cost a query.
        if now - self._keys_loaded >= KEYS_EVERY_S:
            self._key_cache, self._keys_loaded = self._keys(), now
