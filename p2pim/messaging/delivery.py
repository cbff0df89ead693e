"""Delivery of outbox items: relay first, the offline store as the fallback.

Sans-IO. The client feeds what it learns (connection up or down, buddy
presence, receipts, the server's answers) and the time; :meth:`Delivery.poll`
says what to transmit now and :meth:`next_timer` when to ask again.

A text to an online buddy goes through the relay and stays pending until the
buddy's *delivered* receipt comes back; without one after
:data:`RELAY_TRIES` sends it is handed to the offline store, which holds it
until the buddy acknowledges it at their next login. A text to an offline
buddy goes to the store at once. Either way it leaves the outbox only when
the buddy or the server has it. Receipts are not acknowledged: they go over
the relay once when the buddy is online, else to the store. Retransmission is
safe because receivers deduplicate by message id and the server keeps one
copy per id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

# Relay retransmission: 1 s, then 2 s, then give up and store. A relay round
# trip on a healthy server is milliseconds, so 1 s means the buddy is not
# answering (an old client, a stalled process), not a slow network.
RELAY_RTO = 1.0
RELAY_TRIES = 3


class Via(Enum):
    RELAY = "relay"
    STORE = "store"


class Phase(Enum):
    WAITING = "waiting"  # not connected, or waiting for the server's answer to a store
    RELAYED = "relayed"  # sent over the relay, waiting for a receipt
    STORING = "storing"  # store request in flight
    BACKOFF = "backoff"  # the server said "too fast": try again at ``due``


@dataclass
class Item:
    """One outbox entry and where it stands."""

    msg_id: bytes
    peer: str
    envelope: bytes
    receipt: bool  # a receipt: sent once, never acknowledged
    relay_only: bool = False  # never on a direct path (see Client._on_envelope)
    phase: Phase = Phase.WAITING
    tries: int = 0  # relay sends so far
    due: float = 0.0  # when to act next (RELAYED: retransmit or store)


@dataclass(frozen=True)
class Transmit:
    """Send ``item`` now, over ``via``."""

    item: Item
    via: Via


@dataclass(frozen=True)
class Finished:
    """``item`` has left the outbox: ``state`` is "delivered", "stored" or "relayed" (receipts)."""

    item: Item
    state: str


@dataclass(frozen=True)
class Failed:
    """``item`` cannot be delivered (no longer a buddy, store full): dropped, marked failed."""

    item: Item
    reason: str


Action = Transmit | Finished | Failed


@dataclass
class Delivery:
    connected: bool = False
    online: set[str] = field(default_factory=set)  # buddies the server says are online
    items: dict[bytes, Item] = field(default_factory=dict)
    _ready: list[Action] = field(default_factory=list)

    # -- inputs ---------------------------------------------------------------

    def add(self, msg_id: bytes, peer: str, envelope: bytes, receipt: bool, relay_only: bool = False) -> None:
        if msg_id not in self.items:
            self.items[msg_id] = Item(msg_id, peer, envelope, receipt, relay_only)

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
        for item in self.items.values():
            if item.peer == peer and item.phase is Phase.RELAYED:
                item.phase = Phase.WAITING  # went offline with a relay unanswered: store it

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
        for item in list(self.items.values()):
            if item.phase is Phase.STORING:
                continue
            if item.phase in (Phase.RELAYED, Phase.BACKOFF) and now < item.due:
                continue
            if item.peer in self.online and item.tries < RELAY_TRIES:
                item.tries += 1
                item.phase, item.due = Phase.RELAYED, now + RELAY_RTO * item.tries
                actions.append(Transmit(item, Via.RELAY))
                if item.receipt:
                    del self.items[item.msg_id]
                    actions.append(Finished(item, "relayed"))
            else:
                item.phase = Phase.STORING
                actions.append(Transmit(item, Via.STORE))
        return actions

    def next_timer(self) -> float | None:
        dues = [i.due for i in self.items.values() if i.phase in (Phase.RELAYED, Phase.BACKOFF)]
        return min(dues) if dues else None
