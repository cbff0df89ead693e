"""Texts with IP Messenger clients: kept, in order, shown exactly once each way (sans-IO).

Draft-9 has no message ids, only packet numbers, and clients number their
packets from 1 again each time they start (iptux does). Remembering "this
address sent packet 7" for longer than the client's run therefore drops a new
message as a duplicate after the client restarts, while acknowledging it:
silent loss. So a *numbering* (an epoch per address) starts again whenever
the peer says it (re)started or left (BR_ENTRY, BR_EXIT), and:

* **In**: a SENDMSG is a duplicate only if the same address sent the same
  packet (number and bytes) in the same numbering. Its message id in the
  history is a hash of (address, numbering, packet), and the numbering is kept
  in SQLite once a message came in it, so a resend that arrives after p2pim
  was killed and restarted is still known (the history's primary key
  deduplicates). Each address may send :data:`RATE` messages per second
  (bursts of :data:`BURST`), and all addresses together :data:`TOTAL_RATE`
  (bursts of :data:`TOTAL_BURST`: source addresses are easy to forge, and
  every message shown is a row on disk); past that they are neither shown nor
  answered, so a real client resends them later.
* **Out**: the text is kept in the outbox (SQLite, under ``ipmsg:NAME``) with a
  history row, and goes by the :data:`~p2pim.messaging.delivery.IPMSG` policy:
  one at a time per peer, oldest first (iptux drops a packet numbered below
  the last it showed, so an overtaken resend would be lost), resent until the
  peer's RECVMSG, and while the peer is away it waits for its return. The
  packet number is chosen at the first send in this run and kept for resends,
  so the receiver recognises them.

The LAN core (:mod:`p2pim.lan.core`) owns the peers and the socket; this
module owns the conversation.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from ..bounded import keep
from ..messaging.core import settle
from ..messaging.delivery import IPMSG, Delivery, Transmit
from ..messaging.events import Message, MessagingEvent
from ..messaging.ids import new_msg_id
from ..messaging.store import ClientStore
from ..ratelimit import RateLimiter
from . import ipmsg

Addr = tuple[str, int]
PREFIX = "ipmsg:"  # history and outbox names of IP Messenger peers: "ipmsg:nick@ip"
RATE, BURST = 20.0, 40  # SENDMSGs per second per address that are shown and answered
TOTAL_RATE, TOTAL_BURST = 100.0, 200  # ... and from all addresses together
MAX_ADDRESSES = 1024  # numberings and rate buckets kept in memory


class IpmsgMessages:
    def __init__(self, store: ClientStore, clock_ms: Callable[[], int], counters: dict[str, int]) -> None:
        self.store = store
        self.clock_ms = clock_ms
        self.counters = counters
        for key in ("ipmsg_duplicates", "ipmsg_rate_limited"):
            counters.setdefault(key, 0)
        self.delivery = Delivery(IPMSG, connected=True)
        self._limiter = RateLimiter(RATE, BURST, MAX_ADDRESSES)
        self._total = RateLimiter(TOTAL_RATE, TOTAL_BURST, 1)
        # msg_id <-> (ip, packet number) of its sends in this run, for the RECVMSG
        self._sent: dict[bytes, tuple[str, int]] = {}
        self._by_number: dict[tuple[str, int], bytes] = {}
        # ip -> (numbering, written to the store yet); least recently used first
        self._numberings: OrderedDict[str, tuple[int, bool]] = OrderedDict()
        self._events: deque[MessagingEvent] = deque()
        # (ip, packet number) -> msg_id of file offers sent in this run, for a RELEASEFILES
        self._offers: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        for row in store.outbox():  # typed before a crash, or while the peer was away
            if row.peer.startswith(PREFIX):
                self.delivery.add(row.msg_id, row.peer.removeprefix(PREFIX), row.envelope, receipt=False)

    # -- out -----------------------------------------------------------------------

    def send(self, peer: str, text: str, now: float) -> bytes:
        """Keep ``text`` for ``peer`` ("nick@ip"); it goes while the peer is here."""
        now_ms = self.clock_ms()
        msg_id = new_msg_id(now_ms)
        self._keep(msg_id, peer, text, text.replace("\0", " ").encode(), now)
        return msg_id

    def attach(self, peer: str, msg_id: bytes, files: list[ipmsg.Attachment], line: str, now: float) -> None:
        """Keep a file offer (a SENDMSG with FILEATTACHOPT, ``line`` in the history) for ``peer``;
        it goes like a text. ``msg_id`` is the transfer's id: a RELEASEFILES names it."""
        self._keep(msg_id, peer, line, ipmsg.attachment_extra("", files), now)

    def _keep(self, msg_id: bytes, peer: str, line: str, data: bytes, now: float) -> None:
        now_ms = self.clock_ms()
        self.store.queue_outgoing(msg_id, PREFIX + peer, line, data, now_ms, now_ms)
        self.delivery.add(msg_id, peer, data, receipt=False, now=now)

    def transmits(
        self, now: float, where: Callable[[str], Addr | None], number: Callable[[], int]
    ) -> list[tuple[Addr, int, bytes]]:
        """(address, packet number, text) to send as SENDMSG now; ``where(peer)`` is the
        peer's address, ``number()`` a fresh packet number."""
        out = []
        for action in self.delivery.poll(now):
            item = action.item
            if isinstance(action, Transmit):
                addr = where(item.peer)
                if addr is None:
                    continue
                sent = self._sent.get(item.msg_id)
                if sent is None:
                    self.store.advance(item.msg_id, "relayed")
                else:
                    del self._by_number[sent]
                key = (addr[0], number() if sent is None else sent[1])
                self._sent[item.msg_id], self._by_number[key] = key, item.msg_id
                if attached(item.envelope):
                    keep(self._offers, key, item.msg_id, MAX_ADDRESSES)
                out.append((addr, key[1], item.envelope))
            else:  # delivered (its RECVMSG came)
                if (done := self._sent.pop(item.msg_id, None)) is not None:
                    del self._by_number[done]
                if (outcome := settle(self.store, action)) is not None:
                    self._events.append(outcome)
        return out

    def acked(self, ip: str, packetno: int) -> None:
        """A RECVMSG for ``packetno`` from ``ip``."""
        msg_id = self._by_number.get((ip, packetno))
        if msg_id is not None:
            self.delivery.delivered([msg_id])  # the next transmits() finishes it

    def released(self, ip: str, packetno: int) -> bytes | None:
        """The file offer (its msg_id) that a RELEASEFILES for ``packetno`` from ``ip`` declines."""
        return self._offers.pop((ip, packetno), None)

    def rename(self, ip: str, new: str) -> None:
        """The peer at ``ip`` is now called ``new``: what waits for any name there is for it."""
        old_names = {i.peer for i in self.delivery.items.values() if i.peer.endswith("@" + ip)}
        for old in old_names - {new}:
            self.delivery.rename(old, new)
            self.store.rename_outgoing(PREFIX + old, PREFIX + new)

    def presence(self, peer: str, here: bool) -> None:
        self.delivery.presence(peer, here)
        if here:
            self.delivery.resend_now(peer)

    def pending(self) -> int:
        return len(self.delivery.items)

    def next_timer(self) -> float | None:
        return self.delivery.next_timer()

    def next_event(self) -> MessagingEvent | None:
        return self._events.popleft() if self._events else None

    def known(self) -> list[str]:
        """Names of IP Messenger peers there is a conversation with (newest first)."""
        return [p.removeprefix(PREFIX) for p, _, _ in self.store.conversations((PREFIX,))]

    # -- in ------------------------------------------------------------------------

    def admit(self, ip: str, now: float) -> bool:
        """May ``ip`` have another message shown and answered now?"""
        if self._limiter.allow(ip, now) and self._total.allow(None, now):
            return True
        self.counters["ipmsg_rate_limited"] += 1
        return False

    def new_numbering(self, ip: str) -> None:
        """``ip`` (re)started or left: its packet numbers start again."""
        old = self._numbering(ip)
        self._remember(ip, max(self.clock_ms(), old + 1), False)

    def digest(self, ip: str, data: bytes) -> bytes:
        """The id of the packet ``data`` from ``ip`` in its current numbering (the numbering is
        written to the store first, so the id is the same after a restart)."""
        numbering = self._numbering(ip)
        if not self._numberings[ip][1]:
            self.store.set_numbering(ip, numbering, self.clock_ms())
            self._remember(ip, numbering, True)
        return hashlib.blake2b(f"{ip}\0{numbering}\0".encode() + data, digest_size=16).digest()

    def incoming(self, pkt: ipmsg.Packet, data: bytes, ip: str, sender: str) -> Message | None:
        """A SENDMSG (answered by the caller): the message to show, or None for a duplicate."""
        digest = self.digest(ip, data)
        text, now_ms = pkt.text(), self.clock_ms()
        if not self.store.add_incoming(digest, PREFIX + sender, text, now_ms, now_ms):
            self.counters["ipmsg_duplicates"] += 1
            return None
        return Message(sender, text, digest, now_ms, "ipmsg", False)

    # -- helpers -----------------------------------------------------------------------

    def _numbering(self, ip: str) -> int:
        if ip not in self._numberings:
            stored = self.store.numbering(ip)
            self._remember(ip, 0 if stored is None else stored, stored is not None)
        return self._numberings[ip][0]

    def _remember(self, ip: str, numbering: int, written: bool) -> None:
        self._numberings[ip] = (numbering, written)
        self._numberings.move_to_end(ip)
        if len(self._numberings) > MAX_ADDRESSES:
            self._numberings.popitem(last=False)


def attached(data: bytes) -> bool:
    """Is this kept SENDMSG a file offer? (Texts are kept without NUL; offers have one.)"""
    return b"\0" in data


def called(name: str, names: Iterable[str]) -> list[str]:
    """The IP Messenger peers (``nick@ip``) among ``names`` that ``name`` means: itself if
    it is one, else every one with that nickname (one: found; more: ambiguous)."""
    names = list(names)
    if name in names:
        return [name]
    return [n for n in names if n.rsplit("@", 1)[0] == name]
