"""asyncio shell around :class:`rendezvous.hub.Hub`: WebSockets in, frames out.

Where a frame enters: :meth:`RendezvousServer._connection` reads one binary
message at a time and gives it to the hub (its ``receive_datagram``). The hub
runs on the shared :class:`p2pim.driver.Driver`, like every protocol core:
whatever it queued for any connection goes, in :meth:`_send`, into that
connection's :class:`Outgoing` queue, which only its own writer task drains,
and its one timer closes connections that did not log in in time and expires
the offline store. So the
handler of a sender never waits on a recipient's socket: a peer that stops
reading fills its own queue and is dropped ("not reading"), and everyone
writing to it carries on (their messages are retransmitted and then stored).

Bounds kept here, from :class:`rendezvous.hub.Limits`: connections in all,
per address and per address not yet logged in (decided at TCP accept, see
:mod:`rendezvous.admission`); a deadline to log in; each connection's queued
bytes; how long one write may stay blocked. Heartbeats are the WebSocket
ping/pong of the ``websockets`` library; a peer whose writes stay blocked is
caught by our own watchdog, because the library's ping waits in the same
blocked drain. Password hashing runs in a small thread pool, its queue
bounded by the hub, so a login never stalls the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from p2pim.driver import Driver
from p2pim.sansio import Datagram
from p2pim.wire import control_pb2 as pb

from .account import AccountWork, Mail
from .admission import Admission, Verdict, default_max_connections
from .bus import NatsBus
from .cluster import BUS
from .db import StoreUnavailable
from .errors import error_frame
from .hub import MAX_FRAME, Close, Counters, HashWork, Hub, Session
from .mail import Mailer
from .passwords import PasswordHasher

log = logging.getLogger(__name__)

WATCHDOG_EVERY_S = 1.0
READ_SIZE = 64 * 1024  # bytes per socket read (see _Admitted.connection_made)
SOCKET_BUFFER = 256 * 1024  # websockets' write limit: what the kernel may not have taken yet
CLOSE_GRACE_S = 2.0  # a close frame's chance to leave before the socket is cut
LOG_EVERY_S = 10.0  # repeated errors (accept failing, a bug hit in a loop) log once per this
HASHING_NICE = 10  # password hashing yields the CPU to relaying (see _lower_priority)
# One core stays free for the event loop: a login flood may saturate the hashing threads,
# never the relay.
HASHING_THREADS = max(1, (os.cpu_count() or 2) - 1)
STALLED_S = 1.0  # a write stuck this long: the reader stopped, it is not merely slow
REFUSAL_LINGER_S = 0.5  # a refused connection's chance to read our 503 before it is cut
# Draining (SIGTERM): each client is told to move with this close code (RFC 6455's "service
# restart"); clients given several URLs go to another node at once.
DRAIN_CODE = 1012
DRAIN_REASON = "this node is draining: reconnect to another"


class Outgoing:
    """One connection's frames waiting to be written: a bounded queue and its writer task.

    Small on purpose (thousands of idle connections each hold one): the queue and the
    writer exist only while there is something to write.
    """

    __slots__ = ("dropped", "frames", "limit", "session", "size", "writer", "ws")

    def __init__(self, ws: ServerConnection, session: Session, limit: int) -> None:
        self.ws = ws
        self.session = session
        self.limit = limit
        self.frames: deque[bytes | Close] | None = None
        self.size = 0  # bytes in ``frames``
        self.writer: asyncio.Task[None] | None = None  # running while ``frames`` is not empty
        self.dropped = False  # cut for not reading: queue nothing more

    def put(self, item: bytes | Close) -> bool:
        """Queue a frame; False if that would pass the bound (the peer is not reading)."""
        if self.dropped:
            return True
        if isinstance(item, bytes):
            if self.size + len(item) > self.limit:
                return False
            self.size += len(item)
        if self.frames is None:
            self.frames = deque()
        self.frames.append(item)
        return True


class _LogOnce:
    """Log a repeating error at most once per :data:`LOG_EVERY_S`, with how often it happened."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.last = -LOG_EVERY_S

    def __call__(self, detail: str, exc_info: BaseException | None = None) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S:
            log.warning(
                "%s: %s (%d times since last logged)", self.what, detail, self.count, exc_info=exc_info
            )
            self.last, self.count = now, 0


