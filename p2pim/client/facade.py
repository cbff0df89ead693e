"""``p2pim.Client``: the async client library (asyncio shell over the sans-IO parts).

Where things enter and leave: :meth:`Client._reader` takes every frame the
server sends; replies complete the request that asked, pushes go to
``_on_push`` (presence, buddy events, relayed and offline envelopes). Outgoing
envelopes are decided by :class:`p2pim.messaging.delivery.Delivery` and leave
in :meth:`Client._pump`. Everything the user should see comes out of
:meth:`Client.events`.

A lost connection is an ordinary input: the client reconnects with
exponential backoff and full jitter, logs in again with its resume token, and
the outbox goes out again. Typical use::

    async with Client("ws://127.0.0.1:7788", Profile("alice")) as c:
        await c.login("alice", password)
        await c.send("bob", "hello")
        async for event in c.events():
            print(event)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .identity import fingerprint, valid_public_key
from .messaging.delivery import Delivery, Failed, Finished, Transmit, Via
from .messaging.envelope import (
    EnvelopeError,
    Opened,
    open_envelope,
    parse_envelope,
    receipt_body,
    seal,
    text_body,
)
from .messaging.store import ClientStore, Contact
from .paths.disco import is_disco
from .paths.manager import PathManager
from .paths.peer import DEFAULT_KEEPALIVE, Path
from .profile import Profile
from .wire import control_pb2 as pb
from .wire import envelope_pb2 as epb

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0
# Reconnect: full jitter (sleep uniform(0, min(CAP, BASE * 2**attempt))), so a
# server restart is not met by every client at the same instant.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
MAX_FRAME = 256 * 1024
RELAY_IDS_KEPT = 4096  # request ids of recent relays, to match a refusal to its message
BUSY_RETRIES, BUSY_RETRY_MAX_MS = 3, 2000  # a login the server shed for load is tried again
# Bad input from one buddy (garbage relayed, forged envelopes) is counted always and
# shown once, then as one summary line per this many seconds: a flood must not
# become a flood of warnings.
PROBLEM_EVERY_S = 30.0

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
}
KEY_CHANGED = 100  # local error code (not from the server): a buddy's key differs from the pinned one


class ClientError(Exception):
    """A refused request. ``code`` is a ``control_pb2.ErrorCode`` (or :data:`KEY_CHANGED`)."""

    def __init__(self, code: int, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


class Unreachable(ClientError):
    """The server cannot be reached, or the connection dropped mid-request."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


# -- events ---------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A text from a buddy, shown once (duplicates are dropped before this)."""

    peer: str
    text: str
    msg_id: bytes
    sent_at_ms: int
    offline: bool  # came from the server's offline store


@dataclass(frozen=True)
class Receipt:
    """Our messages ``msg_ids`` reached ``peer`` ("delivered") or were shown there ("read")."""

    peer: str
    kind: str
    msg_ids: tuple[bytes, ...]


@dataclass(frozen=True)
class PresenceChange:
    peer: str
    status: str  # online, away, offline
    last_seen_ms: int


@dataclass(frozen=True)
class BuddyChange:
    peer: str
    kind: str  # requested, accepted, declined, removed


@dataclass(frozen=True)
class KeyChanged:
    """The server offers a different key for ``peer`` than the one pinned: never used silently."""

    peer: str
    pinned: str  # fingerprints
    offered: str


@dataclass(frozen=True)
class Outcome:
    """An outbox item finished: ``state`` is delivered, stored or failed (``detail`` says why)."""

    peer: str
    msg_id: bytes
    state: str
    detail: str = ""


@dataclass(frozen=True)
class Problem:
    """Something went wrong that the user should know about; the client carries on."""

    message: str


@dataclass(frozen=True)
class ConnectionState:
    up: bool
    detail: str


@dataclass(frozen=True)
class PathUpdate:
    """Traffic to ``peer`` now goes ``via`` "direct" (to ``addr``) or "relay"."""

    peer: str
    via: str
    addr: str
    rtt_ms: float | None
    reason: str


