"""asyncio shell around :class:`StunServerCore`: binds its sockets, moves bytes.

One datagram endpoint per (ip, port) the core names. Each received datagram
goes to the core with the local address it arrived on; the answer leaves
through whichever of our sockets the core picks (that is how CHANGE-REQUEST is
honoured). Nothing here parses or decides.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from p2pim.stun.codec import Addr

from .stun_server import StunServerCore

log = logging.getLogger(__name__)


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, service: StunService, local: Addr) -> None:
        self.service = service
        self.local = local

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.service.datagram_received(data, self.local, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier answers (client gone): nothing to do.
        self.service.socket_errors += 1


class StunService:
    """The running service; ``await StunService.start(core)``, then ``close()``."""

    def __init__(self, core: StunServerCore) -> None:
        self.core = core
        self.socket_errors = 0
        self._transports: dict[Addr, asyncio.DatagramTransport] = {}
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def start(cls, core: StunServerCore) -> StunService:
        service = cls(core)
        try:
            for local in core.local_addresses():
                family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
                transport, _ = await service._loop.create_datagram_endpoint(
                    lambda local=local: _Endpoint(service, local),  # type: ignore[misc]
                    local_addr=local,
                    family=family,
                )
                service._transports[local] = transport
        except OSError:
            service.close()
            raise
        return service

    def datagram_received(self, data: bytes, local: Addr, remote: Addr) -> None:
        out = self.core.handle(data, local, remote, self._loop.time())
        if out is not None:
            self._transports[out.source].sendto(out.data, out.destination)

    @property
    def addresses(self) -> list[Addr]:
        return list(self._transports)

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()
