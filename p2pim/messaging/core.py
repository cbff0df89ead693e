"""The messaging core: envelopes in and out, for the internet client and the LAN node alike.

Sans-IO. Whoever owns the roads (the client: direct path, relay and offline
store; the LAN node: its data socket) hands every envelope that arrives to
:meth:`Messenger.receive` and sends what :meth:`Messenger.datagrams_to_send`
returns; the user sees what :meth:`Messenger.next_event` gives.

In: parse once, find the sender's key, open, drop duplicates by message id,
keep the text in the history, answer with a *delivered* receipt (also for a
duplicate: its sender retransmits because it missed the last one), match
receipts to the outbox. Out: seal, keep in the outbox (SQLite, so nothing
typed is lost to a crash) and send over the roads the :class:`Policy` names
until the receipt or the server has it (:mod:`p2pim.messaging.delivery`).

Keys come from a callable (``keys(name, via)``), so each owner says whom it
trusts on which road: the client its pinned buddies (on the direct path only
mutual ones), the LAN node pinned or announced peers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import NamedTuple

from ..identity import Identity
from ..wire import envelope_pb2 as epb
from .delivery import INTERNET, Delivery, Failed, Finished, Policy, Transmit, Via
from .envelope import EnvelopeError, Opened, open_envelope, parse_envelope, receipt_body, seal
from .events import Message, MessagingEvent, Outcome, Problem, Receipt, SentElsewhere
from .store import ClientStore, owned_by

# Bad input from one sender (garbage relayed, forged envelopes) is counted always and
# shown once, then as one summary line per this many seconds: a flood must not
# become a flood of warnings.
PROBLEM_EVERY_S = 30.0
MAX_PROBLEM_SENDERS = 1024
MAX_EVENTS = 10_000  # undrained events past this are dropped (counted): a stalled reader must not grow us


class Verdict(Enum):
    """What became of an envelope; for an offline copy, whether the server may delete it."""

    TAKEN = "taken"  # read (or a duplicate of one read): delete it
    DROPPED = "dropped"  # unreadable for good (garbage, forged, a stranger): delete it too
    KEPT = "kept"  # not for this session, or sealed with a key not trusted yet: leave it


class Keys(NamedTuple):
    """A sender's pinned key, and a newer one it offers that the user has not trusted."""

    key: bytes
    offered: bytes | None = None


class Received(NamedTuple):
    verdict: Verdict
    sender: str = ""  # the authenticated sender (TAKEN only)


KeyLookup = Callable[[str, Via], Keys | None]
# Body kinds other than texts and receipts (file offers and answers): their owner keeps
# them (committed before the receipt goes) and says whether they were new.
BodyHandler = Callable[[str, Opened, Via], bool]
# Group messages a member sent us directly (sealed for the group, not for us): their owner
# verifies, opens and orders them.
GroupHandler = Callable[[epb.Envelope], None]


