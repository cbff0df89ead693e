"""The sender-key core of groups (sans-IO, on the client's database): which key we seal
with and who must get it first; what becomes of each group message that comes (shown
once and in its sender's order, held for its key, or dropped) and of each membership
event. The shell (:mod:`p2pim.client.groups`) talks to the server, hands the group
outbox over and sends the direct copies.

Keys. Each member seals with a key of its own per *epoch*, handed to each other member
inside the pairwise envelopes (a ``GroupKey`` body), through the group outbox before the
first message sealed with it. A key serves the members it was made for: when the
membership is another (anyone joined, left or was removed), our next message comes
with a new key, so whoever left never holds the key of what follows and whoever joined
never holds the key of what came before, even with the server's database in hand.
The new key is made when we next speak, not at the event: a change costs each member
who speaks afterwards one key per member, not every member one per member.

Order. Two roads bring a member's message: the rendezvous's fan-out (one ordered stream
per member, the authority: every copy comes that way, in the order the sender posted)
and, between members with a direct path, a copy sent straight away over UDP (lost or
not, the server's copy follows). Each message carries its place in its sender's order
within the epoch (``Body.seq``). A copy from the server is shown when it comes (its
stream keeps the sender's order); a direct copy only in its turn, else it waits in a
small bounded buffer for the ones before it (from either road), or is dropped (its
server copy comes). The history dedupes by message id: each message is shown once.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from ..bounded import seen
from ..identity import Identity
from ..messaging.envelope import seal, text_body
from ..messaging.ids import new_msg_id
from ..messaging.store import ClientStore
from ..wire import control_pb2 as pb
from ..wire import envelope_pb2 as epb
from . import seal as gseal
from .events import GroupChange, GroupMessage
from .store import GroupRow, GroupStore, Item, Post

MAX_HELD = 1000  # server copies waiting for their sender's key
MAX_AHEAD = 256  # direct copies waiting for their turn
EVENT_NAMES = {
    pb.GroupEvent.CREATED: "created", pb.GroupEvent.INVITED: "invited", pb.GroupEvent.JOINED: "joined",
    pb.GroupEvent.DECLINED: "declined", pb.GroupEvent.LEFT: "left", pb.GroupEvent.REMOVED: "removed",
    pb.GroupEvent.RENAMED: "renamed", pb.GroupEvent.ROLE: "role", pb.GroupEvent.DELETED: "deleted",
}  # fmt: skip
OUT = (pb.GroupEvent.LEFT, pb.GroupEvent.REMOVED, pb.GroupEvent.DECLINED)
SERVER, DIRECT = "server", "direct"

Stream = tuple[bytes, str, int]  # group, sender, epoch
GroupEventOut = GroupMessage | GroupChange


class GroupError(Exception):
    """A group the user named cannot be found (or is ambiguous), or cannot be used now."""


class GroupCore:
    def __init__(
        self,
        identity: Identity,
        me: str,
        store: GroupStore,
        contacts: ClientStore,
        *,
        see_key: Callable[[str, bytes], object] = lambda peer, key: None,
        clock_ms: Callable[[], int] | None = None,
        counters: dict[str, int] | None = None,
        inbox: bool = True,
    ) -> None:
        """``see_key``: pins (or warns of) a member's identity key the server shows.
        ``inbox``: this session shows messages; without it (a one-shot command) events are
        applied and everything is left on the server for the session that shows it."""
        self.identity = identity
        self.me = me
        self.store = store
        self.contacts = contacts
        self.see_key = see_key
        self.inbox = inbox
        self.counters = counters if counters is not None else {}
        for name in ("group_bad", "group_duplicates", "group_direct_early", "group_direct_dropped"):
            self.counters.setdefault(name, 0)
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._held: OrderedDict[int, epb.Envelope] = OrderedDict()  # store id -> server copy without key
        self._ahead: OrderedDict[tuple[Stream, int], tuple[epb.Envelope, epb.Body]] = OrderedDict()
        self._asked: set[Stream] = set()
        self._events: deque[GroupEventOut] = deque()
        self._queued: list[Item] = []

    # -- what the shell takes ----------------------------------------------------------

    def next_event(self) -> GroupEventOut | None:
        return self._events.popleft() if self._events else None

    def take_queued(self) -> list[Item]:
        """What went into the group outbox since last asked (to hand over, and send directly)."""
        out, self._queued = self._queued, []
        return out

    # -- out ---------------------------------------------------------------------------

    def post(self, gid: bytes, text: str) -> epb.Envelope:
        """Seal ``text`` for the group and queue it (our key first to whoever lacks it)."""
        try:
            body = text_body(text)
        except ValueError as exc:
            raise GroupError(str(exc)) from None
        epoch, key = self._my_key(gid)
        body.msg_id, body.sent_at_ms = new_msg_id(), self._clock_ms()
        body.seq = self.store.next_seq(gid, self.me, epoch)
        env = gseal.seal(self.identity, self.me, gid, epoch, key, body)
        post = Post(gid, self.me, epoch, body.seq, env.msg_id, gseal.label(gid), text, env.sent_at_ms)
        self._queue([("post", gid.hex(), env.msg_id, env.SerializeToString())], post)
        return env

    def _my_key(self, gid: bytes) -> tuple[int, bytes]:
        """Our key for ``gid``, handed to every member who lacks it: a new one (a new epoch)
        unless the current one was made for exactly the members there are now."""
        members = self.active_members(gid) - {self.me}
        current = self.store.current_key(gid, self.me)
        if current is not None and self.store.made_for(gid, self.me, current[0]) == members:
            epoch, key = current
            self._give_key(gid, members - self.store.given(gid, self.me, epoch), epoch, key)
            return current
        # An epoch is a key's random id, not a count: each of our devices makes its own keys,
        # and a member keeps them all apart (and each one's order) by (sender, epoch).
        epoch, key = secrets.randbelow(2**31 - 1) + 1, gseal.new_key()
        self.store.add_key(gid, self.me, epoch, key, members)
        self._give_key(gid, members, epoch, key)
        return epoch, key

    def _give_key(self, gid: bytes, to: set[str], epoch: int, key: bytes) -> None:
        items, given = [], set()
        for member in sorted(to):
            contact = self.contacts.contact(member)
            if member == self.me or contact is None or contact.offered_key is not None:
                continue  # a changed key is not trusted with ours until the user says so
            body = epb.Body(group_key=epb.GroupKey(group=gid, epoch=epoch, key=key))
            env = seal(self.identity, self.me, member, contact.identity_key, body)
            items.append(("store", member, env.msg_id, env.SerializeToString()))
            given.add(member)
        if items:
            self._queue(items)
            self.store.give(gid, self.me, epoch, given)

    def _queue(self, items: list[Item], post: Post | None = None) -> None:
        self.store.queue(items, post)
        self._queued.extend(items)

    def active_members(self, gid: bytes) -> set[str]:
        """Members who have joined (not those only invited), ourselves among them."""
        return {m for m, role in self.store.members(gid).items() if role != "invited"}

    # -- membership ----------------------------------------------------------------------

    def apply(self, info: pb.GroupInfo) -> GroupRow:
        """The group as the server says it is now; pins its members' keys."""
        for m in info.members:
            if m.username != self.me:
                self.see_key(m.username, m.identity_key)
        return self.store.apply(info, self.me)

    def event(self, data: bytes) -> bool:
        """A membership event from our stream: applied (True), or unreadable (False)."""
        try:
            ev = pb.GroupEvent.FromString(data)
        except Exception:
            return self._bad()
        known = self.store.group(ev.group)
        fresh = known is None or ev.seq > known.seq or known.role == "gone"  # else a refresh got ahead
        if ev.kind == pb.GroupEvent.DELETED or (ev.kind in OUT and ev.subject == self.me):
            self.store.gone(ev.group)
            row = self.store.group(ev.group)
        else:
            row = self.apply(ev.info) if fresh else known
        name = row.name if row is not None else ev.info.name
        if self.inbox:
            kind = EVENT_NAMES.get(ev.kind, "?")
            self._events.append(GroupChange(name, ev.group, kind, ev.actor, ev.subject, ev.seq))
        return True

    # -- in ------------------------------------------------------------------------------

    def receive(self, env: epb.Envelope, store_id: int | None = None) -> bool | None:
        """A member's message: from the server (``store_id``, its place in our stream) or
        straight from its sender (None). True: taken (acknowledge it); None: held (keep it
        on the server); False: unreadable for good (acknowledge all the same)."""
        direct = store_id is None
        row = self.store.group(env.group)
        contact = self.contacts.contact(env.sender)
        if row is None or contact is None or (direct and env.sender not in self._members_now(row)):
            return self._bad()
        try:
            gseal.verify(env, contact.identity_key)
        except gseal.GroupSealError:
            return self._bad()
        key = self.store.key(env.group, env.sender, env.epoch)
        if key is None:
            if direct:  # its key is still on its way: the server's copy comes after it
                self.counters["group_direct_early"] += 1
                return False
            assert store_id is not None
            self._hold(store_id, env)
            return None
        try:
            body = gseal.open_body(env, key)
        except gseal.GroupSealError:
            return self._bad()
        if body.WhichOneof("kind") != "text":
            return True
        stream = (env.group, env.sender, env.epoch)
        turn = self.store.next_seq(*stream)
        if direct and body.seq != turn:
            if body.seq < turn:
                self.counters["group_duplicates"] += 1
            else:
                self._ahead[(stream, body.seq)] = (env, body)  # a direct copy ahead of its turn
                if len(self._ahead) > MAX_AHEAD:
                    self._ahead.popitem(last=False)  # its server copy comes
                    self.counters["group_direct_dropped"] += 1
            return True
        self._show(row, env, body, DIRECT if direct else SERVER)
        while (early := self._ahead.pop((stream, self.store.next_seq(*stream)), None)) is not None:
            self._show(row, *early, DIRECT)
        return True

    def _members_now(self, row: GroupRow) -> set[str]:
        return self.active_members(row.gid) if row.active else set()

    def _show(self, row: GroupRow, env: epb.Envelope, body: epb.Body, via: str) -> None:
        text = body.text.text
        if self.contacts.add_incoming(
            env.msg_id, gseal.label(env.group), text, env.sent_at_ms, self._clock_ms(), env.sender
        ):
            self._events.append(
                GroupMessage(row.name, env.group, env.sender, text, env.msg_id, env.sent_at_ms, via)
            )
        else:
            self.counters["group_duplicates"] += 1
        self.store.shown(env.group, env.sender, env.epoch, body.seq)

    def _hold(self, store_id: int, env: epb.Envelope) -> None:
        self._held[store_id] = env
        if len(self._held) > MAX_HELD:
            self._held.popitem(last=False)  # stays on the server: it comes again at the next login
        ask = (env.group, env.sender, env.epoch)
        contact = self.contacts.contact(env.sender)
        if contact is not None and contact.offered_key is None and not seen(self._asked, ask, MAX_HELD):
            # "send me your key" (a GroupKey with no key), once per key we lack
            body = epb.Body(group_key=epb.GroupKey(group=env.group, epoch=env.epoch))
            out = seal(self.identity, self.me, env.sender, contact.identity_key, body)
            self._queue([("store", env.sender, out.msg_id, out.SerializeToString())])

    def on_key(self, peer: str, key: epb.GroupKey) -> list[int]:
        """A member's sender key (or, with no key, their request for ours of that epoch),
        pairwise. Returns the store ids of held messages it opened (to acknowledge)."""
        row = self.store.group(key.group)
        if row is None or not row.active or peer not in self.store.members(key.group):
            self._bad()
            return []
        if not key.key:
            self._asked_for(key.group, peer, key.epoch)
            return []
        if len(key.key) != gseal.KEY_SIZE:
            self._bad()
            return []
        self.store.add_key(key.group, peer, key.epoch, key.key)
        done = []
        for store_id, env in list(self._held.items()):
            if env.sender == peer and env.group == key.group and env.epoch == key.epoch:
                del self._held[store_id]
                if self.receive(env, store_id) is not None:
                    done.append(store_id)
        return done

    def _asked_for(self, gid: bytes, peer: str, epoch: int) -> None:
        """ "Send me your key of ``epoch``": once more, to a member it was made for (never
        one of an epoch from before they joined)."""
        key = self.store.key(gid, self.me, epoch)
        made_for = self.store.made_for(gid, self.me, epoch)
        if key is None or made_for is None or peer not in made_for:
            self.counters["group_bad"] += 1
            return
        if peer in self.active_members(gid):
            self._give_key(gid, {peer}, epoch, key)

    def _bad(self) -> bool:
        self.counters["group_bad"] += 1
        return False
