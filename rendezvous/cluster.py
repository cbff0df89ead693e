"""One rendezvous among several: who is connected where, and frames for them, over a bus.

Sans-IO, part of the hub. Every node keeps its own sessions; the state they share
(accounts, buddies, groups, the offline store) is in PostgreSQL. What a node must
know of the others is small and lives here:

- **Who is on which node**: each node tells every other (subject ``p2pim.all``)
  when a user's sessions on it change, as a whole (:class:`bus_pb2.UserState`:
  how many, the presence buddies see, the endpoints last published). So any node
  answers presence, buddy lists and endpoint lookups for anyone, and knows where
  to send a frame.
- **Frames for someone elsewhere** (a relayed datagram, a presence update, a buddy
  or group event) go to the nodes that have that user (``p2pim.node.<id>``), which
  send them to its sessions there.
- **"Read the store again"**: an envelope stored on one node for a user connected to
  another makes that node push it (:meth:`Cluster.pump`).
- **Liveness**: a beat each :data:`BEAT_S`; a node silent for :data:`NODE_TIMEOUT_S`
  is gone and its users with it (their buddies see them offline). A node heard for the
  first time (new, or back after the bus was cut) is sent every state this node has,
  and every node reads the store again for its own sessions: what was stored while
  the bus was down reaches them. It is also asked (``Beat.sync``) to do the same for
  us: a partition is not always seen from both sides.

The bus carries nothing durable and may drop a message: a relayed datagram is
retransmitted end to end (or stored), and a missed pump is made good by the next
store, ack, login or bus event. The hub's outputs for the bus are
``Datagram(BUS, bytes, subject)``; the shell publishes them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from p2pim.sansio import Datagram
from p2pim.wire import bus_pb2 as bus
from p2pim.wire import control_pb2 as pb

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger(__name__)

BEAT_S = 1.0
NODE_TIMEOUT_S = 3.5
ALL = "p2pim.all"
MAX_NODES = 256  # nodes remembered at once (a bus full of strangers cannot grow this)
MAX_REMOTE_USERS = 1_000_000


class _Bus:
    """The marker a bus output's ``Datagram.sock`` is (the shell publishes to ``addr``)."""

    def __repr__(self) -> str:
        return "BUS"


BUS = _Bus()


def shown_presence(presences: Iterable[pb.Presence.ValueType]) -> pb.Presence.ValueType:
    """What buddies see of several sessions (or nodes): online if any is, else away if any
    is, else offline."""
    shown = set(presences)
    if pb.ONLINE in shown:
        return pb.ONLINE
    return pb.AWAY if pb.AWAY in shown else pb.OFFLINE


def node_subject(node: str) -> str:
    return f"p2pim.node.{node}"


@dataclass
class Remote:
    """A user's sessions on another node."""

    sessions: int
    presence: pb.Presence.ValueType
    endpoints: pb.Endpoints | None
    devices: frozenset[int]


