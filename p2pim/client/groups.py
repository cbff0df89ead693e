"""Groups for the internet client: membership through the rendezvous, messages sealed
with sender keys and ordered by :class:`p2pim.groups.core.GroupCore`, fanned out by the
server, and sent straight to members we have a direct path to.

What arrives comes in the client's one ordered offline stream (each member's copy,
``OfflineEnvelope.group`` set): membership events (empty sender) are applied, then
acknowledged; group messages are shown once (the core verifies, opens and dedupes them),
then acknowledged. One whose key has not come yet is held (acknowledged as "keep", so
the server's window moves on) and shown when the key arrives.

What we send goes through the group outbox, in order, each item until the server took
it: first our sender key for each member who lacks it (a pairwise envelope into the
offline store), then the post. The server stores both for each member in that order, so
a member reads the key before the message. The moment an item is queued it also goes
straight to each member we have a direct path to (one UDP datagram, no retry: the
server's copy is the one that cannot be lost); the member shows it at once if it is
next in our order, and drops the server's copy later as a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..groups.core import GroupCore, GroupError
from ..groups.seal import label
from ..groups.store import ROLE_NAMES, GroupRow, GroupStore, Item, Outgoing
from ..messaging.envelope import EnvelopeError, parse_envelope
from ..wire import control_pb2 as pb
from ..wire import envelope_pb2 as epb
from .control import ClientError, Unreachable

if TYPE_CHECKING:
    from .facade import Client

log = logging.getLogger(__name__)
__all__ = ["GroupError", "Groups"]


class Groups:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.store = GroupStore(client.store.conn)
        self.core = GroupCore(
            client.profile.identity, "", self.store, client.store,
            see_key=client._see_key, counters=client.counters, inbox=client.inbox,
        )  # fmt: skip
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._waiting: dict[bytes, asyncio.Future[str]] = {}  # post msg_id -> its fate
        self._closed = False
        for name in ("group_direct_out", "group_direct_in"):
            client.counters.setdefault(name, 0)

    @property
    def me(self) -> str:
        return self.client.username

    # -- asking the server ---------------------------------------------------------------

    async def create(self, name: str, invite: Sequence[str] = ()) -> GroupRow:
        reply = await self.client.control.request(
            "group_create", pb.GroupCreate(name=name, invite=list(invite))
        )
        return self.core.apply(reply.group)

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
        listed = {info.group: self.core.apply(info) for info in reply.groups.groups}
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
        """We have shown these posts: read here, and the server told (their senders see
        "read by"; if it cannot be told now, they are read here all the same)."""
        self.client.store.mark_read(msg_ids)
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
        env = self.core.post(row.gid, text)
        self._pump()
        self.client.copy_to_devices(
            label(row.gid), True, text, env.msg_id, env.sent_at_ms
        )  # our other devices
        return env.msg_id

    def _pump(self) -> None:
        """After the core acted: its events to the user; what it queued to the flusher and,
        at once, to each member with a direct path."""
        while (ev := self.core.next_event()) is not None:
            self.client._emit(ev)
        queued = self.core.take_queued()
        if queued:
            self._wake.set()
            self._send_direct(queued)

    def _send_direct(self, items: list[Item]) -> None:
        paths = self.client.paths
        if paths is None:
            return
        for kind, target, _msg_id, data in items:
            if kind == "store":
                to = [target]
            else:
                to = sorted(self.core.active_members(bytes.fromhex(target)) - {self.me})
            for member in to:
                if paths.send_direct(member, data):  # False: no direct path to them now
                    self.client.counters["group_direct_out"] += 1

    def wake(self) -> None:
        """Something was queued: hand it over."""
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
        try:
            if not sender:
                taken = self.core.event(data)
                return None if taken and not self.client.inbox else taken
            if not self.client.inbox:
                return None
            try:
                env = parse_envelope(data)
            except EnvelopeError:
                self.client.counters["group_bad"] += 1
                return False
            if env.sender != sender:  # the server vouches for who stored it
                self.client.counters["group_bad"] += 1
                return False
            return self.core.receive(env, store_id)
        finally:
            self._pump()

    def on_direct(self, env: epb.Envelope) -> None:
        """A member's message straight from them (a mutual buddy on the direct path)."""
        if not self.client.inbox:
            return  # the session that shows messages gets the server's copy
        self.client.counters["group_direct_in"] += 1
        self.core.receive(env)
        self._pump()

    def on_key(self, peer: str, key: epb.GroupKey) -> None:
        """A member's sender key (or their request for ours), pairwise."""
        done = self.core.on_key(peer, key)
        self._pump()
        if done:
            self.client.control.post(
                pb.Frame(id=self.client.control.take_id(), offline_ack=pb.OfflineAck(store_ids=done))
            )