Event = (
    Message
    | Receipt
    | PresenceChange
    | BuddyChange
    | KeyChanged
    | Outcome
    | Problem
    | ConnectionState
    | PathUpdate
)


@dataclass(frozen=True)
class BuddyInfo:
    username: str
    state: str  # buddy, request sent, asks to be your buddy
    presence: str
    last_seen_ms: int
    fingerprint: str
    key_warning: bool  # the server's key differs from the pinned one


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
    ) -> None:
        """``quiet``: a short-lived session (one CLI command) that buddies do not see as online.

        ``direct``: open a UDP socket and punch direct paths to buddies (default: unless quiet);
        ``udp_port`` is its port (0: any).

        ``inbox``: this session takes delivery of messages (the offline backlog and live
        texts) and so must show them. A command that shows nothing (a one-shot ``send``)
        passes False: the server skips the backlog for it, and texts that reach it anyway
        are neither shown nor acknowledged (a relayed one is resent by its sender and then
        stored; a stored one stays on the server), so they wait for a session that shows
        them. Receipts it still takes: they are its own business.
        """
        self.server = server
        self.quiet = quiet
        self.inbox = inbox
        self.direct = (not quiet) if direct is None else direct
        self.udp_port = udp_port
        self.paths: PathManager | None = None
        self.local_ready = asyncio.Event()  # our candidates are known (STUN answered or gave up)
        self.profile = profile
        self.store = ClientStore(profile.db_path)
        self.reconnect = reconnect
        self.username = ""
        self.delivery = Delivery()
        self.counters = {
            "bad_envelopes": 0,
            "bad_pushes": 0,
            "left_for_inbox": 0,
            "duplicates": 0,
            "reconnects": 0,
            "sent_direct": 0,
            "sent_relay": 0,
            "received_direct": 0,
            "received_relay": 0,
        }
        self._ws: ClientConnection | None = None
        self._nonce = b""
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[pb.Frame]] = {}
        self._store_reqs: dict[int, bytes] = {}
        self._relay_reqs: OrderedDict[int, bytes] = OrderedDict()
        self._token = b""
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._outcomes: dict[bytes, asyncio.Future[Outcome]] = {}
        self._mutual: set[str] = set()
        self._wake = asyncio.Event()
        # Pushes are handled off the reader task: handling one may need a request
        # (an unknown sender's key), whose reply only the reader can deliver.
        self._pushes: asyncio.Queue[tuple[pb.Frame, bool]] = asyncio.Queue()  # (frame, came direct)
        self._logged_in = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._reader_task: asyncio.Task[None] | None = None
        self._closing = False
        self._presence: pb.Presence.ValueType = pb.ONLINE
        self._problems: dict[str, tuple[float, int]] = {}  # sender -> (last shown, dropped since)
        for row in self.store.outbox():
            self.delivery.add(row.msg_id, row.peer, row.envelope, row.receipt)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    # -- connection -------------------------------------------------------------

    async def connect(self) -> None:
        """Open the WebSocket and read the server's challenge. Raises :class:`Unreachable`."""
        try:
            ws = await asyncio.wait_for(
                connect(
                    self.server,
                    max_size=4 * MAX_FRAME,
                    compression=None,
                    open_timeout=CONNECT_TIMEOUT,
                    ping_interval=20,
                    ping_timeout=20,
                    close_timeout=2,  # a server that does not answer our close must not hold up exit
                ),
                CONNECT_TIMEOUT + 1,
            )
        except InvalidStatus as exc:  # the server answered, and said no (e.g. too many connections)
            said = exc.response.body.decode("utf-8", "replace").strip()[:200] if exc.response.body else ""
            raise Unreachable(
                f"the server at {self.server} refused the connection: "
                f"{said or 'HTTP ' + str(exc.response.status_code)}"
            ) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise Unreachable(f"cannot reach the server at {self.server}: {_reason(exc)}") from None
        except InvalidURI:
            raise ClientError(
                pb.BAD_REQUEST, f"bad server address {self.server!r} (ws://host:port)"
            ) from None
        try:
            first = pb.Frame.FromString(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT))  # type: ignore[arg-type]
        except Exception:
            await ws.close()
            raise Unreachable(f"{self.server} did not greet us like a p2pim rendezvous") from None
        if first.WhichOneof("body") != "challenge":
            await ws.close()
            raise Unreachable(f"{self.server} did not greet us like a p2pim rendezvous")
        self._ws, self._nonce = ws, first.challenge.nonce
        self._reader_task = asyncio.create_task(self._reader(ws))
        if not self._tasks:
            self._tasks.append(asyncio.create_task(self._pump()))
            self._tasks.append(asyncio.create_task(self._push_worker()))

    async def close(self) -> None:
        """Disconnect (without logging out: buddies see us go offline) and stop all tasks."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.paths is not None:
            await self.paths.close()
        self.store.close()

    @property
    def connected(self) -> bool:
        return self._ws is not None and self.delivery.connected

    async def _request(self, body: str, message: Any, timeout: float = REQUEST_TIMEOUT) -> pb.Frame:
        ws = self._ws
        if ws is None:
            raise Unreachable("not connected to the server")
        frame = pb.Frame(id=self._take_id())
        getattr(frame, body).CopyFrom(message)
        future: asyncio.Future[pb.Frame] = asyncio.get_running_loop().create_future()
        self._pending[frame.id] = future
        try:
            await ws.send(frame.SerializeToString())
            reply = await asyncio.wait_for(future, timeout)
        except ConnectionClosed:
            raise Unreachable("the connection to the server was lost") from None
        except TimeoutError:
            raise Unreachable("the server did not answer in time") from None
        finally:
            self._pending.pop(frame.id, None)
        if reply.WhichOneof("body") == "error":
            raise ClientError(reply.error.code, reply.error.message, reply.error.retry_after_ms)
        return reply

    def _take_id(self) -> int:
        self._next_id = self._next_id % 0xFFFFFFFF + 1
        return self._next_id

    async def _reader(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                if isinstance(data, str):
                    continue
                try:
                    frame = pb.Frame.FromString(data)
                except Exception:
                    self.counters["bad_envelopes"] += 1
                    continue
                if frame.id:
                    self._on_reply(frame)
                else:
                    if frame.HasField("relay_in") and not is_disco(frame.relay_in.data):
                        self.counters["received_relay"] += 1
                    self._pushes.put_nowait((frame, False))
        except ConnectionClosed:
            pass
        finally:
            await self._lost(ws)

    async def _lost(self, ws: ClientConnection) -> None:
        if self._ws is not ws:
            return
        self._ws = None
        self._logged_in.clear()
        was_up = self.delivery.connected
        self.delivery.connection(False)
        self._store_reqs.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unreachable("the connection to the server was lost"))
        if self._closing:
            return
        detail = "connection lost"
        error = ws.close_reason if ws.close_reason else ""
        if error:
            detail += f" ({error})"
        self._emit(ConnectionState(False, detail))
        if was_up and self.reconnect and self._token:
            self._tasks.append(asyncio.create_task(self._reconnect()))

    async def _reconnect(self) -> None:
        attempt = 0
        while not self._closing:
            await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
            attempt += 1
            try:
                await self.connect()
                await self._login(self.username, "", self._token, want_token=False)
            except Unreachable:
                if self._ws is not None:
                    await self._ws.close()
                continue
            except ClientError as exc:
                self._emit(
                    ConnectionState(False, f"cannot log in again: {exc.message}; log in with a password")
                )
                if self._ws is not None:
                    await self._ws.close()
                return
            self.counters["reconnects"] += 1
            self._emit(ConnectionState(True, "reconnected"))
            return

    # -- accounts ---------------------------------------------------------------

    async def register(self, username: str, password: str) -> None:
        """Create an account bound to this profile's identity key."""
        await self._request(
            "register",
            pb.Register(username=username, password=password, identity_key=self.profile.identity.public_key),
        )

    async def login(self, username: str, password: str = "", *, remember: bool = True) -> int:
        """Log in with a password, or (no password) with the token saved by an earlier login.

        Returns how many offline envelopes the server holds for us (they arrive as events).
        """
        token = b""
        if not password:
            saved = self.store.account()
            if saved is None or saved[1] != username or not saved[2]:
                raise ClientError(pb.AUTH_FAILED, f"no saved session for {username}: log in with a password")
            token = saved[2]
        ok = await self._login(username, password, token, want_token=bool(password))
        if ok.resume_token:
            self._token = ok.resume_token
        if remember:
            self.store.set_account(self.server, username, self._token)
        return ok.offline_pending

    async def _login(self, username: str, password: str, token: bytes, want_token: bool) -> pb.LoginOk:
        signature = self.profile.identity.sign_login(self._nonce, username)
        req = pb.Login(
            username=username,
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
                reply = await self._request("login", req)
                break
            except ClientError as exc:
                # A server shedding load says "retry in a second"; a throttled password guess
                # says far longer, and that one the user should see.
                busy = exc.code == pb.RATE_LIMITED and 0 < exc.retry_after_ms <= BUSY_RETRY_MAX_MS
                if not busy or attempt == BUSY_RETRIES:
                    raise
                await asyncio.sleep(exc.retry_after_ms / 1000 * random.uniform(0.5, 1.5))
        self.username = username
        if token:
            self._token = token
        self.delivery.connection(True)
        if self.direct and self.paths is None:
            self._start_paths(reply.login_ok)
        await self._refresh_buddies()
        self._logged_in.set()
        self._wake.set()
        return reply.login_ok

    # -- direct paths ---------------------------------------------------------------

    def _start_paths(self, ok: pb.LoginOk) -> None:
        # `p2pim nat --lifetime` saves the keepalive its measurement implies.
        keepalive = float(self.store.setting("keepalive_s") or DEFAULT_KEEPALIVE)
        self.paths = PathManager(
            self.profile.identity,
            self._buddy_keys,
            self._relay_bytes,
            self._on_direct,
            self._on_path,
            keepalive,
        )
        try:
            self.paths.start(self.udp_port)
        except OSError as exc:
            self._emit(Problem(f"no UDP socket ({exc.strerror}): messages go through the server only"))
            self.paths = None
            self.local_ready.set()
            return
        host = urlsplit(self.server).hostname or "127.0.0.1"
        stun = [(a.ip or host, a.port) for a in ok.stun]
        self._tasks.append(asyncio.create_task(self._discover(stun)))

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
            for peer in self.delivery.online:
                self.paths.want(peer)

    def _buddy_keys(self) -> dict[bytes, str]:
        """Pinned keys of mutual buddies: nobody else may probe us or send to us directly."""
        return {k: u for k, u in self.store.keys().items() if u in self._mutual and valid_public_key(k)}

    def _relay_bytes(self, peer: str, data: bytes) -> None:
        ws = self._ws
        if ws is None or not self.delivery.connected:
            return
        frame = pb.Frame(id=self._take_id(), relay=pb.Relay(to=peer, data=data))

        async def send() -> None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(frame.SerializeToString())

        self._tasks.append(asyncio.create_task(send()))
        self._tasks = [t for t in self._tasks if not t.done()]

    def _on_direct(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            env = parse_envelope(data)
        except EnvelopeError:
            self.counters["bad_envelopes"] += 1
            return
        if env.sender not in self._mutual:
            self.counters["bad_envelopes"] += 1  # the relay would refuse it; so do we
            return
        self.counters["received_direct"] += 1
        self._pushes.put_nowait((pb.Frame(relay_in=pb.RelayIn(sender=env.sender, data=data)), True))

    def _on_path(self, peer: str, path: Path | None, reason: str) -> None:
        via, addr, rtt = _path_view(path)
        self.store.set_path(peer, via, addr, rtt, _now_ms())
        self._emit(PathUpdate(peer, via, addr, rtt, reason))

    def path_to(self, peer: str) -> tuple[str, str, float | None]:
        """("direct", "ip:port", rtt_ms) or ("relay", "", None), as this session sees it."""
        return _path_view(self.paths.route(peer) if self.paths else None)

    async def logout(self, forget: bool = True) -> None:
        """Log out (buddies see us offline); ``forget`` also revokes and deletes the saved token."""
        self._closing = True
        with contextlib.suppress(Unreachable):
            await self._request("logout", pb.Logout(revoke_token=forget))
        if forget:
            self.store.clear_account()
            self._token = b""

    async def set_status(self, status: str) -> None:
        presence = {"online": pb.ONLINE, "away": pb.AWAY}[status]
        self._presence = presence
        await self._request("set_status", pb.SetStatus(presence=presence))

    # -- buddies ------------------------------------------------------------------

    async def buddies(self) -> list[BuddyInfo]:
        return await self._refresh_buddies()

    async def _refresh_buddies(self) -> list[BuddyInfo]:
        reply = await self._request("buddy_list", pb.BuddyListRequest())
        out = []
        self._mutual = set()
        for b in reply.buddies.buddies:
            warning = self._see_key(b.username, b.identity_key)
            if b.state == pb.MUTUAL:
                self._mutual.add(b.username)
                self.delivery.presence(b.username, b.presence in (pb.ONLINE, pb.AWAY))
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
        if self.paths is not None:
            self.paths.forget_keys()
            if not self.quiet and self.local_ready.is_set():
                for peer in self.delivery.online & self._mutual:
                    self.paths.want(peer)  # a buddy learned just now may have tried to punch already
        return out

    def _see_key(self, peer: str, key: bytes) -> bool:
        """Pin on first sight; report a change or an unusable key (True) and keep the old key."""
        if not valid_public_key(key):
            self._problem(peer, f"the server offers an unusable key for {peer}: ignored")
            return True
        seen = self.store.see_key(peer, key, _now_ms())
        if seen != "changed":
            return False
        pinned = self.store.contact(peer)
        assert pinned is not None
        self._emit(KeyChanged(peer, fingerprint(pinned.identity_key), fingerprint(key)))
        return True

    async def buddy_add(self, peer: str) -> None:
        await self._request("buddy_request", pb.BuddyRequest(username=peer))
        await self._refresh_buddies()

    async def buddy_accept(self, peer: str) -> None:
        await self._request("buddy_accept", pb.BuddyAccept(username=peer))
        await self._refresh_buddies()

    async def buddy_decline(self, peer: str) -> None:
        await self._request("buddy_decline", pb.BuddyDecline(username=peer))

    async def buddy_remove(self, peer: str) -> None:
        await self._request("buddy_remove", pb.BuddyRemove(username=peer))
        self._mutual.discard(peer)
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
        return (await self._request("lookup_endpoints", pb.LookupEndpoints(username=peer))).endpoints

    async def publish_endpoints(self, endpoints: pb.PublishEndpoints) -> None:
        await self._request("publish_endpoints", endpoints)

    # -- messages -----------------------------------------------------------------

    async def send(self, peer: str, text: str) -> bytes:
        """Queue ``text`` for ``peer``; returns its message id once it is safely in the outbox.

        Works offline for a known buddy (it goes out after the next login).
        """
        if self.connected and peer not in self._mutual:
            await self._refresh_buddies()
            if peer not in self._mutual:
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
        try:
            body = text_body(text)
        except ValueError as exc:
            raise ClientError(pb.BAD_REQUEST, str(exc)) from None
        return self._queue(peer, contact.identity_key, body, text)

    def _queue(
        self, peer: str, key: bytes, body: epb.Body, text: str | None, relay_only: bool = False
    ) -> bytes:
        env = seal(self.profile.identity, self.username or self._account_name(), peer, key, body)
        data = env.SerializeToString()
        self.store.queue_outgoing(env.msg_id, peer, text, data, env.sent_at_ms, _now_ms())
        self.delivery.add(env.msg_id, peer, data, receipt=text is None, relay_only=relay_only)
        self._wake.set()
        return env.msg_id

    def _account_name(self) -> str:
        saved = self.store.account()
        if saved is None:
            raise ClientError(pb.NOT_LOGGED_IN, "log in first")
        return saved[1]

    async def wait_outcome(self, msg_id: bytes, timeout: float) -> Outcome | None:
        """Wait until ``msg_id`` leaves the outbox; None if it is still queued after ``timeout``."""
        # No await between this check and registering the future, and _finish writes the
        # database before it resolves futures: an outcome cannot slip between the two.
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
        ids = self.store.unread(peer)
        if ids:
            self.store.mark_read(ids)
            contact = self.store.contact(peer)
            if contact is not None and contact.offered_key is None:
                self._queue(peer, contact.identity_key, receipt_body(epb.Receipt.READ, ids), None)
        return len(ids)

    def history(self, peer: str, limit: int = 50) -> list[Any]:
        return self.store.history(peer, limit)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            yield await self._events.get()

    def _emit(self, event: Event) -> None:
        self._events.put_nowait(event)

    # -- outgoing: the delivery pump ---------------------------------------------

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = self.delivery.next_timer()
            # Not wait_for: on Python 3.11 it can swallow a cancel racing with the wake.
            timer = None if due is None else loop.call_at(due, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()
            self._wake.clear()
            for action in self.delivery.poll(loop.time()):
                if isinstance(action, Transmit):
                    await self._transmit(action)
                elif isinstance(action, Finished):
                    self._finish(action.item.msg_id, action.item.peer, action.item.receipt, action.state, "")
                elif isinstance(action, Failed):
                    self._finish(
                        action.item.msg_id, action.item.peer, action.item.receipt, "failed", action.reason
                    )

    async def _transmit(self, action: Transmit) -> None:
        ws = self._ws
        if ws is None:
            return
        item = action.item
        frame = pb.Frame(id=self._take_id())
        if action.via is Via.RELAY:
            paths = self.paths
            if paths is not None:
                paths.want(item.peer)
                # The first try takes the direct path; a retransmission (the receipt
                # did not come) takes the relay, which cannot lose it, and makes the
                # path manager check the direct path at once.
                if item.tries == 1 and not item.relay_only and paths.send_direct(item.peer, item.envelope):
                    self.counters["sent_direct"] += 1
                    if not item.receipt:
                        self.store.advance(item.msg_id, "relayed")
                    return
                if item.tries > 1:
                    paths.suspect(item.peer)
            self.counters["sent_relay"] += 1
            frame.relay.to, frame.relay.data = item.peer, item.envelope
            self._relay_reqs[frame.id] = item.msg_id
            if len(self._relay_reqs) > RELAY_IDS_KEPT:
                self._relay_reqs.popitem(last=False)
            if not item.receipt:
                self.store.advance(item.msg_id, "relayed")
        else:
            frame.store.to, frame.store.msg_id, frame.store.envelope = item.peer, item.msg_id, item.envelope
            self._store_reqs[frame.id] = item.msg_id
        with contextlib.suppress(ConnectionClosed):
            await ws.send(frame.SerializeToString())

    def _finish(self, msg_id: bytes, peer: str, receipt: bool, state: str, detail: str) -> None:
        self.store.outbox_done(msg_id, None if receipt else state)
        if receipt:
            return
        outcome = Outcome(peer, msg_id, state, detail)
        future = self._outcomes.pop(msg_id, None)
        if future is not None and not future.done():
            future.set_result(outcome)
        self._emit(outcome)

    def _on_reply(self, frame: pb.Frame) -> None:
        kind = frame.WhichOneof("body")
        if frame.id in self._store_reqs:
            msg_id = self._store_reqs.pop(frame.id)
            if kind == "ok":
                self.delivery.stored(msg_id)
            else:
                self._refused(msg_id, frame.error)
            self._wake.set()
        elif frame.id in self._relay_reqs:  # relays are answered only when refused
            self._refused(self._relay_reqs.pop(frame.id), frame.error)
            self._wake.set()
        else:
            future = self._pending.get(frame.id)
            if future is not None and not future.done():
                future.set_result(frame)

    def _refused(self, msg_id: bytes, error: pb.Error) -> None:
        # RATE_LIMITED: the server is shedding load; the message waits and goes again.
        retry = max(0.05, error.retry_after_ms / 1000) if error.code == pb.RATE_LIMITED else 0.0
        now = asyncio.get_running_loop().time()
        self.delivery.refused(msg_id, error.code == pb.PEER_OFFLINE, error.message, retry, now)

    # -- incoming pushes -------------------------------------------------------------

    async def _push_worker(self) -> None:
        """Handle pushes one by one. Nothing one push holds may end this loop: it serves them all."""
        while True:
            frame, direct = await self._pushes.get()
            await self._logged_in.wait()  # the server pushes right after LoginOk: finish login first
            try:
                await self._on_push(frame, direct)
            except Unreachable:
                pass  # the connection dropped while handling it; offline copies come again
            except Exception as exc:  # a bug or input nobody foresaw: count it, say it, carry on
                self.counters["bad_pushes"] += 1
                log.debug("push %s failed", frame.WhichOneof("body"), exc_info=True)
                self._problem("", f"could not handle a {frame.WhichOneof('body')} from the server: {exc}")

    def _problem(self, sender: str, message: str) -> None:
        """Show a problem with ``sender``'s input once, then one summary per :data:`PROBLEM_EVERY_S`."""
        now = time.monotonic()
        last, dropped = self._problems.get(sender, (-PROBLEM_EVERY_S, 0))
        if now - last < PROBLEM_EVERY_S:
            self._problems[sender] = (last, dropped + 1)
            return
        if len(self._problems) > 1024:  # bounded: forget who was shown when
            self._problems.clear()
        self._problems[sender] = (now, 0)
        more = f" ({dropped} more like it since the last warning)" if dropped else ""
        self._emit(Problem(message + more))

    async def _on_push(self, frame: pb.Frame, direct: bool = False) -> None:
        kind = frame.WhichOneof("body")
        if kind == "relay_in":
            data = frame.relay_in.data
            if is_disco(data):
                if self.paths is not None:
                    self.paths.on_relay(frame.relay_in.sender, data)
                return
            await self._on_envelope(frame.relay_in.sender, data, None, direct)
        elif kind == "offline_envelope":
            off = frame.offline_envelope
            await self._on_envelope(off.sender, off.envelope, off.store_id)
        elif kind == "presence":
            p = frame.presence
            online = p.presence in (pb.ONLINE, pb.AWAY)
            if online and p.username not in self._mutual and self.connected:
                await self._refresh_buddies()  # only buddies' presence is pushed: ours is stale
            self.delivery.presence(p.username, online)
            if self.paths is not None:
                if not online:
                    self.paths.offline(p.username)
                elif not self.quiet and self.local_ready.is_set():
                    self.paths.want(p.username)
            self._wake.set()
            self._emit(PresenceChange(p.username, PRESENCE_NAMES.get(p.presence, "offline"), p.last_seen_ms))
        elif kind == "buddy_event":
            ev = frame.buddy_event
            self._see_key(ev.buddy.username, ev.buddy.identity_key)
            if ev.kind == pb.BuddyEvent.ACCEPTED:
                self._mutual.add(ev.buddy.username)
            elif ev.kind == pb.BuddyEvent.REMOVED:
                self._mutual.discard(ev.buddy.username)
                if self.paths is not None:
                    self.paths.offline(ev.buddy.username)
            if self.paths is not None:
                self.paths.forget_keys()
            self._emit(BuddyChange(ev.buddy.username, BUDDY_EVENTS.get(ev.kind, "?")))
        elif kind == "error":
            self._emit(Problem(f"server: {frame.error.message}"))

    async def _on_envelope(
        self, sender: str, data: bytes, store_id: int | None, direct: bool = False
    ) -> None:
        keep = False  # an offline copy to leave on the server, unacknowledged by design
        try:
            env, contact, opened = await self._open(sender, data)
        except EnvelopeError as exc:
            # Unreadable for good (garbage, forged, a stranger): an offline copy is acknowledged
            # and so deleted, or it would sit in our store for a month crowding out real ones.
            self.counters["bad_envelopes"] += 1
            self._problem(sender, f"dropped a message from {sender}: {exc}")
        except _NotYet as exc:
            keep = True
            self._problem(sender, str(exc))
        else:
            body = opened.body
            which = body.WhichOneof("kind")
            if which == "text" and not self.inbox:
                # Not ours to show: no receipt, and an offline copy is kept on the server,
                # so it waits for a session that shows it.
                self.counters["left_for_inbox"] += 1
                keep = True
            elif which == "text":
                fresh = self.store.add_incoming(env.msg_id, sender, body.text.text, env.sent_at_ms, _now_ms())
                if fresh:
                    self._emit(
                        Message(sender, body.text.text, env.msg_id, env.sent_at_ms, store_id is not None)
                    )
                else:
                    self.counters["duplicates"] += 1
                # Receipt even for a duplicate: the sender retransmits because it missed the last one.
                # It goes back the way the message came: a relayed message may come from another
                # session of the sender (a one-shot `send`) than the one our direct path reaches.
                if contact.offered_key is None:
                    receipt = receipt_body(epb.Receipt.DELIVERED, [env.msg_id])
                    self._queue(sender, contact.identity_key, receipt, None, relay_only=not direct)
            elif which == "receipt":
                ids = [m for m in body.receipt.msg_ids if self.store.outgoing_peer(m) == sender]
                state = "read" if body.receipt.kind == epb.Receipt.READ else "delivered"
                moved = [m for m in ids if self.store.advance(m, state)]
                self.delivery.delivered(ids)
                self._wake.set()
                if moved:
                    self._emit(Receipt(sender, state, tuple(moved)))
        if store_id is not None and self._ws is not None:
            # Every pushed offline envelope is answered: the server sends the next ones as we do.
            answer = pb.OfflineAck(keep_ids=[store_id]) if keep else pb.OfflineAck(store_ids=[store_id])
            ack = pb.Frame(id=self._take_id(), offline_ack=answer)
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(ack.SerializeToString())

    async def _open(self, sender: str, data: bytes) -> tuple[epb.Envelope, Contact, Opened]:
        """Parse and open an envelope from ``sender``.

        Raises :class:`EnvelopeError` for what can never be read, and :class:`_NotYet`
        for what opens only with a key the user has not trusted yet.
        """
        env = parse_envelope(data)
        if env.sender != sender:
            raise EnvelopeError(f"envelope claims to be from {env.sender!r} but came from {sender!r}")
        contact = self.store.contact(sender)
        if contact is None and self.connected:
            await self._refresh_buddies()
            contact = self.store.contact(sender)
        if contact is None:
            raise EnvelopeError(f"message from {sender!r}, whose key we do not know")
        me = self.profile.identity
        try:
            return env, contact, open_envelope(me, self.username, env, contact.identity_key)
        except EnvelopeError:
            offered = contact.offered_key
            if offered is None:
                raise
        try:
            open_envelope(me, self.username, env, offered)
        except EnvelopeError:
            raise EnvelopeError(f"envelope from {sender!r} failed authentication") from None
        raise _NotYet(
            f"a message from {sender} is sealed with their new key; it stays on the server until "
            f"you check the key and run: p2pim buddy trust {sender}"
        )


class _NotYet(Exception):
    """An envelope that opens only with a key not yet trusted: kept on the server for later."""


def _path_view(path: Path | None) -> tuple[str, str, float | None]:
    """How a path is shown and stored: ("direct", "ip:port", rtt_ms) or ("relay", "", None)."""
    if path is None:
        return ("relay", "", None)
    return ("direct", f"{path.addr[0]}:{path.addr[1]}", round(path.rtt * 1000, 2))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "connection refused (is the rendezvous running there?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
