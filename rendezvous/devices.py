"""Devices on the rendezvous (issue 16): which keys may log in as an account, linking a new
device through a short-lived channel, listing and removing devices.

Every device of an account holds the account's identity key (buddies see one key, and
every pairwise and group envelope opens on every device); each also has a key of its own,
the *device key*, which is what logs in: the server knows the account's device keys, and a
removed device's key logs in no more (its sessions end at once, its tokens are gone). The
first device's key is the identity key itself, so accounts from before devices existed
need nothing new.

Linking: a logged-in device opens a channel and shows ``<channel>-<word>-<word>``; the
new device joins the channel by its number (before it can log in) and the two run SPAKE2
over the words through the channel (:mod:`p2pim.client.devices`). The server passes the
opaque messages and nothing else: it never sees the words, the key they agree on, or the
account's identity key sealed under it. A channel takes one join, lives
:data:`LINK_TTL_S`, carries at most :data:`LINK_MAX_MESSAGES` messages of at most
:data:`LINK_MAX_BYTES`, and is burnt by the first failed exchange: whoever guesses a
channel number gets one try at the words, and the user sees the link fail.

In a cluster the two devices may be on different nodes: a channel lives on the node of
the device that opened it; a join for a channel this node does not have is asked of every
node (:class:`bus_pb2.LinkHop`), the one that has it answers, and from then on each
message hops to the other node (:class:`RemoteEnd`). The limits are the owner node's.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from p2pim.identity import valid_public_key, verify_login
from p2pim.wire import bus_pb2 as bus
from p2pim.wire import control_pb2 as pb

from .errors import RequestError

if TYPE_CHECKING:
    from .db import Device, User
    from .hub import Hub, Session

LINK_TTL_S = 300.0
LINK_MAX_MESSAGES = 16
LINK_MAX_BYTES = 64 * 1024
MAX_CHANNELS = 1000  # open at once, server-wide
CHANNEL_RANGE = 10_000  # channel numbers are 1..9999 (short to type)
MAX_DEVICES = 16  # per account
MAX_DEVICE_NAME = 64


@dataclass(frozen=True)
class RemoteEnd:
    """The joiner of a channel here is connected to another node."""

    node: str


@dataclass
class Joining:
    """A session here joined a channel another node holds (``node`` once it answered)."""

    session: Session
    expires: float
    node: str = ""


@dataclass
class Channel:
    number: int
    owner: Session
    expires: float
    joiner: Session | RemoteEnd | None = None
    messages: int = 0
    added: int = 0  # the device the owner added through it


@dataclass
class DeviceHandlers:
    hub: Hub
    channels: dict[int, Channel] = field(default_factory=dict)
    joining: dict[int, Joining] = field(default_factory=dict)  # channels held by other nodes

    def handlers(self) -> dict[str, object]:
        return {
            "device_link_open": self.link_open,
            "device_link_join": self.link_join,
            "device_link_data": self.link_data,
            "device_add": self.add,
            "device_list": self.listing,
            "device_remove": self.remove,
        }

    # -- which device logs in ---------------------------------------------------------

    def login_device(self, user: User, req: pb.Login, nonce: bytes, token_device: int | None) -> int:
        """The device ``req`` logs in as (its id), or :class:`RequestError`: AUTH_FAILED for
        a bad signature or a token of another device, DEVICE_NOT_LINKED when the password
        was right but the key is none of the account's devices."""
        db = self.hub.db
        key = req.device_key or user.identity_key
        if not verify_login(key, nonce, req.username, req.signature):
            raise RequestError(pb.AUTH_FAILED, "wrong username or password")
        if req.new_identity:
            if req.resume_token or not valid_public_key(key):
                raise RequestError(pb.BAD_REQUEST, "a new identity key needs the password and a valid key")
            return -1  # the caller resets the account (it must tell the buddies)
        device = db.device_by_key(user.id, key)
        if token_device is not None:
            if device is None or device.id != token_device:
                raise RequestError(pb.AUTH_FAILED, "wrong username or password")
            return device.id
        if device is None:
            raise RequestError(
                pb.DEVICE_NOT_LINKED,
                f"this device is not linked to {user.username}: run `p2pim device link` on a linked "
                f"device and `p2pim device join CODE` here, or `p2pim login {user.username} --new-key` "
                "if every linked device is lost (your buddies will see a new key)",
            )
        return device.id

    # -- linking ----------------------------------------------------------------------

    def link_open(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        self.expire(now)
        self._close_of(session)  # one channel per session
        if len(self.channels) >= MAX_CHANNELS:
            raise RequestError(
                pb.RATE_LIMITED, "too many devices are being linked; retry in a minute", 60_000
            )
        if self.hub.db.device_count(session.user_id) >= MAX_DEVICES:
            raise RequestError(pb.NOT_ALLOWED, f"an account has at most {MAX_DEVICES} devices")
        number = 0
        while not number or number in self.channels:
            number = secrets.randbelow(CHANNEL_RANGE - 1) + 1
        self.channels[number] = Channel(number, session, now + LINK_TTL_S)
        return pb.Frame(device_channel=pb.DeviceChannel(channel=number, expires_s=int(LINK_TTL_S)))

    def link_join(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        """The new device (not logged in) takes a channel; each channel takes one join."""
        self.expire(now)
        if session.username or self._channel_of(session) is not None:
            raise RequestError(pb.BAD_REQUEST, "a device joins a link before it logs in, once")
        number = frame.device_link_join.channel
        channel = self.channels.get(number)
        cluster = self.hub.cluster
        if channel is None and cluster is not None and 0 < number < CHANNEL_RANGE:
            if number in self.joining or len(self.joining) >= MAX_CHANNELS:
                raise RequestError(pb.LINK_FAILED, "that link code is being joined already")
            self.joining[number] = Joining(session, now + LINK_TTL_S)
            cluster.link(number, b"", to_creator=True)  # whoever holds it answers
            return pb.Frame(ok=pb.Ok())
        if channel is None or channel.joiner is not None:
            raise RequestError(
                pb.LINK_FAILED, "no such link code (or it expired, or was used): make a new one"
            )
        channel.joiner = session
        self._to(channel.owner, pb.DeviceLinkIn())  # "joined": the owner starts the exchange
        return pb.Frame(ok=pb.Ok())

    def link_data(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        req = frame.device_link_data
        joining = self._joining_of(session)
        if joining is not None:  # the channel is on another node: it checks and forwards
            number, far = joining
            if now > far.expires:
                raise RequestError(pb.LINK_FAILED, "the link is over (it expired, or the other side left)")
            self._to_holder(number, far, frame)
            if req.close:
                self.joining.pop(number, None)
            return pb.Frame(ok=pb.Ok())
        channel = self._channel_of(session)
        if channel is None or channel.joiner is None or now > channel.expires:
            raise RequestError(pb.LINK_FAILED, "the link is over (it expired, or the other side left)")
        self._pass(channel, session, req, now)
        return pb.Frame(ok=pb.Ok())

    def _pass(
        self, channel: Channel, sender: Session | RemoteEnd, req: pb.DeviceLinkData, now: float
    ) -> None:
        """One message through ``channel`` from ``sender`` to its other end."""
        if len(req.data) > LINK_MAX_BYTES or channel.messages >= LINK_MAX_MESSAGES:
            self._close(channel, "too much")
            raise RequestError(pb.BAD_REQUEST, "too much through one link")
        channel.messages += 1
        other = channel.joiner if sender is channel.owner else channel.owner
        assert other is not None
        self._to(other, pb.DeviceLinkIn(data=req.data, closed=req.close))
        if req.close:
            self._drop(channel)

    def add(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        """The linked device registers the new one (it proved it knows the code): its key
        may log in from now on; its first resume token goes back, sealed, through the link."""
        req = frame.device_add
        channel = self.channels.get(req.channel)
        if channel is None or channel.owner is not session or channel.joiner is None or channel.added:
            raise RequestError(pb.LINK_FAILED, "no device joined that link")
        if not valid_public_key(req.device_key):
            raise RequestError(pb.BAD_REQUEST, "device_key must be a 32-byte Ed25519 public key")
        name = req.name.strip()[:MAX_DEVICE_NAME] or "new device"
        device_id = self.hub.db.add_device(session.user_id, req.device_key, name, _ms(now))
        if device_id is None:
            raise RequestError(pb.BAD_REQUEST, "that device is linked already")
        channel.added = device_id
        token = self.hub.new_token(session.user_id, device_id, now)
        self._event(session, pb.DeviceEvent.ADDED, device_id, now)
        return pb.Frame(device_added=pb.DeviceAdded(device_id=device_id, resume_token=token))

    # -- the account's devices ------------------------------------------------------------

    def listing(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        return pb.Frame(
            devices=pb.DeviceList(devices=[self._info(d, session) for d in self._devices(session)])
        )

    def remove(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        device_id = frame.device_remove.device_id
        if device_id == session.device_id:
            raise RequestError(pb.BAD_REQUEST, "that is this device: log out instead (p2pim logout)")
        if not any(d.id == device_id for d in self._devices(session)):
            raise RequestError(pb.BAD_REQUEST, f"no device {device_id} (p2pim device list)")
        self.hub.db.remove_device(session.user_id, device_id)
        self.hub.end_device(session.username, device_id, "this device was removed from the account", now)
        self._event(session, pb.DeviceEvent.REMOVED, device_id, now)
        return pb.Frame(ok=pb.Ok())

    # -- plumbing ---------------------------------------------------------------------

    def disconnect(self, session: Session) -> None:
        self._close_of(session)
        joining = self._joining_of(session)
        if joining is not None:
            number, far = joining
            del self.joining[number]
            self._to_holder(number, far, pb.Frame(device_link_data=pb.DeviceLinkData(close=True)))

    def expire(self, now: float) -> None:
        for channel in [c for c in self.channels.values() if now > c.expires]:
            self._close(channel, "expired")
        for number in [n for n, j in self.joining.items() if now > j.expires]:
            del self.joining[number]

    def hop_in(self, node: str, hop: bus.LinkHop, now: float) -> None:
        """A channel's traffic from another node (see the module's docstring)."""
        if hop.to_creator:  # from a joiner on ``node`` to a channel here (or not: ignored)
            channel = self.channels.get(hop.channel)
            if channel is None:
                return
            if not hop.frame:  # a join
                if channel.joiner is not None or now > channel.expires:
                    return  # taken, or gone: the joiner's link times out
                channel.joiner = RemoteEnd(node)
                assert self.hub.cluster is not None
                self.hub.cluster.link(hop.channel, b"", to_creator=False, node=node)  # "it is here"
                self._to(channel.owner, pb.DeviceLinkIn())
                return
            if channel.joiner != RemoteEnd(node):
                return
            if now > channel.expires:
                self._close(channel, "expired")
                return
            try:
                frame = pb.Frame.FromString(hop.frame)
            except DecodeError:
                self.hub.counters.bus_bad += 1
                return
            if frame.WhichOneof("body") == "device_link_data":
                with contextlib.suppress(RequestError):
                    self._pass(channel, channel.joiner, frame.device_link_data, now)
            return
        joining = self.joining.get(hop.channel)  # from the channel's node to a joiner here
        if joining is None or (joining.node and joining.node != node):
            return
        if not hop.frame:
            joining.node = node  # the answer to our join
            return
        try:
            msg = pb.DeviceLinkIn.FromString(hop.frame)
        except DecodeError:
            self.hub.counters.bus_bad += 1
            return
        self.hub._send(joining.session, pb.Frame(device_link_in=msg))
        if msg.closed:
            del self.joining[hop.channel]

    def _to_holder(self, number: int, far: Joining, frame: pb.Frame) -> None:
        """A joiner's message to the node holding the channel. Before that node answered (a
        joiner may speak, or leave, first) it goes to every node, after the join on the same
        subject, so the holder takes them in order."""
        assert self.hub.cluster is not None
        self.hub.cluster.link(number, frame.SerializeToString(), to_creator=True, node=far.node)

    def _joining_of(self, session: Session) -> tuple[int, Joining] | None:
        return next(((n, j) for n, j in self.joining.items() if j.session is session), None)

    def _devices(self, session: Session) -> list[Device]:
        return self.hub.db.devices(session.user_id)

    def _info(self, d: Device, session: Session) -> pb.DeviceInfo:
        online = any(x.device_id == d.id for x in self.hub.online.get(session.username, ())) or (
            self.hub.cluster is not None and self.hub.cluster.device_online(session.username, d.id)
        )
        return pb.DeviceInfo(
            device_id=d.id, name=d.name, created_ms=d.created_ms, last_seen_ms=d.last_seen_ms,
            online=online, this=d.id == session.device_id,
        )  # fmt: skip

    def _event(self, session: Session, kind: int, device_id: int, now: float) -> None:
        devices = self._devices(session)
        info = next(
            (self._info(d, session) for d in devices if d.id == device_id), pb.DeviceInfo(device_id=device_id)
        )
        info.this = False
        event = pb.DeviceEvent(kind=kind, device=info, devices=len(devices))  # type: ignore[arg-type]
        self.hub._to_user(session.username, pb.Frame(device_event=event))

    def _channel_of(self, session: Session) -> Channel | None:
        return next((c for c in self.channels.values() if session in (c.owner, c.joiner)), None)

    def _close_of(self, session: Session) -> None:
        channel = self._channel_of(session)
        if channel is not None:
            self._close(channel, "the other side left")

    def _close(self, channel: Channel, why: str) -> None:
        for s in (channel.owner, channel.joiner):
            if isinstance(s, RemoteEnd) or (s is not None and not s.closed):
                self._to(s, pb.DeviceLinkIn(closed=True, data=why.encode()))
        self._drop(channel)

    def _drop(self, channel: Channel) -> None:
        self.channels.pop(channel.number, None)

    def _to(self, end: Session | RemoteEnd, msg: pb.DeviceLinkIn) -> None:
        if isinstance(end, RemoteEnd):
            channel = next(c.number for c in self.channels.values() if c.joiner == end)
            assert self.hub.cluster is not None
            self.hub.cluster.link(channel, msg.SerializeToString(), to_creator=False, node=end.node)
        else:
            self.hub._send(end, pb.Frame(device_link_in=msg))


def _ms(now: float) -> int:
    return int(now * 1000)
