"""The rendezvous's group rules without sockets: who may do what, the bounds, the order."""

from __future__ import annotations

import pytest

from p2pim.messaging.ids import new_msg_id
from p2pim.wire import control_pb2 as pb

from .test_hub import World

NAMES = ["alice", "bob", "carol", "mallory"]


def world(target: str, **limits: object) -> tuple[World, dict[str, object]]:
    w = World(target, **limits)
    for n in NAMES:
        w.account(n)
    for n in ("bob", "carol"):
        w.buddies("alice", n)
    return w, {n: w.login(n) for n in NAMES}


def code(reply: pb.Frame) -> int:
    return reply.error.code if reply.WhichOneof("body") == "error" else 0


def team(w: World, s: dict[str, object]) -> bytes:
    reply = w.request(s["alice"], group_create=pb.GroupCreate(name="team", invite=["bob", "carol"]))
    gid = reply.group.group
    for n in ("bob", "carol"):
        assert code(w.request(s[n], group_answer=pb.GroupAnswer(group=gid, accept=True))) == 0
    return gid


def post(w: World, s: object, gid: bytes, size: int = 100) -> pb.Frame:
    return w.request(s, group_post=pb.GroupPost(group=gid, msg_id=new_msg_id(), envelope=b"g" * size))


def stored(w: World, s: object) -> list[pb.OfflineEnvelope]:
    return [f.offline_envelope for f in w.frames(s) if f.HasField("offline_envelope")]


def test_membership_changes_are_ordered_events_for_each_member_and_posts_reach_members_only(
    store_target: str,
) -> None:
    w, s = world(store_target)
    gid = team(w, s)
    for n in ("alice", "bob", "carol"):
        events = [pb.GroupEvent.FromString(e.envelope) for e in stored(w, s[n]) if not e.sender]
        seqs = [e.seq for e in events]
        assert seqs == sorted(seqs) and events[-1].seq == 5, n  # created, 2 invited, 2 joined
    assert code(post(w, s["bob"], gid)) == 0
    got = {n: [e for e in stored(w, s[n]) if e.sender] for n in NAMES}
    assert [len(got[n]) for n in NAMES] == [1, 0, 1, 0]  # not to the sender, not to strangers
    assert got["alice"][0].group == gid and got["alice"][0].sender == "bob"


def test_what_each_role_may_not_do(store_target: str) -> None:
    w, s = world(store_target)
    gid = team(w, s)
    assert code(post(w, s["mallory"], gid)) == pb.NOT_A_MEMBER  # a stranger
    assert code(w.request(s["mallory"], group_list=pb.GroupListRequest())) == 0
    assert not w.request(s["mallory"], group_list=pb.GroupListRequest()).groups.groups  # sees none
    assert (
        code(w.request(s["bob"], group_remove=pb.GroupRemove(group=gid, username="carol"))) == pb.NOT_ALLOWED
    )
    assert code(w.request(s["bob"], group_rename=pb.GroupRename(group=gid, name="x"))) == pb.NOT_ALLOWED
    assert code(w.request(s["bob"], group_delete=pb.GroupDelete(group=gid))) == pb.NOT_ALLOWED
    assert (
        code(w.request(s["alice"], group_remove=pb.GroupRemove(group=gid, username="alice")))
        == pb.NOT_ALLOWED
    )
    assert code(w.request(s["alice"], group_leave=pb.GroupLeave(group=gid))) == pb.NOT_ALLOWED  # the owner
    # invitations go to one's buddies only; the invited neither post nor read
    assert (
        code(w.request(s["alice"], group_invite=pb.GroupInvite(group=gid, username="mallory")))
        == pb.NOT_A_BUDDY
    )
    w.buddies("alice", "mallory")
    assert code(w.request(s["alice"], group_invite=pb.GroupInvite(group=gid, username="mallory"))) == 0
    assert code(post(w, s["mallory"], gid)) == pb.NOT_A_MEMBER
    assert code(w.request(s["carol"], group_answer=pb.GroupAnswer(group=gid, accept=True))) == pb.NOT_A_MEMBER
    # garbage ids and sizes
    assert code(post(w, s["bob"], b"\0" * 8)) == pb.NOT_A_MEMBER
    assert code(post(w, s["bob"], b"short")) == pb.NOT_A_MEMBER
    assert code(post(w, s["bob"], gid, size=70_000)) == pb.BAD_REQUEST
    assert code(w.request(s["alice"], group_create=pb.GroupCreate(name=""))) == pb.BAD_REQUEST
    assert code(w.request(s["alice"], group_create=pb.GroupCreate(name="x" * 65))) == pb.BAD_REQUEST


