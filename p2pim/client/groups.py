"""Groups for the internet client: membership through the rendezvous, messages sealed
with sender keys (:mod:`p2pim.groups.seal`), fanned out by the server.

What arrives comes in the client's one ordered offline stream (each member's copy,
``OfflineEnvelope.group`` set): membership events (empty sender) are applied, then
acknowledged; group messages are verified (the sender's identity signature), opened
with the sender's key for their epoch, written to the history under ``#<group id>``
(deduplicated by message id: exactly once), then acknowledged. One whose key has not
come yet is held (acknowledged as "keep", so the server's window moves on) and opened
when the key arrives; the sender is asked for it once.

What we send goes through the group outbox, in order, each item until the server
took it: first our sender key for each member who lacks it (a pairwise envelope into
the offline store, sealed to that member's pinned key), then the post. The server
stores both for each member in that order, so a member reads the key before the
message. After every event that takes someone out of the group we make a new key
(a new epoch) and give it to those who remain; a newcomer gets our current one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..bounded import seen
from ..groups import seal as gseal
from ..groups.store import ROLE_NAMES, GroupRow, GroupStore, Outgoing
from ..messaging.envelope import EnvelopeError, parse_envelope, seal, text_body
from ..messaging.ids import new_msg_id
from ..wire import control_pb2 as pb
from ..wire import envelope_pb2 as epb
from .control import ClientError, Unreachable
from .events import GroupChange, GroupMessage

if TYPE_CHECKING:
    from .facade import Client

log = logging.getLogger(__name__)
MAX_HELD = 1000  # group messages waiting for their sender's key
EVENT_NAMES = {
    pb.GroupEvent.CREATED: "created", pb.GroupEvent.INVITED: "invited", pb.GroupEvent.JOINED: "joined",
    pb.GroupEvent.DECLINED: "declined", pb.GroupEvent.LEFT: "left", pb.GroupEvent.REMOVED: "removed",
    pb.GroupEvent.RENAMED: "renamed", pb.GroupEvent.ROLE: "role", pb.GroupEvent.DELETED: "deleted",
}  # fmt: skip
OUT = (pb.GroupEvent.LEFT, pb.GroupEvent.REMOVED, pb.GroupEvent.DECLINED)


class GroupError(Exception):
    """A group the user named cannot be found (or is ambiguous), or cannot be used now."""


class Groups:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.store = GroupStore(client.store.conn)
        self._held: OrderedDict[int, tuple[str, epb.Envelope]] = OrderedDict()  # store id -> (sender, env)
        self._asked: set[tuple[bytes, str, int]] = set()
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._waiting: dict[bytes, asyncio.Future[str]] = {}  # post msg_id -> its fate
        self._closed = False
        client.counters.setdefault("group_bad", 0)

    @property
    def me(self) -> str:
        return self.client.username

    # -- asking the server ---------------------------------------------------------------

    async def create(self, name: str, invite: Sequence[str] = ()) -> GroupRow:
        reply = await self.client.control.request(
            "group_create", pb.GroupCreate(name=name, invite=list(invite))
        )
        return self._apply(reply.group)

    async def invite(self, group: str, user: str) -> None:
        await self.client.control.request(
            "group_invite", pb.GroupInvite(group=self.find(group).gid, username=user)
        )

    async def answer(self, group: str, accept: bool) -> None:
        gid = self.find(group, invited=True).gid
        await self.client.control.request("group_answer", pb.GroupAnswer(group=gid, accept=accept))

    async def leave(self, group: str) -> None:
        gid = self.find(group, invited=True).gid
        await self.client.control.request("group_leave", pb.GroupLeave(group=gid))

    async def remove(self, group: str, user: str) -> None:
        await self.client.control.request(
            "group_remove", pb.GroupRemove(group=self.find(group).gid, username=user)
        )

    async def rename(self, group: str, name: str) -> None:
        await self.client.control.request(
            "group_rename", pb.GroupRename(group=self.find(group).gid, name=name)
        )

    async def set_role(self, group: str, user: str, role: str) -> None:
        roles = {n: r for r, n in ROLE_NAMES.items() if n != "invited"}
        if role not in roles:
            raise GroupError("a role is owner, admin or member")
        req = pb.GroupSetRole(group=self.find(group).gid, username=user, role=roles[role])
        await self.client.control.request("group_set_role", req)

    async def delete(self, group: str) -> None:
        await self.client.control.request("group_delete", pb.GroupDelete(group=self.find(group).gid))

    async def refresh(self) -> list[GroupRow]:
        """What the server says our groups are now (also pins the members' keys)."""
        reply = await self.client.control.request("group_list", pb.GroupListRequest())
        listed = {info.group: self._apply(info) for info in reply.groups.groups}
        for row in self.store.groups():
            if row.gid not in listed and row.role != "gone":
                self.store.gone(row.gid)
        return self.store.groups()

    async def counts(self, group: str, msg_ids: list[bytes]) -> dict[bytes, tuple[int, int, int]]:
        """For our posts ``msg_ids`` in ``group``: (members it was kept for, delivered to, read by)."""
        req = pb.GroupCountsRequest(group=self.find(group).gid, msg_ids=msg_ids)
        reply = await self.client.control.request("group_counts", req)
        return {c.msg_id: (c.members, c.delivered, c.read) for c in reply.counts.counts}

    async def mark_read(self, gid: bytes, msg_ids: list[bytes]) -> None:
        """Tell the server we have shown these posts (their senders see "read by")."""
        await self.client.control.request("group_read", pb.GroupRead(group=gid, msg_ids=msg_ids))

    def find(self, name: str, invited: bool = False) -> GroupRow:
        """A group by ``#name``, name or id (hex prefix) among ours."""
        want = name.removeprefix("#")
        hits = self.store.named(name)
        if len(hits) == 1 and hits[0].role == "invited" and not invited:
            raise GroupError(f"you are invited to #{hits[0].name}, not in it yet: p2pim group accept {want}")
        if len(hits) != 1:
            what = "no group" if not hits else f"{len(hits)} groups"
            raise GroupError(f"{what} called {name!r} (p2pim group list)")
        return hits[0]

    # -- sending -------------------------------------------------------------------------

    async def send(self, group: str, text: str) -> bytes:
        """Seal ``text`` for the group and queue it (our key first to whoever lacks it)."""
        row = self.find(group)
        try:
            body = text_body(text)
        except ValueError as exc:
            raise GroupError(str(exc)) from None
        epoch, key = self._my_key(row.gid, rotate=False)
        body.msg_id = new_msg_id()
        env = gseal.seal(self.client.profile.identity, self.me, row.gid, epoch, key, body)
        item = ("post", row.gid.hex(), env.msg_id, env.SerializeToString())
        self.store.queue([item], (env.msg_id, gseal.label(row.gid), text, env.sent_at_ms))
        self._wake.set()
        return env.msg_id

    def _my_key(self, gid: bytes, rotate: bool) -> tuple[int, bytes]:
        """Our sender key for ``gid``, handed to every member who lacks it. A new one (a new
        epoch) if we have none, if ``rotate``, or if anyone who got the current one is no
        longer a member: whoever is out never holds the key of what follows, also when we
        learn of it only now (a one-shot command after a removal)."""
        members = {m for m, role in self.store.members(gid).items() if role != "invited" and m != self.me}
        current = self.store.current_key(gid, self.me)
        if current is not None and not rotate:
            epoch, key = current
            given = self.store.given(gid, self.me, epoch)
            if given <= members:
                self._give_key(gid, sorted(members - given), epoch, key)  # newcomers
                return current
        epoch, key = (current[0] + 1 if current else 1), gseal.new_key()
        self.store.add_key(gid, self.me, epoch, key)
        self._give_key(gid, sorted(members), epoch, key)
        return epoch, key

    def _give_key(self, gid: bytes, to: list[str], epoch: int, key: bytes) -> None:
        items, given = [], set()
        for member in to:
            contact = self.client.store.contact(member)
            if member == self.me or contact is None or contact.offered_key is not None:
                continue  # a changed key is not trusted with ours until the user says so
            body = epb.Body(group_key=epb.GroupKey(group=gid, epoch=epoch, key=key))
            env = seal(self.client.profile.identity, self.me, member, contact.identity_key, body)
            items.append(("store", member, env.msg_id, env.SerializeToString()))
            given.add(member)
        if items:
            self.store.queue(items)
            self.store.give(gid, self.me, epoch, given)
            self._wake.set()

    def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        self._wake.set()

    async def close(self) -> None:
        self._closed = True  # also ends the loop if a cancel is swallowed (3.11's wait_for can)
        if self._flusher is not None:
            self._flusher.cancel()
            self._wake.set()
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def _flush(self) -> None:
        """Hand the group outbox to the server, in order, each item until it is taken."""
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            for item in self.store.outgoing():
                if self._closed or not await self._hand_over(item):
                    break

    async def _hand_over(self, item: Outgoing) -> bool:
        """True when the item is done with (taken, or refused for good)."""
        while True:
            try:
                if item.kind == "store":
                    req: Any = pb.Store(to=item.target, msg_id=item.msg_id, envelope=item.envelope)
                    await self.client.control.request("store", req)
                else:
                    req = pb.GroupPost(
                        group=bytes.fromhex(item.target), msg_id=item.msg_id, envelope=item.envelope
                    )
                    await self.client.control.request("group_post", req)
            except Unreachable:
                return False  # at the next login (start() wakes us)
            except ClientError as exc:
                if exc.code == pb.RATE_LIMITED:
                    await asyncio.sleep(max(0.05, exc.retry_after_ms / 1000))
                    continue
                self.store.sent(item, "failed")  # not a member any more, no such user: for good
                self.client._emit_problem(f"a group message could not be sent: {exc}")
                self._settle(item, "failed")
                return True
            self.store.sent(item)
            self._settle(item, "stored")
            return True

    def _settle(self, item: Outgoing, state: str) -> None:
        waiter = self._waiting.pop(item.msg_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(state)

    async def wait_sent(self, msg_id: bytes, timeout: float) -> str | None:
        """ "stored" once the server keeps our post for every member, "failed", or None (not yet)."""
        row = self.client.store.message(msg_id)
        if row is not None and row.state in ("stored", "failed"):
            return row.state
        waiter = self._waiting.setdefault(msg_id, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return None

    # -- what the server brings ----------------------------------------------------------

    def on_stored(self, store_id: int, sender: str, data: bytes) -> bool | None:
        """A group item from the offline stream: True taken (ack), None hold it (keep), False
        unreadable for good (ack all the same). A session without an inbox (a one-shot
        command) applies events but keeps them and messages for the session that shows them."""
        if not sender:
            taken = self._on_event(data)
            return None if taken and not self.client.inbox else taken
        if not self.client.inbox:
            return None
        try:
            env = parse_envelope(data)
        except EnvelopeError:
            self.client.counters["group_bad"] += 1
            return False
        return self._on_message(store_id, sender, env)

    def _on_event(self, data: bytes) -> bool:
        try:
            ev = pb.GroupEvent.FromString(data)
        except Exception:
            self.client.counters["group_bad"] += 1
            return False
        known = self.store.group(ev.group)
        kind = EVENT_NAMES.get(ev.kind, "?")
        fresh = known is None or ev.seq > known.seq or known.role == "gone"  # else a refresh got ahead
        if ev.kind == pb.GroupEvent.DELETED or (ev.kind in OUT and ev.subject == self.me):
            self.store.gone(ev.group)
            row = self.store.group(ev.group)
        else:
            row = self._apply(ev.info) if fresh else known
            if row is not None and row.active and ev.kind in (*OUT, pb.GroupEvent.JOINED):
                # Someone is out: a new key they never see, for those who remain; someone is
                # in: our key for them (we are: ours for everyone). _my_key sees which.
                self._my_key(ev.group, rotate=False)
        name = row.name if row is not None else ev.info.name
        if self.client.inbox:
            self.client._emit(GroupChange(name, ev.group, kind, ev.actor, ev.subject, ev.seq))
        return True

    def _apply(self, info: pb.GroupInfo) -> GroupRow:
        for m in info.members:
            if m.username != self.me:
                self.client._see_key(m.username, m.identity_key)
        return self.store.apply(info, self.me)

    def _on_message(self, store_id: int, sender: str, env: epb.Envelope) -> bool | None:
        row = self.store.group(env.group)
        contact = self.client.store.contact(sender)
        if row is None or env.sender != sender or contact is None:
            self.client.counters["group_bad"] += 1
            return False
        try:
            gseal.verify(env, contact.identity_key)
        except gseal.GroupSealError:
            self.client.counters["group_bad"] += 1
            return False
        key = self.store.key(env.group, sender, env.epoch)
        if key is None:
            self._hold(store_id, sender, env)
            return None
        try:
            body = gseal.open_body(env, key)
        except gseal.GroupSealError:
            self.client.counters["group_bad"] += 1
            return False
        if body.WhichOneof("kind") != "text":
            return True
        text = body.text.text
        now_ms = int(time.time() * 1000)
        if self.client.store.add_incoming(
            env.msg_id, gseal.label(env.group), text, env.sent_at_ms, now_ms, sender
        ):
            self.client._emit(GroupMessage(row.name, env.group, sender, text, env.msg_id, env.sent_at_ms))
        return True

    def _hold(self, store_id: int, sender: str, env: epb.Envelope) -> None:
        self._held[store_id] = (sender, env)
        if len(self._held) > MAX_HELD:
            self._held.popitem(last=False)  # stays on the server: it comes again at the next login
        ask = (env.group, sender, env.epoch)
        contact = self.client.store.contact(sender)
        if contact is not None and contact.offered_key is None and not seen(self._asked, ask, MAX_HELD):
            # "send me your key" (a GroupKey with no key), once per key we lack
            body = epb.Body(group_key=epb.GroupKey(group=env.group, epoch=env.epoch))
            env_out = seal(self.client.profile.identity, self.me, sender, contact.identity_key, body)
            self.store.queue([("store", sender, env_out.msg_id, env_out.SerializeToString())])
            self._wake.set()

    def on_key(self, peer: str, key: epb.GroupKey) -> None:
        """A member's sender key (or, with no key, their request for ours), pairwise."""
        row = self.store.group(key.group)
        if row is None or not row.active or peer not in self.store.members(key.group):
            self.client.counters["group_bad"] += 1
            return
        if not key.key:  # "send me yours": once more, if they are a member
            mine = self.store.current_key(key.group, self.me)
            if mine is not None and self.store.members(key.group).get(peer) not in (None, "invited"):
                self._give_key(key.group, [peer], *mine)
            return
        if len(key.key) != gseal.KEY_SIZE:
            self.client.counters["group_bad"] += 1
            return
        self.store.add_key(key.group, peer, key.epoch, key.key)
        done = []
        for store_id, (sender, env) in list(self._held.items()):
            if sender == peer and env.group == key.group and env.epoch == key.epoch:
                del self._held[store_id]
                if self._on_message(store_id, sender, env) is not None:
                    done.append(store_id)
        if done:
            self.client.control.post(
                pb.Frame(id=self.client.control.take_id(), offline_ack=pb.OfflineAck(store_ids=done))
            )
