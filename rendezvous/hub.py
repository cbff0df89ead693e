"""The rendezvous core: sessions, accounts, buddies, presence, relay, offline store.

No I/O, and the common core verbs (:mod:`p2pim.sansio`), so the shared driver
runs it. The asyncio shell (``rendezvous.server``) creates a :class:`Session`
per WebSocket, hands every received frame to :meth:`Hub.receive_datagram`
with the (wall-clock) time, and sends what :meth:`Hub.datagrams_to_send`
returns; the hub's one timer closes sessions that do not log in within
``login_deadline_s`` and expires the offline store hourly. Password hashing is
the one slow step, so login and register come in two halves: the first leaves
the work on :attr:`Session.work`, the shell runs it in a thread, and
``finish_*`` applies the result.

Requests the hub accepts (``Frame.body``), and what answers them:

===================  ==============================================  =====================
body                 needs                                           reply
===================  ==============================================  =====================
register             —                                               ok / error
login                —                                               login_ok / error
logout               login                                           ok, then close
buddy_request        login                                           ok / error
buddy_accept         login, a request from that user                 ok / error
buddy_decline        login, a request from that user                 ok / error
buddy_remove         login                                           ok / error
buddy_list           login                                           buddies
set_status           login                                           ok
publish_endpoints    login                                           ok
lookup_endpoints     login, mutual buddy                             endpoints / error
relay                login, mutual buddy online                      error only on refusal
store                login, mutual buddy                             ok / error
offline_ack          login                                           ok
===================  ==============================================  =====================

Pushes (frame id 0): presence, buddy_event, relay_in, offline_envelope.

Every table here has a bound, and everything a peer can make the server do
is limited (see :class:`Limits`): login and register attempts per address and
user, password-hashing jobs waiting (in all and per address), each sender's
share of a recipient's offline store, and offline envelopes in flight per
session (the backlog is pushed a window at a time, paced by the reader's
acks), and the time to log in. Connection counts and each connection's send
queue are enforced by the shell, from the same :class:`Limits`.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from p2pim.identity import valid_public_key
from p2pim.ratelimit import RateLimiter
from p2pim.sansio import Datagram
from p2pim.wire import control_pb2 as pb
from p2pim.wire import nat_pb2 as nat_pb
from p2pim.wire.limits import DEFAULT_HEARTBEAT_S, ID_SIZE, MAX_ENVELOPE, MAX_FRAME

from .account import AccountHandlers, AccountWork, Mail
from .admission import bump
from .cluster import Cluster, shown_presence
from .db import Database, StoreUnavailable, User
from .devices import DeviceHandlers
from .errors import RequestError, error_frame
from .groups import GroupHandlers
from .passwords import MAX_PASSWORD, MIN_PASSWORD

MAX_RELAY = 64 * 1024  # one relayed datagram
RELAY_BUSY_MS = 20  # "the recipient is not keeping up": send again after this
EXPIRE_EVERY_S = 3600.0  # how often old offline envelopes and tokens are deleted
# Acknowledged offline envelopes are deleted in batches: one transaction per ack cost an
# fsync each, and a group post brings one ack per member. Losing a batch to a crash only
# means those envelopes come again, and clients drop what they have seen (by message id).
ACK_FLUSH_S = 0.2
ACK_FLUSH_IDS = 512
NONCE_SIZE = 32
TOKEN_SIZE = 32
TOKEN_LIFETIME_MS = 90 * 24 * 3600 * 1000
USERNAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,31}")
MAX_HOST_ENDPOINTS = 16
MAX_MAIL_QUEUE = 1000  # mails the shell has not sent yet
MAX_SESSIONS = 8  # per user; the oldest is closed when a ninth logs in
MAX_ACK_IDS = 1000  # store ids in one offline_ack
MAX_SQL_INT = 2**63 - 1  # SQLite INTEGER; a uint64 from the wire may not fit
MAX_PAUSE_S = 1.0  # the longest the shell stops reading a connection after a RATE_LIMITED
LATE_LOOK_S = 1.0  # in a cluster, a login reads the store once more this much later (see _late)
STORE_RETRY_MS = 1000  # the database is away: what a refused request is told to wait
UNMETERED = ("offline_ack", "logout")  # acks pace the backlog: metering them would stall it
# Requests that wait for a password hash in the shell's pool (begin_* here, then finish_*).
HASHED = ("register", "login", "account_password", "account_delete")


@dataclass(frozen=True)
class Limits:
    """Server policy; every number a deployment may want to change."""

    # Login attempts: per username (guessing one password) and per source IP (spraying).
    login_user_rate: float = 5 / 60
    login_user_burst: float = 10
    login_ip_rate: float = 5.0
    login_ip_burst: float = 50
    # Registrations per source IP: a bucket of their own, far stricter than logins
    # (an account costs a row forever; a login costs nothing after it).
    register_ip_rate: float = 1 / 60
    register_ip_burst: float = 10
    # argon2id jobs waiting or running, in all and per source IP. Hashing is slow on
    # purpose (and 64 MiB each at the interactive cost); beyond these a login or
    # register is answered RATE_LIMITED at once instead of waiting behind a flood.
    # The per-address bound is what keeps an honest login fast: a flood from N
    # addresses puts at most 2N jobs ahead of it.
    hashing_max: int = 32
    hashing_per_ip: int = 2
    # Offline store per recipient, and the share one sender may fill: a buddy (or
    # three) sending garbage cannot keep everyone else's messages out.
    offline_max_envelopes: int = 2000
    offline_max_bytes: int = 32 * 1024 * 1024
    offline_sender_envelopes: int = 500
    offline_sender_bytes: int = 8 * 1024 * 1024
    offline_max_age_s: float = 30 * 24 * 3600
    # Offline envelopes pushed to a session and not yet acknowledged: the backlog
    # flows at the pace the reader acks it, never as one 32 MiB burst.
    offline_window: int = 32
    # Requests per user and second (with bursts): relays, and everything else but acks.
    # An honest client is far below both; a buddy cannot make the server write, fan out
    # presence or relay for it without bound.
    request_rate: float = 20.0
    request_burst: float = 200
    relay_rate: float = 500.0
    relay_burst: float = 2000
    # Relayed bytes per user and second: what one user's file transfers may cost the
    # server's uplink when no direct path exists (the operator's knob: --relay-kbps).
    relay_bytes_rate: float = 8 * 1024 * 1024
    relay_bytes_burst: float = 16 * 1024 * 1024
    # Groups: members (invited ones included) per group, groups per user (invitations
    # included: a buddy cannot fill anyone's table), and posts per member and second.
    group_max_members: int = 256
    group_max_per_user: int = 100
    group_post_rate: float = 10.0
    group_post_burst: float = 50
    # Email notices: the shortest delay and period a user may choose, and how often the
    # server looks for notices that are due.
    notice_min_s: float = 60.0
    notice_sweep_s: float = 30.0
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    # Enforced by the shell (rendezvous.server):
    login_deadline_s: float = 20.0  # a connection that has not logged in by then is closed
    max_connections: int = 0  # 0: the open-file limit minus a reserve
    max_connections_per_ip: int = 128  # NATs put many users behind one address: not too low
    max_pending_per_ip: int = 16  # of those, not logged in yet (see rendezvous.admission)
    connect_ip_rate: float = 10.0  # new connections per second per address ...
    connect_ip_burst: float = 50  # ... with bursts (a NAT's users reconnecting after a restart)
    send_queue_bytes: int = 1024 * 1024  # per connection, beyond the socket's own buffer

    def offline_refusal(self, usage: tuple[int, int, int, int], more: int, to: str) -> str | None:
        """Why ``more`` bytes more may not wait for ``to`` (``usage``: what waits for them in
        all, then from this sender; see Database.offline_usage), or None if they may."""
        count, size, mine, my_size = usage
        if mine >= self.offline_sender_envelopes or my_size + more > self.offline_sender_bytes:
            return f"{mine} of your messages are waiting for {to} already: the most one sender may leave"
        if count >= self.offline_max_envelopes or size + more > self.offline_max_bytes:
            return f"{to}'s offline store is full"
        return None

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if name.endswith(("_rate", "_s")) and not value > 0:
                raise ValueError(f"{name} must be positive")
            if name.endswith("_burst") and value < 1:
                raise ValueError(f"{name} must be at least 1")
            if isinstance(value, int) and name != "max_connections" and value < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_connections < 0:
            raise ValueError("max_connections must be 0 (from the file limit) or more")


@dataclass
class Session:
    """One connection. ``username`` is empty until login."""

    remote: tuple[str, int]
    nonce: bytes = field(default_factory=lambda: os.urandom(NONCE_SIZE))
    username: str = ""
    user_id: int = 0
    device_id: int = 0
    presence: pb.Presence.ValueType = pb.OFFLINE
    quiet: bool = False  # a one-shot command: can send and receive, does not show as online
    leave_offline: bool = False  # shows nothing: gets only what is stored while it is on, not the backlog
    offline_cursor: int = 0  # highest store id pushed to this session
    offline_inflight: set[int] = field(default_factory=set)  # pushed, not yet acked or kept
    offline_drained: bool = False  # the last look found nothing more: look again once more is stored
    hashing: bool = False  # holds a password-hashing slot
    pause_s: float = 0.0  # the shell reads nothing more from it for this long (then resets it)
    token_hash: bytes = b""
    endpoints: pb.PublishEndpoints | None = None
    closed: bool = False
    transport: object = None  # the shell's handle (the WebSocket); the hub never touches it
    # Bytes queued for this connection and not yet written (the shell's count): a relay
    # to a session that is not keeping up is refused (slow down) instead of queued.
    backlog: Callable[[], int] = field(default=lambda: 0)
    # A register or login that needs a password hash: (frame, work) for the shell's thread
    # pool, which hands the result to finish_register / finish_login.
    work: tuple[pb.Frame, HashWork | VerifyWork | AccountWork] | None = None


@dataclass
class Counters:
    connections: int = 0
    frames: int = 0
    bad_frames: int = 0
    registered: int = 0
    logins: int = 0
    login_failures: int = 0
    login_throttled: int = 0
    register_throttled: int = 0
    requests_throttled: int = 0
    hashing_shed: int = 0
    relayed: int = 0
    relay_refused: int = 0
    relay_busy: int = 0  # relays refused because the recipient was not keeping up
    relay_shaped: int = 0  # relays after which the sender waited for its byte budget
    stored: int = 0
    offline_delivered: int = 0
    offline_acked: int = 0
    offline_dropped: int = 0  # with a buddy removal
    offline_expired: int = 0  # older than offline_max_age_s
    group_posts: int = 0
    notices: int = 0
    mail_dropped: int = 0
    accounts_deleted: int = 0
    group_stored: int = 0  # copies of group posts kept for members
    group_events: int = 0
    group_quota_skipped: int = 0  # a member whose offline store was full missed a post
    store_unavailable: int = 0  # requests (and chores) the database could not take
    bus_in: int = 0
    bus_out: int = 0
    bus_bad: int = 0
    # counted by the shell
    connections_refused: int = 0
    login_timeouts: int = 0
    slow_consumers: int = 0
    internal_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Close:
    """Output: close this connection (after the frames queued before) with a WebSocket code."""

    code: int = 1000
    reason: str = ""


@dataclass(frozen=True)
class HashWork:
    """Register: the password to hash in a thread."""

    password: str


@dataclass(frozen=True)
class VerifyWork:
    """Login: the stored hash (None for an unknown user) to check the password against."""

    user: User | None
    password: str


class ProtocolError(Exception):
    """The peer broke the protocol: send the error, then close its connection."""


def _check_username(name: str) -> str:
    if not USERNAME_RE.fullmatch(name):
        raise RequestError(
            pb.BAD_REQUEST,
            "usernames are 2-32 characters: a-z, 0-9, '.', '_', '-', starting with a letter or digit",
        )
    return name


class Hub:
    def __init__(
        self, db: Database, limits: Limits | None = None, mail: bool = False, node: str = ""
    ) -> None:
        """``mail``: the shell can send email (an SMTP server is configured). ``node``: this
        hub's name in a cluster (its outputs then include bus messages, :mod:`rendezvous.cluster`)."""
        self.db = db
        self.limits = limits or Limits()
        self.counters = Counters()
        # Where clients find our STUN service (ip "" = the control host): told at login.
        self.stun: list[tuple[str, int]] = []
        # Every logged-in connection of each user (a listener and a one-shot `send` may
        # overlap, or several devices), oldest first.
        self.online: dict[str, list[Session]] = {}
        self._shown: dict[str, pb.Presence.ValueType] = {}  # presence buddies were last told
        self.buddies: dict[str, set[str]] = {}  # mutual buddies of each online user
        self.watchers: dict[str, set[str]] = {}  # the reverse: online users each name is a buddy of
        self._out: list[Datagram] = []
        lim = self.limits
        self._user_limiter = RateLimiter(lim.login_user_rate, lim.login_user_burst)
        self._ip_limiter = RateLimiter(lim.login_ip_rate, lim.login_ip_burst)
        self._register_limiter = RateLimiter(lim.register_ip_rate, lim.register_ip_burst)
        self._request_budget = RateLimiter(lim.request_rate, lim.request_burst)
        self._relay_budget = RateLimiter(lim.relay_rate, lim.relay_burst)
        self._relay_bytes = RateLimiter(lim.relay_bytes_rate, lim.relay_bytes_burst)
        self._deadlines: list[tuple[float, int, Session]] = []  # login deadlines, a heap
        self._deadline_seq = itertools.count()
        self._next_expire = 0.0  # housekeeping: the offline store and tokens (see handle_timer)
        self._acks: list[tuple[int, int, int]] = []  # (user id, device id, store id) taken, not yet deleted
        self._ack_due: float | None = None
        self._hashing: dict[str, int] = {}  # source IP -> jobs waiting or running
        self._hashing_total = 0
        self._handlers: dict[str, Callable[[Session, pb.Frame, float], pb.Frame | None]] = {
            "logout": self._logout,
            "buddy_request": self._buddy_request,
            "buddy_accept": self._buddy_accept,
            "buddy_decline": self._buddy_decline,
            "buddy_remove": self._buddy_remove,
            "buddy_list": self._buddy_list,
            "set_status": self._set_status,
            "publish_endpoints": self._publish_endpoints,
            "lookup_endpoints": self._lookup_endpoints,
            "relay": self._relay,
            "store": self._store,
            "offline_ack": self._offline_ack,
        }
        self.groups = GroupHandlers(self)
        self._handlers.update(self.groups.handlers())  # type: ignore[arg-type]
        self.devices = DeviceHandlers(self)
        self._handlers.update(self.devices.handlers())  # type: ignore[arg-type]
        self.account = AccountHandlers(self, mail)
        self._handlers.update(self.account.handlers())  # type: ignore[arg-type]
        self._mail: deque[Mail] = deque()
        self._next_sweep = 0.0
        self.cluster = Cluster(self, node) if node else None
        self._late: deque[tuple[float, Session]] = deque()  # logins to look at the store for again

    # -- the core verbs (p2pim.sansio) ---------------------------------------------

    def receive_datagram(self, sock: Session, data: bytes | str, addr: object, now: float) -> None:
        """One frame from ``sock``'s connection. A register or login that needs a password
        hash leaves its work on the session (:attr:`Session.work`) for the shell."""
        frame = self.parse(sock, data)
        if frame is None:
            return
        try:
            self._dispatch(sock, frame, now)
        except StoreUnavailable as exc:
            self._unavailable(sock, frame.id, exc)

    def _unavailable(self, session: Session, frame_id: int, exc: StoreUnavailable) -> None:
        """The database is away: this request was not carried out; the client retries."""
        self.counters.store_unavailable += 1
        self._send(session, error_frame(frame_id, pb.UNAVAILABLE, f"{exc}; retry", STORE_RETRY_MS))

    def _dispatch(self, sock: Session, frame: pb.Frame, now: float) -> None:
        kind = frame.WhichOneof("body")
        work: HashWork | VerifyWork | AccountWork | None
        if kind == "register":
            work = self.begin_register(sock, frame, now)
        elif kind == "login":
            work = self.begin_login(sock, frame, now)
        elif kind in ("account_password", "account_delete"):
            try:
                work = self.account.begin(sock, frame, now)
                self._claim_hashing(sock)
            except RequestError as exc:
                self._send(sock, self._refusal(sock, frame, exc))
                return
        else:
            self.receive(sock, frame, now)
            return
        if work is not None:
            sock.work = (frame, work)

    def receive_bus(self, data: bytes, now: float) -> None:
        """One message from another node of the cluster (:mod:`rendezvous.cluster`)."""
        if self.cluster is not None:
            self.counters.bus_in += 1
            with self._chore():
                self.cluster.receive(data, now)

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        """Frames (bytes) and closes (:class:`Close`, after what came before) per session, in order."""
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        deadlines = self._deadlines
        while deadlines and (deadlines[0][2].username or deadlines[0][2].closed):
            heapq.heappop(deadlines)  # logged in or gone: no deadline any more
        due = min(deadlines[0][0], self._next_expire) if deadlines else self._next_expire
        due = min(due, self._next_sweep) if self.account.mail else due
        if self.cluster is not None:
            due = min(due, self.cluster.get_timer(), self._late[0][0] if self._late else due)
        return due if self._ack_due is None else min(due, self._ack_due)

    def handle_timer(self, now: float) -> None:
        """Close connections that did not log in in time; hourly, expire the offline store."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, session = heapq.heappop(self._deadlines)
            self.login_deadline(session, now)
        if self.cluster is not None:
            self.cluster.handle_timer(now)  # beats go out even while the database is away
        self.devices.expire(now)
        # Each chore on its own: one the database cannot take now waits for its next turn.
        with self._chore():
            while self._late and self._late[0][0] <= now:
                self._pump_offline(self._late.popleft()[1], stored=True)
        with self._chore():
            if self._ack_due is not None and now >= self._ack_due:
                self.flush_acks()
        if self.account.mail and now >= self._next_sweep:
            self._next_sweep = now + self.limits.notice_sweep_s
            with self._chore():
                self.counters.notices += self.account.sweep(now)
        if now >= self._next_expire:
            self._next_expire = now + EXPIRE_EVERY_S
            with self._chore():
                self.counters.offline_expired += self.expire(now)

    @contextlib.contextmanager
    def _chore(self) -> Iterator[None]:
        try:
            yield
        except StoreUnavailable:
            self.counters.store_unavailable += 1

    def flush_acks(self) -> None:
        """Delete the acknowledged offline envelopes, all in one transaction."""
        acks, self._acks, self._ack_due = self._acks, [], None
        if acks:  # lost if the database is away: those envelopes come again, and are dropped as seen
            self.counters.offline_acked += self.db.ack_offline_many(acks)

    def next_event(self) -> Mail | None:
        """What the shell must do besides sending frames: mail (codes, notices)."""
        return self._mail.popleft() if self._mail else None

    def mail_out(self, mail: Mail) -> None:
        if len(self._mail) >= MAX_MAIL_QUEUE:
            self.counters.mail_dropped += 1
            return
        self._mail.append(mail)

    # -- plumbing -------------------------------------------------------------

    def _send(self, session: Session, frame: pb.Frame) -> None:
        if not session.closed:
            self._out.append(Datagram(session, frame.SerializeToString(), session.remote))

    def _close(self, session: Session, code: int = 1000, reason: str = "") -> None:
        if not session.closed:
            self._out.append(Datagram(session, Close(code, reason), session.remote))
            session.closed = True

    def connect(self, remote: tuple[str, int], now: float | None = None) -> Session:
        """A new connection; with ``now``, it must log in by ``now + login_deadline_s``."""
        session = Session(remote=remote)
        self.counters.connections += 1
        if now is not None:
            deadline = now + self.limits.login_deadline_s
            heapq.heappush(self._deadlines, (deadline, next(self._deadline_seq), session))
        self._send(
            session, pb.Frame(challenge=pb.Challenge(nonce=session.nonce, server="p2pim-rendezvous/0.1"))
        )
        return session

    def parse(self, session: Session, data: bytes | str) -> pb.Frame | None:
        """Decode one frame; on garbage, queue an error and a close and return None."""
        self.counters.frames += 1
        try:
            if isinstance(data, str):
                raise ProtocolError("text frames are not part of this protocol; send binary protobuf")
            if len(data) > MAX_FRAME:
                raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
            try:
                frame = pb.Frame.FromString(data)
            except DecodeError:
                raise ProtocolError("frame is not a valid protobuf Frame") from None
            kind = frame.WhichOneof("body")
            if kind not in self._handlers and kind not in HASHED:
                raise ProtocolError(f"unknown or missing request body ({kind or 'none'})")
        except ProtocolError as exc:
            self.counters.bad_frames += 1
            self._send(session, error_frame(0, pb.BAD_FRAME, str(exc)))
            self._close(session)
            return None
        return frame

    def _refusal(self, session: Session, frame: pb.Frame, exc: RequestError) -> pb.Frame:
        if exc.code == pb.RATE_LIMITED:
            # Refusing is cheap and a loop of refusals is not: the shell stops reading this
            # connection for a moment, so a client that ignores retry_after cannot spin us.
            session.pause_s = min(MAX_PAUSE_S, exc.retry_after_ms / 1000)
        return error_frame(frame.id, exc.code, exc.message, exc.retry_after_ms)

    def receive(self, session: Session, frame: pb.Frame, now: float) -> None:
        """Handle a parsed request other than register/login (those go through begin/finish)."""
        kind = frame.WhichOneof("body")
        assert kind is not None
        try:
            if not session.username:
                if kind == "device_link_join":
                    self._throttle(session, None, now)  # a guess at a code counts like a login
                    first: pb.Frame = self.devices.link_join(session, frame, now)
                elif kind == "device_link_data":
                    first = self.devices.link_data(session, frame, now)
                else:
                    raise RequestError(pb.NOT_LOGGED_IN, "log in first")
                first.id = frame.id
                self._send(session, first)
                return
            if kind not in UNMETERED:
                budget = self._relay_budget if kind == "relay" else self._request_budget
                if not budget.allow(session.username, now):
                    self.counters.requests_throttled += 1
                    raise RequestError(
                        pb.RATE_LIMITED, "too many requests; slow down", int(1000 / budget.rate)
                    )
            reply = self._handlers[kind](session, frame, now)
        except RequestError as exc:
            reply = self._refusal(session, frame, exc)
        if reply is not None:
            reply.id = frame.id
            self._send(session, reply)

    def login_deadline(self, session: Session, now: float) -> bool:
        """The shell's login timer fired: close ``session`` if it has not logged in (True if closed)."""
        if session.username or session.closed:
            return False
        self.counters.login_timeouts += 1
        reason = f"log in within {self.limits.login_deadline_s:g} s"
        self._send(session, error_frame(0, pb.NOT_LOGGED_IN, reason))
        self._close(session, 1008, reason)
        return True

    def disconnect(self, session: Session, now: float) -> None:
        """The connection is gone (closed, failed, or missed heartbeats)."""
        session.closed = True
        self.devices.disconnect(session)
        self._go_offline(session, now)

    # -- register -------------------------------------------------------------

    def begin_register(self, session: Session, frame: pb.Frame, now: float) -> HashWork | None:
        req = frame.register
        try:
            if not self._register_limiter.allow(session.remote[0], now):
                self.counters.register_throttled += 1
                raise RequestError(
                    pb.RATE_LIMITED,
                    "too many new accounts from your address; wait and retry",
                    int(1000 / self.limits.register_ip_rate),
                )
            _check_username(req.username)
            self.check_password(req.password)
            if not valid_public_key(req.identity_key):
                raise RequestError(
                    pb.BAD_REQUEST,
                    "identity_key must be a 32-byte Ed25519 public key of the prime-order subgroup",
                )
            if self.db.user(req.username) is not None:
                raise RequestError(pb.USERNAME_TAKEN, f"the name {req.username!r} is taken")
            self._claim_hashing(session)
        except RequestError as exc:
            self._send(session, self._refusal(session, frame, exc))
            return None
        return HashWork(req.password)

    def finish_register(self, session: Session, frame: pb.Frame, pw_hash: bytes, now: float) -> None:
        req = frame.register
        try:
            added = self.db.add_user(req.username, pw_hash, req.identity_key, int(now * 1000))
        except StoreUnavailable as exc:
            self._unavailable(session, frame.id, exc)
            return
        if added:
            self.counters.registered += 1
            self._send(session, pb.Frame(id=frame.id, ok=pb.Ok()))
        else:
            self._send(
                session, error_frame(frame.id, pb.USERNAME_TAKEN, f"the name {req.username!r} is taken")
            )

    # -- login ----------------------------------------------------------------

    def _throttle(self, session: Session, username: str | None, now: float) -> None:
        ok_ip = self._ip_limiter.allow(session.remote[0], now)
        ok_user = username is None or self._user_limiter.allow(username, now)
        if not (ok_ip and ok_user):
            self.counters.login_throttled += 1
            rate = self.limits.login_ip_rate if not ok_ip else self.limits.login_user_rate
            raise RequestError(pb.RATE_LIMITED, "too many attempts; wait and retry", int(1000 / rate))

    def _throttle_everywhere(self, username: str, now: float) -> None:
        """In a cluster, guesses at one account's password count on every node together
        (each node's own bucket would let N nodes take N times the rate)."""
        lim = self.limits
        if not self.db.take_token(
            f"login:{username}", lim.login_user_rate, lim.login_user_burst, int(now * 1000)
        ):
            self.counters.login_throttled += 1
            raise RequestError(
                pb.RATE_LIMITED, "too many attempts; wait and retry", int(1000 / lim.login_user_rate)
            )

    def begin_login(self, session: Session, frame: pb.Frame, now: float) -> VerifyWork | None:
        """Checks that need no hashing. None: answered already (error, or a token login done)."""
        req = frame.login
        try:
            if session.username:
                raise RequestError(pb.BAD_REQUEST, "already logged in")
            # A resume token is 256 random bits: guessing it is hopeless, so token logins only
            # count against the address. That also keeps a user whose password is under
            # attack (and so throttled) able to log in from devices holding a token.
            self._throttle(session, None if req.resume_token else req.username, now)
            user = self.db.user(req.username)
            if user is not None and not req.resume_token and self.cluster is not None:
                self._throttle_everywhere(user.username, now)
            if req.resume_token:
                device = None if user is None else self.db.token_device(
                    user.id, _token_hash(req.resume_token), int(now * 1000)
                )  # fmt: skip
                self._finish(session, frame, user if device is not None else None, now, device)
                return None
            if not req.password:
                raise RequestError(pb.BAD_REQUEST, "give a password or a resume token")
            self._claim_hashing(session)
        except RequestError as exc:
            self._send(session, self._refusal(session, frame, exc))
            return None
        return VerifyWork(user, req.password)

    def _claim_hashing(self, session: Session) -> None:
        """Take a password-hashing slot for ``session``, or refuse (RATE_LIMITED) when none is free."""
        ip, lim = session.remote[0], self.limits
        if self._hashing_total >= lim.hashing_max or self._hashing.get(ip, 0) >= lim.hashing_per_ip:
            self.counters.hashing_shed += 1
            raise RequestError(
                pb.RATE_LIMITED, "the server is busy checking passwords; retry in a second", 1000
            )
        bump(self._hashing, ip, 1)
        self._hashing_total += 1
        session.hashing = True

    def hash_done(self, session: Session) -> None:
        """The shell finished (or abandoned) the hashing ``begin_*`` asked for: free the slot."""
        if not session.hashing:
            return
        session.hashing = False
        self._hashing_total -= 1
        bump(self._hashing, session.remote[0], -1)

    def finish_login(
        self, session: Session, frame: pb.Frame, work: VerifyWork, password_ok: bool, now: float
    ) -> None:
        try:
            self._finish(session, frame, work.user if password_ok else None, now)
        except StoreUnavailable as exc:
            self._unavailable(session, frame.id, exc)

    def _finish(
        self, session: Session, frame: pb.Frame, user: User | None, now: float, by_token: int | None = None
    ) -> None:
        """``by_token``: the device whose resume token this login gave (None: a password login)."""
        req = frame.login
        if session.closed:
            return
        try:
            if user is None:  # One answer for unknown user, wrong password, stale token and bad signature.
                raise RequestError(pb.AUTH_FAILED, "wrong username or password")
            device_id = self.devices.login_device(user, req, session.nonce, by_token)
        except RequestError as exc:
            self.counters.login_failures += 1
            self._send(session, error_frame(frame.id, exc.code, exc.message))
            return
        if device_id < 0:  # every device lost: the key this login signed with is the account's now
            user, device_id = self._new_identity(user, req.device_key, req.device_name, now)
        # What the database says first: if it is away, nothing below has changed.
        cursor = self.db.last_offline_id(user.id) if req.leave_offline else 0
        buddies = self.db.mutual_buddies(user.id) if user.username not in self.buddies else None
        token = self.new_token(user.id, device_id, now) if req.want_token else b""
        ok = pb.LoginOk(
            resume_token=token,
            heartbeat_s=self.limits.heartbeat_s,
            offline_pending=self.db.offline_count(user.id, device_id),
            stun=[nat_pb.Address(ip=ip, port=port) for ip, port in self.stun],
            device_id=device_id,
            identity_key=user.identity_key,
            devices=self.db.device_count(user.id),
        )
        sessions = self.online.setdefault(user.username, [])
        if len(sessions) >= MAX_SESSIONS:
            old = sessions[0]
            self._send(
                old, error_frame(0, pb.BAD_REQUEST, f"more than {MAX_SESSIONS} sessions: closing the oldest")
            )
            self._close(old)
            self._go_offline(old, now)
            sessions = self.online.setdefault(user.username, [])
        session.username, session.user_id, session.device_id = user.username, user.id, device_id
        session.presence = req.presence if req.presence in (pb.ONLINE, pb.AWAY) else pb.ONLINE
        session.quiet = req.quiet
        session.leave_offline = req.leave_offline
        session.offline_cursor = cursor  # leave_offline: no backlog; what is stored from now on comes
        if buddies is not None:
            self._set_buddies(user.username, buddies)
        sessions.append(session)
        self.counters.logins += 1
        if token or req.resume_token:
            session.token_hash = _token_hash(token or req.resume_token)
        self._send(session, pb.Frame(id=frame.id, login_ok=ok))
        self._changed_here(session.username, now)
        self._pump_offline(session)
        if self.cluster is not None:  # a store on another node that did not know of us yet
            self._late.append((now + LATE_LOOK_S, session))

    def check_password(self, password: str) -> None:
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise RequestError(pb.BAD_REQUEST, f"passwords are {MIN_PASSWORD} to {MAX_PASSWORD} characters")

    def finish_account(
        self, session: Session, frame: pb.Frame, work: AccountWork, ok: bool, new_hash: bytes, now: float
    ) -> None:
        if not session.closed:
            try:
                self.account.finish(session, frame, work, ok, new_hash, now)
            except StoreUnavailable as exc:
                self._unavailable(session, frame.id, exc)

    def delete_account(self, user: User, now: float) -> None:
        """Remove ``user`` for good: its sessions end, its buddies see it go, nothing of it stays."""
        buddies = self._tell_buddies(user, pb.BuddyEvent.REMOVED, now)
        self._end_everywhere(user.username, 0, "the account was deleted", now)
        self.db.delete_user(user.id)
        self._buddies_changed(buddies)
        self.counters.accounts_deleted += 1

    def new_token(self, user_id: int, device_id: int, now: float) -> bytes:
        """A resume token for ``device_id`` (kept hashed)."""
        token = os.urandom(TOKEN_SIZE)
        self.db.add_token(user_id, _token_hash(token), int(now * 1000) + TOKEN_LIFETIME_MS, device_id)
        return token

    def _new_identity(self, user: User, key: bytes, name: str, now: float) -> tuple[User, int]:
        """``user`` lost every device: ``key`` is its identity key and only device now (its
        id returned with the user). Its other sessions end; its buddies are told (their
        clients warn: a key change)."""
        device_id = self.db.reset_identity(user.id, key, name.strip()[:64] or "new device", int(now * 1000))
        self._end_everywhere(
            user.username, 0, "the account's key was reset (login --new-key): this device is not linked", now
        )
        fresh = self.db.user(user.username)
        assert fresh is not None
        self._tell_buddies(fresh, pb.BuddyEvent.KEY_CHANGED, now)
        return fresh, device_id

    def _tell_buddies(self, user: User, kind: int, now: float) -> list[str]:
        """A buddy event about ``user`` to each of its mutual buddies online; returns their names."""
        buddies = [r.username for r in self.db.relations(user.id) if r.state == "mutual"]
        for buddy in buddies:
            self._event(buddy, kind, user, "mutual", now)
        return buddies

    def end_device(self, username: str, device_id: int, reason: str, now: float) -> None:
        """Close every session of a removed device, now, on every node."""
        self._end_everywhere(username, device_id, reason, now)

    def _end_everywhere(self, username: str, device_id: int, reason: str, now: float) -> None:
        """End ``username``'s sessions (of one device, or 0: all) here and on other nodes."""
        self.end_local(username, device_id, reason, now)
        if self.cluster is not None:
            self.cluster.end(username, device_id, reason)

    def end_local(self, username: str, device_id: int, reason: str, now: float) -> None:
        for x in [x for x in self.online.get(username, ()) if not device_id or x.device_id == device_id]:
            self._end(x, reason, now)

    def _end(self, session: Session, reason: str, now: float) -> None:
        self._send(session, error_frame(0, pb.NOT_LOGGED_IN, reason))
        self._close(session, 1008, reason[:120])
        session.closed = True
        self._go_offline(session, now)

    # -- presence -------------------------------------------------------------

    def local_presence(self, name: str) -> pb.Presence.ValueType:
        """What buddies see of ``name``'s sessions here (the quiet ones do not show)."""
        return shown_presence(x.presence for x in self.online.get(name, ()) if not x.quiet)

    def presence_of(self, name: str) -> pb.Presence.ValueType:
        """The same over every node of the cluster."""
        here = self.local_presence(name)
        if self.cluster is None or here == pb.ONLINE:
            return here
        return shown_presence((here, self.cluster.presence(name)))

    def is_online(self, name: str) -> bool:
        """Has ``name`` a session anywhere (a quiet one too)?"""
        return name in self.online or (self.cluster is not None and name in self.cluster.users)

    def local_endpoints(self, name: str) -> pb.Endpoints | None:
        """What ``lookup_endpoints`` answers for ``name`` from its sessions here."""
        sessions = self.online.get(name)
        if not sessions:
            return None
        published = [x for x in sessions if x.endpoints is not None]
        peer = published[-1] if published else sessions[-1]
        reply = pb.Endpoints(username=name)
        reply.observed.ip, reply.observed.port = peer.remote
        if peer.endpoints is not None:
            reply.host.extend(peer.endpoints.host)
            reply.mapped.CopyFrom(peer.endpoints.mapped)
            reply.nat.CopyFrom(peer.endpoints.nat)
        return reply

    def _to_user(self, name: str, frame: pb.Frame) -> bool:
        """Send to every session of ``name``, on any node (serialized once); False if there
        is none."""
        data = frame.SerializeToString()
        here = name in self.online
        self.deliver_local(name, [data])
        elsewhere = self.cluster is not None and self.cluster.deliver(name, data)
        return here or elsewhere

    def deliver_local(self, name: str, frames: list[bytes]) -> None:
        """Frames for ``name``'s sessions here (from this node, or from another)."""
        for x in self.online.get(name, ()):
            if not x.closed:
                self._out.extend(Datagram(x, data, x.remote) for data in frames)

    def _changed_here(self, name: str, now: float) -> None:
        """``name``'s sessions here changed (came, went, status, endpoints)."""
        self.announce(name, now)
        if self.cluster is not None:
            self.cluster.state(name, now)

    def announce(self, name: str, now: float) -> None:
        """Tell ``name``'s mutual buddies connected here about its presence, if it changed
        (in a cluster each node tells its own: :mod:`rendezvous.cluster`)."""
        presence = self.presence_of(name)
        if self._shown.get(name, pb.OFFLINE) == presence:
            return
        self._shown[name] = presence
        if presence == pb.OFFLINE:
            del self._shown[name]
        update = pb.Frame(
            presence=pb.PresenceUpdate(username=name, presence=presence, last_seen_ms=int(now * 1000))
        ).SerializeToString()
        for buddy in self.watchers.get(name, ()):
            self.deliver_local(buddy, [update])

    def _set_buddies(self, name: str, buddies: set[str]) -> None:
        """``name`` (connected here) has these mutual buddies: kept both ways (``watchers``)."""
        for old in self.buddies.get(name, set()) - buddies:
            self._unwatch(old, name)
        for new in buddies:
            self.watchers.setdefault(new, set()).add(name)
        self.buddies[name] = buddies

    def _drop_buddies(self, name: str) -> None:
        for buddy in self.buddies.pop(name, set()):
            self._unwatch(buddy, name)

    def _unwatch(self, buddy: str, name: str) -> None:
        watching = self.watchers.get(buddy)
        if watching is not None:
            watching.discard(name)
            if not watching:
                del self.watchers[buddy]

    def reload_buddies(self, name: str) -> None:
        """``name``'s buddy list changed (here or on another node): read it again."""
        sessions = self.online.get(name)
        if sessions:
            self._set_buddies(name, self.db.mutual_buddies(sessions[0].user_id))

    def _buddies_changed(self, names: Iterable[str]) -> None:
        names = list(names)
        for name in names:
            self.reload_buddies(name)
        if self.cluster is not None:
            self.cluster.changed(names)

    def _go_offline(self, session: Session, now: float) -> None:
        sessions = self.online.get(session.username, [])
        if session not in sessions:
            return
        sessions.remove(session)
        session.presence = pb.OFFLINE
        if not sessions:
            del self.online[session.username]
            self._drop_buddies(session.username)
        self._changed_here(session.username, now)
        with self._chore():  # buddies saw it go; a database away only misses its "last seen"
            self.db.set_last_seen(session.user_id, int(now * 1000))
            self.db.device_seen(session.device_id, int(now * 1000))

    def _logout(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame | None:
        if frame.logout.revoke_token and session.token_hash:
            self.db.revoke_token(session.token_hash)
        self._go_offline(session, now)
        self._send(session, pb.Frame(id=frame.id, ok=pb.Ok()))
        self._close(session)
        return None

    def _set_status(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        if frame.set_status.presence not in (pb.ONLINE, pb.AWAY):
            raise RequestError(pb.BAD_REQUEST, "status is online or away (log out to go offline)")
        session.presence = frame.set_status.presence
        self._changed_here(session.username, now)
        return pb.Frame(ok=pb.Ok())

    # -- buddies --------------------------------------------------------------

    def _other(self, session: Session, name: str) -> User:
        other = self.db.user(name)
        if other is None:
            raise RequestError(pb.NO_SUCH_USER, f"no user {name!r}")
        if other.id == session.user_id:
            raise RequestError(pb.BAD_REQUEST, "that is you")
        return other

    def _buddy_entry(self, name: str, key: bytes, state: str, last_seen_ms: int) -> pb.Buddy:
        states = {"mutual": pb.MUTUAL, "sent": pb.REQUEST_SENT, "received": pb.REQUEST_RECEIVED}
        presence = self.presence_of(name) if state == "mutual" else pb.OFFLINE
        return pb.Buddy(
            username=name,
            identity_key=key,
            state=states[state],
            presence=presence,
            last_seen_ms=last_seen_ms if state == "mutual" else 0,
        )

    def _event(self, to: str, kind: int, about: User, state: str, now: float) -> None:
        if self.is_online(to):
            entry = self._buddy_entry(about.username, about.identity_key, state, int(now * 1000))
            self._to_user(to, pb.Frame(buddy_event=pb.BuddyEvent(kind=kind, buddy=entry)))  # type: ignore[arg-type]

    def _me(self, session: Session) -> User:
        me = self.db.user(session.username)
        assert me is not None
        return me

    def _buddy_request(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        other = self._other(session, frame.buddy_request.username)
        mine, theirs = (
            self.db.relation(session.user_id, other.id),
            self.db.relation(other.id, session.user_id),
        )
        if mine == "mutual":
            return pb.Frame(ok=pb.Ok())
        if theirs == "sent":  # they asked us already: asking back is accepting
            return self._accept(session, other, now)
        self.db.add_request(session.user_id, other.id)
        self._event(other.username, pb.BuddyEvent.REQUESTED, self._me(session), "received", now)
        return pb.Frame(ok=pb.Ok())

    def _buddy_accept(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        other = self._other(session, frame.buddy_accept.username)
        state = self.db.relation(other.id, session.user_id)
        if state == "mutual":
            return pb.Frame(ok=pb.Ok())
        if state != "sent":
            raise RequestError(pb.BAD_REQUEST, f"{other.username} has not asked to be your buddy")
        return self._accept(session, other, now)

    def _accept(self, session: Session, other: User, now: float) -> pb.Frame:
        self.db.make_mutual(session.user_id, other.id)
        self._buddies_changed([session.username, other.username])
        self._event(other.username, pb.BuddyEvent.ACCEPTED, self._me(session), "mutual", now)
        # Both sides learn each other's presence now, as if the other had just logged in.
        for a, b in ((session.username, other.username), (other.username, session.username)):
            if self.is_online(a) and self.presence_of(b) != pb.OFFLINE:
                self._to_user(
                    a, pb.Frame(presence=pb.PresenceUpdate(username=b, presence=self.presence_of(b)))
                )
        return pb.Frame(ok=pb.Ok())

    def _buddy_decline(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        other = self._other(session, frame.buddy_decline.username)
        if self.db.relation(other.id, session.user_id) != "sent":
            raise RequestError(pb.BAD_REQUEST, f"{other.username} has not asked to be your buddy")
        self.db.remove_relation(session.user_id, other.id)
        self._event(other.username, pb.BuddyEvent.DECLINED, self._me(session), "sent", now)
        return pb.Frame(ok=pb.Ok())

    def _buddy_remove(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        other = self._other(session, frame.buddy_remove.username)
        if not self.db.remove_relation(session.user_id, other.id):
            raise RequestError(pb.NOT_A_BUDDY, f"{other.username} is not your buddy")
        # What waits between them goes too: a removed buddy's envelopes (garbage, say)
        # must not keep filling the store, and ours are not for them any more.
        self.counters.offline_dropped += self.db.drop_offline_between(self._me(session), other)
        self._buddies_changed([session.username, other.username])
        self._event(other.username, pb.BuddyEvent.REMOVED, self._me(session), "mutual", now)
        return pb.Frame(ok=pb.Ok())

    def _buddy_list(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        entries = [
            self._buddy_entry(r.username, r.identity_key, r.state, r.last_seen_ms)
            for r in self.db.relations(session.user_id)
        ]
        return pb.Frame(buddies=pb.BuddyList(buddies=entries))

    def _require_buddy(self, session: Session, name: str) -> None:
        """Buddies may reach each other, and so may members of one group (their sender keys
        go pairwise); anyone else is refused."""
        if name in self.buddies.get(session.username, ()):
            return
        other = self.db.user(name) if name else None
        if other is None or not self.db.share_group(session.user_id, other.id):
            raise RequestError(pb.NOT_A_BUDDY, f"{name or '(nobody)'} is not your buddy")

    # -- endpoints --------------------------------------------------------------

    def _publish_endpoints(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        eps = frame.publish_endpoints
        if len(eps.host) > MAX_HOST_ENDPOINTS:
            raise RequestError(pb.BAD_REQUEST, f"at most {MAX_HOST_ENDPOINTS} host addresses")
        session.endpoints = eps
        if self.cluster is not None:
            self.cluster.state(session.username, now)
        return pb.Frame(ok=pb.Ok())

    def _lookup_endpoints(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        name = frame.lookup_endpoints.username
        self._require_buddy(session, name)
        reply = self.local_endpoints(name)
        if reply is None and self.cluster is not None:
            reply = self.cluster.endpoints(name)
        if reply is None:
            raise RequestError(pb.PEER_OFFLINE, f"{name} is offline")
        return pb.Frame(endpoints=reply)

    # -- relay and offline store ---------------------------------------------------

    def _relay(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame | None:
        req = frame.relay
        try:
            self._require_buddy(session, req.to)
            size = len(req.data)
            if size > MAX_RELAY:
                raise RequestError(pb.BAD_REQUEST, f"relayed datagrams are at most {MAX_RELAY} bytes")
            # Back-pressure: the recipient's queue is half full. Refused, the sender waits
            # and sends again; queued, it would cut the recipient off for not reading.
            busy = self.limits.send_queue_bytes // 2
            if any(x.backlog() > busy for x in self.online.get(req.to, ())):
                self.counters.relay_busy += 1
                raise RequestError(pb.RATE_LIMITED, f"{req.to} is not keeping up; slow down", RELAY_BUSY_MS)
            if not self._to_user(
                req.to, pb.Frame(relay_in=pb.RelayIn(sender=session.username, data=req.data))
            ):
                raise RequestError(pb.PEER_OFFLINE, f"{req.to} is offline")
        except RequestError:
            self.counters.relay_refused += 1
            raise
        # The byte budget shapes, it does not refuse: the frame went, and the shell reads
        # nothing more from this sender until the budget has caught up (TCP pushes back on
        # the sender; nothing is lost or sent twice).
        debt = self._relay_bytes.charge(session.username, now, size)
        if debt > 0:
            self.counters.relay_shaped += 1
            session.pause_s = max(session.pause_s, min(MAX_PAUSE_S, debt))
        self.counters.relayed += 1
        return None

    def _store(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        req = frame.store
        if len(req.envelope) > MAX_ENVELOPE or len(req.msg_id) != ID_SIZE:
            raise RequestError(
                pb.BAD_REQUEST, f"envelopes are at most {MAX_ENVELOPE} bytes with a {ID_SIZE}-byte id"
            )
        not_for = None
        if req.to == session.username:  # a copy for the account's other devices
            if self.db.device_count(session.user_id) < 2:
                return pb.Frame(ok=pb.Ok())  # there is none
            not_for = session.device_id
        else:
            self._require_buddy(session, req.to)
        recipient = self.db.user(req.to)
        assert recipient is not None
        if self.db.has_offline(recipient.id, req.msg_id):
            return pb.Frame(ok=pb.Ok())  # a retransmission of an envelope we hold already
        usage = self.db.offline_usage(recipient.id, session.username)
        refused = self.limits.offline_refusal(usage, len(req.envelope), req.to)
        if refused is not None:
            raise RequestError(pb.QUOTA_EXCEEDED, refused)
        store_id = self.db.store_offline(
            recipient.id,
            session.username,
            req.msg_id,
            req.envelope,
            int(now * 1000),
            not_for=not_for,
            counts=req.counts and not_for is None,
        )
        if store_id is not None:
            self.counters.stored += 1
            self.pump_users([req.to])
        return pb.Frame(ok=pb.Ok())

    def pump_users(self, names: Iterable[str]) -> None:
        """Something was stored for them: push it to their sessions, here and elsewhere."""
        names = list(names)
        for name in names:
            self.pump_local(name)
        if self.cluster is not None:
            self.cluster.pump(names)

    def pump_local(self, name: str) -> None:
        for peer in self.online.get(name, ()):
            self._pump_offline(peer, stored=True)

    def pump_everyone(self) -> None:
        """Every session here reads the store again (what came while the bus was cut)."""
        for name in list(self.online):
            self.pump_local(name)

    def _pump_offline(self, session: Session, stored: bool = False) -> None:
        """Push the next stored envelopes to ``session``, up to its window of unanswered ones.

        ``stored``: something was just stored for its user. Otherwise (an acknowledgement
        made room) the store is read only if the last read may have left something: a live
        member's copies cost one read each, not two."""
        if session.closed or not session.username:
            return
        session.offline_drained &= not stored
        room = self.limits.offline_window - len(session.offline_inflight)
        if room <= 0 or session.offline_drained:
            return
        pending = self.db.pending_offline(session.user_id, session.offline_cursor, room, session.device_id)
        session.offline_drained = len(pending) < room
        for env in pending:
            session.offline_cursor = env.id
            session.offline_inflight.add(env.id)
            self._push_offline(session, env.id, env.sender, env.envelope, env.stored_ms, env.grp)

    def _push_offline(
        self, session: Session, store_id: int, sender: str, envelope: bytes, stored_ms: int, grp: bytes | None
    ) -> None:
        self.counters.offline_delivered += 1
        self._send(
            session,
            pb.Frame(
                offline_envelope=pb.OfflineEnvelope(
                    store_id=store_id,
                    sender=sender,
                    envelope=envelope,
                    stored_at_ms=stored_ms,
                    group=grp or b"",
                )
            ),
        )

    def _offline_ack(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        acked, kept = list(frame.offline_ack.store_ids), list(frame.offline_ack.keep_ids)
        if len(acked) + len(kept) > MAX_ACK_IDS:
            raise RequestError(pb.BAD_REQUEST, f"at most {MAX_ACK_IDS} store ids in one offline_ack")
        if any(i > MAX_SQL_INT for i in acked + kept):
            raise RequestError(pb.BAD_REQUEST, "store ids are below 2^63 (use the ids the server pushed)")
        self._acks.extend((session.user_id, session.device_id, i) for i in acked)
        if len(self._acks) >= ACK_FLUSH_IDS:
            self.flush_acks()
        elif acked and self._ack_due is None:
            self._ack_due = now + ACK_FLUSH_S
        session.offline_inflight.difference_update(acked)
        session.offline_inflight.difference_update(kept)  # stays stored; pushed again next login
        self._pump_offline(session)
        return pb.Frame(ok=pb.Ok())

    def expire(self, now: float) -> int:
        """Periodic housekeeping: drop expired offline envelopes and tokens."""
        return self.db.expire(int(now * 1000), int(self.limits.offline_max_age_s * 1000))


def _token_hash(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()
