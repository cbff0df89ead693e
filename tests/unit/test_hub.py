"""The rendezvous core without sockets: bounds on what one peer can make it do.

Sessions log in with a token (no password hashing needed in-process); frames go in
with :meth:`Hub.receive` and come out of :meth:`Hub.datagrams_to_send`.
"""

from __future__ import annotations

import hashlib
import itertools

import pytest

from p2pim.identity import Identity
from p2pim.messaging.ids import new_msg_id
from p2pim.wire import control_pb2 as pb
from rendezvous.db import Database
from rendezvous.hub import ACK_FLUSH_S, Close, Hub, Limits, Session

_ids = itertools.count(1)


def add_account(db: Database, name: str) -> Identity:
    """An account whose resume token is its name (token logins need no password hashing)."""
    ident = Identity.generate()
    assert db.add_user(name, b"$argon2id$x", ident.public_key, 0)
    user = db.user(name)
    assert user is not None
    device = db.devices(user.id)[0].id
    db.add_token(user.id, hashlib.sha256(name.encode()).digest(), 10**15, device)
    return ident


def make_buddies(db: Database, a: str, b: str) -> None:
    ua, ub = db.user(a), db.user(b)
    assert ua is not None and ub is not None
    db.make_mutual(ua.id, ub.id)


class World:
    def __init__(self, target: str = ":memory:", **limits: object) -> None:
        self.db = Database(target)
        self.hub = Hub(self.db, Limits(**limits))  # type: ignore[arg-type]
        self.keys: dict[str, Identity] = {}
        self.now = 1000.0
        self._inbox: dict[int, list[pb.Frame]] = {}

    def account(self, name: str) -> None:
        self.keys[name] = add_account(self.db, name)

    def buddies(self, a: str, b: str) -> None:
        make_buddies(self.db, a, b)

    def login(self, name: str, ip: str = "10.0.0.1", leave_offline: bool = False) -> Session:
        s = self.hub.connect((ip, 40000))
        sig = self.keys[name].sign_login(s.nonce, name)
        login = pb.Login(
            username=name, resume_token=name.encode(), signature=sig, leave_offline=leave_offline
        )
        assert self.hub.begin_login(s, pb.Frame(id=next(_ids), login=login), self.now) is None  # token: done
        assert s.username == name
        return s

    def request(self, s: Session, **body: object) -> pb.Frame:
        """Send a request; returns its reply (pushes it caused stay for :meth:`frames`)."""
        frame = pb.Frame(id=next(_ids), **body)  # type: ignore[arg-type]
        self.hub.receive(s, frame, self.now)
        self._pull()
        reply = next(f for f in self._inbox[id(s)] if f.id == frame.id)
        self._inbox[id(s)].remove(reply)
        return reply

    def frames(self, s: Session) -> list[pb.Frame]:
        """Everything sent to ``s`` and not yet looked at."""
        self._pull()
        return self._inbox.pop(id(s), [])

    def _pull(self) -> None:
        for dg in self.hub.datagrams_to_send(self.now):
            if isinstance(dg.data, bytes):
                self._inbox.setdefault(id(dg.sock), []).append(pb.Frame.FromString(dg.data))


def pushed(frames: list[pb.Frame]) -> list[int]:
    return [f.offline_envelope.store_id for f in frames if f.HasField("offline_envelope")]


def store(w: World, s: Session, to: str, size: int = 100) -> pb.Frame:
    return w.request(s, store=pb.Store(to=to, msg_id=new_msg_id(), envelope=b"e" * size))


def test_the_offline_backlog_is_pushed_a_window_at_a_time_as_acks_come(store_target: str) -> None:
    w = World(store_target, offline_window=4)
    for name in ("alice", "bob"):
        w.account(name)
    w.buddies("alice", "bob")
    alice = w.login("alice")
    for _ in range(10):
        assert store(w, alice, "bob").HasField("ok")
    bob = w.login("bob")
    first = pushed(w.frames(bob))
    assert len(first) == 4  # not all ten at once
    assert pushed(w.frames(bob)) == []  # nothing more until bob answers
    w.request(bob, offline_ack=pb.OfflineAck(store_ids=first[:2]))
    assert len(pushed(w.frames(bob))) == 2  # two answered, two more come
    # "keep" frees the window without deleting: it comes again at the next login.
    w.request(bob, offline_ack=pb.OfflineAck(keep_ids=first[2:]))
    nxt = pushed(w.frames(bob))
    assert len(nxt) == 2
    # acknowledged ones are deleted in a batch, at the hub's next timer
    assert w.db.offline_count(bob.user_id) == 10 and w.hub.get_timer() <= w.now + ACK_FLUSH_S
    w.now += ACK_FLUSH_S
    w.hub.handle_timer(w.now)
    assert w.db.offline_count(bob.user_id) == 8


