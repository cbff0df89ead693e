"""The message bus between rendezvous nodes: NATS (``nats-py``), a thin shell.

Why NATS rather than Redis pub/sub: the bus carries only what is on its way (state is
in PostgreSQL), and NATS is exactly that: subject-addressed, at-most-once, no storage
to manage, a single static binary (Debian ``nats-server``) that clusters on its own,
and its client reconnects and buffers across a restart by itself. Redis would bring a
data store we would use only as a pipe.

The bus is trusted (a node believes what another says): keep NATS on a private network
and give it a user and password (``nats://user:password@host:4222``; never logged).

The hub's bus outputs (``Datagram(BUS, data, subject)``) are queued here and written
by one task per burst, so a relay costs no task of its own; the queue is bounded (a
bus that is away loses what does not fit, counted: nothing on it is durable). What
arrives goes to :meth:`rendezvous.hub.Hub.receive_bus` through the shell's callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from .cluster import ALL, node_subject
from .sql import without_credentials

log = logging.getLogger(__name__)

MAX_QUEUE = 20_000  # bus messages waiting to be written
RECONNECT_WAIT_S = 0.25
PENDING_BYTES = 8 * 1024 * 1024  # what nats-py buffers while reconnecting


class BusUnavailable(Exception):
    """The bus could not be reached at start."""


class NatsBus:
    def __init__(self, url: str, node: str, on_message: Callable[[bytes], None]) -> None:
        self.url = url
        self.shown = without_credentials(url)
        self.node = node
        self._on_message = on_message
        self._nc: Any = None
        self._queue: deque[tuple[str, bytes]] = deque()
        self._writer: asyncio.Task[None] | None = None
        self.dropped = 0
        self.reconnects = 0
        self._closing = False

    async def start(self, timeout_s: float = 5.0) -> None:
        import nats  # only clusters need it imported

        try:
            self._nc = await nats.connect(
                servers=[u.strip() for u in self.url.split(",")],
                name=f"p2pim-rendezvous {self.node}",
                connect_timeout=timeout_s,
                max_reconnect_attempts=-1,  # a bus restart is waited for, not fatal
                reconnect_time_wait=RECONNECT_WAIT_S,
                pending_size=PENDING_BYTES,
                allow_reconnect=True,
                error_cb=self._error,
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
            )
        except Exception as exc:  # nats-py raises several kinds (refused, timeout, no servers)
            why = str(exc) or type(exc).__name__
            raise BusUnavailable(f"cannot reach the bus at {self.shown}: {why}") from None
        for subject in (ALL, node_subject(self.node)):
            await self._nc.subscribe(subject, cb=self._in)

    @property
    def connected(self) -> bool:
        return self._nc is not None and bool(self._nc.is_connected)

    def publish(self, subject: str, data: bytes) -> None:
        if len(self._queue) >= MAX_QUEUE:
            self.dropped += 1
            return
        self._queue.append((subject, data))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        try:
            while self._queue:
                subject, data = self._queue.popleft()
                try:
                    await self._nc.publish(subject, data)
                except Exception:  # away and its buffer full, or closed: this one is lost
                    self.dropped += 1
        finally:
            self._writer = None

    async def _in(self, msg: Any) -> None:
        self._on_message(msg.data)

    async def _error(self, exc: Exception) -> None:
        log.debug("bus: %s", exc)

    async def _disconnected(self) -> None:
        if self._closing:  # our own close, not news
            return
        log.warning("bus: disconnected from %s; reconnecting", self.shown)

    async def _reconnected(self) -> None:
        self.reconnects += 1
        log.warning("bus: reconnected")

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._writer), 1.0)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.drain(), 2.0)
            with contextlib.suppress(Exception):
                await self._nc.close()
