"""LAN chat with no server: discovery, messages and IP Messenger peers (sans-IO).

The shell (:mod:`p2pim.lan.node`) feeds datagrams and the time and sends
what :meth:`LanCore.poll` returns; ``None`` as a destination means "broadcast
on every LAN we are on". Two kinds of peer share the picture:

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
  2425: plain text, shown as unencrypted. They announce only at start and
  exit, so one silent for :data:`IPMSG_IDLE` seconds is asked (a unicast
  BR_ENTRY, which every client answers with ANSENTRY) and is gone after
  :data:`IPMSG_PROBES` unanswered asks.

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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TypeVar

from ..identity import Identity, fingerprint
from ..messaging.envelope import EnvelopeError, open_envelope, parse_envelope, receipt_body, seal, text_body
from ..messaging.store import ClientStore
from ..paths.disco import DATA_MAGIC
from ..wire import envelope_pb2 as epb
from ..wire import lan_pb2 as lpb
from . import announce, ipmsg

Addr = tuple[str, int]
DISCOVERY_PORT = 2426
DEFAULT_INTERVAL = 10.0
EXPIRE_AFTER = 3.5  # intervals without an announcement
RTO_FIRST, RTO_MAX = 0.5, 8.0
IPMSG_RTO, IPMSG_TRIES = 1.0, 6
IPMSG_IDLE = 60.0  # an IP Messenger peer silent this long is asked whether it is still there
IPMSG_PROBE_GAP, IPMSG_PROBES = 5.0, 3  # ... this often, this many times, then it is gone
MAX_PEERS = 256
MAX_REMEMBERED = 4096  # announcement times (replay protection) and names seen, per run
MAX_DATA = 60 * 1024
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
    away: bool = False
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
        }


# -- outputs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    channel: str  # "discovery" (p2pim announcements + data), or "ipmsg"
    dest: Addr | None  # None: broadcast to this channel's port
    data: bytes


@dataclass(frozen=True)
class PeerUp:
    peer: LanPeer
    again: bool  # it was seen before in this run (a restart, or back from a timeout)


@dataclass(frozen=True)
class PeerGone:
    peer: LanPeer
    reason: str  # "left" or "timeout"


@dataclass(frozen=True)
class LanMessage:
    peer: str
    text: str
    encrypted: bool
    msg_id: str


@dataclass(frozen=True)
class LanDelivered:
    peer: str
    msg_id: str


@dataclass(frozen=True)
class LanFailed:
    peer: str
    msg_id: str
    reason: str


@dataclass(frozen=True)
class LanWarning:
    message: str


LanEvent = PeerUp | PeerGone | LanMessage | LanDelivered | LanFailed | LanWarning


@dataclass
class _Out:
    msg_id: bytes
    peer: str
    envelope: bytes
    receipt: bool
    tries: int = 0
    due: float = 0.0


@dataclass
class _IpmsgOut:
    packetno: int
    peer: str
    addr: Addr
    data: bytes
    tries: int = 0
    due: float = 0.0


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
            "peers_full": 0,
            "evicted": 0,
            "name_conflicts": 0,
        }
    )
    _sends: list[Send] = field(default_factory=list)
    _events: list[LanEvent] = field(default_factory=list)
    _out: dict[bytes, _Out] = field(default_factory=dict)
    _ipmsg_out: dict[int, _IpmsgOut] = field(default_factory=dict)
    _ipmsg_seen: OrderedDict[tuple[str, int], None] = field(default_factory=OrderedDict)
    _ever: set[str] = field(default_factory=set)  # names seen this run (bounded)
    # newest announcement time per key, bounded (least recently heard forgotten first)
    _last_at: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    _conflicts: set[bytes] = field(default_factory=set)  # keys warned about (bounded)
    _recent: OrderedDict[str, bytes] = field(default_factory=OrderedDict)  # gone, unpinned: name -> key
    _next_announce: float = 0.0
    _packetno: int = field(default_factory=lambda: int(time.time()))
    _last_ms: int = 0

    def __post_init__(self) -> None:
        for row in self.store.outbox():  # typed before a crash or while the peer was away
            self._out[row.msg_id] = _Out(row.msg_id, row.peer.removeprefix(PREFIX), row.envelope, row.receipt)

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
        """Who is here? Everyone answers straight to us."""
        self._announce(announce.ENTRY, None)

    # -- input ---------------------------------------------------------------------

    def datagram(self, channel: str, data: bytes, src: Addr, now: float) -> None:
        if channel == "ipmsg":
            self._on_ipmsg(data, src, now)
        elif announce.is_announce(data):
            self._on_announce(data, src, now)
        elif data[:4] == DATA_MAGIC and len(data) <= MAX_DATA:
            self._on_data(data[4:], src, now)
        else:
            self.counters["garbage"] += 1

    def send(self, to: str, text: str, now: float) -> str:
        """Queue ``text`` for the peer called ``to``; returns the message id (hex)."""
        peer: LanPeer | None = self.find(to)
        if peer is None:
            known = self.store.contact(PREFIX + to)
            key = known.identity_key if known is not None else self._recent.get(to)
            if key is None:
                raise LanError(f"nobody called {to!r} on this LAN (p2pim lan peers)")
            peer = LanPeer(to, "p2pim", ("0.0.0.0", 0), key, pinned=known is not None)  # queued until seen
        if peer.kind == "ipmsg":
            return self._send_ipmsg(peer, text, now)
        if peer.key_changed:
            raise LanError(f"{peer.name}'s key changed; check it, then: p2pim lan trust {peer.name}")
        self._pin(peer)
        try:
            body = text_body(text)
        except ValueError as exc:
            raise LanError(str(exc)) from None
        msg_id = self._queue(peer.name, peer.key, body, text, now)
        return msg_id.hex()

    def known(self, name: str) -> bool:
        """Here now, or seen before (pinned, or earlier in this run): a message to it can be queued."""
        return (
            self.find(name) is not None
            or name in self._recent
            or self.store.contact(PREFIX + name) is not None
        )

    def find(self, name: str) -> LanPeer | None:
        if name in self.peers:
            return self.peers[name]
        nick = [p for p in self.peers.values() if p.kind == "ipmsg" and p.name.split("@", 1)[0] == name]
        return nick[0] if len(nick) == 1 else None

    # -- output --------------------------------------------------------------------

    def poll(self, now: float) -> tuple[list[Send], list[LanEvent]]:
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
        for item in list(self._out.values()):
            to = self.peers.get(item.peer)
            if to is None or to.kind != "p2pim" or now < item.due:
                continue
            self._sends.append(Send("discovery", to.addr, DATA_MAGIC + item.envelope))
            item.tries += 1
            if item.receipt:  # receipts go once: a lost one is answered again on the resend
                del self._out[item.msg_id]
                self.store.outbox_done(item.msg_id, None)
                continue
            item.due = now + min(RTO_MAX, RTO_FIRST * 2 ** (item.tries - 1))
        for out in list(self._ipmsg_out.values()):
            if now < out.due:
                continue
            if out.tries >= IPMSG_TRIES:
                del self._ipmsg_out[out.packetno]
                self._events.append(LanFailed(out.peer, str(out.packetno), "no answer (RECVMSG)"))
                continue
            out.tries += 1
            out.due = now + IPMSG_RTO
            self._sends.append(Send("ipmsg", out.addr, out.data))
        sends, events = self._sends, self._events
        self._sends, self._events = [], []
        return sends, events

    def next_timer(self) -> float:
        dues = [self._next_announce]
        dues += [p.expires for p in self.peers.values() if p.expires is not None]
        dues += [self._probe_due(p) for p in self.peers.values() if p.kind == "ipmsg"]
        dues += [o.due for o in self._out.values() if o.peer in self.peers]
        dues += [o.due for o in self._ipmsg_out.values()]
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
        self._events.append(PeerGone(peer, reason))
        if peer.kind == "p2pim" and not peer.pinned and not peer.key_changed:
            _keep(self._recent, peer.name, peer.key, MAX_PEERS)

    def _pin(self, peer: LanPeer) -> None:
        """Keep ``peer``'s key in the profile: from now on another key for its name is a warning."""
        if not peer.pinned and peer.kind == "p2pim":
            self.store.see_key(PREFIX + peer.name, peer.key, int(time.time() * 1000))
            peer.pinned = True

    def pending(self) -> int:
        """Messages (not receipts) still waiting for their receipt."""
        return sum(1 for o in self._out.values() if not o.receipt) + len(self._ipmsg_out)

    # -- p2pim peers ---------------------------------------------------------------

    def _announce(self, kind: lpb.Announce.Kind.ValueType, dest: Addr | None) -> None:
        at_ms = max(int(time.time() * 1000), self._last_ms + 1)
        self._last_ms = at_ms
        packet = announce.make(self.identity, kind, self.name, self.data_port, at_ms, int(self.interval))
        self._sends.append(Send("discovery", dest, packet))

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
            seen = self.store.see_key(PREFIX + heard.name, heard.key, int(time.time() * 1000))
            if seen == "changed" and (old is None or not old.key_changed):
                self._events.append(
                    LanWarning(
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
            if not _seen(self._conflicts, heard.key):
                self._events.append(
                    LanWarning(
                        f"another key ({fingerprint(heard.key)}) also announces itself as {heard.name}: "
                        f"ignored while the first ({fingerprint(old.key)}) is here"
                    )
                )
            return
        if heard.at_ms <= self._last_at.get(heard.key, -1):
            self.counters["replayed"] += 1  # also after it left: an old ENTRY must not bring it back
            return
        _keep(self._last_at, heard.key, heard.at_ms, MAX_REMEMBERED)
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
            self._events.append(PeerUp(peer, _seen(self._ever, heard.name)))
            for item in self._out.values():  # it is (back) here: send now
                if item.peer == heard.name:
                    item.due = now
        if heard.kind == announce.ENTRY:
            self._announce(announce.ANSWER, addr)

    def _on_data(self, data: bytes, src: Addr, now: float) -> None:
        try:
            env = parse_envelope(data)
            contact = self.store.contact(PREFIX + env.sender)
            peer = self.peers.get(env.sender)
            if contact is not None:
                key = contact.identity_key
            elif peer is not None and peer.kind == "p2pim":
                key = peer.key  # announced, not pinned yet: this message pins it
            else:
                self.counters["unknown_sender"] += 1
                return
            opened = open_envelope(self.identity, self.name, env, key)
        except EnvelopeError:
            self.counters["bad_envelopes"] += 1
            return
        sender = env.sender
        if peer is not None:
            self._pin(peer)
            peer.heard = now
            if peer.addr != src:
                peer.addr = src  # authenticated by the envelope: it moved (a restart)
        body = opened.body
        kind = body.WhichOneof("kind")
        if kind == "text":
            fresh = self.store.add_incoming(
                env.msg_id, PREFIX + sender, body.text.text, env.sent_at_ms, int(time.time() * 1000)
            )
            if fresh:
                self._events.append(LanMessage(sender, body.text.text, True, env.msg_id.hex()))
            else:
                self.counters["duplicates"] += 1
            receipt = receipt_body(epb.Receipt.DELIVERED, [env.msg_id])
            rid = self._queue(sender, key, receipt, None, now)
            if peer is None:  # not announced yet (we just started): answer where it came from
                item = self._out.pop(rid)
                self.store.outbox_done(rid, None)
                self._sends.append(Send("discovery", src, DATA_MAGIC + item.envelope))
        elif kind == "receipt":
            for m in body.receipt.msg_ids:
                if self.store.outgoing_peer(m) != PREFIX + sender:
                    continue
                self.store.advance(m, "delivered")
                done = self._out.pop(m, None)
                if done is not None:
                    self.store.outbox_done(m, "delivered")
                    self._events.append(LanDelivered(sender, m.hex()))

    def _queue(self, peer: str, key: bytes, body: epb.Body, text: str | None, now: float) -> bytes:
        env = seal(self.identity, self.name, peer, key, body)
        data = env.SerializeToString()
        self.store.queue_outgoing(
            env.msg_id, PREFIX + peer, text, data, env.sent_at_ms, int(time.time() * 1000)
        )
        self._out[env.msg_id] = _Out(env.msg_id, peer, data, text is None, due=now)
        return env.msg_id

    # -- IP Messenger peers ---------------------------------------------------------------

    def _entry(self) -> bytes:
        return ipmsg.entry_extra(self.name, P2PIM_GROUP)

    def _ipmsg(self, dest: Addr | None, command: int, extra: bytes) -> int:
        self._packetno += 1
        data = ipmsg.encode(self._packetno, self.name, self.host, command, extra)
        self._sends.append(Send("ipmsg", dest, data))
        return self._packetno

    def _send_ipmsg(self, peer: LanPeer, text: str, now: float) -> str:
        self._packetno += 1
        command = ipmsg.SENDMSG | ipmsg.SENDCHECKOPT | ipmsg.UTF8OPT
        data = ipmsg.encode(self._packetno, self.name, self.host, command, text.encode() + b"\0")
        if len(data) > ipmsg.MAX_PACKET:
            raise LanError("message too long for IP Messenger")
        self._ipmsg_out[self._packetno] = _IpmsgOut(self._packetno, peer.name, peer.addr, data, due=now)
        return str(self._packetno)

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
        for p in self.peers.values():  # anything from it answers our "are you there?"
            if p.kind == "ipmsg" and p.addr == src:
                p.heard, p.probes, p.next_probe = now, 0, 0.0
        nick = pkt.text() or pkt.user
        name = f"{nick.replace('@', '_')}@{src[0]}"
        if mode in (ipmsg.BR_ENTRY, ipmsg.ANSENTRY, ipmsg.BR_ABSENCE) and pkt.group() == P2PIM_GROUP:
            return  # another p2pim: it announces itself (signed, encrypted) on the discovery port
        if mode in (ipmsg.BR_ENTRY, ipmsg.ANSENTRY, ipmsg.BR_ABSENCE):
            old = next((p for p in self.peers.values() if p.kind == "ipmsg" and p.addr == src), None)
            if old is not None and old.name != name:
                del self.peers[old.name]
            if old is None and not self._admit(name):
                return
            peer = LanPeer(
                name,
                "ipmsg",
                src,
                host=pkt.host,
                group=pkt.group(),
                away=pkt.has(ipmsg.ABSENCEOPT),
                heard=now,
            )
            self.peers[name] = peer
            if old is None:
                self._events.append(PeerUp(peer, _seen(self._ever, name)))
            if mode == ipmsg.BR_ENTRY:
                self._ipmsg(src, ipmsg.ANSENTRY | ipmsg.CAPUTF8OPT | ipmsg.UTF8OPT, self._entry())
        elif mode == ipmsg.BR_EXIT:
            for p in [p for p in self.peers.values() if p.kind == "ipmsg" and p.addr == src]:
                self._gone(p, "left")
        elif mode == ipmsg.SENDMSG:
            sender = next((p.name for p in self.peers.values() if p.kind == "ipmsg" and p.addr == src), None)
            sender = sender or f"{pkt.user.replace('@', '_')}@{src[0]}"
            if pkt.has(ipmsg.SENDCHECKOPT) and not pkt.has(ipmsg.AUTORETOPT | ipmsg.BROADCASTOPT):
                self._ipmsg(src, ipmsg.RECVMSG, str(pkt.packetno).encode())
            key = (src[0], pkt.packetno)
            if key in self._ipmsg_seen:
                self.counters["ipmsg_duplicates"] += 1
                return
            self._ipmsg_seen[key] = None
            if len(self._ipmsg_seen) > 1024:
                self._ipmsg_seen.popitem(last=False)
            text = pkt.text()
            self._events.append(LanMessage(sender, text, False, f"ipmsg:{src[0]}:{pkt.packetno}"))
        elif mode == ipmsg.RECVMSG:
            try:
                acked = int(pkt.extra.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                self.counters["ipmsg_malformed"] += 1
                return
            out = self._ipmsg_out.get(acked)
            if out is not None and out.addr[0] == src[0]:
                del self._ipmsg_out[acked]
                self._events.append(LanDelivered(out.peer, str(acked)))


K = TypeVar("K")
V = TypeVar("V")


def _seen(seen: set[K], item: K) -> bool:
    """Note ``item`` in ``seen`` (forgotten all at once past :data:`MAX_REMEMBERED`); True if
    it was there already."""
    if item in seen:
        return True
    if len(seen) >= MAX_REMEMBERED:
        seen.clear()
    seen.add(item)
    return False


def _keep(table: OrderedDict[K, V], key: K, value: V, bound: int) -> None:
    """Set ``table[key]``, the newest last; past ``bound`` entries the oldest goes."""
    table[key] = value
    table.move_to_end(key)
    if len(table) > bound:
        table.popitem(last=False)
