"""Two hubs as two nodes of a cluster, without sockets: one database, a bus that is a list.

Each node's bus outputs (``Datagram(BUS, data, subject)``) are handed to the other by
:meth:`Cluster.flush` (or dropped, when the bus is "cut"), so what crosses nodes, and
what happens when a node goes quiet, is seen frame by frame with a fake clock.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

from p2pim.identity import Identity
from p2pim.messaging.ids import new_msg_id
from p2pim.wire import bus_pb2 as bus
from p2pim.wire import control_pb2 as pb
from p2pim.wire import nat_pb2 as nat_pb
from rendezvous.cluster import BUS, NODE_TIMEOUT_S, node_subject
from rendezvous.db import Database
from rendezvous.hub import Hub, Session

from .test_hub import add_account, make_buddies

_ids = itertools.count(1)


class Cluster:
    def __init__(self, target: str, nodes: int = 2) -> None:
        self.hubs = [Hub(Database(target), node=f"n{i}") for i in range(nodes)]
        self.db = self.hubs[0].db
        self.keys: dict[str, Identity] = {}
        self.now = 1000.0
        self.inbox: dict[int, list[pb.Frame]] = {}
        self.cut = False  # the bus is down: what is published is lost
        self.published: list[tuple[str, str, bytes]] = []  # (from node, subject, data)

    def account(self, name: str) -> None:
        self.keys[name] = add_account(self.db, name)

    def buddies(self, a: str, b: str) -> None:
        make_buddies(self.db, a, b)

    def login(self, node: int, name: str) -> Session:
        hub = self.hubs[node]
        s = hub.connect(("10.0.0.1", 40000 + next(_ids)))
        sig = self.keys[name].sign_login(s.nonce, name)
        login = pb.Login(username=name, resume_token=name.encode(), signature=sig)
        assert hub.begin_login(s, pb.Frame(id=next(_ids), login=login), self.now) is None
        assert s.username == name
        self.flush()
        return s

    def request(self, node: int, s: Session, **body: object) -> pb.Frame:
        frame = pb.Frame(id=next(_ids), **body)  # type: ignore[arg-type]
        self.hubs[node].receive(s, frame, self.now)
        self.flush()
        inbox = self.inbox[id(s)]
        reply = next(f for f in inbox if f.id == frame.id)
        inbox.remove(reply)
        return reply

    def send(self, node: int, s: Session, **body: object) -> None:
        """A request that has no answer when it goes well (a relay); a refusal stays in the inbox."""
        self.hubs[node].receive(s, pb.Frame(id=next(_ids), **body), self.now)  # type: ignore[arg-type]
        self.flush()

    def frames(self, s: Session) -> list[pb.Frame]:
        self.flush()
        return self.inbox.pop(id(s), [])

    def tick(self, seconds: float) -> None:
        """Time passes; every hub's timer runs (beats, node timeouts) each 0.5 s."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + 0.5)
            for hub in self.hubs:
                hub.handle_timer(self.now)
            self.flush()

    def flush(self) -> None:
        """Move every output: frames to the inboxes, bus messages to the other hubs."""
        moved = True
        while moved:
            moved = False
            for hub in self.hubs:
                for dg in hub.datagrams_to_send(self.now):
                    moved = True
                    if dg.sock is BUS:
                        assert hub.cluster is not None
                        self.published.append((hub.cluster.node, dg.addr, dg.data))
                        if not self.cut:
                            self._bus(hub, dg.addr, dg.data)
                    elif isinstance(dg.data, bytes):
                        self.inbox.setdefault(id(dg.sock), []).append(pb.Frame.FromString(dg.data))

    def _bus(self, sender: Hub, subject: str, data: bytes) -> None:
        for hub in self.hubs:
            assert hub.cluster is not None
            if hub is not sender and subject in ("p2pim.all", node_subject(hub.cluster.node)):
                hub.receive_bus(data, self.now)


def alice_and_bob(tmp_path: Path) -> tuple[Cluster, Session, Session]:
    """Two buddies, alice on node 0 and bob on node 1, after the nodes met."""
    c = Cluster(str(tmp_path / "s.db"))
    c.account("alice")
    c.account("bob")
    c.buddies("alice", "bob")
    c.tick(1.0)
    return c, c.login(0, "alice"), c.login(1, "bob")


def kinds(frames: list[pb.Frame]) -> list[str]:
    return [str(f.WhichOneof("body")) for f in frames]


