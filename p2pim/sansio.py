"""The one shape every protocol core has (aioquic's verbs), and what it sends.

A core is a plain object: it is fed datagrams and the time, and asked what
to send, when its next timer is, and what happened. It never touches a
socket, a clock or asyncio, so it is tested on a fake clock, and one driver
(:class:`p2pim.driver.Driver`) runs any of them:

* ``receive_datagram(sock, data, addr, now)``: bytes arrived on the socket
  (or road) the core calls ``sock``, from ``addr``;
* ``datagrams_to_send(now)``: what to send now, each a :class:`Datagram`
  (or a richer object with the same three fields);
* ``get_timer()``: when it wants :meth:`handle_timer` (None: no timer);
* ``handle_timer(now)``: the timer fired; act on what is due;
* ``next_event()``: the next thing the user should hear of, or None.

Cores that care about ICMP errors (NAT discovery) also take
``socket_error(sock, now)``; the paths endpoint takes each error with its
offender, ``icmp_error(sock, error, now)`` (:mod:`p2pim.icmp`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

Addr = tuple[str, int]


class Datagram(NamedTuple):
    """``data`` to ``addr`` from the socket (or road) the core calls ``sock``.

    ``addr`` None means "broadcast" where the shell knows how (the LAN). ``data``
    is bytes, or an instruction its shell knows (the hub's ``Close``). A tuple:
    the relay makes one per frame, and a tuple is the cheapest object to make.
    """

    sock: Any
    data: Any
    addr: Any


class ShortDatagram(NamedTuple):
    """A :class:`Datagram` sent with IP TTL ``ttl``: it opens our NATs' mappings and dies
    on the way (hole punching), or finds the routers on the way (a TTL ladder)."""

    sock: Any
    data: Any
    addr: Any
    ttl: int


class Core(Protocol):
    def receive_datagram(self, sock: Any, data: bytes, addr: Addr, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> Sequence[Any]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Any | None: ...