class _Admitted(ServerConnection):
    """A connection counted by an :class:`Admission` from accept to close.

    Over a cap, it never becomes a WebSocket: it answers at once with an HTTP 503
    saying why (the client shows that line), half-closes, ignores what the peer
    sends, and is cut after :data:`REFUSAL_LINGER_S`, so a refusal holds a
    descriptor for a moment, not for the handshake timeout. Each server makes a
    subclass that sets ``admission`` and ``counters``.
    """

    admission: Admission
    counters: Counters

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else "?"
        self.verdict, refusal = self.admission.open(self.peer_ip, time.monotonic())
        self.logged_in = False
        if self.verdict is Verdict.ACCEPT:
            # asyncio reads with recv(256 KiB): a buffer that size is above glibc's mmap
            # threshold, so unless an earlier free happened to raise that threshold, every
            # read is an mmap and a munmap (measured: one pair per read, +25% server CPU per
            # relayed message, depending on start-up luck). Reads below it stay on the heap.
            if hasattr(transport, "max_size"):
                transport.max_size = READ_SIZE
            super().connection_made(transport)
            return
        self.counters.connections_refused += 1
        if self.verdict is Verdict.DROP:
            transport.abort()
            return
        body = (refusal + "\n").encode()
        try:
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            if transport.can_write_eof():
                transport.write_eof()
        except OSError:  # reset before we could answer (a flood does that): nothing to say
            transport.abort()
            return
        asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.verdict is Verdict.ACCEPT:
            super().data_received(data)

    def eof_received(self) -> None:
        if self.verdict is Verdict.ACCEPT:
            super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.admission.close(self.peer_ip, self.verdict, self.logged_in)
        if self.verdict is Verdict.ACCEPT:
            super().connection_lost(exc)

    def count_login(self) -> None:
        if not self.logged_in:
            self.logged_in = True
            self.admission.logged_in(self.peer_ip)


