"""The sender-key core on a fake clock, with the server played by a few lines here: a new
key after every membership change (whoever joins cannot open what came before, whoever
leaves what follows), direct copies shown in their sender's order (reordered, lost,
replayed, also after a restart), and a member who missed a key update asking for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pim.groups import seal as gseal
from p2pim.groups.core import GroupCore
from p2pim.groups.events import GroupMessage
from p2pim.groups.store import GroupStore
from p2pim.identity import Identity
from p2pim.messaging.envelope import open_envelope, parse_envelope
from p2pim.messaging.store import ClientStore
from p2pim.wire import control_pb2 as pb
from p2pim.wire import envelope_pb2 as epb

GID = os.urandom(8)
NOW_MS = 1_800_000_000_000


class Member:
    def __init__(self, name: str, root: Path, identity: Identity | None = None) -> None:
        self.name, self.root = name, root
        self.identity = identity or Identity.generate()
        self.contacts = ClientStore(root / f"{name}.db")
        self.core = GroupCore(
            self.identity, name, GroupStore(self.contacts.conn), self.contacts, clock_ms=lambda: NOW_MS
        )
        self.stream: list[tuple[int, str, bytes]] = []  # what the server keeps for us

    def restart(self) -> Member:
        self.contacts.close()
        return Member(self.name, self.root, self.identity)

    def shown(self) -> list[tuple[str, str, str]]:
        out = []
        while (ev := self.core.next_event()) is not None:
            if isinstance(ev, GroupMessage):
                out.append((ev.sender, ev.text, ev.via))
        return out


class Server:
    """Membership, the fan-out and each member's offline stream, as the rendezvous keeps them."""

    def __init__(self, members: dict[str, Member]) -> None:
        self.all = members
        self.roles: dict[str, int] = {}
        self.seq = 0
        self.store_ids = iter(range(1, 1_000_000))
        for m in members.values():
            for other in members.values():
                m.contacts.see_key(other.name, other.identity.public_key, NOW_MS)

    def set_members(self, names: list[str]) -> None:
        self.roles = {n: (pb.OWNER if i == 0 else pb.MEMBER) for i, n in enumerate(names)}
        self.seq += 1
        info = pb.GroupInfo(group=GID, name="team", seq=self.seq, members=[
            pb.GroupMember(username=n, identity_key=self.all[n].identity.public_key, role=r)
            for n, r in self.roles.items()
        ])  # fmt: skip
        for n in self.roles:
            self.all[n].core.apply(info)

    def flush(self, sender: Member, lose_keys_to: str = "") -> list[bytes]:
        """Take ``sender``'s outbox: keys into each member's stream, posts fanned out to
        current members. Returns the posts' bytes (what a direct copy would carry)."""
        posts = []
        for kind, target, _msg_id, data in sender.core.take_queued():
            if kind == "store":
                if target != lose_keys_to and target in self.roles:
                    self.all[target].stream.append((next(self.store_ids), sender.name, data))
            else:
                posts.append(data)
                for n in self.roles:
                    if n != sender.name:
                        self.all[n].stream.append((next(self.store_ids), sender.name, data))
        return posts

    def deliver(self, to: Member) -> dict[int, bool | None]:
        """Push ``to``'s stream (pairwise keys opened as the messaging core would)."""
        verdicts, stream, to.stream = {}, to.stream, []
        for store_id, sender, data in stream:
            env = parse_envelope(data)
            if env.group:
                verdicts[store_id] = to.core.receive(env, store_id)
            else:
                opened = open_envelope(to.identity, to.name, env, self.all[sender].identity.public_key)
                for done in to.core.on_key(sender, opened.body.group_key):
                    verdicts[done] = True
        return verdicts


@pytest.fixture
def net(tmp_path: Path) -> Iterator[tuple[Server, dict[str, Member]]]:
    members = {n: Member(n, tmp_path) for n in ("alice", "bob", "carol")}
    yield Server(members), members
    for m in members.values():
        m.contacts.close()


def post(server: Server, who: Member, text: str) -> bytes:
    who.core.post(GID, text)
    return server.flush(who)[0]


def test_a_new_key_after_every_membership_change_and_none_without(
    net: tuple[Server, dict[str, Member]],
) -> None:
    server, m = net
    alice, bob, carol = m["alice"], m["bob"], m["carol"]
    server.set_members(["alice", "bob"])
    first = parse_envelope(post(server, alice, "before carol"))
    second = parse_envelope(post(server, alice, "still before carol"))
    assert first.epoch == second.epoch  # no change, no new key
    server.deliver(bob)
    assert bob.shown() == [("alice", "before carol", "server"), ("alice", "still before carol", "server")]

    server.set_members(["alice", "bob", "carol"])  # carol joins
    joined = parse_envelope(post(server, alice, "welcome carol"))
    assert joined.epoch != first.epoch
    server.deliver(bob), server.deliver(carol)
    assert carol.shown() == [("alice", "welcome carol", "server")]
    assert carol.core.store.key(GID, "alice", first.epoch) is None  # what came before stays closed
    # asking for the old key is refused: alice's first key was not made for carol
    alice.core.on_key("carol", epb.GroupKey(group=GID, epoch=first.epoch))
    assert alice.core.take_queued() == [] and alice.core.counters["group_bad"] == 1

    server.set_members(["alice", "carol"])  # bob is removed
    after = parse_envelope(post(server, alice, "bob is gone"))
    assert after.epoch not in (first.epoch, joined.epoch)
    assert bob.stream == []  # the server gives him neither the key nor the post
    newest = alice.core.store.key(GID, "alice", after.epoch)
    held = [bob.core.store.key(GID, "alice", e) for e in (first.epoch, joined.epoch, after.epoch)]
    assert newest is not None and newest not in held and held[2] is None
    for old in held[:2]:  # with the post in hand, every key he holds fails
        with pytest.raises(gseal.GroupSealError):
            gseal.open_body(after, old or b"")
    server.deliver(carol)
    assert carol.shown() == [("alice", "bob is gone", "server")]
    assert alice.core.store.made_for(GID, "alice", after.epoch) == {"carol"}