def test_a_removed_member_is_told_gets_nothing_more_and_loses_what_waited(store_target: str) -> None:
    w, s = world(store_target)
    gid = team(w, s)
    stored(w, s["carol"])
    w.hub.disconnect(s["carol"], w.now)  # carol is away: two posts wait for her
    for _ in range(2):
        assert code(post(w, s["bob"], gid)) == 0
    carol = w.db.user("carol")
    assert carol is not None and len([e for e in w.db.pending_offline(carol.id) if e.sender]) == 2
    assert code(w.request(s["alice"], group_remove=pb.GroupRemove(group=gid, username="carol"))) == 0
    left = w.db.pending_offline(carol.id)
    assert not [e for e in left if e.sender]  # the posts that waited for her are gone
    assert pb.GroupEvent.FromString(left[-1].envelope).kind == pb.GroupEvent.REMOVED  # she is told
    assert code(post(w, s["bob"], gid)) == 0
    assert w.db.pending_offline(carol.id) == left  # and nothing more comes
    # co-members may reach each other pairwise (sender keys go that way); former ones may not
    assert code(w.request(s["bob"], store=pb.Store(to="alice", msg_id=new_msg_id(), envelope=b"k"))) == 0
    assert (
        code(w.request(s["bob"], store=pb.Store(to="carol", msg_id=new_msg_id(), envelope=b"k")))
        == pb.NOT_A_BUDDY
    )


@pytest.mark.parametrize("cap", [3])
def test_the_member_cap_and_the_post_rate(cap: int, store_target: str) -> None:
    w, s = world(store_target, group_max_members=cap, group_post_rate=1.0, group_post_burst=3)
    w.buddies("alice", "mallory")
    gid = team(w, s)  # alice, bob, carol: full
    assert (
        code(w.request(s["alice"], group_invite=pb.GroupInvite(group=gid, username="mallory")))
        == pb.GROUP_FULL
    )
    codes = [code(post(w, s["bob"], gid)) for _ in range(5)]
    assert codes == [0, 0, 0, pb.RATE_LIMITED, pb.RATE_LIMITED]
    w.now += 1.0
    assert code(post(w, s["bob"], gid)) == 0  # the bucket refills


def test_a_sender_sees_how_many_members_took_its_post(store_target: str) -> None:
    w, s = world(store_target)
    gid = team(w, s)
    for n in NAMES:
        stored(w, s[n])
    msg_id = new_msg_id()
    assert code(w.request(s["bob"], group_post=pb.GroupPost(group=gid, msg_id=msg_id, envelope=b"x"))) == 0
    copies = {n: stored(w, s[n]) for n in ("alice", "carol")}
    w.request(s["carol"], offline_ack=pb.OfflineAck(store_ids=[e.store_id for e in copies["carol"]]))

    def counts(who: str) -> list[tuple[int, int, int]]:
        reply = w.request(s[who], group_counts=pb.GroupCountsRequest(group=gid, msg_ids=[msg_id]))
        return [(c.members, c.delivered, c.read) for c in reply.counts.counts]

    assert counts("bob") == [(2, 1, 0)]  # kept for alice and carol; carol's client took it
    assert counts("alice") == []  # not hers: a member sees only how far their own posts went
    w.request(s["alice"], offline_ack=pb.OfflineAck(store_ids=[e.store_id for e in copies["alice"]]))
    for _ in range(3):  # carol read it (once, however often she says so); bob's own word does not count
        assert code(w.request(s["carol"], group_read=pb.GroupRead(group=gid, msg_ids=[msg_id]))) == 0
    assert code(w.request(s["bob"], group_read=pb.GroupRead(group=gid, msg_ids=[msg_id]))) == 0
    assert (
        code(w.request(s["mallory"], group_read=pb.GroupRead(group=gid, msg_ids=[msg_id]))) == pb.NOT_A_MEMBER
    )
    assert counts("bob") == [(2, 2, 1)]


def test_groups_per_user_are_bounded_invitations_included(store_target: str) -> None:
    w, s = world(store_target, group_max_per_user=2)
    create = pb.GroupCreate
    assert code(w.request(s["alice"], group_create=create(name="one", invite=["bob"]))) == 0
    assert code(w.request(s["alice"], group_create=create(name="two"))) == 0
    full = w.request(s["alice"], group_create=create(name="three"))
    assert code(full) == pb.GROUP_FULL and "2 groups" in full.error.message
    # bob is invited to one; a buddy's invitations count, so he can be filled up to the cap only
    assert code(w.request(s["carol"], group_create=create(name="c1", invite=["alice"]))) == pb.GROUP_FULL
    gid = w.request(s["carol"], group_create=create(name="c2")).group.group
    w.buddies("carol", "bob")
    assert code(w.request(s["carol"], group_invite=pb.GroupInvite(group=gid, username="bob"))) == 0
    third = w.request(s["carol"], group_create=create(name="c3", invite=["bob"]))
    assert code(third) == pb.GROUP_FULL and "bob is in 2 groups" in third.error.message