def test_a_session_that_leaves_the_backlog_gets_only_what_is_stored_while_it_is_on(store_target: str) -> None:
    w = World(store_target)
    for name in ("alice", "bob"):
        w.account(name)
    w.buddies("alice", "bob")
    alice = w.login("alice")
    store(w, alice, "bob")
    one_shot = w.login("bob", leave_offline=True)
    assert pushed(w.frames(one_shot)) == []  # the backlog waits for a session that shows it
    store(w, alice, "bob")  # e.g. a receipt for what the one-shot session sent
    assert len(pushed(w.frames(one_shot))) == 1
    listener = w.login("bob")
    assert len(pushed(w.frames(listener))) == 2


def test_one_sender_may_fill_only_its_share_of_a_store(store_target: str) -> None:
    w = World(store_target, offline_max_envelopes=6, offline_sender_envelopes=2)
    for name in ("alice", "bob", "mallory"):
        w.account(name)
    w.buddies("bob", "alice")
    w.buddies("bob", "mallory")
    mallory, alice = w.login("mallory"), w.login("alice")
    assert store(w, mallory, "bob").HasField("ok") and store(w, mallory, "bob").HasField("ok")
    refused = store(w, mallory, "bob")
    assert refused.error.code == pb.QUOTA_EXCEEDED and "one sender" in refused.error.message
    assert store(w, alice, "bob").HasField("ok")
    # Removing mallory drops what mallory left.
    bob = w.login("bob")
    assert w.request(bob, buddy_remove=pb.BuddyRemove(username="mallory")).HasField("ok")
    assert w.db.offline_count(bob.user_id) == 1


@pytest.mark.parametrize("ids", [[2**63], [1, 2**64 - 1]])
def test_store_ids_beyond_sqlite_are_a_bad_request(ids: list[int]) -> None:
    w = World()
    w.account("alice")
    alice = w.login("alice")
    assert w.request(alice, offline_ack=pb.OfflineAck(store_ids=ids)).error.code == pb.BAD_REQUEST


def test_password_hashing_slots_are_bounded_per_address_and_in_all() -> None:
    w = World(hashing_max=3, hashing_per_ip=2, login_ip_burst=100)
    w.account("alice")

    def begin(ip: str) -> tuple[Session, object]:
        s = w.hub.connect((ip, 1))
        login = pb.Login(username="alice", password="guess guess", signature=b"")
        return s, w.hub.begin_login(s, pb.Frame(id=1, login=login), w.now)

    s1, work1 = begin("10.0.0.1")
    s2, work2 = begin("10.0.0.1")
    s3, work3 = begin("10.0.0.1")
    assert work1 is not None and work2 is not None and work3 is None  # third from one address: shed
    assert w.frames(s3)[-1].error.code == pb.RATE_LIMITED and s3.pause_s > 0
    s4, work4 = begin("10.0.0.2")
    _s5, work5 = begin("10.0.0.3")
    assert work4 is not None and work5 is None  # three in all
    w.hub.hash_done(s1)
    s6, work6 = begin("10.0.0.3")
    assert work6 is not None  # a slot came free
    for s in (s2, s4, s6):
        w.hub.hash_done(s)
    w.hub.hash_done(s6)  # twice is harmless
    assert w.hub._hashing == {} and w.hub._hashing_total == 0


def test_requests_past_a_users_budget_are_refused_and_acks_are_not_metered() -> None:
    w = World(request_rate=1.0, request_burst=3)
    w.account("alice")
    alice = w.login("alice")
    codes = [w.request(alice, buddy_list=pb.BuddyListRequest()).WhichOneof("body") for _ in range(4)]
    assert codes == ["buddies", "buddies", "buddies", "error"]
    assert w.request(alice, offline_ack=pb.OfflineAck()).HasField("ok")
    w.now += 1.0
    assert w.request(alice, buddy_list=pb.BuddyListRequest()).HasField("buddies")