def presences(frames: list[pb.Frame], name: str) -> list[int]:
    return [f.presence.presence for f in frames if f.HasField("presence") and f.presence.username == name]


def test_presence_relay_and_lookup_cross_nodes(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path / "s.db"))
    for n in ("alice", "bob", "carol"):
        c.account(n)
    c.buddies("alice", "bob")
    c.tick(1.0)  # the nodes hear each other
    a = c.login(0, "alice")
    b = c.login(1, "bob")
    assert presences(c.frames(a), "bob") == [pb.ONLINE]  # told by its own node, from the bus
    assert c.hubs[0].presence_of("bob") == pb.ONLINE and c.hubs[0].is_online("bob")
    c.request(1, b, publish_endpoints=pb.PublishEndpoints(host=[nat_pb.Address(ip="192.168.1.5", port=4000)]))
    eps = c.request(0, a, lookup_endpoints=pb.LookupEndpoints(username="bob")).endpoints
    assert [h.ip for h in eps.host] == ["192.168.1.5"] and eps.observed.port == b.remote[1]
    listed = c.request(1, b, buddy_list=pb.BuddyListRequest()).buddies.buddies
    assert [(x.username, x.presence) for x in listed] == [("alice", pb.ONLINE)]  # alice is on node 0
    c.send(0, a, relay=pb.Relay(to="bob", data=b"x"))
    got = [f.relay_in for f in c.frames(b) if f.HasField("relay_in")]
    assert [(r.sender, r.data) for r in got] == [("alice", b"x")]
    # carol is nobody's buddy: a relay to her from another node's user is refused, as on one node
    cs = c.login(1, "carol")
    refused = c.request(0, a, relay=pb.Relay(to="carol", data=b"y"))
    assert refused.error.code == pb.NOT_A_BUDDY
    assert not [f for f in c.frames(cs) if f.HasField("relay_in")]
    c.request(1, b, set_status=pb.SetStatus(presence=pb.AWAY))
    assert presences(c.frames(a), "bob") == [pb.AWAY]


def test_a_store_on_one_node_is_pushed_by_the_other(tmp_path: Path) -> None:
    c, a, b = alice_and_bob(tmp_path)
    c.frames(b)
    ok = c.request(0, a, store=pb.Store(to="bob", msg_id=new_msg_id(), envelope=b"sealed"))
    assert ok.HasField("ok")
    pushed = [f.offline_envelope for f in c.frames(b) if f.HasField("offline_envelope")]
    assert [p.envelope for p in pushed] == [b"sealed"]
    pumps = [bus.NodeMessage.FromString(d) for _, subj, d in c.published if subj == node_subject("n1")]
    assert any(m.HasField("pump") and list(m.pump.usernames) == ["bob"] for m in pumps)


def test_buddy_changes_reach_the_other_nodes_cache(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path / "s.db"))
    c.account("alice")
    c.account("bob")
    c.tick(1.0)
    a, b = c.login(0, "alice"), c.login(1, "bob")
    assert c.request(0, a, buddy_request=pb.BuddyRequest(username="bob")).HasField("ok")
    events = [f.buddy_event for f in c.frames(b) if f.HasField("buddy_event")]
    assert [e.kind for e in events] == [pb.BuddyEvent.REQUESTED]
    assert c.request(1, b, buddy_accept=pb.BuddyAccept(username="alice")).HasField("ok")
    assert "bob" in c.hubs[0].buddies["alice"]  # node 0 read alice's list again
    assert presences(c.frames(a), "bob") == [pb.ONLINE]
    c.send(0, a, relay=pb.Relay(to="bob", data=b"hi"))
    assert any(f.HasField("relay_in") for f in c.frames(b))
    assert c.request(1, b, buddy_remove=pb.BuddyRemove(username="alice")).HasField("ok")
    assert "bob" not in c.hubs[0].buddies["alice"]
    assert c.request(0, a, relay=pb.Relay(to="bob", data=b"no")).error.code == pb.NOT_A_BUDDY


