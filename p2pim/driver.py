"""The one asyncio driver: runs any sans-IO core (:mod:`p2pim.sansio`) with one timer.

It reads the sockets attached to it and feeds each datagram to the core,
hands what the core wants sent to the shell's ``send`` (or, by default,
to the attached socket the datagram names), passes events to ``on_event``,
and sleeps until the core's next timer or the next input. A shell that feeds
the core through a method of its own (a message typed, a frame from the
server) calls :meth:`Driver.kick` afterwards, so the core's answer goes out
at once and the timer is armed anew.

One loop serves every input, so nothing a single datagram does may end it:
an exception from the core is logged once per kind and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Hashable
from typing import Any

from .sansio import Core

log = logging.getLogger(__name__)

READS_PER_WAKE = 64  # datagrams read from one socket before others get a turn


class Driver:
    def __init__(
        self,
        core: Core,
        send: Callable[[Any], None] | None = None,
        on_event: Callable[[Any], None] | None = None,
        bufsize: int = 65535,
    ) -> None:
        self.core = core
        self._send = send or self.send_to_socket
        self._on_event = on_event or (lambda event: None)
        self.bufsize = bufsize
        self.sockets: dict[Hashable, socket.socket] = {}
        self.done = asyncio.Event()  # set when ``until`` (see start) holds
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._until: Callable[[], bool] | None = None
        self._failed: set[str] = set()
        # Demultiplexing (RFC 9443 style): a datagram for which this returns True was taken
        # by the shell (another core's traffic on the same socket) and is not fed to ``core``.
        self.divert: Callable[[Hashable, bytes, Any], bool] | None = None

    # -- sockets -----------------------------------------------------------------------

    def attach(self, label: Hashable, sock: socket.socket) -> None:
        """Read ``sock`` (non-blocking) for the core, which calls it ``label``."""
        sock.setblocking(False)
        self.sockets[label] = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, label, sock)

    def detach(self, label: Hashable) -> socket.socket | None:
        sock = self.sockets.pop(label, None)
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
        return sock

    def send_to_socket(self, dg: Any) -> None:
        """The default ``send``: ``dg.data`` to ``dg.addr`` from the attached socket ``dg.sock``."""
        sock = self.sockets.get(dg.sock)
        if sock is None:
            return
        try:
            sock.sendto(dg.data, dg.addr)
        except OSError:  # unreachable, a full buffer: the core's own timers cope
            self._socket_error(dg.sock)

    def _readable(self, label: Hashable, sock: socket.socket) -> None:
        core = self.core
        loop = asyncio.get_running_loop()
        for _ in range(READS_PER_WAKE):
            try:
                data, addr = sock.recvfrom(self.bufsize)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # an ICMP error queued on the socket
                self._socket_error(label)
                break
            source = (addr[0], addr[1])
            if self.divert is not None and self._guard(self.divert, label, data, source):
                continue
            self._guard(core.receive_datagram, label, data, source, loop.time())
        self.kick()

    def _socket_error(self, label: Hashable) -> None:
        handler = getattr(self.core, "socket_error", None)
        if handler is not None:
            self._guard(handler, label, asyncio.get_running_loop().time())

    # -- running -----------------------------------------------------------------------

    def start(self, until: Callable[[], bool] | None = None) -> None:
        """Run the core; with ``until``, stop (and set :attr:`done`) once it holds."""
        self._until = until
        self.kick()
        self._task = asyncio.create_task(self._run())

    async def run(self, until: Callable[[], bool]) -> None:
        """Run the core until ``until()`` holds (the sockets stay open)."""
        self.start(until)
        try:
            await self.done.wait()
        finally:
            await self.close(sockets=False)

    def kick(self) -> None:
        """The core was fed outside the driver: send what it has now, then re-arm the timer."""
        self._flush()
        self._wake.set()

    def stop(self) -> None:
        """Stop the loop now (from synchronous code); :meth:`close` also waits for it."""
        if self._task is not None:
            self._task.cancel()

    async def close(self, sockets: bool = True) -> None:
        """Stop the loop and close the attached sockets (``sockets=False``: only stop reading
        them, for a shell that runs another core on them next)."""
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if sockets:
            self.close_sockets()
        else:
            for label in list(self.sockets):
                self.detach(label)

    def close_sockets(self) -> None:
        for label in list(self.sockets):
            sock = self.detach(label)
            if sock is not None:
                sock.close()

    async def _run(self) -> None:
        # A timer handle and an Event rather than wait_for: on Python 3.11, wait_for
        # can swallow a cancel that races with the event, and close() would hang.
        core = self.core
        loop = asyncio.get_running_loop()
        while True:
            if self._until is not None and self._until():
                self.done.set()
                return
            due = core.get_timer()
            timer = None if due is None else loop.call_at(due, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()
            self._wake.clear()
            now = loop.time()
            if due is not None and now >= due:
                self._guard(core.handle_timer, now)
            self._flush()

    def _flush(self) -> None:
        core = self.core
        now = asyncio.get_running_loop().time()
        for dg in self._guard(core.datagrams_to_send, now) or ():
            self._guard(self._send, dg)
        while (event := self._guard(core.next_event)) is not None:
            self._guard(self._on_event, event)

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # a bug or input nobody foresaw: one log line per kind, and on
            kind = f"{getattr(fn, '__qualname__', fn)}"
            if kind not in self._failed:
                self._failed.add(kind)
                log.exception("%s failed (further failures of it are not logged)", kind)
            return None