class Cluster:
    def __init__(self, hub: Hub, node: str) -> None:
        self.hub = hub
        self.node = node
        self.nodes: dict[str, float] = {}  # other nodes: when last heard
        self._caught_up: dict[str, float] = {}  # other nodes: when we last caught them up
        self.users: dict[str, dict[str, Remote]] = {}  # username -> node -> its sessions there
        self._next_beat = 0.0

    # -- what the hub asks -------------------------------------------------------------

    def nodes_of(self, name: str) -> list[str]:
        return list(self.users.get(name, ()))

    def presence(self, name: str) -> pb.Presence.ValueType:
        return shown_presence(r.presence for r in self.users.get(name, {}).values())

    def device_online(self, name: str, device_id: int) -> bool:
        return any(device_id in r.devices for r in self.users.get(name, {}).values())

    def endpoints(self, name: str) -> pb.Endpoints | None:
        with_eps = [r.endpoints for r in self.users.get(name, {}).values() if r.endpoints is not None]
        return with_eps[-1] if with_eps else None

    # -- what the hub tells --------------------------------------------------------------

    def state(self, name: str, now: float, to: str = ALL) -> None:
        """``name``'s sessions on this node changed: tell every node (or one, ``to``)."""
        sessions = [x for x in self.hub.online.get(name, ()) if not x.closed]
        state = bus.UserState(
            username=name,
            sessions=len(sessions),
            presence=self.hub.local_presence(name),
            devices=sorted({x.device_id for x in sessions}),
        )
        eps = self.hub.local_endpoints(name)
        if eps is not None:
            state.endpoints.CopyFrom(eps)
        self._publish(to, bus.NodeMessage(state=state))

    def deliver(self, name: str, frame: bytes) -> bool:
        """A serialized frame to ``name``'s sessions on other nodes; False if it has none."""
        nodes = self.nodes_of(name)
        for node in nodes:
            self._publish(
                node_subject(node), bus.NodeMessage(deliver=bus.Deliver(username=name, frames=[frame]))
            )
        return bool(nodes)

    def pump(self, names: Iterable[str]) -> None:
        """Something was stored for them: nodes that have them read the store again."""
        for node, who in self._by_node(names).items():
            self._publish(node_subject(node), bus.NodeMessage(pump=bus.Usernames(usernames=who)))

    def changed(self, names: Iterable[str]) -> None:
        """Their buddy lists changed: nodes that have them read the lists again."""
        for node, who in self._by_node(names).items():
            self._publish(node_subject(node), bus.NodeMessage(changed=bus.Usernames(usernames=who)))

    def _by_node(self, names: Iterable[str]) -> dict[str, list[str]]:
        """Who of ``names`` each other node has (one message per node, not per user)."""
        by_node: dict[str, list[str]] = {}
        for name in names:
            for node in self.nodes_of(name):
                by_node.setdefault(node, []).append(name)
        return by_node

    def link(self, channel: int, frame: bytes, to_creator: bool, node: str = "") -> None:
        """A device link's traffic to the node holding the channel (or, ``node`` empty, to all:
        a join, which only the holder answers)."""
        hop = bus.LinkHop(channel=channel, frame=frame, to_creator=to_creator)
        self._publish(node_subject(node) if node else ALL, bus.NodeMessage(link=hop))

    def end(self, name: str, device_id: int, reason: str) -> None:
        for node in self.nodes_of(name):
            msg = bus.NodeMessage(end=bus.End(username=name, device_id=device_id, reason=reason))
            self._publish(node_subject(node), msg)

    # -- the core verbs, for the hub ------------------------------------------------------

    def get_timer(self) -> float:
        return self._next_beat

    def handle_timer(self, now: float) -> None:
        if now < self._next_beat:
            return
        self._next_beat = now + BEAT_S
        self._publish(ALL, bus.NodeMessage(beat=bus.Beat(users=len(self.hub.online))))
        for node in [n for n, heard in self.nodes.items() if now - heard > NODE_TIMEOUT_S]:
            self._node_gone(node, now)

    def receive(self, data: bytes, now: float) -> None:
        """One bus message. Garbage (or our own echo) is counted or ignored, never fatal."""
        try:
            msg = bus.NodeMessage.FromString(data)
        except DecodeError:
            self.hub.counters.bus_bad += 1
            return
        if not msg.node or msg.node == self.node:
            return
        if msg.node not in self.nodes:
            if len(self.nodes) >= MAX_NODES:
                self.hub.counters.bus_bad += 1
                return
            self._node_new(msg.node, now)
        self.nodes[msg.node] = now
        kind = msg.WhichOneof("body")
        if kind == "beat" and msg.beat.sync:
            self._catch_up(msg.node, now)
        elif kind == "state":
            self._state(msg.node, msg.state, now)
        elif kind == "deliver":
            self.hub.deliver_local(msg.deliver.username, list(msg.deliver.frames))
        elif kind == "pump":
            for name in msg.pump.usernames:
                self.hub.pump_local(name)
        elif kind == "changed":
            for name in msg.changed.usernames:
                self.hub.reload_buddies(name)
        elif kind == "end":
            self.hub.end_local(msg.end.username, msg.end.device_id, msg.end.reason, now)
        elif kind == "link":
            self.hub.devices.hop_in(msg.node, msg.link, now)

    # -- inside ---------------------------------------------------------------------------

    def _publish(self, subject: str, msg: bus.NodeMessage) -> None:
        msg.node = self.node
        self.hub.counters.bus_out += 1
        self.hub._out.append(Datagram(BUS, msg.SerializeToString(), subject))

    def _state(self, node: str, state: bus.UserState, now: float) -> None:
        name = state.username
        if state.sessions == 0:
            nodes = self.users.get(name, {})
            nodes.pop(node, None)
            if not nodes:
                self.users.pop(name, None)
        else:
            if name not in self.users and len(self.users) >= MAX_REMOTE_USERS:
                self.hub.counters.bus_bad += 1
                return
            eps = pb.Endpoints()
            eps.CopyFrom(state.endpoints)
            self.users.setdefault(name, {})[node] = Remote(
                state.sessions,
                state.presence,
                eps if state.HasField("endpoints") else None,
                frozenset(state.devices[:64]),
            )
        self.hub.announce(name, now)  # it tells buddies here only if what they saw changed

    def _node_new(self, node: str, now: float) -> None:
        """A node we did not know: it learns our users; we all look at our stores again."""
        log.warning("node %s: joined (or back)", node)
        self.nodes[node] = now
        self._publish(
            node_subject(node), bus.NodeMessage(beat=bus.Beat(users=len(self.hub.online), sync=True))
        )
        self._catch_up(node, now)

    def _catch_up(self, node: str, now: float) -> None:
        """``node`` may have missed what happened here (and we what happened there): it gets
        every state we hold, and our sessions read the store again. Once per meeting: two
        nodes meeting each see the other as new and each asks the other (``Beat.sync``)."""
        if now - self._caught_up.get(node, -BEAT_S) < BEAT_S:
            return
        self._caught_up[node] = now
        for name in list(self.hub.online):
            self.state(name, now, to=node_subject(node))
        self.hub.pump_everyone()

    def _node_gone(self, node: str, now: float) -> None:
        del self.nodes[node]
        self._caught_up.pop(node, None)
        gone = sum(1 for nodes in self.users.values() if node in nodes)
        log.warning("node %s: not heard for %.1f s; its %d users are offline", node, NODE_TIMEOUT_S, gone)
        for name in [n for n, nodes in self.users.items() if node in nodes]:
            del self.users[name][node]
            if not self.users[name]:
                del self.users[name]
            self.hub.announce(name, now)
