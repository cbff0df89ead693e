"""The one asyncio driver: runs any sans-IO core (:mod:`p2pim.sansio`) with one timer.

It reads the sockets attached to it and feeds each datagram to the core,
hands what the core wants sent to the shell's ``send`` (or, by default,
to the attached socket the datagram names), passes events to ``on_event``,
and keeps one timer armed at the core's next deadline. A shell that feeds
the core through a method of its own (a message typed, a frame from the
server) calls :meth:`Driver.kick` afterwards, so the core's answer goes out
at once and the timer is armed anew. There is no task: reads, kicks and the
timer are plain callbacks, so an input costs no task switch.

One loop serves every input, so nothing a single datagram does may end it:
an exception from the core is logged once per kind and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Hashable
from typing import Any

from . import icmp
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
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``clock``: the time the core reckons in (default: the event loop's monotonic
        clock; the rendezvous hub keeps wall-clock time, for its database)."""
        self.core = core
        self._send = send or self.send_to_socket
        self._on_event = on_event or (lambda event: None)
        self.bufsize = bufsize
        self.clock = clock
        self.sockets: dict[Hashable, socket.socket] = {}
        self._icmp: set[Hashable] = set()  # sockets whose ICMP errors go to core.icmp_error
        self.done = asyncio.Event()  # set when ``until`` (see start) holds
        # Demultiplexing (RFC 9443 style): a datagram for which this returns True was taken
        # by the shell (another core's traffic on the same socket) and is not fed to ``core``.
        self.divert: Callable[[Hashable, bytes, Any], bool] | None = None
        self._until: Callable[[], bool] | None = None
        self._running = False
        self._timer: asyncio.TimerHandle | None = None
        self._due: float | None = None
        self._flushing = False
        self._again = False
        self._failed: set[str] = set()

    def now(self) -> float:
        return self.clock() if self.clock is not None else asyncio.get_running_loop().time()

    # -- sockets -----------------------------------------------------------------------

    def attach(self, label: Hashable, sock: socket.socket, icmp_errors: bool = False) -> None:
        """Read ``sock`` (non-blocking) for the core, which calls it ``label``.

        ``icmp_errors``: also the ICMP errors about what it sent (the core's
        ``icmp_error(sock, error, now)``), where the kernel can tell them.
        """
        sock.setblocking(False)
        self.sockets[label] = sock
        if icmp_errors and icmp.enable(sock):
            self._icmp.add(label)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, label, sock)

    def detach(self, label: Hashable) -> socket.socket | None:
        sock = self.sockets.pop(label, None)
        self._icmp.discard(label)
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
        return sock

    def close_sockets(self) -> None:
        for label in list(self.sockets):
            sock = self.detach(label)
            if sock is not None:
                sock.close()

    def send_to_socket(self, dg: Any) -> None:
        """The default ``send``: ``dg.data`` to ``dg.addr`` from the attached socket ``dg.sock``
        (with ``dg.ttl`` as the IP TTL, for a :class:`~p2pim.sansio.ShortDatagram`)."""
        sock = self.sockets.get(dg.sock)
        if sock is None:
            return
        try:
            icmp.send(sock, dg.data, dg.addr, getattr(dg, "ttl", None), retry=dg.sock in self._icmp)
        except OSError:  # unreachable, a full buffer: the core's own timers cope
            self._socket_error(dg.sock)

    def _readable(self, label: Hashable, sock: socket.socket) -> None:
        core = self.core
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
            self._guard(core.receive_datagram, label, data, source, self.now())
        if label in self._icmp:
            # Drained at every wake: a queued error keeps the socket readable (EPOLLERR).
            for err in icmp.read(sock):
                self._guard(core.icmp_error, label, err, self.now())  # type: ignore[attr-defined]
        self.kick()

    def _socket_error(self, label: Hashable) -> None:
        handler = getattr(self.core, "socket_error", None)
        if handler is not None:
            self._guard(handler, label, self.now())

    # -- running -----------------------------------------------------------------------

    def start(self, until: Callable[[], bool] | None = None) -> None:
        """Run the core; with ``until``, stop (and set :attr:`done`) once it holds."""
        self._until = until
        self._running = True
        self.kick()

    async def run(self, until: Callable[[], bool]) -> None:
        """Run the core until ``until()`` holds (the sockets stay open)."""
        self.start(until)
        try:
            await self.done.wait()
        finally:
            await self.close(sockets=False)

    def kick(self) -> None:
        """The core was fed: send what it has now, then arm the timer for its next deadline."""
        self._flush()
        self._arm()

    def stop(self) -> None:
        """Stop (timers and reading; the sockets stay open)."""
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._due = None, None

    async def close(self, sockets: bool = True) -> None:
        """Stop, and close the attached sockets (``sockets=False``: only stop reading them,
        for a shell that runs another core on them next)."""
        self.stop()
        if sockets:
            self.close_sockets()
        else:
            for label in list(self.sockets):
                self.detach(label)

    def _arm(self) -> None:
        if not self._running:
            return
        if self._until is not None and self._until():
            self.stop()
            self.done.set()
            return
        due = self._guard(self.core.get_timer)
        if due == self._due and (due is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = due
        if due is not None:
            # Not wait_for on an Event: on Python 3.11 it can swallow a cancel that races
            # with the event. A plain timer handle has no such race.
            self._timer = asyncio.get_running_loop().call_later(max(0.0, due - self.now()), self._fire)

    def _fire(self) -> None:
        self._timer, self._due = None, None
        self._guard(self.core.handle_timer, self.now())
        self.kick()

    def _flush(self) -> None:
        if self._flushing:  # fed again from inside a send or an event: one more round after this
            self._again = True
            return
        self._flushing = True
        core, send = self.core, self._send
        try:
            while True:
                self._again = False
                for dg in self._guard(core.datagrams_to_send, self.now()) or ():
                    try:  # inline, not _guard: the relay passes every frame through here
                        send(dg)
                    except Exception:
                        self._failure(send)
                while (event := self._guard(core.next_event)) is not None:
                    self._guard(self._on_event, event)
                if not self._again:
                    return
        finally:
            self._flushing = False

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # a bug or input nobody foresaw: one log line per kind, and on
            self._failure(fn)
            return None

    def _failure(self, fn: Callable[..., Any]) -> None:
        kind = f"{getattr(fn, '__qualname__', fn)}"
        if kind not in self._failed:
            self._failed.add(kind)
            log.exception("%s failed (further failures of it are not logged)", kind)