class Messenger:
    def __init__(
        self,
        identity: Identity,
        store: ClientStore,
        keys: KeyLookup,
        *,
        name: str = "",
        policy: Policy = INTERNET,
        prefix: str = "",
        inbox: bool = True,
        warn: bool = True,
        counters: dict[str, int] | None = None,
        clock_ms: Callable[[], int] | None = None,
        bodies: BodyHandler | None = None,
        groups: GroupHandler | None = None,
    ) -> None:
        """``prefix``: how this owner's peers are named in the shared history ("lan:").

        ``inbox``: this session shows texts; without it, texts are left unread and
        unanswered (a relayed one is resent by its sender and then stored, a stored
        one stays on the server) for a session that shows them.

        ``warn``: bad input becomes a (throttled) :class:`Problem` event, not only a counter.

        ``bodies``: takes the body kinds this core does not know itself (file offers and
        answers); they are acknowledged like texts, also by a session without an inbox.

        ``groups``: takes group messages that come on the direct path from a mutual buddy.
        """
        self.identity = identity
        self.store = store
        self.keys = keys
        self.name = name
        self.prefix = prefix
        self.inbox = inbox
        self.warn = warn
        self.bodies = bodies
        self.groups = groups
        self.delivery = Delivery(policy, connected=policy.away is None)
        self.counters = counters if counters is not None else {}
        for key in ("bad_envelopes", "unknown_sender", "duplicates", "left_for_inbox", "events_dropped"):
            self.counters.setdefault(key, 0)
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._events: deque[MessagingEvent] = deque()
        self._problems: dict[str, tuple[float, int]] = {}  # sender -> (last shown, dropped since)
        for row in store.outbox():  # typed before a crash or while the peer was away
            if owned_by(row.peer, prefix):
                self.delivery.add(row.msg_id, row.peer.removeprefix(prefix), row.envelope, row.receipt)

    # -- out ------------------------------------------------------------------------

    def send(
        self,
        peer: str,
        key: bytes,
        body: epb.Body,
        text: str | None,
        now: float,
        *,
        relay_only: bool = False,
        reply_to: object = None,
    ) -> bytes:
        """Seal ``body`` for ``peer`` and put it in the outbox; returns its message id.

        ``text``: what the history shows (None for receipts, which are sent once).
        """
        now_ms = self._clock_ms()
        if not body.sent_at_ms:
            body.sent_at_ms = now_ms
        env = seal(self.identity, self.name, peer, key, body)
        data = env.SerializeToString()
        self.store.queue_outgoing(env.msg_id, self.prefix + peer, text, data, env.sent_at_ms, now_ms)
        self.delivery.add(env.msg_id, peer, data, text is None, relay_only, reply_to, now)
        return env.msg_id

    def mark_read(self, peer: str, key: bytes | None, now: float) -> int:
        """Mark everything from ``peer`` read and, with a key, tell them; returns how many."""
        ids = self.store.unread(self.prefix + peer)
        if ids:
            self.store.mark_read(ids)
            if key is not None:
                self.send(peer, key, receipt_body(epb.Receipt.READ, ids), None, now)
        return len(ids)

    # -- in -------------------------------------------------------------------------

    def receive(
        self, data: bytes, via: Via, now: float, *, sender: str | None = None, reply_to: object = None
    ) -> Received:
        """An envelope arrived over ``via``; ``sender``: who the road vouches sent it (the relay).

        ``reply_to``: where to answer if the peer cannot be reached the usual way yet
        (the LAN: its source address).
        """
        self.counters[f"received_{via.value}"] = self.counters.get(f"received_{via.value}", 0) + 1
        who = sender or ""
        # Problems are throttled per sender, but only a sender the road vouches for (the
        # relay's) is one: on a direct path anyone can write any name into an envelope,
        # and a stranger cycling names must not get one warning per name. Until the
        # envelope opens, the road itself is the sender.
        blame = sender if sender is not None else via.value
        try:
            env = parse_envelope(data)
            if sender is not None and env.sender != sender:
                raise EnvelopeError(f"envelope claims to be from {env.sender!r} but came from {sender!r}")
            who = env.sender
            keys = self.keys(env.sender, via)
            if keys is None:
                self.counters["unknown_sender"] += 1
                self.problem(blame, f"dropped a message from {who!r}, whose key we do not know", now)
                return Received(Verdict.DROPPED)
            if env.group:  # sealed for a group: only a member's direct copy comes this way
                if self.groups is None or via is not Via.DIRECT:
                    raise EnvelopeError("a group message on a road that carries none")
                self.groups(env)
                return Received(Verdict.TAKEN, who)
            opened = self._open(env, keys)
        except EnvelopeError as exc:
            self.counters["bad_envelopes"] += 1
            self.problem(blame, f"dropped a message from {who}: {exc}", now)
            return Received(Verdict.DROPPED)
        except _NotYet as exc:
            self.problem(who, str(exc), now)  # it opened with the key offered for ``who``: vouched
            return Received(Verdict.KEPT)
        body = opened.body
        kind = body.WhichOneof("kind")
        if kind == "text":
            if not self.inbox:
                self.counters["left_for_inbox"] += 1
                return Received(Verdict.KEPT)
            text = body.text.text
            if self.store.add_incoming(env.msg_id, self.prefix + who, text, env.sent_at_ms, self._clock_ms()):
                self._emit(Message(who, text, env.msg_id, env.sent_at_ms, via.value))
            else:
                self.counters["duplicates"] += 1
            self._delivered(who, keys.key, env.msg_id, via, now, reply_to)
        elif kind in ("file_offer", "file_answer") and self.bodies is not None:
            if not self.bodies(who, opened, via):
                self.counters["duplicates"] += 1
            self._delivered(who, keys.key, env.msg_id, via, now, reply_to)
        elif kind == "copy" and who == self.name:  # from another device of our own account
            if not self.inbox:
                self.counters["left_for_inbox"] += 1
                return Received(Verdict.KEPT)
            self._copied(body.copy)
        elif kind == "group_key" and self.bodies is not None:
            self.bodies(who, opened, via)  # comes through the store: the offline ack is its receipt
        elif kind == "receipt":
            ids = [m for m in body.receipt.msg_ids if self.store.outgoing_peer(m) == self.prefix + who]
            state = "read" if body.receipt.kind == epb.Receipt.READ else "delivered"
            moved = [m for m in ids if self.store.advance(m, state)]
            self.delivery.delivered(ids)
            if moved:
                self._emit(Receipt(who, state, tuple(moved)))
        return Received(Verdict.TAKEN, who)

    def _copied(self, c: epb.DeviceCopy) -> None:
        """Our other device's copy of what it sent or took: into our history, once."""
        now_ms, peer = self._clock_ms(), self.prefix + c.peer
        if c.outgoing:
            if self.store.add_copy(c.msg_id, peer, c.text, c.sent_at_ms, now_ms, c.author):
                self._emit(SentElsewhere(c.peer, c.text, c.msg_id, c.sent_at_ms))
        elif self.store.add_incoming(c.msg_id, peer, c.text, c.sent_at_ms, now_ms, c.author):
            self._emit(Message(c.peer, c.text, c.msg_id, c.sent_at_ms, "copy"))
        else:
            self.counters["duplicates"] += 1

    def _delivered(self, who: str, key: bytes, msg_id: bytes, via: Via, now: float, reply_to: object) -> None:
        # The receipt goes back the way the message came: a relayed message may come
        # from another session of the sender (a one-shot `send`) than the one our
        # direct path reaches.
        receipt = receipt_body(epb.Receipt.DELIVERED, [msg_id])
        self.send(who, key, receipt, None, now, relay_only=via is not Via.DIRECT, reply_to=reply_to)

    def _open(self, env: epb.Envelope, keys: Keys) -> Opened:
        """Open with the pinned key; an envelope that opens only with the offered key is kept."""
        try:
            return open_envelope(self.identity, self.name, env, keys.key)
        except EnvelopeError:
            if keys.offered is None:
                raise
        try:
            open_envelope(self.identity, self.name, env, keys.offered)
        except EnvelopeError:
            raise EnvelopeError(f"envelope from {env.sender!r} failed authentication") from None
        raise _NotYet(
            f"a message from {env.sender} is sealed with their new key; it stays on the server until "
            f"you check the key and run: p2pim buddy trust {env.sender}"
        )

    # -- what the roads say ------------------------------------------------------------

    def connection(self, up: bool) -> None:
        self.delivery.connection(up)

    def presence(self, peer: str, online: bool) -> None:
        self.delivery.presence(peer, online)

    def path(self, peer: str, direct: bool) -> None:
        self.delivery.path(peer, direct)

    def resend_now(self, peer: str) -> None:
        self.delivery.resend_now(peer)

    def stored(self, msg_id: bytes) -> None:
        self.delivery.stored(msg_id)

    def refused(
        self, msg_id: bytes, peer_offline: bool, reason: str, retry_in: float = 0.0, now: float = 0.0
    ) -> None:
        self.delivery.refused(msg_id, peer_offline, reason, retry_in, now)

    def pending(self) -> int:
        """Messages (not receipts) still in the outbox."""
        return sum(1 for i in self.delivery.items.values() if not i.receipt)

    # -- the core verbs ---------------------------------------------------------------

    def receive_datagram(self, sock: Via, data: bytes, addr: object, now: float) -> None:
        """The common verb: an envelope on road ``sock``; ``addr`` is the sender the road
        vouches for (a name: the relay) or where it came from (an address: the LAN)."""
        if isinstance(addr, str):
            self.receive(data, sock, now, sender=addr)
        else:
            self.receive(data, sock, now, reply_to=addr)

    def datagrams_to_send(self, now: float) -> list[Transmit]:
        """What to send now, each over its road; finished items leave the outbox here."""
        out = []
        for action in self.delivery.poll(now):
            if isinstance(action, Transmit):
                if action.via is not Via.STORE and not action.item.receipt:
                    self.store.advance(action.item.msg_id, "relayed")
                out.append(action)
            elif (outcome := settle(self.store, action)) is not None:
                self._emit(outcome)
        return out

    def get_timer(self) -> float | None:
        return self.delivery.next_timer()

    def handle_timer(self, now: float) -> None:
        """Nothing to do apart from :meth:`datagrams_to_send`, which acts on what is due."""

    def next_event(self) -> MessagingEvent | None:
        return self._events.popleft() if self._events else None

    # -- helpers ------------------------------------------------------------------------

    def _emit(self, event: MessagingEvent) -> None:
        if len(self._events) >= MAX_EVENTS:
            self.counters["events_dropped"] += 1
            return
        self._events.append(event)

    def problem(self, sender: str, message: str, now: float) -> None:
        """Show a problem with ``sender``'s input once, then one summary per :data:`PROBLEM_EVERY_S`."""
        if not self.warn:
            return
        last, dropped = self._problems.get(sender, (-1e18, 0))
        if now - last < PROBLEM_EVERY_S:
            self._problems[sender] = (last, dropped + 1)
            return
        if len(self._problems) >= MAX_PROBLEM_SENDERS:  # bounded: forget who was shown when
            self._problems.clear()
        self._problems[sender] = (now, 0)
        more = f" ({dropped} more like it since the last warning)" if dropped else ""
        self._emit(Problem(message + more))


def settle(store: ClientStore, action: Finished | Failed) -> Outcome | None:
    """An item left the outbox: its row goes and, for a text, its history row says how far
    it got (one transaction); returns the :class:`Outcome` to show (None for a receipt).
    Shared by every outbox over a :class:`Delivery` (this core's, IP Messenger's)."""
    item = action.item
    state, detail = (action.state, "") if isinstance(action, Finished) else ("failed", action.reason)
    store.outbox_done(item.msg_id, None if item.receipt else state)
    return None if item.receipt else Outcome(item.peer, item.msg_id, state, detail)


class _NotYet(Exception):
    """An envelope that opens only with a key not yet trusted: kept on the server for later."""