def test_a_silent_node_is_gone_and_a_returning_one_is_caught_up(tmp_path: Path) -> None:
    c, a, b = alice_and_bob(tmp_path)
    c.frames(a)
    c.frames(b)
    c.cut = True  # the bus goes down
    c.tick(NODE_TIMEOUT_S + 1.5)
    assert presences(c.frames(a), "bob") == [pb.OFFLINE]  # bob's node went quiet
    assert c.request(0, a, relay=pb.Relay(to="bob", data=b"x")).error.code == pb.PEER_OFFLINE
    # stored meanwhile: bob's node is not told (the bus is down) ...
    assert c.request(0, a, store=pb.Store(to="bob", msg_id=new_msg_id(), envelope=b"late")).HasField("ok")
    assert not [f for f in c.frames(b) if f.HasField("offline_envelope")]
    c.cut = False  # ... until the nodes hear each other again
    c.tick(1.5)
    assert [f.offline_envelope.envelope for f in c.frames(b) if f.HasField("offline_envelope")] == [b"late"]
    assert presences(c.frames(a), "bob") == [pb.ONLINE]


def test_garbage_and_strangers_on_the_bus_are_counted_not_fatal(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path / "s.db"))
    hub = c.hubs[0]
    hub.receive_bus(b"\xff\x00garbage", c.now)
    fake = bus.NodeMessage(node="x", deliver=bus.Deliver(username="nobody", frames=[b"\x01"]))
    hub.receive_bus(fake.SerializeToString(), c.now)
    assert hub.counters.bus_bad == 1 and hub.counters.bus_in == 2
    for i in range(300):  # more nodes than it remembers
        hub.receive_bus(bus.NodeMessage(node=f"z{i}", beat=bus.Beat()).SerializeToString(), c.now)
    assert hub.cluster is not None and len(hub.cluster.nodes) == 256
    assert hub.counters.bus_bad > 1


def test_ending_a_device_ends_its_sessions_on_other_nodes(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path / "s.db"))
    c.account("alice")
    c.tick(1.0)
    user = c.db.user("alice")
    assert user is not None
    phone = Identity.generate()
    second = c.db.add_device(user.id, phone.public_key, "phone", 0)
    assert second is not None
    c.db.add_token(user.id, hashlib.sha256(b"phone").digest(), 10**15, second)
    a = c.login(0, "alice")
    other = c.hubs[1].connect(("10.0.0.2", 1))  # alice's phone, on node 1
    login = pb.Login(
        username="alice",
        resume_token=b"phone",
        device_key=phone.public_key,
        signature=phone.sign_login(other.nonce, "alice"),
    )
    assert c.hubs[1].begin_login(other, pb.Frame(id=1, login=login), c.now) is None
    assert other.username == "alice" and other.device_id == second
    c.flush()
    listed = c.request(0, a, device_list=pb.DeviceListRequest()).devices.devices
    assert [(d.name, d.online) for d in listed] == [("first device", True), ("phone", True)]
    assert c.request(0, a, device_remove=pb.DeviceRemove(device_id=second)).HasField("ok")
    assert other.closed and "alice" not in c.hubs[1].online
    assert not a.closed and c.hubs[0].presence_of("alice") == pb.ONLINE


def test_password_guesses_at_one_account_count_on_every_node_together(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path / "s.db"))
    c.account("alice")
    burst = int(c.hubs[0].limits.login_user_burst)
    outcomes = []
    for attempt in range(burst + 4):  # alternating nodes: each node's own bucket would allow 2 * burst
        hub = c.hubs[attempt % 2]
        s = hub.connect((f"10.0.{attempt}.1", 1))
        login = pb.Login(username="alice", password="guess", signature=b"x" * 64)
        work = hub.begin_login(s, pb.Frame(id=1, login=login), c.now)
        if work is not None:
            hub.hash_done(s)
        outcomes.append(work is not None)
    assert outcomes == [True] * burst + [False] * 4
    c.now += 60  # the shared bucket refills at the per-user rate
    s = c.hubs[1].connect(("10.1.0.1", 1))
    login = pb.Login(username="alice", password="guess", signature=b"x" * 64)
    assert c.hubs[1].begin_login(s, pb.Frame(id=1, login=login), c.now) is not None


def test_shared_buckets_on_both_engines(store_target: str) -> None:
    db = Database(store_target)
    taken = [db.take_token("k", 1.0, 3, 1000) for _ in range(4)]
    assert taken == [True, True, True, False]
    assert db.take_token("k", 1.0, 3, 2000)  # a second later: one more
    assert not db.take_token("k", 1.0, 3, 2000)
    assert db.take_token("other", 1.0, 3, 2000)  # its own bucket
    db.expire(now_ms=2000 + 3600 * 1000 + 1, max_age_ms=10**12)
    assert [db.take_token("k", 1.0, 3, 10**10) for _ in range(4)] == [True, True, True, False]
