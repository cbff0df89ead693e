"""asyncio shell around :class:`rendezvous.hub.Hub`: WebSockets in, frames out.

Where a frame enters: :meth:`RendezvousServer._connection` reads one binary
message at a time and gives it to the hub; whatever the hub queued leaves in
:meth:`_flush`. Heartbeats are the WebSocket ping/pong of the ``websockets``
library: a client that stops answering is closed after ``heartbeat_s`` and the
hub then tells its buddies it went offline. Password hashing runs in a small
thread pool so a login never stalls the relay.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from p2pim.wire import control_pb2 as pb

from .hub import MAX_FRAME, Hub, Session
from .passwords import PasswordHasher

log = logging.getLogger(__name__)

# A peer whose unsent backlog passes this is not reading: close it rather than
# buffer without bound or let it stall the senders (relay is datagram-like).
SLOW_CONSUMER_BYTES = 1024 * 1024
EXPIRE_EVERY_S = 3600.0


class RendezvousServer:
    """``await RendezvousServer(hub, hasher).start(host, port)``, then ``await close()``."""

    def __init__(self, hub: Hub, hasher: PasswordHasher) -> None:
        self.hub = hub
        self.hasher = hasher
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="argon2")
        self._server: Server | None = None
        self._housekeeping: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        hb = self.hub.limits.heartbeat_s
        self._server = await serve(
            self._connection,
            host,
            port,
            ssl=tls,
            max_size=4 * MAX_FRAME,  # above our own limit, so the hub answers oversized frames itself
            max_queue=4,
            write_limit=SLOW_CONSUMER_BYTES,
            compression=None,  # ciphertext does not compress; per-message deflate costs memory
            ping_interval=hb,
            ping_timeout=hb,
            close_timeout=2,  # a peer that does not answer our close must not hold up shutdown
        )
        self._housekeeping = asyncio.create_task(self._expire_loop())

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def close(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _expire_loop(self) -> None:
        while True:
            dropped = self.hub.expire(time.time())
            if dropped:
                log.info("expired %d offline envelopes", dropped)
            await asyncio.sleep(EXPIRE_EVERY_S)

    async def _connection(self, ws: ServerConnection) -> None:
        remote = ws.remote_address
        session = self.hub.connect((str(remote[0]), int(remote[1])))
        session.transport = ws
        await self._flush()
        try:
            async for data in ws:
                frame = self.hub.parse(session, data)
                if frame is not None:
                    kind = frame.WhichOneof("body")
                    if kind == "register":
                        await self._register(session, frame)
                    elif kind == "login":
                        await self._login(session, frame)
                    else:
                        self.hub.receive(session, frame, time.time())
                await self._flush()
                if session.closed:
                    break
        except ConnectionClosed:
            pass
        finally:
            self.hub.disconnect(session, time.time())
            await self._flush()

    async def _register(self, session: Session, frame: pb.Frame) -> None:
        work = self.hub.begin_register(session, frame, time.time())
        if work is not None:
            loop = asyncio.get_running_loop()
            pw_hash = await loop.run_in_executor(self._pool, self.hasher.hash, work.password)
            self.hub.finish_register(session, frame, pw_hash, time.time())

    async def _login(self, session: Session, frame: pb.Frame) -> None:
        work = self.hub.begin_login(session, frame, time.time())
        if work is not None:
            stored = work.user.pw_hash if work.user is not None else None
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self._pool, self.hasher.verify, stored, work.password)
            self.hub.finish_login(session, frame, work, ok, time.time())

    async def _flush(self) -> None:
        for session, data in self.hub.take_output():
            ws = session.transport
            assert isinstance(ws, ServerConnection)
            try:
                if data is None:
                    await ws.close(1000)
                elif ws.transport.get_write_buffer_size() > SLOW_CONSUMER_BYTES:
                    log.info("closing slow consumer %s", session.username or session.remote)
                    await ws.close(1008, "not reading")
                else:
                    await ws.send(data)
            except ConnectionClosed:
                pass