def test_direct_copies_are_shown_in_the_senders_order_once(net: tuple[Server, dict[str, Member]]) -> None:
    server, m = net
    alice, bob = m["alice"], m["bob"]
    server.set_members(["alice", "bob", "carol"])
    copies = [parse_envelope(post(server, alice, f"m{i}")) for i in range(5)]
    bob.stream = [s for s in bob.stream if not parse_envelope(s[2]).group]
    server.deliver(bob)  # the key came (through the server, or directly)
    for i in (2, 0, 1, 0, 4, 3, 2):  # reordered, and replayed
        bob.core.receive(copies[i])
    assert bob.shown() == [("alice", f"m{i}", "direct") for i in range(5)]
    assert bob.core.counters["group_duplicates"] == 2
    for i in range(5):  # then the server's copies: nothing shown twice
        assert bob.core.receive(copies[i], 100 + i) is True
    assert bob.shown() == []

    bob = m["bob"] = bob.restart()  # the order survives a restart: a replay is still old
    bob.core.receive(copies[3])
    assert bob.shown() == [] and bob.core.counters["group_duplicates"] == 1


def test_a_lost_direct_copy_is_filled_by_the_server_and_those_after_it_follow(
    net: tuple[Server, dict[str, Member]],
) -> None:
    server, m = net
    alice, bob = m["alice"], m["bob"]
    server.set_members(["alice", "bob"])
    copies = [parse_envelope(post(server, alice, f"m{i}")) for i in range(3)]
    posts = [s for s in bob.stream if parse_envelope(s[2]).group]
    bob.stream = [s for s in bob.stream if not parse_envelope(s[2]).group]
    server.deliver(bob)
    bob.core.receive(copies[1]), bob.core.receive(copies[2])  # m0's datagram was lost
    assert bob.shown() == []
    bob.stream = posts
    server.deliver(bob)
    assert bob.shown() == [("alice", "m0", "server"), ("alice", "m1", "direct"), ("alice", "m2", "direct")]


def test_a_direct_copy_before_its_key_or_from_a_stranger_is_dropped(
    net: tuple[Server, dict[str, Member]],
) -> None:
    server, m = net
    alice, bob, carol = m["alice"], m["bob"], m["carol"]
    server.set_members(["alice", "bob"])
    early = parse_envelope(post(server, alice, "too soon"))
    assert bob.core.receive(early) is False and bob.core.counters["group_direct_early"] == 1
    server.deliver(bob)  # the key, then the server's copy
    assert bob.shown() == [("alice", "too soon", "server")]
    # carol is not a member: her direct copies are nobody's business here
    carol.core.store.apply(pb.GroupInfo(group=GID, name="team", seq=1), "carol")
    carol.core.store.add_key(GID, "carol", 1, gseal.new_key(), set())
    body = epb.Body(text=epb.Text(text="let me in"), seq=0)
    forged = gseal.seal(carol.identity, "carol", GID, 1, carol.core.store.key(GID, "carol", 1) or b"", body)
    assert bob.core.receive(forged) is False
    # a member cannot pass a message off as another's: alice's name, carol's signature
    forged.sender = "alice"
    assert bob.core.receive(forged, 999) is False
    assert bob.shown() == [] and bob.core.counters["group_bad"] == 2


def test_a_member_who_missed_a_key_update_asks_and_reads_it(net: tuple[Server, dict[str, Member]]) -> None:
    server, m = net
    alice, bob = m["alice"], m["bob"]
    server.set_members(["alice", "bob"])
    alice.core.post(GID, "can you read this")
    server.flush(alice, lose_keys_to="bob")  # bob's key never came
    verdicts = server.deliver(bob)
    assert list(verdicts.values()) == [None]  # held: stays on the server meanwhile
    assert bob.shown() == []
    server.flush(bob)  # bob's "send me your key"
    verdicts = server.deliver(alice)
    server.flush(alice)  # alice's answer: the key of that epoch, once more
    verdicts = server.deliver(bob)
    assert list(verdicts.values()) == [True]  # the held message, now taken
    assert bob.shown() == [("alice", "can you read this", "server")]
