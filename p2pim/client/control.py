"""The control connection: one WebSocket to the rendezvous, requests and their replies.

:meth:`Control.connect` opens it and reads the server's challenge;
:meth:`Control.request` sends a frame and waits for the reply with its id;
:meth:`Control.post` sends without waiting (relayed envelopes, disco, acks)
through one writer task, in order. Frames without an id are pushes and go to
``on_push``; replies nobody waits for (relays and stores the messaging core
sent) go to ``on_reply``. When the connection ends, ``on_lost`` hears of it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from ..wire import control_pb2 as pb
from ..wire.limits import DEFAULT_HEARTBEAT_S, MAX_FRAME

CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0
READ_SIZE = 64 * 1024  # bytes per socket read
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


class Control:
    def __init__(
        self,
        server: str,
        on_push: Callable[[pb.Frame], None],
        on_reply: Callable[[pb.Frame], bool],
        on_lost: Callable[[ClientConnection], Awaitable[None]],
        counters: dict[str, int],
    ) -> None:
        """``server``: one URL, or several separated by commas (the nodes of a cluster:
        the first that answers is used; a lost one makes the next reconnect start with
        the one after it). ``on_reply`` returns True for a reply it took (one nobody
        awaits here)."""
        self.servers = [u.strip() for u in server.split(",") if u.strip()] or [server]
        self._current = 0
        self._on_push = on_push
        self._on_reply = on_reply
        self._on_lost = on_lost
        self.counters = counters
        self.ws: ClientConnection | None = None
        self.nonce = b""
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[pb.Frame]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._queue: deque[bytes] = deque()
        self._writing = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    @property
    def server(self) -> str:
        """The URL in use (or tried next)."""
        return self.servers[self._current]

    def move_on(self) -> None:
        """The node we were on is going away: the next connect starts with the next one."""
        self._current = (self._current + 1) % len(self.servers)

    async def connect(self) -> None:
        """Open the WebSocket to the first server that answers (from the current one, in
        order) and read its challenge. Raises :class:`Unreachable` if none does."""
        failures: list[Unreachable] = []
        for _ in self.servers:
            try:
                await self._connect(self.server)
                return
            except Unreachable as exc:
                failures.append(exc)
                self.move_on()
        if len(failures) == 1:
            raise failures[0]
        raise Unreachable("cannot reach any of the servers: " + "; ".join(f.message for f in failures))

    async def _connect(self, server: str) -> None:
        try:
            ws = await asyncio.wait_for(
                connect(
                    server,
                    max_size=4 * MAX_FRAME,
                    compression=None,
                    open_timeout=CONNECT_TIMEOUT,
                    # Until LoginOk says the server's heartbeat (see heartbeat()).
                    ping_interval=DEFAULT_HEARTBEAT_S,
                    ping_timeout=DEFAULT_HEARTBEAT_S,
                    close_timeout=2,  # a server that does not answer our close must not hold up exit
                ),
                CONNECT_TIMEOUT + 1,
            )
        except InvalidStatus as exc:  # the server answered, and said no (e.g. too many connections)
            said = exc.response.body.decode("utf-8", "replace").strip()[:200] if exc.response.body else ""
            raise Unreachable(
                f"the server at {server} refused the connection: "
                f"{said or 'HTTP ' + str(exc.response.status_code)}"
            ) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise Unreachable(f"cannot reach the server at {server}: {reason(exc)}") from None
        except InvalidURI:
            raise ClientError(pb.BAD_REQUEST, f"bad server address {server!r} (ws://host:port)") from None
        try:
            first = pb.Frame.FromString(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT))  # type: ignore[arg-type]
        except Exception:
            await ws.close()
            raise Unreachable(f"{server} did not greet us like a p2pim rendezvous") from None
        if first.WhichOneof("body") != "challenge":
            await ws.close()
            raise Unreachable(f"{server} did not greet us like a p2pim rendezvous")
        transport = ws.transport
        if hasattr(transport, "max_size"):
            # asyncio reads with recv(256 KiB), above glibc's mmap threshold: each read can
            # be an mmap and a munmap (see rendezvous.server.READ_SIZE). Reads this size stay
            # on the heap.
            transport.max_size = READ_SIZE
        self.ws, self.nonce = ws, first.challenge.nonce
        self._queue.clear()
        self._reader = asyncio.create_task(self._read(ws))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())

    def heartbeat(self, seconds: int) -> None:
        """Ping at the server's interval (from LoginOk), so both ends agree when a link is dead."""
        if self.ws is not None and seconds > 0:
            self.ws.ping_interval = self.ws.ping_timeout = float(seconds)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def take_id(self) -> int:
        self._next_id = self._next_id % 0xFFFFFFFF + 1
        return self._next_id

    async def request(self, body: str, message: Any, timeout: float = REQUEST_TIMEOUT) -> pb.Frame:
        """Send one request and wait for its reply; an error frame raises :class:`ClientError`."""
        ws = self.ws
        if ws is None:
            raise Unreachable("not connected to the server")
        frame = pb.Frame(id=self.take_id())
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

    def post(self, frame: pb.Frame) -> bool:
        """Send ``frame`` without waiting, after what was posted before; False if not connected."""
        if self.ws is None:
            return False
        self._queue.append(frame.SerializeToString())
        self._writing.set()
        return True

    async def _write(self) -> None:
        while True:
            await self._writing.wait()
            self._writing.clear()
            while self._queue:
                ws = self.ws
                if ws is None:
                    self._queue.clear()
                    break
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(self._queue.popleft())

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                if isinstance(data, str):
                    continue
                try:
                    frame = pb.Frame.FromString(data)
                except Exception:
                    self.counters["bad_frames"] = self.counters.get("bad_frames", 0) + 1
                    continue
                if not frame.id:
                    self._on_push(frame)
                elif not self._on_reply(frame):
                    future = self._pending.get(frame.id)
                    if future is not None and not future.done():
                        future.set_result(frame)
        except ConnectionClosed:
            pass
        finally:
            if self.ws is ws:
                self.ws = None
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(Unreachable("the connection to the server was lost"))
                await self._on_lost(ws)


def reason(exc: BaseException) -> str:
    """Why a connection failed, in words for the user."""
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "connection refused (is the rendezvous running there?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