def _lower_priority() -> None:
    """Run this (hashing) thread at a lower CPU priority than the event loop.

    A login flood keeps both argon2id threads busy; on a small machine they would
    otherwise take the cores the relay needs. Linux applies nice values per thread.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASHING_NICE)


class RendezvousServer:
    """``await RendezvousServer(hub, hasher).start(host, port)``, then ``await close()``."""

    def __init__(
        self, hub: Hub, hasher: PasswordHasher, mailer: Mailer | None = None, bus_url: str = ""
    ) -> None:
        """``bus_url``: the NATS server(s) of a cluster (the hub must have a node name)."""
        self.hub = hub
        self.hasher = hasher
        self.mailer = mailer
        self.bus: NatsBus | None = None
        if bus_url:
            assert hub.cluster is not None, "a bus needs a hub with a node name"
            self.bus = NatsBus(bus_url, hub.cluster.node, self._bus_in)
        self.draining = False
        self._outs: set[Outgoing] = set()  # every connection's queue (for the drain)
        lim = hub.limits
        self.admission = Admission(
            default_max_connections(lim.max_connections),
            lim.max_connections_per_ip,
            lim.max_pending_per_ip,
            lim.connect_ip_rate,
            lim.connect_ip_burst,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=HASHING_THREADS, thread_name_prefix="argon2", initializer=_lower_priority
        )
        self._server: Server | None = None
        # the hub keeps wall-clock time; its events are mails to send
        self._driver = Driver(hub, self._send, self._mail, clock=time.time)
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: dict[Outgoing, float] = {}  # connections whose writer is blocked, since when
        self._accept_errors = _LogOnce("cannot accept connections")
        self._bugs = _LogOnce("internal error handling a frame")

    async def start(
        self, host: str, port: int, tls: ssl.SSLContext | None = None, reuse_port: bool = False
    ) -> None:
        """``reuse_port``: several worker processes share the port (SO_REUSEPORT)."""
        asyncio.get_running_loop().set_exception_handler(self._loop_error)
        if self.bus is not None:
            await self.bus.start()  # BusUnavailable: the caller says so and exits
        lim = self.hub.limits
        admitted = type(
            "Admitted", (_Admitted,), {"admission": self.admission, "counters": self.hub.counters}
        )
        hb = lim.heartbeat_s
        self._server = await serve(
            self._connection,
            host,
            port,
            ssl=tls,
            create_connection=admitted,
            open_timeout=min(10.0, lim.login_deadline_s),
            max_size=4 * MAX_FRAME,  # above our own limit, so the hub answers oversized frames itself
            max_queue=4,
            write_limit=SOCKET_BUFFER,
            compression=None,  # ciphertext does not compress; per-message deflate costs memory
            ping_interval=hb,
            ping_timeout=hb,
            close_timeout=CLOSE_GRACE_S,  # a peer that does not answer our close must not hold up shutdown
            reuse_port=reuse_port,
        )
        self._driver.start()
        self._tasks = [asyncio.create_task(self._watchdog())]
        if self.mailer is not None:
            self.mailer.start()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def connection_count(self) -> int:
        return len(self._outs)

    async def drain(self, seconds: float) -> None:
        """Stop taking connections and tell every client to move (close 1012, after what is
        queued for it); wait up to ``seconds`` for them to go. :meth:`close` follows."""
        self.draining = True
        if self._server is not None:
            self._server.close(close_connections=False)  # the listening sockets only
        for out in list(self._outs):
            self._put(out, Close(DRAIN_CODE, DRAIN_REASON))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self._outs and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._driver.stop()
        with contextlib.suppress(StoreUnavailable):
            self.hub.flush_acks()  # what clients acknowledged goes now, not with the next start
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()  # a close frame to each connection (1001, going away) ...
            try:
                await asyncio.wait_for(asyncio.shield(self._server.wait_closed()), 2 * CLOSE_GRACE_S)
            except TimeoutError:
                # ... which a peer that stopped reading never takes (websockets waits for
                # its drain without a deadline): cut those.
                for ws in list(self._server.all_connections):
                    ws.transport.abort()
                await self._server.wait_closed()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.mailer is not None:
            await self.mailer.close()
        if self.bus is not None:
            await self.bus.close()

    def _bus_in(self, data: bytes) -> None:
        self.hub.receive_bus(data, time.time())
        self._driver.kick()

    def _mail(self, event: object) -> None:
        if isinstance(event, Mail) and self.mailer is not None:
            self.mailer.send(event)

    # -- housekeeping ------------------------------------------------------------------

    async def _watchdog(self) -> None:
        """Drop connections whose writes have been blocked for a heartbeat: they stopped reading."""
        stall = float(self.hub.limits.heartbeat_s)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCHDOG_EVERY_S)
            now = loop.time()
            for out in [o for o, since in self._busy.items() if now - since > stall]:
                self._drop(out, "not reading")
            self._driver.kick()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio logs a traceback for every failed accept (EMFILE: out of descriptors) and
        # retries each second; under a flood that is megabytes of log a minute.
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            self._accept_errors(str(context.get("exception", "")))
            return
        loop.default_exception_handler(context)

    # -- one connection -------------------------------------------------------------------

    async def _connection(self, ws: ServerConnection) -> None:
        remote = ws.remote_address
        session = self.hub.connect((str(remote[0]), int(remote[1])), time.time())
        out = Outgoing(ws, session, self.hub.limits.send_queue_bytes)
        self._outs.add(out)
        session.transport = out
        session.backlog = functools.partial(self._backlog, out)
        self._driver.kick()
        try:
            async for data in ws:
                if session.closed:  # dropped meanwhile (not reading): nothing more it sends counts
                    break
                try:
                    self.hub.receive_datagram(session, data, remote, time.time())
                    if session.work is not None:
                        await self._hash(out)
                    if session.username and isinstance(ws, _Admitted):
                        ws.count_login()  # no longer counts against "not logged in" per address
                except Exception as exc:  # a bug: this connection ends, everyone else carries on
                    self.hub.counters.internal_errors += 1
                    self._bugs(f"{type(exc).__name__}: {exc}", exc)
                    self._put(out, error_frame(0, pb.INTERNAL, "internal error").SerializeToString())
                    self._put(out, Close(1011, "internal error"))
                    session.closed = True
                self._driver.kick()
                if session.closed:
                    break
                if session.pause_s:  # refused for going too fast: read nothing more for a moment
                    await asyncio.sleep(session.pause_s)
                    session.pause_s = 0.0
        except ConnectionClosed:
            pass
        finally:
            self.hub.disconnect(session, time.time())
            self._driver.kick()
            # Let the writer finish what is queued (a goodbye, a close) unless it is stuck
            # (wait_for cancels it then), or the connection is gone already.
            if ws.state is State.CLOSED:
                if out.writer is not None:
                    out.writer.cancel()
            else:
                self._put(out, Close())
                if out.writer is not None:
                    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                        await asyncio.wait_for(out.writer, CLOSE_GRACE_S)
            self._busy.pop(out, None)
            self._outs.discard(out)

    async def _hash(self, out: Outgoing) -> None:
        """A register or login waits for its password hash, in the thread pool (nice 10)."""
        session = out.session
        assert session.work is not None
        (frame, work), session.work = session.work, None
        loop = asyncio.get_running_loop()
        if isinstance(work, HashWork):
            try:
                pw_hash = await loop.run_in_executor(self._pool, self.hasher.hash, work.password)
            finally:
                self.hub.hash_done(session)
            self.hub.finish_register(session, frame, pw_hash, time.time())
            return
        stored = work.user.pw_hash if work.user is not None else None
        new_hash = b""
        try:
            ok = await loop.run_in_executor(self._pool, self.hasher.verify, stored, work.password)
            if ok and isinstance(work, AccountWork) and work.new_password:
                new_hash = await loop.run_in_executor(self._pool, self.hasher.hash, work.new_password)
        finally:
            self.hub.hash_done(session)
        if isinstance(work, AccountWork):
            self.hub.finish_account(session, frame, work, ok, new_hash, time.time())
        else:
            self.hub.finish_login(session, frame, work, ok, time.time())

    # -- frames out ------------------------------------------------------------------------

    def _send(self, dg: Datagram) -> None:
        """Move what the hub queued into that connection's own queue (or the bus's); never waits."""
        if dg.sock is BUS:
            if self.bus is not None:
                self.bus.publish(dg.addr, dg.data)
            return
        out = dg.sock.transport
        assert isinstance(out, Outgoing)
        self._put(out, dg.data)

    def _put(self, out: Outgoing, item: bytes | Close) -> None:
        """Queue ``item`` for ``out`` and make sure a writer runs; drop a peer that is not reading."""
        if not out.put(item):
            self._drop(out, "not reading")
        elif out.writer is None and not out.dropped:
            out.writer = asyncio.create_task(self._writer(out))

    def _drop(self, out: Outgoing, reason: str) -> None:
        """``out``'s peer is not reading: it goes offline now, its socket is cut after a short grace."""
        if out.dropped:
            return
        out.dropped = True
        self.hub.counters.slow_consumers += 1
        log.info("closing slow consumer %s", out.session.username or out.session.remote)
        self.hub.disconnect(out.session, time.time())  # buddies see it offline at once
        if out.writer is not None:
            out.writer.cancel()
        out.frames = None
        out.size = 0
        self._busy.pop(out, None)
        out.writer = asyncio.create_task(self._cut(out.ws, 1008, reason))  # the handler awaits it

    async def _cut(self, ws: ServerConnection, code: int, reason: str) -> None:
        """Close with ``code`` if the close frame can still leave, else abort the TCP connection."""
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            await asyncio.wait_for(ws.close(code, reason), CLOSE_GRACE_S)
        ws.transport.abort()

    def _backlog(self, out: Outgoing) -> int:
        """Bytes queued for a recipient that is still taking them (the hub refuses relays to
        it past half its bound: back-pressure). One whose write has been stuck for
        :data:`STALLED_S` stopped reading: refusing would only hide that, so it counts as
        0, its queue fills, and it is cut off as before."""
        since = self._busy.get(out)
        if since is not None and asyncio.get_running_loop().time() - since > STALLED_S:
            return 0
        return out.size

    async def _writer(self, out: Outgoing) -> None:
        """Write ``out``'s queue until it is empty, then end (the next frame starts another)."""
        ws, loop = out.ws, asyncio.get_running_loop()
        try:
            while out.frames:
                item = out.frames.popleft()
                self._busy[out] = loop.time()
                try:
                    if isinstance(item, Close):
                        out.dropped = True  # nothing may follow a close
                        await self._cut(ws, item.code, item.reason)
                        return
                    out.size -= len(item)
                    await ws.send(item)
                except ConnectionClosed:
                    out.dropped = True
                    return
                finally:
                    self._busy.pop(out, None)
            out.frames = None
        finally:
            if out.writer is asyncio.current_task():
                out.writer = None
