"""Groups on the rendezvous: membership, its ordered events, and the fan-out of what
members post (issue 15). The hub's request handlers for ``group_*`` frames.

Membership is the server's: who is in a group, with which role (owner, admin, member,
or invited), changed only by requests the asker's role allows. Every change is an event
with the group's next ``seq``, written for each member it concerns into the offline
store (empty sender, ``grp`` set) in the same transaction as the change, and pushed
from there; so a member gets events and messages in one order, exactly once, whether
online or not. What members say is sealed end to end by its sender (one copy, a sender
key; :mod:`p2pim.groups`): a post is stored once per member but the sender, committed
before the Ok, and pushed to those online. The server never holds a key.

Rules: only members (not the invited) post and see who is in; invitations go to the
asker's buddies; at most ``Limits.group_max_members`` (invited included) per group and
``group_max_per_user`` groups (invitations included) per user; posts are
metered per member (``group_post_rate``); a member whose offline store is full misses
that post (counted) rather than blocking the others; a member who leaves or is removed
is sent nothing more, and what waited for them in the group is dropped.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from p2pim.groups.store import ROLE_NAMES
from p2pim.ratelimit import RateLimiter
from p2pim.wire import control_pb2 as pb
from p2pim.wire.limits import ID_SIZE, MAX_ENVELOPE

from .db import Group, Member, User
from .errors import RequestError

if TYPE_CHECKING:
    from .hub import Hub, Session

GID_SIZE = 8
MAX_NAME = 64
MAX_COUNTS = 200  # message ids in one counts request
ROLES = {name: role for role, name in ROLE_NAMES.items()}
EV = pb.GroupEvent


class GroupHandlers:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.db = hub.db
        lim = hub.limits
        self._posts = RateLimiter(lim.group_post_rate, lim.group_post_burst)
        self._touched: set[str] = set()  # users the current change stored something for

    def handlers(self) -> dict[str, object]:
        return {
            "group_create": self.create,
            "group_invite": self.invite,
            "group_answer": self.answer,
            "group_leave": self.leave,
            "group_remove": self.remove,
            "group_rename": self.rename,
            "group_set_role": self.set_role,
            "group_delete": self.delete,
            "group_list": self.listing,
            "group_post": self.post,
            "group_counts": self.counts,
            "group_read": self.read,
        }

    # -- requests -----------------------------------------------------------------------

    def create(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        req = frame.group_create
        name = _name(req.name)
        invitees = [self._invitee(session, n) for n in dict.fromkeys(req.invite)]
        for user_id, who in [(session.user_id, "you are"), *((o.id, f"{o.username} is") for o in invitees)]:
            self._room_for(user_id, who)
        if len(invitees) + 1 > self.hub.limits.group_max_members:
            raise RequestError(
                pb.GROUP_FULL, f"a group has at most {self.hub.limits.group_max_members} members"
            )
        with self.db.transaction():
            group = self.db.add_group(os.urandom(GID_SIZE), name, _ms(now))
            self.db.set_member(group.id, session.user_id, "owner")
            self._event(group, EV.CREATED, session.username, session.username, now)
            for other in invitees:
                self.db.set_member(group.id, other.id, "invited")
                self._event(group, EV.INVITED, session.username, other.username, now, also=[other])
        self._pump()
        return pb.Frame(group=self._info(self._group(group.gid)))

    def invite(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        req = frame.group_invite
        group, me = self._membership(session, req.group)
        other = self._invitee(session, req.username)
        members = self.db.members(group.id)
        if any(m.user_id == other.id for m in members):
            return pb.Frame(ok=pb.Ok())  # in already (or invited): nothing changes
        if len(members) >= self.hub.limits.group_max_members:
            raise RequestError(
                pb.GROUP_FULL, f"a group has at most {self.hub.limits.group_max_members} members"
            )
        self._room_for(other.id, f"{other.username} is")
        with self.db.transaction():
            self.db.set_member(group.id, other.id, "invited")
            self._event(group, EV.INVITED, me.username, other.username, now, also=[other])
        self._pump()
        return pb.Frame(ok=pb.Ok())

    def answer(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        req = frame.group_answer
        group = self._group(req.group)
        me = self._member(group, session.user_id)
        if me is None or me.role != "invited":
            raise RequestError(pb.NOT_A_MEMBER, "you were not invited to that group")
        with self.db.transaction():
            self.db.set_member(group.id, me.user_id, "member" if req.accept else None)
            kind = EV.JOINED if req.accept else EV.DECLINED
            self._event(group, kind, me.username, me.username, now, also=[me])
        self._pump()
        return pb.Frame(ok=pb.Ok())

    def leave(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        group, me = self._membership(session, frame.group_leave.group, invited_ok=True)
        others = [m for m in self.db.members(group.id) if m.user_id != me.user_id and m.role != "invited"]
        if me.role == "owner" and others:
            raise RequestError(pb.NOT_ALLOWED, "make another member the owner first (group role ... owner)")
        self._out(group, me, EV.LEFT, me.username, now)
        return pb.Frame(ok=pb.Ok())

    def remove(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        req = frame.group_remove
        group, me = self._membership(session, req.group)
        other = next((m for m in self.db.members(group.id) if m.username == req.username), None)
        if other is None:
            raise RequestError(pb.NOT_A_MEMBER, f"{req.username} is not in that group")
        if me.role not in ("owner", "admin") or other.role == "owner" or (me.role == other.role):
            raise RequestError(
                pb.NOT_ALLOWED, f"your role ({me.role}) cannot remove {other.username} ({other.role})"
            )
        self._out(group, other, EV.REMOVED, me.username, now)
        return pb.Frame(ok=pb.Ok())

    def rename(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        req = frame.group_rename
        group, me = self._membership(session, req.group, roles=("owner", "admin"))
        with self.db.transaction():
            self.db.rename_group(group.id, _name(req.name))
            self._event(self._group(group.gid), EV.RENAMED, me.username, me.username, now)
        self._pump()
        return pb.Frame(ok=pb.Ok())

    def set_role(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        req = frame.group_set_role
        group, me = self._membership(session, req.group, roles=("owner",))
        other = next((m for m in self.db.members(group.id) if m.username == req.username), None)
        if other is None or other.role == "invited" or other.user_id == me.user_id:
            raise RequestError(pb.NOT_A_MEMBER, f"{req.username} is not another member of that group")
        role = ROLE_NAMES.get(req.role)
        if role in (None, "invited"):
            raise RequestError(pb.BAD_REQUEST, "a role is owner, admin or member")
        with self.db.transaction():
            self.db.set_member(group.id, other.user_id, role)
            if role == "owner":  # handed over: the old owner stays, as an admin
                self.db.set_member(group.id, me.user_id, "admin")
            self._event(group, EV.ROLE, me.username, other.username, now)
        self._pump()
        return pb.Frame(ok=pb.Ok())

    def delete(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        group, me = self._membership(session, frame.group_delete.group, roles=("owner",))
        with self.db.transaction():
            self.hub.counters.offline_dropped += self.db.drop_group_messages(group.gid)
            self._event(group, EV.DELETED, me.username, me.username, now, invited_too=True)
            self.db.delete_group(group.id)
        self._pump()
        return pb.Frame(ok=pb.Ok())

    def listing(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        return pb.Frame(
            groups=pb.GroupList(groups=[self._info(g) for g in self.db.groups_of(session.user_id)])
        )

    def post(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        req = frame.group_post
        group, me = self._membership(session, req.group)
        if len(req.envelope) > MAX_ENVELOPE or len(req.msg_id) != ID_SIZE:
            raise RequestError(
                pb.BAD_REQUEST, f"envelopes are at most {MAX_ENVELOPE} bytes with a {ID_SIZE}-byte id"
            )
        if not self._posts.allow(session.username, now):
            self.hub.counters.requests_throttled += 1
            raise RequestError(
                pb.RATE_LIMITED, "too many group messages; slow down", int(1000 / self._posts.rate)
            )
        lim, more = self.hub.limits, len(req.envelope)
        others = {
            m.user_id: m.username
            for m in self.db.members(group.id)
            if m.user_id != me.user_id and m.role != "invited"
        }
        with self.db.transaction():
            to = []
            for user_id, usage in self.db.offline_usages(list(others), me.username).items():
                if lim.offline_refusal(usage, more, others[user_id]) is not None:
                    self.hub.counters.group_quota_skipped += 1
                else:
                    to.append(user_id)
            added = (
                self.db.store_post(to, me.username, req.msg_id, req.envelope, _ms(now), group.gid)
                if to
                else []
            )
        self.hub.counters.group_stored += len(added)
        self._touched.update(others[u] for u in added)
        self.hub.counters.group_posts += 1
        self._pump()
        return pb.Frame(ok=pb.Ok())

    def counts(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        req = frame.group_counts
        group, me = self._membership(session, req.group)
        if len(req.msg_ids) > MAX_COUNTS:
            raise RequestError(pb.BAD_REQUEST, f"at most {MAX_COUNTS} message ids at once")
        self.hub.flush_acks()  # what was acknowledged so far counts
        found = self.db.post_counts(group.gid, me.username, list(req.msg_ids))
        counts = [pb.GroupCount(msg_id=m, members=c, delivered=d, read=r) for m, (c, d, r) in found.items()]
        return pb.Frame(counts=pb.GroupCounts(counts=counts))

    def read(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        req = frame.group_read
        group, me = self._membership(session, req.group)
        if len(req.msg_ids) > MAX_COUNTS:
            raise RequestError(pb.BAD_REQUEST, f"at most {MAX_COUNTS} message ids at once")
        self.db.mark_read(group.gid, me.user_id, list(req.msg_ids))
        return pb.Frame(ok=pb.Ok())

    # -- helpers ------------------------------------------------------------------------

    def _out(self, group: Group, who: Member, kind: int, actor: str, now: float) -> None:
        """``who`` leaves the group (or is removed): told, and nothing of it waits for them."""
        with self.db.transaction():
            self.hub.counters.offline_dropped += self.db.drop_group_messages(group.gid, who.user_id)
            self.db.set_member(group.id, who.user_id, None)
            if not self.db.members(group.id):
                self._event(group, EV.DELETED, actor, who.username, now, also=[who])
                self.db.delete_group(group.id)
            else:
                self._event(group, kind, actor, who.username, now, also=[who])
        self._pump()

    def _event(
        self, group: Group, kind: int, actor: str, subject: str, now: float,
        also: list[Member | User] | None = None, invited_too: bool = False,
    ) -> None:  # fmt: skip
        """The group's next event, stored for every member (and ``also``) in this transaction."""
        seq = self.db.next_seq(group.id)
        members = self.db.members(group.id)
        event = pb.GroupEvent(
            group=group.gid, seq=seq, kind=kind, actor=actor, subject=subject, at_ms=_ms(now),  # type: ignore[arg-type]
            info=self._info(self._group(group.gid), members),
        )  # fmt: skip
        data = event.SerializeToString()
        targets = {(m.user_id, m.username) for m in members if invited_too or m.role != "invited"}
        targets |= {
            (u.user_id, u.username) if isinstance(u, Member) else (u.id, u.username) for u in also or ()
        }
        msg_id = group.gid + seq.to_bytes(ID_SIZE - GID_SIZE, "big")
        for user_id, _ in targets:
            self.db.store_offline(user_id, "", msg_id, data, _ms(now), group.gid)
        self.hub.counters.group_events += 1
        self._touched.update(name for _, name in targets)

    def _pump(self) -> None:
        """Push what the last change stored to its recipients who are online."""
        touched, self._touched = self._touched, set()
        self.hub.pump_users(touched)

    def _info(self, group: Group, members: list[Member] | None = None) -> pb.GroupInfo:
        listed = [
            pb.GroupMember(username=m.username, identity_key=m.identity_key, role=ROLES[m.role])
            for m in (self.db.members(group.id) if members is None else members)
        ]
        return pb.GroupInfo(group=group.gid, name=group.name, seq=group.seq, members=listed)

    def _group(self, gid: bytes) -> Group:
        group = self.db.group(gid) if len(gid) == GID_SIZE else None
        if group is None:
            raise RequestError(pb.NOT_A_MEMBER, "no such group (or not yours)")
        return group

    def _member(self, group: Group, user_id: int) -> Member | None:
        return next((m for m in self.db.members(group.id) if m.user_id == user_id), None)

    def _membership(
        self, session: Session, gid: bytes, roles: tuple[str, ...] = ("owner", "admin", "member"),
        invited_ok: bool = False,
    ) -> tuple[Group, Member]:  # fmt: skip
        group = self._group(gid)
        me = self._member(group, session.user_id)
        if me is None or (me.role == "invited" and not invited_ok):
            raise RequestError(pb.NOT_A_MEMBER, "no such group (or not yours)")
        if me.role not in roles and not (invited_ok and me.role == "invited"):
            raise RequestError(pb.NOT_ALLOWED, f"your role ({me.role}) cannot do that")
        return group, me

    def _room_for(self, user_id: int, who: str) -> None:
        most = self.hub.limits.group_max_per_user
        if self.db.group_count(user_id) >= most:
            raise RequestError(pb.GROUP_FULL, f"{who} in {most} groups already (invitations included)")

    def _invitee(self, session: Session, name: str) -> User:
        other = self.hub._other(session, name)
        if name not in self.db.mutual_buddies(session.user_id):
            raise RequestError(pb.NOT_A_BUDDY, f"{name} is not your buddy: invite your buddies")
        return other


def _name(name: str) -> str:
    name = name.strip()
    if not 0 < len(name) <= MAX_NAME or any(ord(c) < 32 for c in name):
        raise RequestError(pb.BAD_REQUEST, f"a group name is 1-{MAX_NAME} printable characters")
    return name


def _ms(now: float) -> int:
    return int(now * 1000)
