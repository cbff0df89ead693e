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
  2425: plain text, shown as unencrypted.

Garbage on either port is dropped and counted in :attr:`LanCore.counters`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

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
        }
    )
    _sends: list[Send] = field(default_factory=list)
    _events: list[LanEvent] = field(default_factory=list)
    _out: dict[bytes, _Out] = field(default_factory=dict)
    _ipmsg_out: dict[int, _IpmsgOut] = field(default_factory=dict)
    _ipmsg_seen: OrderedDict[tuple[str, int], None] = field(default_factory=OrderedDict)
    _ever: set[str] = field(default_factory=set)
    _last_at: dict[bytes, int] = field(default_factory=dict)  # newest announcement time per key
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
            if known is None:
                raise LanError(f"nobody called {to!r} on this LAN (p2pim lan peers)")
            peer = LanPeer(to, "p2pim", ("0.0.0.0", 0), known.identity_key)  # queued until seen
        if peer.kind == "ipmsg":
            return self._send_ipmsg(peer, text, now)
        if peer.key_changed:
            raise LanError(f"{peer.name}'s key changed; check it, then: p2pim lan trust {peer.name}")
        try:
            body = text_body(text)
        except ValueError as exc:
            raise LanError(str(exc)) from None
        msg_id = self._queue(peer.name, peer.key, body, text, now)
        return msg_id.hex()

    def known(self, name: str) -> bool:
        """Here now, or seen before (its key is pinned): a message to it can be queued."""
        return self.find(name) is not None or self.store.contact(PREFIX + name) is not None

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
        for name, peer in list(self.peers.items()):
            if peer.expires is not None and now >= peer.expires:
                del self.peers[name]
                self._events.append(PeerGone(peer, "timeout"))
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
        dues += [o.due for o in self._out.values() if o.peer in self.peers]
        dues += [o.due for o in self._ipmsg_out.values()]
        return min(dues)

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
        seen = self.store.see_key(PREFIX + heard.name, heard.key, int(time.time() * 1000))
        old = self.peers.get(heard.name)
        if seen == "changed":
            if old is None or not old.key_changed:
                pinned = self.store.contact(PREFIX + heard.name)
                self._events.append(
                    LanWarning(
                        f"{heard.name} now announces a different key ({fingerprint(heard.key)}; pinned "
                        f"{fingerprint(pinned.identity_key) if pinned else '?'}): not trusted. If they "
                        f"really changed it: p2pim lan trust {heard.name}"
                    )
                )
            if old is not None:
                old.key_changed = True
            return
        if heard.at_ms <= self._last_at.get(heard.key, -1):
            self.counters["replayed"] += 1  # also after it left: an old ENTRY must not bring it back
            return
        self._last_at[heard.key] = heard.at_ms
        if heard.kind == announce.EXIT:
            if old is not None:
                del self.peers[heard.name]
                self._events.append(PeerGone(old, "left"))
            return
        addr = (src[0], heard.port)
        peer = LanPeer(
            heard.name,
            "p2pim",
            addr,
            heard.key,
            expires=now + EXPIRE_AFTER * heard.interval_s,
            last_at_ms=heard.at_ms,
        )
        self.peers[heard.name] = peer
        if old is None or old.addr != addr:
            self._events.append(PeerUp(peer, heard.name in self._ever))
            self._ever.add(heard.name)
            for item in self._out.values():  # it is (back) here: send now
                if item.peer == heard.name:
                    item.due = now
        if heard.kind == announce.ENTRY:
            self._announce(announce.ANSWER, addr)

    def _on_data(self, data: bytes, src: Addr, now: float) -> None:
        try:
            env = parse_envelope(data)
            contact = self.store.contact(PREFIX + env.sender)
            if contact is None:
                self.counters["unknown_sender"] += 1
                return
            opened = open_envelope(self.identity, self.name, env, contact.identity_key)
        except EnvelopeError:
            self.counters["bad_envelopes"] += 1
            return
        sender = env.sender
        peer = self.peers.get(sender)
        if peer is not None and peer.addr != src:
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
            rid = self._queue(sender, contact.identity_key, receipt, None, now)
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
        nick = pkt.text() or pkt.user
        name = f"{nick.replace('@', '_')}@{src[0]}"
        if mode in (ipmsg.BR_ENTRY, ipmsg.ANSENTRY, ipmsg.BR_ABSENCE) and pkt.group() == P2PIM_GROUP:
            return  # another p2pim: it announces itself (signed, encrypted) on the discovery port
        if mode in (ipmsg.BR_ENTRY, ipmsg.ANSENTRY, ipmsg.BR_ABSENCE):
            old = next((p for p in self.peers.values() if p.kind == "ipmsg" and p.addr == src), None)
            if old is not None and old.name != name:
                del self.peers[old.name]
            peer = LanPeer(
                name, "ipmsg", src, host=pkt.host, group=pkt.group(), away=pkt.has(ipmsg.ABSENCEOPT)
            )
            self.peers[name] = peer
            if old is None:
                self._events.append(PeerUp(peer, name in self._ever))
                self._ever.add(name)
            if mode == ipmsg.BR_ENTRY:
                self._ipmsg(src, ipmsg.ANSENTRY | ipmsg.CAPUTF8OPT | ipmsg.UTF8OPT, self._entry())
        elif mode == ipmsg.BR_EXIT:
            gone = [p for p in self.peers.values() if p.kind == "ipmsg" and p.addr == src]
            for p in gone:
                del self.peers[p.name]
                self._events.append(PeerGone(p, "left"))
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
