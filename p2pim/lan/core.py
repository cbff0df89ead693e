"""LAN chat with no server: discovery, messages and IP Messenger peers (sans-IO).

It speaks the common core verbs (:mod:`p2pim.sansio`); the shell
(:mod:`p2pim.lan.node`) runs it with the shared driver. A datagram to
``None`` means "broadcast on every LAN we are on". Envelopes (in and out) are
the messaging core's job (:class:`p2pim.messaging.core.Messenger`, with the
:data:`~p2pim.messaging.delivery.LAN` route policy); this module finds peers
and tells the messaging core who is here. Two kinds of peer share the picture:

* **p2pim peers** announce themselves with signed announcements
  (:mod:`p2pim.lan.announce`) on the discovery port: at start (ENTRY, which
  everyone answers directly), every ``interval`` seconds (ALIVE) and when
  leaving (EXIT). A peer that stops announcing is gone after 3.5 of its
  intervals. Messages are the same end-to-end envelopes as over the
  internet, sent straight to the peer's data port and retransmitted (0.5 s,
  doubling to 8 s) until its *delivered* receipt; the outbox and history live
  in SQLite, so a message typed before a crash still goes out when the peer
  is next seen, and receivers drop duplicates by message id.
* **IP Messenger peers** (IP Messenger, iptux, FeiQ) speak Draft-9 on UDP
  2425: plain text, shown as unencrypted. They are named ``nickname@ip``;
  one that changes its nickname or away state is the same peer (an event
  says so). They announce only at start and exit, so one silent for
  :data:`IPMSG_IDLE` seconds is asked (a unicast BR_ENTRY, which every client
  answers with ANSENTRY) and is gone after :data:`IPMSG_PROBES` unanswered
  asks. Their messages, both ways, are kept and deduplicated by
  :mod:`p2pim.lan.ipmsg_messages`.

Anyone on the LAN may send anything, so everything here is bounded: at most
:data:`MAX_PEERS` peers (when full, the unpinned peer heard from longest ago
makes room; pinned peers are never pushed out), announcement intervals of at
most :data:`announce.MAX_INTERVAL_S`, and a key is pinned (written to the
profile) only when a message is exchanged with it; until then it lives in
memory. Garbage on either port is dropped and counted in
:attr:`LanCore.counters`.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..bounded import keep, seen
from ..identity import Identity, fingerprint
from ..messaging.core import Keys, Messenger, Verdict
from ..messaging.delivery import LAN, Via
from ..messaging.envelope import MAX_ENVELOPE, text_body
from ..messaging.events import MessagingEvent, Problem
from ..messaging.store import ClientStore
from ..paths.disco import DATA_MAGIC
from ..sansio import Datagram
from ..wire import lan_pb2 as lpb
from . import announce, ipmsg
from .ipmsg_messages import IpmsgMessages, attached, called

Addr = tuple[str, int]
DISCOVERY_PORT = 2426
DEFAULT_INTERVAL = 10.0
EXPIRE_AFTER = 3.5  # intervals without an announcement
IPMSG_IDLE = 60.0  # an IP Messenger peer silent this long is asked whether it is still there
IPMSG_PROBE_GAP, IPMSG_PROBES = 5.0, 3  # ... this often, this many times, then it is gone
MAX_PEERS = 256
MAX_REMEMBERED = 4096  # announcement times (replay protection) and names seen, per run
MAX_DATA = MAX_ENVELOPE
PREFIX = "lan:"  # contacts and history of LAN peers, apart from server buddies
P2PIM_GROUP = "p2pim"  # our IP Messenger group name: how p2pim instances skip each other there


class LanError(Exception):
    """A send the user asked for cannot be done (unknown peer, changed key)."""


@dataclass
class LanPeer:
    name: str  # p2pim: the announced name; IP Messenger: "nickname@ip"
    kind: str  # "p2pim" or "ipmsg"
    addr: Addr  # where to send
    key: bytes = b""
    host: str = ""
    group: str = ""
    away: bool | None = False  # None: its client does not say (iptux)
    client: str = ""  # IP Messenger: which program ("iptux 0.8.3", "FeiQ", "IP Messenger")
    expires: float | None = None
    last_at_ms: int = 0
    key_changed: bool = False
    pinned: bool = False  # its key is in the profile (a message was exchanged); never evicted
    heard: float = 0.0  # when we last heard from it
    probes: int = 0  # IP Messenger: unanswered "are you there?" asks
    next_probe: float = 0.0

    @property
    def encrypted(self) -> bool:
        return self.kind == "p2pim"

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "address": f"{self.addr[0]}:{self.addr[1]}",
            "encrypted": self.encrypted,
            "fingerprint": fingerprint(self.key) if self.key else "",
            "key_changed": self.key_changed,
            "away": self.away,
            "host": self.host,
            "client": self.client if self.kind == "ipmsg" else "p2pim",
        }


# -- outputs ----------------------------------------------------------------------


@dataclass(frozen=True)
class PeerUp:
    peer: LanPeer
    again: bool  # it was seen before in this run (a restart, or back from a timeout)


@dataclass(frozen=True)
class PeerGone:
    peer: LanPeer
    reason: str  # "left" or "timeout"


@dataclass(frozen=True)
class PeerChanged:
    """An IP Messenger peer changed its nickname (``renamed_from`` is the old name) or its
    away state (``away_changed``); what waited for the old name now goes to the new one."""

    peer: LanPeer
    renamed_from: str = ""
    away_changed: bool = False


@dataclass(frozen=True)
class IpmsgFilesOffered:
    """An IP Messenger peer attached ``files`` to its SENDMSG ``packetno`` (``digest``: that
    packet's id, the same when it comes again): for the shell's IP Messenger transfers."""

    sender: str
    addr: Addr
    packetno: int
    files: tuple[ipmsg.Attachment, ...]
    digest: bytes


@dataclass(frozen=True)
class IpmsgFilesReleased:
    """An IP Messenger peer will not fetch the file we offered as ``file_id`` (RELEASEFILES)."""

    sender: str
    file_id: bytes


LanEvent = PeerUp | PeerGone | PeerChanged | MessagingEvent | IpmsgFilesOffered | IpmsgFilesReleased


@dataclass
class LanCore:
    identity: Identity
    name: str
    store: ClientStore
    data_port: int
    interval: float = DEFAULT_INTERVAL
    ipmsg_enabled: bool = True
    host: str = "p2pim"
    group: str = ""
    clock_ms: Callable[[], int] = field(default=lambda: int(time.time() * 1000))  # wall clock: stamps
    peers: dict[str, LanPeer] = field(default_factory=dict)
    counters: dict[str, int] = field(
        default_factory=lambda: {
            "garbage": 0,
            "bad_announcements": 0,
            "replayed": 0,
            "bad_envelopes": 0,
            "unknown_sender": 0,
            "duplicates": 0,
            "ipmsg_malformed": 0,
            "ipmsg_duplicates": 0,
            "ipmsg_rate_limited": 0,
            "peers_full": 0,
            "evicted": 0,
            "name_conflicts": 0,
        }
    )
    # QUIC packets on the data socket (file bytes between p2pim peers): the shell sets it
    # when it runs transfers (and ``messenger.bodies`` for the offers and answers).
    on_quic: Callable[[bytes, Addr], None] | None = None
    _sends: list[Datagram] = field(default_factory=list)
    _events: deque[LanEvent] = field(default_factory=deque)
    _ever: set[str] = field(default_factory=set)  # names seen this run (bounded)
    # newest announcement time per key, bounded (least recently heard forgotten first)
    _last_at: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    _conflicts: set[bytes] = field(default_factory=set)  # keys warned about (bounded)
    _recent: OrderedDict[str, bytes] = field(default_factory=OrderedDict)  # gone, unpinned: name -> key
    _ipmsg_names: OrderedDict[str, str] = field(default_factory=OrderedDict)  # IP Messenger: ip -> name
    _next_announce: float = 0.0
    _packetno: int = 0
    _last_ms: int = 0

    def __post_init__(self) -> None:
        # Envelopes to p2pim peers: the messaging core (outbox in SQLite, so a message
        # typed before a crash still goes out when the peer is next seen).
        self.messenger = Messenger(
            self.identity,
            self.store,
            self._keys,
            name=self.name,
            policy=LAN,
            prefix=PREFIX,
            warn=False,  # anyone on the LAN may send garbage: counted, not shown
            counters=self.counters,
            clock_ms=self.clock_ms,
        )
        self.ipmsg = IpmsgMessages(self.store, self.clock_ms, self.counters)
        self._packetno = self.clock_ms() // 1000  # IP Messenger numbers packets from the start time

    # -- life cycle --------------------------------------------------------------------

    def start(self, now: float) -> None:
        self._announce(announce.ENTRY, None)
        self._next_announce = now + self.interval
        if self.ipmsg_enabled:
            self._ipmsg(None, ipmsg.BR_ENTRY | ipmsg.CAPUTF8OPT | ipmsg.UTF8OPT, self._entry())

    def stop(self) -> None:
        self._announce(announce.EXIT, None)
        if self.ipmsg_enabled:
            self._ipmsg(None, ipmsg.BR_EXIT | ipmsg.UTF8OPT, self._entry())

    def ask(self) -> None:
        """Who is here? Everyone answers straight to us (IP Messenger clients too)."""
        self._announce(announce.ENTRY, None)
        if self.ipmsg_enabled:
            self._ipmsg(None, ipmsg.BR_ENTRY | ipmsg.CAPUTF8OPT | ipmsg.UTF8OPT, self._entry())

    # -- input ---------------------------------------------------------------------

    def receive_datagram(self, sock: str, data: bytes, src: Addr, now: float) -> None:
        """``sock``: "ipmsg" (IP Messenger's port), else ours (discovery or data)."""
        if sock == "ipmsg":
            self._on_ipmsg(data, src, now)
        elif announce.is_announce(data):
            self._on_announce(data, src, now)
        elif data[:4] == DATA_MAGIC and len(data) <= MAX_DATA:
            self._on_data(data[4:], src, now)
        elif sock == "data" and data[:1] and data[0] & 0x40 and self.on_quic is not None:
            self.on_quic(data, src)  # RFC 9443: QUIC's fixed bit, once our magics are ruled out
        else:
            self.counters["garbage"] += 1

    def send(self, to: str, text: str, now: float) -> bytes:
        """Queue ``text`` for the peer called ``to``; returns its message id."""
        peer: LanPeer | None = self.find(to)
        if peer is None:  # away: a p2pim peer we know (encrypted) first, then IP Messenger ones
            known = self.store.contact(PREFIX + to)
            key = known.identity_key if known is not None else self._recent.get(to)
            if key is None and (ipmsg_peer := self._known_ipmsg(to)) is not None:
                return self._send_ipmsg(ipmsg_peer, text, now)  # kept until it is back
            if key is None:
                raise LanError(f"nobody called {to!r} on this LAN (p2pim lan peers)")
            peer = LanPeer(to, "p2pim", ("0.0.0.0", 0), key, pinned=known is not None)  # queued until seen
        if peer.kind == "ipmsg":
            return self._send_ipmsg(peer.name, text, now)
        if peer.key_changed:
            raise LanError(f"{peer.name}'s key changed; check it, then: p2pim lan trust {peer.name}")
        self._pin(peer)
        try:
            body = text_body(text)
        except ValueError as exc:
            raise LanError(str(exc)) from None
        return self.messenger.send(peer.name, peer.key, body, text, now)

    def known(self, name: str) -> bool:
        """Here now, or seen before (pinned, or earlier in this run): a message to it can be queued."""
        return (
            self.find(name) is not None
            or name in self._recent
            or self.store.contact(PREFIX + name) is not None
            or self._known_ipmsg(name) is not None
        )

    def _known_ipmsg(self, name: str) -> str | None:
        """The IP Messenger peer ``name`` (or with that nickname) listed in this run, or
        talked with before."""
        hits = called(name, dict.fromkeys([*self._ipmsg_names.values(), *self.ipmsg.known()]))
        return hits[0] if len(hits) == 1 else None

    def find(self, name: str) -> LanPeer | None:
        if name in self.peers:
            return self.peers[name]
        hits = called(name, (p.name for p in self.peers.values() if p.kind == "ipmsg"))
        return self.peers[hits[0]] if len(hits) == 1 else None

    # -- output --------------------------------------------------------------------

    # -- the core verbs (p2pim.sansio) -------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Announce, expire peers that went quiet, ask IP Messenger peers that did."""
        if now >= self._next_announce:
            self._announce(announce.ALIVE, None)
            self._next_announce = now + self.interval
        for peer in list(self.peers.values()):
            if peer.expires is not None and now >= peer.expires:
                self._gone(peer, "timeout")
            elif peer.kind == "ipmsg" and now >= self._probe_due(peer):
                if peer.probes >= IPMSG_PROBES:
                    self._gone(peer, "timeout")
                    continue
                peer.probes += 1
                peer.next_probe = now + IPMSG_PROBE_GAP
                self._ipmsg(peer.addr, ipmsg.BR_ENTRY | ipmsg.CAPUTF8OPT | ipmsg.UTF8OPT, self._entry())

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        """What to send now: "discovery" goes from the data socket to the discovery port
        (``addr`` None: broadcast), "ipmsg" from and to IP Messenger's port."""
        for t in self.messenger.datagrams_to_send(now):
            to = self.peers.get(t.item.peer)
            dest = to.addr if to is not None and to.kind == "p2pim" else t.item.reply_to
            if isinstance(dest, tuple):
                self._sends.append(Datagram("discovery", DATA_MAGIC + t.item.envelope, dest))
        command = ipmsg.SENDMSG | ipmsg.SENDCHECKOPT | ipmsg.UTF8OPT
        for addr, no, kept in self.ipmsg.transmits(now, self._ipmsg_addr, self._next_packetno):
            if attached(kept):  # a file offer: its extra is kept whole
                data = ipmsg.encode(no, self.name, self.host, command | ipmsg.FILEATTACHOPT, kept)
            else:
                data = ipmsg.encode(no, self.name, self.host, command, kept + b"\0")
            self._sends.append(Datagram("ipmsg", data, addr))
        sends, self._sends = self._sends, []
        return sends

    def next_event(self) -> LanEvent | None:
        if self._events:
            return self._events.popleft()
        return self.ipmsg.next_event() or self.messenger.next_event()

    def get_timer(self) -> float:
        dues = [self._next_announce]
        dues += [p.expires for p in self.peers.values() if p.expires is not None]
        dues += [self._probe_due(p) for p in self.peers.values() if p.kind == "ipmsg"]
        dues += [d for d in (self.messenger.get_timer(), self.ipmsg.next_timer()) if d is not None]
        return min(dues)

    @staticmethod
    def _probe_due(peer: LanPeer) -> float:
        return max(peer.heard + IPMSG_IDLE, peer.next_probe)

    def _admit(self, name: str) -> bool:
        """Room for a new peer ``name``? When full, the unpinned peer heard longest ago goes."""
        if name in self.peers or len(self.peers) < MAX_PEERS:
            return True
        unpinned = [p for p in self.peers.values() if not p.pinned]
        if not unpinned:
            self.counters["peers_full"] += 1
            return False
        self.counters["evicted"] += 1
        self._gone(min(unpinned, key=lambda p: p.heard), "evicted")
        return True

    def _gone(self, peer: LanPeer, reason: str) -> None:
        """``peer`` left the table; an unpinned p2pim peer's key is remembered (bounded) for
        this run, so a message typed to it is still queued until it is back."""
        del self.peers[peer.name]
        if peer.kind == "ipmsg":
            self.ipmsg.presence(peer.name, False)
        else:
            self.messenger.presence(peer.name, False)
        self._events.append(PeerGone(peer, reason))
        if peer.kind == "p2pim" and not peer.pinned and not peer.key_changed:
            keep(self._recent, peer.name, peer.key, MAX_PEERS)

    def _pin(self, peer: LanPeer) -> None:
        """Keep ``peer``'s key in the profile: from now on another key for its name is a warning."""
        if not peer.pinned and peer.kind == "p2pim":
            self.store.see_key(PREFIX + peer.name, peer.key, self.clock_ms())
            peer.pinned = True

    def pending(self) -> int:
        """Messages (not receipts) still waiting for their receipt."""
        return self.messenger.pending() + self.ipmsg.pending()

    # -- p2pim peers ---------------------------------------------------------------

    def _announce(self, kind: lpb.Announce.Kind.ValueType, dest: Addr | None) -> None:
        at_ms = max(self.clock_ms(), self._last_ms + 1)
        self._last_ms = at_ms
        packet = announce.make(self.identity, kind, self.name, self.data_port, at_ms, int(self.interval))
        self._sends.append(Datagram("discovery", packet, dest))

    def _on_announce(self, data: bytes, src: Addr, now: float) -> None:
        try:
            heard = announce.verify(data)
        except announce.AnnounceError:
            self.counters["bad_announcements"] += 1
            return
        if heard.key == self.identity.public_key:
            return  # our own broadcast, looped back
        old = self.peers.get(heard.name)
        contact = self.store.contact(PREFIX + heard.name)
        if contact is not None and contact.identity_key != heard.key:
            pinned = self.store.see_key(PREFIX + heard.name, heard.key, self.clock_ms())
            if pinned == "changed" and (old is None or not old.key_changed):
                self._events.append(
                    Problem(
                        f"{heard.name} now announces a different key ({fingerprint(heard.key)}; pinned "
                        f"{fingerprint(contact.identity_key)}): not trusted. If they "
                        f"really changed it: p2pim lan trust {heard.name}"
                    )
                )
            if old is not None:
                old.key_changed = True
            return
        if contact is None and old is not None and old.key != heard.key:
            # Two keys claim one name and neither is pinned: the one here first keeps it.
            self.counters["name_conflicts"] += 1
            if not seen(self._conflicts, heard.key, MAX_REMEMBERED):
                self._events.append(
                    Problem(
                        f"another key ({fingerprint(heard.key)}) also announces itself as {heard.name}: "
                        f"ignored while the first ({fingerprint(old.key)}) is here"
                    )
                )
            return
        if heard.at_ms <= self._last_at.get(heard.key, -1):
            self.counters["replayed"] += 1  # also after it left: an old ENTRY must not bring it back
            return
        keep(self._last_at, heard.key, heard.at_ms, MAX_REMEMBERED)
        if heard.kind == announce.EXIT:
            if old is not None:
                self._gone(old, "left")
            return
        if not self._admit(heard.name):
            return
        addr = (src[0], heard.port)
        peer = LanPeer(
            heard.name,
            "p2pim",
            addr,
            heard.key,
            expires=now + EXPIRE_AFTER * heard.interval_s,
            last_at_ms=heard.at_ms,
            pinned=contact is not None,
            heard=now,
        )
        self.peers[heard.name] = peer
        if old is None or old.addr != addr:
            self._events.append(PeerUp(peer, seen(self._ever, heard.name, MAX_REMEMBERED)))
            self.messenger.presence(heard.name, True)
            self.messenger.resend_now(heard.name)  # it is (back) here: send now
        if heard.kind == announce.ENTRY:
            self._announce(announce.ANSWER, addr)

    def _keys(self, name: str, via: Via) -> Keys | None:
        key = self.key_of(name)
        return Keys(key) if key is not None else None

    def key_of(self, name: str) -> bytes | None:
        """A p2pim peer's pinned key, else the key it announced (a message pins it)."""
        contact = self.store.contact(PREFIX + name)
        if contact is not None:
            return contact.identity_key
        peer = self.peers.get(name)
        return peer.key if peer is not None and peer.kind == "p2pim" else None

    def _on_data(self, data: bytes, src: Addr, now: float) -> None:
        got = self.messenger.receive(data, Via.LAN, now, reply_to=src)
        if got.verdict is not Verdict.TAKEN:
            return
        peer = self.peers.get(got.sender)
        if peer is not None:
            self._pin(peer)
            peer.heard = now
            if peer.addr != src:
                peer.addr = src  # authenticated by the envelope: it moved (a restart)

    # -- IP Messenger peers ---------------------------------------------------------------

    def _entry(self) -> bytes:
        return ipmsg.entry_extra(self.name, P2PIM_GROUP)

    def _next_packetno(self) -> int:
        self._packetno += 1
        return self._packetno

    def _ipmsg(self, dest: Addr | None, command: int, extra: bytes) -> int:
        no = self._next_packetno()
        self._sends.append(Datagram("ipmsg", ipmsg.encode(no, self.name, self.host, command, extra), dest))
        return no

    def _ipmsg_addr(self, name: str) -> Addr | None:
        peer = self.peers.get(name)
        return peer.addr if peer is not None and peer.kind == "ipmsg" else None

    def _ipmsg_at(self, src: Addr) -> LanPeer | None:
        return next((p for p in self.peers.values() if p.kind == "ipmsg" and p.addr == src), None)

    def _ipmsg_name_at(self, src: Addr, user: str) -> str:
        """The name of an unlisted IP Messenger peer: the last one listed at its address
        in this run, else its user name there."""
        return self._ipmsg_names.get(src[0]) or _ipmsg_name(user, src)

    def _send_ipmsg(self, name: str, text: str, now: float) -> bytes:
        if not self.ipmsg_enabled:
            raise LanError("IP Messenger is off (--no-ipmsg, or its port is taken)")
        size = len(ipmsg.encode(2**32, self.name, self.host, ipmsg.SENDMSG, text.encode() + b"\0"))
        if size > ipmsg.MAX_PACKET:
            raise LanError(f"message too long for IP Messenger ({size} bytes; at most {ipmsg.MAX_PACKET})")
        return self.ipmsg.send(name, text, now)

    def ipmsg_peer(self, to: str) -> str:
        """The full name of the IP Messenger peer ``to`` names (here, or talked with before)."""
        if not self.ipmsg_enabled:
            raise LanError("IP Messenger is off (--no-ipmsg, or its port is taken)")
        peer = self.find(to)
        name = peer.name if peer is not None else self._known_ipmsg(to)
        if name is None or (peer is not None and peer.kind != "ipmsg"):
            raise LanError(f"no IP Messenger peer called {to!r} (p2pim lan peers)")
        return name

    def file_request(self, packetno: int, number: int) -> bytes:
        """A GETFILEDATA (for TCP) for file ``number`` of an IP Messenger peer's SENDMSG
        ``packetno``, from its first byte."""
        extra = ipmsg.file_request_extra(packetno, number, 0)
        return ipmsg.encode(self._next_packetno(), self.name, self.host, ipmsg.GETFILEDATA, extra) + b"\0"

    def release(self, addr: Addr, packetno: int) -> None:
        """Tell an IP Messenger peer we will not fetch the files of its packet ``packetno``."""
        if self.ipmsg_enabled:
            self._ipmsg(addr, ipmsg.RELEASEFILES, str(packetno).encode())

    def _on_ipmsg(self, data: bytes, src: Addr, now: float) -> None:
        if not self.ipmsg_enabled:
            return
        try:
            pkt = ipmsg.parse(data)
        except ipmsg.IpmsgError:
            self.counters["ipmsg_malformed"] += 1
            return
        if pkt.user == self.name and pkt.host == self.host and pkt.packetno <= self._packetno:
            return  # our own broadcast
        mode = pkt.mode
        peer = self._ipmsg_at(src)
        if peer is not None:  # anything from it answers our "are you there?"
            peer.heard, peer.probes, peer.next_probe = now, 0, 0.0
        if mode in (ipmsg.BR_ENTRY, ipmsg.ANSENTRY, ipmsg.BR_ABSENCE):
            if pkt.group() == P2PIM_GROUP:
                return  # another p2pim: it announces itself (signed, encrypted) on the discovery port
            if mode == ipmsg.BR_ENTRY:
                self.ipmsg.new_numbering(src[0])  # it (re)started: its packet numbers start again
                self._ipmsg(src, ipmsg.ANSENTRY | ipmsg.CAPUTF8OPT | ipmsg.UTF8OPT, self._entry())
            self._ipmsg_entry(pkt, src, peer, now, restarted=mode == ipmsg.BR_ENTRY)
        elif mode == ipmsg.BR_EXIT:
            self.ipmsg.new_numbering(src[0])
            if peer is not None:
                self._gone(peer, "left")
        elif mode == ipmsg.SENDMSG:
            if not self.ipmsg.admit(src[0], now):
                return  # neither shown nor answered: a real client sends it again later
            if pkt.has(ipmsg.SENDCHECKOPT) and not pkt.has(ipmsg.AUTORETOPT | ipmsg.BROADCASTOPT):
                self._ipmsg(src, ipmsg.RECVMSG, str(pkt.packetno).encode())
            if peer is None:  # here, but unlisted (its entry was lost): ask who it is
                self._ipmsg(src, ipmsg.BR_ENTRY | ipmsg.CAPUTF8OPT | ipmsg.UTF8OPT, self._entry())
            sender = peer.name if peer is not None else self._ipmsg_name_at(src, pkt.user)
            if pkt.has(ipmsg.FILEATTACHOPT):
                self._attachments(pkt, data, src, sender)
                if not pkt.text():
                    return  # files only (iptux sends them with no text)
            message = self.ipmsg.incoming(pkt, data, src[0], sender)
            if message is not None:
                self._events.append(message)
        elif mode == ipmsg.RELEASEFILES:
            sender = peer.name if peer is not None else self._ipmsg_name_at(src, pkt.user)
            try:
                released = self.ipmsg.released(src[0], int(pkt.extra.rstrip(b"\0").decode("ascii")))
            except (UnicodeDecodeError, ValueError):
                self.counters["ipmsg_malformed"] += 1
                return
            if released is not None:
                self._events.append(IpmsgFilesReleased(sender, released))
        elif mode == ipmsg.RECVMSG:
            try:
                acked = int(pkt.extra.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                self.counters["ipmsg_malformed"] += 1
                return
            self.ipmsg.acked(src[0], acked)

    def _attachments(self, pkt: ipmsg.Packet, data: bytes, src: Addr, sender: str) -> None:
        try:
            files = ipmsg.attachments(pkt)
        except ipmsg.IpmsgError:
            self.counters["ipmsg_malformed"] += 1
            return
        if files:
            digest = self.ipmsg.digest(src[0], data)
            self._events.append(IpmsgFilesOffered(sender, src, pkt.packetno, tuple(files), digest))

    def _ipmsg_entry(
        self, pkt: ipmsg.Packet, src: Addr, old: LanPeer | None, now: float, restarted: bool
    ) -> None:
        """BR_ENTRY, ANSENTRY or BR_ABSENCE: it is here, with this nickname and away state.
        ``restarted`` (BR_ENTRY): it started again, maybe without a BR_EXIT we heard."""
        name = _ipmsg_name(pkt.text() or pkt.user, src)
        if old is None and not self._admit(name):
            return
        away = ipmsg.absence(pkt)
        peer = LanPeer(
            name, "ipmsg", src, host=pkt.host, group=pkt.group(), away=away,
            client=ipmsg.client_name(pkt.tag), heard=now,
        )  # fmt: skip
        before = old.name if old is not None else self._ipmsg_names.get(src[0])  # also one that left
        if old is not None and old.name != name:
            del self.peers[old.name]
        self.peers[name] = peer
        keep(self._ipmsg_names, src[0], name, MAX_PEERS)
        self.ipmsg.rename(src[0], name)  # what waits for this address goes to this name
        if old is None or restarted:
            self._events.append(PeerUp(peer, seen(self._ever, name, MAX_REMEMBERED)))
            self.ipmsg.presence(name, True)  # kept messages (and unanswered ones) go now
        renamed = before if before is not None and before != name else ""
        away_changed = old is not None and old.away != away
        if renamed or away_changed:
            self._events.append(PeerChanged(peer, renamed, away_changed))


def _ipmsg_name(nick: str, src: Addr) -> str:
    """How an IP Messenger peer is listed: its nickname (or user) and its address."""
    return f"{nick.replace('@', '_')}@{src[0]}"
