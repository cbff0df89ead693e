"""The shell of :class:`StunServerCore`: its sockets, run by the shared driver.

One UDP socket per (ip, port) the core names, labelled by that address, so the
core knows where each request arrived; the answer leaves through whichever of
our sockets the core picks (that is how CHANGE-REQUEST is honoured). Nothing
here parses or decides.
"""

from __future__ import annotations

import logging
import socket

from p2pim.driver import Driver
from p2pim.sansio import Datagram
from p2pim.stun.codec import Addr

from .stun_server import StunServerCore

log = logging.getLogger(__name__)


class StunService:
    """The running service; ``await StunService.start(core)``, then ``close()``."""

    def __init__(self, core: StunServerCore) -> None:
        self.core = core
        self.socket_errors = 0
        self._driver = Driver(core, self._send)

    @classmethod
    async def start(cls, core: StunServerCore) -> StunService:
        service = cls(core)
        try:
            for local in core.local_addresses():
                family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    sock.bind(local)
                except OSError:
                    sock.close()
                    raise
                service._driver.attach(local, sock)
        except OSError:
            service._driver.close_sockets()
            raise
        service._driver.start()
        return service

    def _send(self, dg: Datagram) -> None:
        sock = self._driver.sockets.get(dg.sock)
        if sock is None:
            return
        try:
            sock.sendto(dg.data, dg.addr)
        except OSError:  # the client is gone, a full buffer: nothing to do
            self.socket_errors += 1

    @property
    def addresses(self) -> list[Addr]:
        return list(self._driver.sockets)  # type: ignore[arg-type]

    def close(self) -> None:
        self._driver.close_sockets()
        self._driver.stop()
