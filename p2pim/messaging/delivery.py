"""The outbox and its route policy: which road each envelope takes, and when again.

Sans-IO. The messaging core (:mod:`p2pim.messaging.core`) feeds what it
learns (connection up or down, presence, direct paths, receipts, the server's
answers) and the time; :meth:`Delivery.poll` says what to transmit now and
:meth:`next_timer` when to ask again.

Where an envelope goes is a :class:`Policy`, plain data, so the internet
client and the LAN node run the same code with different rules:

* :data:`INTERNET`: to an online buddy the first try takes the direct path if
  one is up (else the relay), retransmissions take the relay, which cannot
  lose it, and ask the path layer to check the direct path; without a
  *delivered* receipt after :data:`RELAY_TRIES` sends the envelope is handed
  to the offline store, which holds it until the buddy acknowledges it at
  their next login. To an offline buddy it goes to the store at once.
* :data:`LAN`: straight to the peer while it is here, again and again (0.5 s
  doubling to 8 s) until its receipt; while it is away it waits.
* :data:`IPMSG`: a text to an IP Messenger client, one at a time per peer and
  in order (see :attr:`Policy.ordered`), every second and then less often
  until its RECVMSG; while the peer is away it waits.

Either way a message leaves the outbox only when the peer or the server has
it. Receipts are not acknowledged: they go once (over the road their message
came by), else to the store. Retransmission is safe because receivers
deduplicate by message id and the server keeps one copy per id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

# Relay retransmission: 1 s, then 2 s, then give up and store. A relay round
# trip on a healthy server is milliseconds, so 1 s means the buddy is not
# answering (an old client, a stalled process), not a slow network.
RELAY_RTO = 1.0
RELAY_TRIES = 3
MAX_DIRECT = 1100  # bigger envelopes take the relay: no IP fragmentation through NATs


class Via(Enum):
    """A road an envelope can take."""

    DIRECT = "direct"  # the punched UDP path
    RELAY = "relay"  # through the rendezvous, to the peer's live session
    STORE = "store"  # the rendezvous' offline store, until the peer's next login
    LAN = "lan"  # straight to a LAN peer
    IPMSG = "ipmsg"  # an IP Messenger client on the LAN (plain text)


class Policy(NamedTuple):
    """The route rule of a conversation, as data.

    ``first`` is the road of the first try (``DIRECT`` means "direct when a
    path is up, else ``retry``"), ``retry`` that of the retransmissions, each
    waiting ``schedule[n]`` seconds for the receipt (the last value repeats).
    After ``tries`` sends (None: never) or while the peer is away, the
    envelope goes to ``away`` (None: it waits until the peer is back).
    ``suspect``: a retransmission asks the path layer to check the direct path.
    ``ordered``: one message in flight per peer, the oldest first. For receivers
    that drop anything numbered below what they last showed (IP Messenger
    clients do): a later message overtaking an earlier one's resend would make
    them drop the earlier one while acknowledging it.
    """

    first: Via
    retry: Via
    schedule: tuple[float, ...]
    tries: int | None
    away: Via | None
    suspect: bool
    ordered: bool = False

    def rto(self, tries: int) -> float:
        return self.schedule[min(tries, len(self.schedule)) - 1]


INTERNET = Policy(
    Via.DIRECT,
    Via.RELAY,
    tuple(RELAY_RTO * n for n in range(1, RELAY_TRIES + 1)),
    RELAY_TRIES,
    Via.STORE,
    True,
)
LAN = Policy(Via.LAN, Via.LAN, (0.5, 1.0, 2.0, 4.0, 8.0), None, None, False)
IPMSG = Policy(Via.IPMSG, Via.IPMSG, (1.0, 1.0, 1.0, 2.0, 4.0, 8.0), None, None, False, ordered=True)


class Phase(Enum):
    WAITING = "waiting"  # not connected, or waiting for the server's answer to a store
    RELAYED = "relayed"  # sent to the peer (direct, relay or LAN), waiting for a receipt
    STORING = "storing"  # store request in flight
    BACKOFF = "backoff"  # the server said "too fast": try again at ``due``


@dataclass
class Item:
    """One outbox entry and where it stands."""

    msg_id: bytes
    peer: str
    envelope: bytes
    receipt: bool  # a receipt: sent once, never acknowledged
    relay_only: bool = False  # never on a direct path (a receipt for a relayed message)
    reply_to: object = None  # a receipt: where its message came from (LAN: the source address)
    phase: Phase = Phase.WAITING
    tries: int = 0  # sends to the peer so far
    due: float = 0.0  # when to act next (RELAYED: retransmit or store)


class Transmit(NamedTuple):
    """Send ``item`` now, over ``via``; ``suspect``: also have the direct path checked."""

    item: Item
    via: Via
    suspect: bool = False


class Finished(NamedTuple):
    """``item`` has left the outbox: ``state`` is "delivered", "stored" or "relayed" (receipts)."""

    item: Item
    state: str


class Failed(NamedTuple):
    """``item`` cannot be delivered (no longer a buddy, store full): dropped, marked failed."""

    item: Item
    reason: str


Action = Transmit | Finished | Failed


@dataclass
class Delivery:
    policy: Policy = INTERNET
    connected: bool = False  # the roads are open (the LAN's always are)
    online: set[str] = field(default_factory=set)  # peers that can be reached now
    direct: set[str] = field(default_factory=set)  # peers with a direct path up
    items: dict[bytes, Item] = field(default_factory=dict)
    _ready: list[Action] = field(default_factory=list)

    # -- inputs ---------------------------------------------------------------

    def add(
        self,
        msg_id: bytes,
        peer: str,
        envelope: bytes,
        receipt: bool,
        relay_only: bool = False,
        reply_to: object = None,
        now: float = 0.0,
    ) -> None:
        if msg_id not in self.items:
            self.items[msg_id] = Item(msg_id, peer, envelope, receipt, relay_only, reply_to, due=now)

    def connection(self, up: bool) -> None:
        """Connected and logged in (True), or the connection was lost (False)."""
        self.connected = up
        if not up:
            self.online.clear()
            for item in self.items.values():
                item.phase, item.tries = Phase.WAITING, 0

    def presence(self, peer: str, online: bool) -> None:
        if online:
            self.online.add(peer)
            return
        self.online.discard(peer)
        self.direct.discard(peer)
        for item in self.items.values():
            if item.peer == peer and item.phase is Phase.RELAYED:
                item.phase = Phase.WAITING  # went away with a send unanswered: store it, or wait

    def path(self, peer: str, direct: bool) -> None:
        """A direct path to ``peer`` is up (True) or gone (False)."""
        if direct:
            self.direct.add(peer)
        else:
            self.direct.discard(peer)

    def resend_now(self, peer: str) -> None:
        """``peer`` is back or has moved: what waits for its receipt goes again at once."""
        for item in self.items.values():
            if item.peer == peer and item.phase is Phase.RELAYED:
                item.phase = Phase.WAITING

    def rename(self, old: str, new: str) -> None:
        """The peer ``old`` is now called ``new`` (an IP Messenger nickname changed)."""
        for item in self.items.values():
            if item.peer == old:
                item.peer = new
        for names in (self.online, self.direct):
            if old in names:
                names.discard(old)
                names.add(new)

    def delivered(self, msg_ids: list[bytes]) -> None:
        """A delivered (or read) receipt from the peer."""
        for msg_id in msg_ids:
            item = self.items.pop(msg_id, None)
            if item is not None:
                self._ready.append(Finished(item, "delivered"))

    def stored(self, msg_id: bytes) -> None:
        """The server committed our store request."""
        item = self.items.pop(msg_id, None)
        if item is not None:
            self._ready.append(Finished(item, "stored"))

    def refused(
        self, msg_id: bytes, peer_offline: bool, reason: str, retry_in: float = 0.0, now: float = 0.0
    ) -> None:
        """The server refused a relay or store of ``msg_id``.

        ``retry_in`` > 0: it was shedding load (rate limited), not refusing the message:
        the item waits that long and is sent again, never failed.
        """
        item = self.items.get(msg_id)
        if item is None:
            return
        if retry_in > 0:
            item.phase, item.due = Phase.BACKOFF, now + retry_in
            return
        item.phase = Phase.WAITING
        if peer_offline:
            self.online.discard(item.peer)  # the next poll stores it
        else:
            del self.items[msg_id]
            self._ready.append(Failed(item, reason))

    # -- outputs --------------------------------------------------------------

    def poll(self, now: float) -> list[Action]:
        actions, self._ready = self._ready, []
        if not self.connected:
            return actions
        policy = self.policy
        busy = {i.peer for i in self.items.values() if i.phase is Phase.RELAYED} if policy.ordered else set()
        for item in list(self.items.values()):
            if item.phase is Phase.STORING:
                continue
            if item.phase in (Phase.RELAYED, Phase.BACKOFF) and now < item.due:
                continue
            if item.phase is not Phase.RELAYED and item.peer in busy:
                continue  # ordered: an older message to this peer is in flight
            # An item with an address of its own (a LAN receipt: where its message came from;
            # an IP Messenger packet) goes there whether or not the peer is known to be here.
            here = item.peer in self.online or item.reply_to is not None
            if here and (policy.tries is None or item.tries < policy.tries):
                item.tries += 1
                item.phase, item.due = Phase.RELAYED, now + policy.rto(item.tries)
                actions.append(Transmit(item, self._road(item), policy.suspect and item.tries > 1))
                if policy.ordered:
                    busy.add(item.peer)
                if item.receipt:
                    del self.items[item.msg_id]
                    actions.append(Finished(item, "relayed"))
            elif policy.away is not None:
                item.phase = Phase.STORING
                actions.append(Transmit(item, policy.away))
            elif here:  # out of tries and nowhere else to go
                del self.items[item.msg_id]
                actions.append(Failed(item, "no answer"))
            else:
                item.phase = Phase.WAITING  # until the peer is back
        return actions

    def _road(self, item: Item) -> Via:
        road = self.policy.first if item.tries == 1 else self.policy.retry
        if road is Via.DIRECT and (
            item.relay_only or item.peer not in self.direct or len(item.envelope) > MAX_DIRECT
        ):
            return self.policy.retry
        return road

    def next_timer(self) -> float | None:
        dues = [i.due for i in self.items.values() if i.phase in (Phase.RELAYED, Phase.BACKOFF)]
        if self.policy.away is None:  # a peer that is away gets nothing until it is back
            dues = [
                i.due
                for i in self.items.values()
                if i.phase in (Phase.RELAYED, Phase.BACKOFF)
                and (i.peer in self.online or i.reply_to is not None)
            ]
        return min(dues) if dues else None