def test_a_connection_that_does_not_log_in_is_closed_at_the_deadline() -> None:
    w = World(login_deadline_s=5)
    w.account("alice")
    idle = w.hub.connect(("10.0.0.9", 1))
    assert w.hub.login_deadline(idle, w.now)
    out = w.hub.datagrams_to_send(w.now)
    assert (out[-1].sock, out[-1].data) == (idle, Close(1008, "log in within 5 s"))
    assert pb.Frame.FromString(out[-2].data).error.code == pb.NOT_LOGGED_IN
    alice = w.login("alice")
    assert not w.hub.login_deadline(alice, w.now)  # logged in: the deadline means nothing


def test_small_order_identity_keys_are_refused_at_register() -> None:
    from tests.mixedkey import MixedKey

    w = World()
    s = w.hub.connect(("10.0.0.1", 1))
    frame = pb.Frame(
        id=5,
        register=pb.Register(username="mallory", password="long enough", identity_key=MixedKey().public_key),
    )
    assert w.hub.begin_register(s, frame, w.now) is None
    assert w.frames(s)[-1].error.code == pb.BAD_REQUEST


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        Limits(hashing_per_ip=0)
    with pytest.raises(ValueError):
        Limits(login_deadline_s=0)


# -- the common core verbs: one driver runs the hub like any other core ----------------------


def test_the_hub_timer_closes_connections_that_do_not_log_in_and_only_those() -> None:
    w = World(login_deadline_s=5)
    w.account("alice")
    idle = w.hub.connect(("10.0.0.9", 1), w.now)
    w.hub.connect(("10.0.0.9", 2), w.now + 1)
    fine = w.hub.connect(("10.0.0.1", 3), w.now + 2)
    w.hub.datagrams_to_send(w.now)
    sig = w.keys["alice"].sign_login(fine.nonce, "alice")
    login = pb.Login(username="alice", resume_token=b"alice", signature=sig)
    w.hub.receive_datagram(fine, pb.Frame(id=1, login=login).SerializeToString(), fine.remote, w.now)
    assert fine.username == "alice" and fine.work is None  # a token login needs no hashing
    w.hub.datagrams_to_send(w.now)
    assert w.hub.get_timer() == 0.0  # housekeeping is due at start
    w.hub.handle_timer(w.now)
    assert w.hub.get_timer() == w.now + 5  # then the first deadline, not the housekeeping hour
    w.hub.handle_timer(w.now + 5)
    closed = [dg.sock for dg in w.hub.datagrams_to_send(w.now + 5) if isinstance(dg.data, Close)]
    assert closed == [idle]
    assert w.hub.get_timer() == w.now + 6  # the second; the logged-in one has none
    w.hub.handle_timer(w.now + 6)
    assert w.hub.counters.login_timeouts == 2 and not fine.closed


def test_a_password_login_leaves_its_hashing_to_the_shell_and_garbage_closes_only_its_sender() -> None:
    w = World()
    w.account("alice")
    s = w.hub.connect(("10.0.0.1", 1), w.now)
    sig = w.keys["alice"].sign_login(s.nonce, "alice")
    login = pb.Frame(id=7, login=pb.Login(username="alice", password="secret pw", signature=sig))
    w.hub.receive_datagram(s, login.SerializeToString(), s.remote, w.now)
    assert s.work is not None and s.work[0].id == 7 and not s.username
    bad = w.hub.connect(("10.0.0.2", 1), w.now)
    w.hub.receive_datagram(bad, b"\xff\xfe not protobuf", bad.remote, w.now)
    out = w.hub.datagrams_to_send(w.now)
    assert [dg.data for dg in out if dg.sock is bad][-1] == Close()
    assert not any(isinstance(dg.data, Close) for dg in out if dg.sock is s)


def test_the_hub_timer_expires_old_offline_envelopes_hourly(store_target: str) -> None:
    w = World(store_target, offline_max_age_s=100)
    w.account("alice")
    w.account("bob")
    w.buddies("alice", "bob")
    alice = w.login("alice")
    assert store(w, alice, "bob").HasField("ok")
    w.hub.handle_timer(w.now)  # the first round runs at once: nothing is old yet
    assert w.hub.counters.offline_expired == 0
    due = w.hub.get_timer()
    assert due is not None and due > w.now + 3000
    w.hub.handle_timer(due)
    assert w.hub.counters.offline_expired == 1
