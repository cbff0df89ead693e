"""``p2pim.Client``: the client library, a facade over its parts.

* :mod:`.control`: the WebSocket to the rendezvous (requests, pushes, replies);
* :class:`p2pim.messaging.core.Messenger`: envelopes in and out, with the
  internet route policy (direct first, relay on retry, the offline store when
  the buddy is away), run by the shared :class:`p2pim.driver.Driver`;
* :class:`p2pim.paths.manager.PathManager`: the UDP socket and direct paths;
  a direct envelope goes from it straight to the messaging core;
* :mod:`.keys`: pinned keys and who is a mutual buddy;
* :mod:`.events`: what :meth:`Client.events` yields.

This module joins them: logins and reconnects, buddies and presence, and
the roads the messaging core's envelopes take. A lost connection is an
ordinary input: the client reconnects with exponential backoff and full
jitter, logs in again with its resume token, and the outbox goes out again.
Typical use::

    async with Client("ws://127.0.0.1:7788", Profile("alice")) as c:
        await c.login("alice", password)
        await c.send("bob", "hello")
        async for event in c.events():
            print(event)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path as FsPath
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection

from ..driver import Driver
from ..files.frames import is_file_frame
from ..files.service import FileService, TransferError
from ..files.store import Transfer
from ..identity import Identity, fingerprint, valid_public_key
from ..messaging.core import Messenger, Opened, Verdict
from ..messaging.delivery import INTERNET, Delivery, Transmit, Via
from ..messaging.envelope import seal, text_body
from ..messaging.store import ClientStore
from ..nat.portmap import Mapping
from ..paths.disco import is_disco, show
from ..paths.manager import PathManager
from ..paths.peer import DEFAULT_KEEPALIVE, Path
from ..profile import Profile
from ..wire import control_pb2 as pb
from ..wire import envelope_pb2 as epb
from .account import Account
from .control import KEY_CHANGED, ClientError, Control, Unreachable
from .devices import Devices
from .events import (
    BuddyChange,
    BuddyInfo,
    ConnectionState,
    DeviceChange,
    Event,
    Message,
    Outcome,
    PathUpdate,
    PresenceChange,
    Problem,
)
from .files import ClientHost
from .groups import GroupError, Groups
from .keys import KeyRing

log = logging.getLogger(__name__)

# Reconnect: full jitter (sleep uniform(0, min(CAP, BASE * 2**attempt))), so a
# server restart is not met by every client at the same instant.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
RELAY_IDS_KEPT = 4096  # request ids of recent relays, to match a refusal to its message
BUSY_RETRIES, BUSY_RETRY_MAX_MS = 3, 2000  # a login the server shed for load is tried again
# "Not now, retry": shedding load, or its database away for a moment (a cluster's failover)
BUSY_CODES = (pb.RATE_LIMITED, pb.UNAVAILABLE)
# A node closing with this (1012, "service restart") is draining: move to another one at once.
MOVE_CODES = (1001, 1012)

PRESENCE_NAMES = {pb.ONLINE: "online", pb.AWAY: "away", pb.OFFLINE: "offline"}
BUDDY_STATES = {
    pb.MUTUAL: "buddy",
    pb.REQUEST_SENT: "request sent",
    pb.REQUEST_RECEIVED: "asks to be your buddy",
}
BUDDY_EVENTS = {
    pb.BuddyEvent.REQUESTED: "requested",
    pb.BuddyEvent.ACCEPTED: "accepted",
    pb.BuddyEvent.DECLINED: "declined",
    pb.BuddyEvent.REMOVED: "removed",
    pb.BuddyEvent.KEY_CHANGED: "key_changed",
}
DEVICE_EVENTS = {pb.DeviceEvent.ADDED: "added", pb.DeviceEvent.REMOVED: "removed"}


class Client:
    def __init__(
        self,
        server: str,
        profile: Profile,
        *,
        reconnect: bool = True,
        quiet: bool = False,
        direct: bool | None = None,
        udp_port: int = 0,
        inbox: bool = True,
        port_mapping: bool = True,
        transfers: bool | None = None,
        auto_accept: FsPath | None = None,
    ) -> None:
        """``quiet``: a short-lived session (one CLI command) that buddies do not see as online.

        ``direct``: open a UDP socket and punch direct paths to buddies (default: unless quiet);
        ``udp_port`` is its port (0: any); ``port_mapping``: ask the router to forward it
        (PCP, NAT-PMP, UPnP IGD), and give the mapping back at the end.

        ``inbox``: this session takes delivery of messages (the offline backlog and live
        texts) and so must show them. A command that shows nothing (a one-shot ``send``)
        passes False: the server skips the backlog for it, and texts that reach it anyway
        are neither shown nor acknowledged (a relayed one is resent by its sender and then
        stored; a stored one stays on the server), so they wait for a session that shows
        them. Receipts it still takes: they are its own business.

        ``transfers``: this session moves the bytes of accepted file transfers (default:
        unless quiet; one session per profile does, see :mod:`.files`); ``auto_accept``:
        accept every buddy's file offer into this directory.
        """
        self.server = server
        self.quiet = quiet
        self.inbox = inbox
        self.direct = (not quiet) if direct is None else direct
        self.udp_port = udp_port
        self.port_mapping = port_mapping
        self.paths: PathManager | None = None
        self.local_ready = asyncio.Event()  # our candidates are known (STUN answered or gave up)
        self.profile = profile
        self.store = ClientStore(profile.db_path)
        self.reconnect = reconnect
        self.username = ""
        self.device_id = 0
        self.stun_servers: list[tuple[str, int]] = []  # the rendezvous's STUN service (from the login)
        # the account's devices (as the server last said): with more, what we send or take
        # is copied to them
        self.device_count = int(self.store.setting("devices") or 1)
        self.counters = {"bad_pushes": 0, "reconnects": 0, "sent_direct": 0, "sent_relay": 0}
        self.keys = KeyRing(self.store)
        self.messenger = Messenger(
            profile.identity,
            self.store,
            self.keys.for_envelope,
            policy=INTERNET,
            inbox=inbox,
            counters=self.counters,
            bodies=self._on_body,
            groups=self._on_group_direct,
        )
        for via in (Via.DIRECT, Via.RELAY, Via.STORE):
            self.counters.setdefault(f"received_{via.value}", 0)
        self.control = Control(server, self._on_push, self._on_reply, self._lost, self.counters)
        self._driver = Driver(self.messenger, self._transmit, self._emit)
        self.files = FileService(
            ClientHost(self),
            self._emit,
            run=(not quiet) if transfers is None else transfers,
            auto_accept=auto_accept,
        )
        self.groups = Groups(self)
        self.devices = Devices(self)
        self.account = Account(self)
        self._store_reqs: dict[int, bytes] = {}
        self._relay_reqs: OrderedDict[int, bytes] = OrderedDict()
        self._token = b""
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._outcomes: dict[bytes, asyncio.Future[Outcome]] = {}
        # Pushes are handled off the reader task: handling one may need a request
        # (an unknown sender's key), whose reply only the reader can deliver.
        self._pushes: asyncio.Queue[pb.Frame] = asyncio.Queue()
        self._logged_in = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._closing = False
        self._presence: pb.Presence.ValueType = pb.ONLINE

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    @property
    def delivery(self) -> Delivery:
        """The outbox and its route policy (for tests and diagnostics)."""
        return self.messenger.delivery

    # -- connection -------------------------------------------------------------

    async def connect(self) -> None:
        """Open the WebSocket and read the server's challenge. Raises :class:`Unreachable`."""
        await self.control.connect()
        if not self._tasks:
            self._driver.start()
            self.files.start()
            self._tasks.append(asyncio.create_task(self._push_worker()))

    async def close(self) -> None:
        """Disconnect (without logging out: buddies see us go offline) and stop all tasks."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await self.control.close()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self._driver.close()
        await self.groups.close()
        await self.files.close()
        if self.paths is not None:
            held = self.paths.portmap
            await self.paths.close()
            if held is not None:
                self._on_portmap(held, self.paths.portmap_tried, released=True)
        self.store.close()

    @property
    def connected(self) -> bool:
        return self.control.ws is not None and self.messenger.delivery.connected

    async def _lost(self, ws: ClientConnection) -> None:
        self._logged_in.clear()
        was_up = self.messenger.delivery.connected
        self.messenger.connection(False)
        self.files.all_offline()
        self._store_reqs.clear()
        if self._closing:
            return
        detail = "connection lost"
        if ws.close_reason:
            detail += f" ({ws.close_reason})"
        self._emit(ConnectionState(False, detail))
        if ws.close_code in MOVE_CODES and len(self.control.servers) > 1:
            self.control.move_on()  # the node is draining (or stopping): another one next
        if was_up and self.reconnect and self._token:
            self._tasks.append(asyncio.create_task(self._reconnect()))

    async def _reconnect(self) -> None:
        attempt = 0
        while not self._closing:
            # Full jitter even for the first try: a node's clients do not all land on the
            # next one at the same instant.
            await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
            attempt += 1
            try:
                await self.connect()
                await self._login(self.username, "", self._token, want_token=False)
            except Unreachable:
                if self.control.ws is not None:
                    await self.control.ws.close()
                continue
            except ClientError as exc:
                self._emit(
                    ConnectionState(False, f"cannot log in again: {exc.message}; log in with a password")
                )
                if self.control.ws is not None:
                    await self.control.ws.close()
                return
            self.counters["reconnects"] += 1
            self._emit(ConnectionState(True, "reconnected"))
            return

    # -- accounts ---------------------------------------------------------------

    async def register(self, username: str, password: str) -> None:
        """Create an account bound to this profile's identity key."""
        await self.control.request(
            "register",
            pb.Register(username=username, password=password, identity_key=self.profile.identity.public_key),
        )

    async def login(
        self, username: str, password: str = "", *, remember: bool = True, new_key: bool = False
    ) -> int:
        """Log in with a password, or (no password) with the token saved by an earlier login.

        ``new_key`` (with the password): every device of the account is lost; a new identity
        key is made here and becomes the account's (its buddies see a key change). File
        transfers keep the key this Client started with: make a new Client for them.

        Returns how many offline envelopes the server holds for us (they arrive as events).
        """
        token = b""
        if not password:
            if new_key:
                raise ClientError(pb.BAD_REQUEST, "a new key needs the password")
            saved = self.store.account()
            if saved is None or saved[1] != username or not saved[2]:
                raise ClientError(pb.AUTH_FAILED, f"no saved session for {username}: log in with a password")
            token = saved[2]
        fresh = Identity.generate() if new_key else None
        ok = await self._login(username, password, token, want_token=bool(password), new_identity=fresh)
        if ok.resume_token:
            self._token = ok.resume_token
        if remember:
            self.store.set_account(self.server, username, self._token)
        return ok.offline_pending

    async def _login(
        self,
        username: str,
        password: str,
        token: bytes,
        want_token: bool,
        new_identity: Identity | None = None,
    ) -> pb.LoginOk:
        device = new_identity or self.profile.device
        signature = device.sign_login(self.control.nonce, username)
        req = pb.Login(
            username=username,
            device_key=device.public_key,
            device_name=socket.gethostname()[:64],
            new_identity=new_identity is not None,
            password=password,
            resume_token=token,
            signature=signature,
            want_token=want_token,
            presence=self._presence,
            quiet=self.quiet,
            leave_offline=not self.inbox,
        )
        for attempt in range(BUSY_RETRIES + 1):
            try:
                reply = await self.control.request("login", req)
                break
            except ClientError as exc:
                # A server shedding load says "retry in a second"; a throttled password guess
                # says far longer, and that one the user should see.
                busy = exc.code in BUSY_CODES and 0 < exc.retry_after_ms <= BUSY_RETRY_MAX_MS
                if not busy or attempt == BUSY_RETRIES:
                    raise
                await asyncio.sleep(exc.retry_after_ms / 1000 * random.uniform(0.5, 1.5))
        if new_identity is not None:  # the server made it the account's key: ours before anything uses it
            self.profile.reset(new_identity)
            self.messenger.identity = self.groups.core.identity = new_identity
        self.username = self.messenger.name = self.groups.core.me = username
        self.keys.me, self.keys.own_key = username, self.profile.identity.public_key
        host = urlsplit(self.control.server).hostname or "127.0.0.1"
        self.stun_servers = [(a.ip or host, a.port) for a in reply.login_ok.stun]  # for NAT diagnostics
        self.device_id, self.device_count = reply.login_ok.device_id, max(1, reply.login_ok.devices)
        self.store.set_setting("devices", str(self.device_count))  # for sends while offline
        if token:
            self._token = token
        self.control.heartbeat(reply.login_ok.heartbeat_s)
        self.messenger.connection(True)
        if self.direct and self.paths is None:
            self._start_paths(reply.login_ok)
        await self._refresh_buddies()
        await self.groups.refresh()
        self.groups.start()  # what waits in the group outbox goes now
        self._logged_in.set()
        self._driver.kick()
        return reply.login_ok

    # -- direct paths ---------------------------------------------------------------

    def _start_paths(self, ok: pb.LoginOk) -> None:
        # `p2pim nat --lifetime` saves the keepalive its measurement implies.
        keepalive = float(self.store.setting("keepalive_s") or DEFAULT_KEEPALIVE)
        self.paths = PathManager(
            self.profile.identity,
            self.keys.for_disco,
            self._relay_bytes,
            self._on_direct,
            self._on_path,
            keepalive,
            port_mapping=self.port_mapping,
            on_portmap=self._on_portmap,
            on_quic=self.files.on_quic,
        )
        try:
            self.paths.start(self.udp_port)
        except OSError as exc:
            self.messenger.problem(
                "", f"no UDP socket ({exc.strerror}): messages go through the server only", 0
            )
            self._driver.kick()
            self.paths = None
            self.local_ready.set()
            return
        self._tasks.append(asyncio.create_task(self._discover(self.stun_servers)))

    def _on_portmap(self, mapping: Mapping | None, tried: tuple[str, ...], released: bool = False) -> None:
        """Kept for `p2pim status` (a one-shot session has no socket to map)."""
        self.store.set_setting(
            "port_mapping",
            json.dumps(
                {
                    "protocol": mapping.protocol if mapping else None,
                    "external": f"{mapping.external[0]}:{mapping.external[1]}" if mapping else None,
                    "tried": list(tried),
                    "released": released,
                    "at_ms": _now_ms(),
                }
            ),
        )

    async def _discover(self, stun: list[tuple[str, int]]) -> None:
        assert self.paths is not None
        loop = asyncio.get_running_loop()
        resolved = []
        for host, port in stun:
            try:
                infos = await loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
                resolved.append((str(infos[0][4][0]), port))
            except OSError:
                continue
        await self.paths.discover(resolved)
        self.local_ready.set()
        if not self.quiet:
            for peer in self.messenger.delivery.online:
                self.paths.want(peer)

    def _relay_bytes(self, peer: str, data: bytes) -> None:
        if self.messenger.delivery.connected:
            self.control.post(pb.Frame(id=self.control.take_id(), relay=pb.Relay(to=peer, data=data)))

    def _on_direct(self, data: bytes, addr: tuple[str, int]) -> None:
        """A direct envelope: straight to the messaging core (it parses it, once)."""
        self.messenger.receive(data, Via.DIRECT, asyncio.get_running_loop().time())
        self._driver.kick()

    def _on_path(self, peer: str, path: Path | None, reason: str) -> None:
        via, addr, rtt = _path_view(path)
        self.messenger.path(peer, path is not None)
        self.store.set_path(peer, via, addr, rtt, _now_ms())
        self.files.path_changed(peer)
        self._emit(PathUpdate(peer, via, addr, rtt, reason))

    def path_to(self, peer: str) -> tuple[str, str, float | None]:
        """("direct", "ip:port", rtt_ms) or ("relay", "", None), as this session sees it."""
        return _path_view(self.paths.route(peer) if self.paths else None)

    async def logout(self, forget: bool = True) -> None:
        """Log out (buddies see us offline); ``forget`` also revokes and deletes the saved token."""
        self._closing = True
        with contextlib.suppress(Unreachable):
            await self.control.request("logout", pb.Logout(revoke_token=forget))
        if forget:
            self.store.clear_account()
            self._token = b""

    async def set_status(self, status: str) -> None:
        presence = {"online": pb.ONLINE, "away": pb.AWAY}[status]
        self._presence = presence
        await self.control.request("set_status", pb.SetStatus(presence=presence))

    # -- buddies ------------------------------------------------------------------

    async def buddies(self) -> list[BuddyInfo]:
        return await self._refresh_buddies()

    async def _refresh_buddies(self) -> list[BuddyInfo]:
        reply = await self.control.request("buddy_list", pb.BuddyListRequest())
        out = []
        mutual = set()
        for b in reply.buddies.buddies:
            warning = self._see_key(b.username, b.identity_key)
            if b.state == pb.MUTUAL:
                mutual.add(b.username)
                self.messenger.presence(b.username, b.presence in (pb.ONLINE, pb.AWAY))
                self.files.online(b.username, b.presence in (pb.ONLINE, pb.AWAY))
            pinned = self.store.contact(b.username)
            key = pinned.identity_key if pinned else b.identity_key
            out.append(
                BuddyInfo(
                    b.username,
                    BUDDY_STATES.get(b.state, "?"),
                    PRESENCE_NAMES.get(b.presence, "offline"),
                    b.last_seen_ms,
                    fingerprint(key),
                    warning,
                )
            )
        self.keys.mutual = mutual
        self._driver.kick()
        if self.paths is not None:
            self.paths.forget_keys()
            if not self.quiet and self.local_ready.is_set():
                for peer in self.messenger.delivery.online & mutual:
                    self.paths.want(peer)  # a buddy learned just now may have tried to punch already
        return out

    def _see_key(self, peer: str, key: bytes) -> bool:
        """Pin on first sight; report a change or an unusable key (True) and keep the old key."""
        seen = self.keys.see(peer, key)
        if isinstance(seen, str):
            self.messenger.problem(peer, seen, asyncio.get_running_loop().time())
            self._driver.kick()
        elif seen is not None:
            self._emit(seen)
        return seen is not None

    async def buddy_add(self, peer: str) -> None:
        await self.control.request("buddy_request", pb.BuddyRequest(username=peer))
        await self._refresh_buddies()

    async def buddy_accept(self, peer: str) -> None:
        await self.control.request("buddy_accept", pb.BuddyAccept(username=peer))
        await self._refresh_buddies()

    async def buddy_decline(self, peer: str) -> None:
        await self.control.request("buddy_decline", pb.BuddyDecline(username=peer))

    async def buddy_remove(self, peer: str) -> None:
        await self.control.request("buddy_remove", pb.BuddyRemove(username=peer))
        self.keys.mutual.discard(peer)
        if self.paths is not None:
            self.paths.offline(peer)
            self.paths.forget_keys()

    def trust(self, peer: str) -> bool:
        """Accept the key the server now offers for ``peer`` (after comparing fingerprints)."""
        trusted = self.store.trust_offered_key(peer, _now_ms())
        if self.paths is not None:
            self.paths.forget_keys()
        return trusted

    async def lookup_endpoints(self, peer: str) -> pb.Endpoints:
        return (await self.control.request("lookup_endpoints", pb.LookupEndpoints(username=peer))).endpoints

    async def publish_endpoints(self, endpoints: pb.PublishEndpoints) -> None:
        await self.control.request("publish_endpoints", endpoints)

    # -- messages -----------------------------------------------------------------

    async def send(self, peer: str, text: str) -> bytes:
        """Queue ``text`` for ``peer`` (a buddy, or ``#group``); returns its message id once it
        is safely in the outbox.

        Works offline for a known buddy or group (it goes out after the next login).
        """
        if peer.startswith("#"):
            try:
                return await self.groups.send(peer, text)
            except GroupError as exc:
                raise ClientError(pb.NOT_A_MEMBER, str(exc)) from None
        key = await self._check_peer(peer)
        try:
            body = text_body(text)
        except ValueError as exc:
            raise ClientError(pb.BAD_REQUEST, str(exc)) from None
        msg_id = self._send_body(peer, key, body, text)
        self.copy_to_devices(peer, True, text, msg_id, body.sent_at_ms)
        return msg_id

    def copy_to_devices(
        self, peer: str, outgoing: bool, text: str, msg_id: bytes, sent_at_ms: int, author: str = ""
    ) -> None:
        """With several devices: what this one sent (or alone took) goes to the others, sealed
        by the account to itself and stored for them (through the durable store outbox)."""
        me = self.username or self._account_name()
        if self.device_count < 2 or not me:
            return
        copy = epb.DeviceCopy(
            peer=peer, outgoing=outgoing, author=author, msg_id=msg_id, sent_at_ms=sent_at_ms, text=text
        )
        env = seal(self.profile.identity, me, me, self.profile.identity.public_key, epb.Body(copy=copy))
        self.groups.store.queue([("store", me, env.msg_id, env.SerializeToString())])
        self.groups.wake()

    async def _check_peer(self, peer: str) -> bytes:
        """``peer``'s pinned key, if we may send to them now; else a :class:`ClientError` that says why."""
        if self.connected and peer not in self.keys.mutual:
            await self._refresh_buddies()
            if peer not in self.keys.mutual:
                raise ClientError(pb.NOT_A_BUDDY, f"{peer} is not your buddy (p2pim buddy add {peer})")
        contact = self.store.contact(peer)
        if contact is None:
            raise ClientError(pb.NOT_A_BUDDY, f"{peer} is not a known buddy")
        if not valid_public_key(contact.identity_key):
            raise ClientError(KEY_CHANGED, f"the key pinned for {peer} is not a usable key")
        if contact.offered_key is not None:
            raise ClientError(
                KEY_CHANGED,
                f"{peer}'s key changed (pinned {fingerprint(contact.identity_key)}, offered "
                f"{fingerprint(contact.offered_key)}); check with {peer}, then run: p2pim buddy trust {peer}",
            )
        return contact.identity_key

    def _send_body(self, peer: str, key: bytes, body: epb.Body, text: str) -> bytes:
        """Seal ``body`` into the outbox (``text``: its history line) and send it on its way."""
        if not self.messenger.name:
            self.messenger.name = self._account_name()
        msg_id = self.messenger.send(peer, key, body, text, asyncio.get_running_loop().time())
        self._driver.kick()
        return msg_id

    # -- files ------------------------------------------------------------------------

    async def send_file(self, peer: str, path: str | FsPath) -> Transfer:
        """Offer a file to ``peer``; the bytes go once they accept (see :mod:`p2pim.files.service`)."""
        with _as_client_error():
            return await self.files.send(peer, path)

    async def accept_file(self, file_id: bytes, directory: FsPath | None = None) -> Transfer:
        with _as_client_error():
            return await self.files.accept(file_id, directory)

    async def decline_file(self, file_id: bytes) -> Transfer:
        with _as_client_error():
            return await self.files.decline(file_id)

    async def cancel_file(self, file_id: bytes) -> Transfer:
        with _as_client_error():
            return await self.files.cancel(file_id)

    def find_file(self, prefix: str) -> Transfer:
        """The transfer whose id starts with ``prefix`` (as `p2pim files` shows it)."""
        with _as_client_error():
            return self.files.find(prefix)

    def transfers(self, active: bool = False) -> list[Transfer]:
        return [t for t in self.files.store.list(active=active) if self.files.mine(t)]

    def _account_name(self) -> str:
        saved = self.store.account()
        if saved is None:
            raise ClientError(pb.NOT_LOGGED_IN, "log in first")
        return saved[1]

    async def wait_outcome(self, msg_id: bytes, timeout: float) -> Outcome | None:
        """Wait until ``msg_id`` leaves the outbox; None if it is still queued after ``timeout``."""
        # No await between this check and registering the future, and the messaging core
        # writes the database before its Outcome reaches _emit: none can slip between.
        row = self.store.message(msg_id)
        if row is None:
            return None
        if row.state not in ("queued", "relayed"):
            return Outcome(row.peer, msg_id, row.state)
        future = self._outcomes.setdefault(msg_id, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return None

    async def mark_read(self, peer: str) -> int:
        """Mark everything from ``peer`` read and tell them (a read receipt); returns how many."""
        contact = self.store.contact(peer)
        key = contact.identity_key if contact is not None and contact.offered_key is None else None
        count = self.messenger.mark_read(peer, key, asyncio.get_running_loop().time())
        self._driver.kick()
        return count

    def history(self, peer: str, limit: int = 50) -> list[Any]:
        return self.store.history(peer, limit)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            yield await self._events.get()

    def _emit(self, event: Event) -> None:
        if isinstance(event, Message) and event.route in ("direct", "relay"):
            # Taken live, here only perhaps: our other devices (offline ones too) get a copy.
            self.copy_to_devices(event.peer, False, event.text, event.msg_id, event.sent_at_ms)
        if isinstance(event, Outcome):
            future = self._outcomes.pop(event.msg_id, None)
            if future is not None and not future.done():
                future.set_result(event)
        self._events.put_nowait(event)

    # -- the roads the messaging core sends on ---------------------------------------------

    def _transmit(self, t: Transmit) -> None:
        item, via = t.item, t.via
        paths = self.paths
        if via is not Via.STORE and paths is not None:
            paths.want(item.peer)
            if t.suspect:
                paths.suspect(item.peer)
        if via is Via.DIRECT:
            if paths is not None and paths.send_direct(item.peer, item.envelope):
                self.counters["sent_direct"] += 1
                return
            via = Via.RELAY  # the socket failed: the relay cannot lose it
        frame = pb.Frame(id=self.control.take_id())
        if via is Via.RELAY:
            self.counters["sent_relay"] += 1
            frame.relay.to, frame.relay.data = item.peer, item.envelope
            self._relay_reqs[frame.id] = item.msg_id
            if len(self._relay_reqs) > RELAY_IDS_KEPT:
                self._relay_reqs.popitem(last=False)
        else:
            frame.store.to, frame.store.msg_id, frame.store.envelope = item.peer, item.msg_id, item.envelope
            frame.store.counts = not item.receipt  # a text or file offer: counts for email notices
            self._store_reqs[frame.id] = item.msg_id
        self.control.post(frame)

    def _on_reply(self, frame: pb.Frame) -> bool:
        """Answers to relays and stores the messaging core sent; False for other replies."""
        slow_down = frame.error.code == pb.RATE_LIMITED
        if self.files.refused(frame.id, slow_down, frame.error.retry_after_ms / 1000):
            return True
        if frame.id in self._store_reqs:
            msg_id = self._store_reqs.pop(frame.id)
            if frame.WhichOneof("body") == "ok":
                self.messenger.stored(msg_id)
            else:
                self._refused(msg_id, frame.error)
        elif frame.id in self._relay_reqs:  # relays are answered only when refused
            self._refused(self._relay_reqs.pop(frame.id), frame.error)
        else:
            return False
        self._driver.kick()
        return True

    def _refused(self, msg_id: bytes, error: pb.Error) -> None:
        # RATE_LIMITED: the server is shedding load; UNAVAILABLE: its database is away for a
        # moment. The message waits and goes again.
        retry = max(0.05, error.retry_after_ms / 1000) if error.code in BUSY_CODES else 0.0
        now = asyncio.get_running_loop().time()
        self.messenger.refused(msg_id, error.code == pb.PEER_OFFLINE, error.message, retry, now)

    # -- incoming pushes -------------------------------------------------------------

    def _on_push(self, frame: pb.Frame) -> None:
        if frame.WhichOneof("body") == "device_link_in":  # linking a device: also before login
            self.devices.on_link(frame.device_link_in)
            return
        self._pushes.put_nowait(frame)

    async def _push_worker(self) -> None:
        """Handle pushes one by one. Nothing one push holds may end this loop: it serves them all."""
        while True:
            frame = await self._pushes.get()
            await self._logged_in.wait()  # the server pushes right after LoginOk: finish login first
            try:
                await self._handle_push(frame)
            except Unreachable:
                pass  # the connection dropped while handling it; offline copies come again
            except Exception as exc:  # a bug or input nobody foresaw: count it, say it, carry on
                self.counters["bad_pushes"] += 1
                log.debug("push %s failed", frame.WhichOneof("body"), exc_info=True)
                self.messenger.problem(
                    "",
                    f"could not handle a {frame.WhichOneof('body')} from the server: {exc}",
                    asyncio.get_running_loop().time(),
                )
            self._driver.kick()

    async def _handle_push(self, frame: pb.Frame) -> None:
        kind = frame.WhichOneof("body")
        if kind == "relay_in":
            sender, data = frame.relay_in.sender, frame.relay_in.data
            if is_disco(data):
                if self.paths is not None:
                    self.paths.on_relay(sender, data)
                return
            if is_file_frame(data):
                self.files.on_relay(sender, data)
                return
            await self._receive(data, Via.RELAY, sender)
        elif kind == "offline_envelope":
            off = frame.offline_envelope
            if off.group:  # a group's: its events and its members' messages
                keep = self.groups.on_stored(off.store_id, off.sender, off.envelope) is None
            else:
                verdict = await self._receive(off.envelope, Via.STORE, off.sender)
                keep = verdict is Verdict.KEPT
            # Every pushed offline envelope is answered: the server sends the next ones as we do.
            # One unreadable for good is acknowledged too, or it would sit in our store for a
            # month crowding out real ones.
            answer = (
                pb.OfflineAck(keep_ids=[off.store_id]) if keep else pb.OfflineAck(store_ids=[off.store_id])
            )
            self.control.post(pb.Frame(id=self.control.take_id(), offline_ack=answer))
        elif kind == "presence":
            p = frame.presence
            online = p.presence in (pb.ONLINE, pb.AWAY)
            if online and p.username not in self.keys.mutual and self.connected:
                await self._refresh_buddies()  # only buddies' presence is pushed: ours is stale
            self.messenger.presence(p.username, online)
            self.files.online(p.username, online)
            if self.paths is not None:
                if not online:
                    self.paths.offline(p.username)
                elif not self.quiet and self.local_ready.is_set():
                    self.paths.want(p.username)
            self._emit(PresenceChange(p.username, PRESENCE_NAMES.get(p.presence, "offline"), p.last_seen_ms))
        elif kind == "buddy_event":
            ev = frame.buddy_event
            self._see_key(ev.buddy.username, ev.buddy.identity_key)
            if ev.kind == pb.BuddyEvent.ACCEPTED:
                self.keys.mutual.add(ev.buddy.username)
            elif ev.kind == pb.BuddyEvent.REMOVED:
                self.keys.mutual.discard(ev.buddy.username)
                if self.paths is not None:
                    self.paths.offline(ev.buddy.username)
            if self.paths is not None:
                self.paths.forget_keys()
            self._emit(BuddyChange(ev.buddy.username, BUDDY_EVENTS.get(ev.kind, "?")))
        elif kind == "device_event":
            dev = frame.device_event
            self.device_count = max(1, dev.devices)
            self.store.set_setting("devices", str(self.device_count))
            kind_name = DEVICE_EVENTS.get(dev.kind, "?")
            self._emit(DeviceChange(kind_name, dev.device.device_id, dev.device.name, self.device_count))
        elif kind == "error":
            self._emit(Problem(f"server: {frame.error.message}"))

    def _on_body(self, peer: str, opened: Opened, via: Via) -> bool:
        """Bodies the messaging core leaves to us: group keys, file offers and answers."""
        if opened.body.WhichOneof("kind") == "group_key":  # pairwise: from the store or direct
            self.groups.on_key(peer, opened.body.group_key)
            return True
        return self.files.on_body(peer, opened, via)

    def _on_group_direct(self, env: epb.Envelope) -> None:
        self.groups.on_direct(env)

    def _emit_problem(self, text: str) -> None:
        self.messenger.problem("", text, asyncio.get_running_loop().time())
        self._driver.kick()

    async def _receive(self, data: bytes, via: Via, sender: str) -> Verdict:
        """An envelope the server pushed: learn an unknown sender's key first, then open it."""
        if self.store.contact(sender) is None and self.connected:
            await self._refresh_buddies()
        return self.messenger.receive(data, via, asyncio.get_running_loop().time(), sender=sender).verdict


@contextlib.contextmanager
def _as_client_error() -> Iterator[None]:
    try:
        yield
    except TransferError as exc:
        raise ClientError(pb.BAD_REQUEST, str(exc)) from None


def _path_view(path: Path | None) -> tuple[str, str, float | None]:
    """How a path is shown and stored: ("direct", "ip:port", rtt_ms) or ("relay", "", None)."""
    if path is None:
        return ("relay", "", None)
    return ("direct", show(path.addr), round(path.rtt * 1000, 2))


def _now_ms() -> int:
    return int(time.time() * 1000)
