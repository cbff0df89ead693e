"""ICMP errors on a UDP socket, and sends with a short TTL (Linux).

Hole punching through routers that answer unsolicited packets (no input
firewall) needs packets that open our own NAT's mapping but die before they
reach the peer's router, and to aim them it needs to know how many hops our
NATs are. Both come from the kernel: a UDP socket with ``IP_RECVERR`` queues
every ICMP error about a packet it sent, with the router that sent it
(the *offender*); ``IP_TTL`` limits how far a packet goes.

Everything here is best effort: where the kernel lacks a feature, nothing is
reported and sends go with the default TTL.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
ICMP_TIME_EXCEEDED = 11
ICMP6_TIME_EXCEEDED = 3
_EE = struct.Struct("=IBBBBII")  # struct sock_extended_err
MAX_ERRORS_PER_READ = 64


@dataclass(frozen=True)
class IcmpError:
    """An ICMP error about a datagram we sent to ``dest``, from router ``offender``."""

    dest: tuple[str, int]
    offender: str | None
    time_exceeded: bool  # the TTL ran out on the way (else: unreachable, and the like)
    payload: bytes  # what the router quoted of our datagram (may be empty)


def enable(sock: socket.socket) -> bool:
    """Queue ICMP errors about this socket's datagrams (read them with :func:`read`)."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        return True
    except OSError:
        return False


def read(sock: socket.socket) -> list[IcmpError]:
    """Drain the socket's error queue (non-blocking)."""
    out: list[IcmpError] = []
    for _ in range(MAX_ERRORS_PER_READ):
        try:
            data, ancdata, _flags, addr = sock.recvmsg(2048, 512, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        err = _parse(ancdata, addr, data)
        if err is not None:
            out.append(err)
    return out


def _parse(ancdata: list[tuple[int, int, bytes]], addr: object, data: bytes) -> IcmpError | None:
    for level, kind, blob in ancdata:
        if (level, kind) not in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
            continue
        if len(blob) < _EE.size:
            return None
        _errno, origin, icmp_type, _code, _pad, _info, _data = _EE.unpack_from(blob)
        if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
            return None
        exceeded = icmp_type == (ICMP_TIME_EXCEEDED if origin == SO_EE_ORIGIN_ICMP else ICMP6_TIME_EXCEEDED)
        dest = (str(addr[0]), int(addr[1])) if isinstance(addr, tuple) and len(addr) >= 2 else ("", 0)
        return IcmpError(dest, _offender(blob[_EE.size :]), exceeded, bytes(data))
    return None


def _offender(sa: bytes) -> str | None:
    """The ``SO_EE_OFFENDER`` sockaddr after the extended error (AF_UNSPEC: none)."""
    if len(sa) >= 8 and struct.unpack_from("=H", sa)[0] == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, sa[4:8])
    if len(sa) >= 24 and struct.unpack_from("=H", sa)[0] == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, sa[8:24])
    return None


def send(
    sock: socket.socket, data: bytes, addr: tuple[str, int], ttl: int | None = None, retry: bool = True
) -> None:
    """``sendto``, with the IP TTL (IPv6: hop limit) set for this one datagram if ``ttl``.

    With ``IP_RECVERR`` on, a pending ICMP error (a punch that died on the way,
    as it was meant to) fails the next send once, whatever its destination:
    that send is made again (``retry=False``: a shell that wants that error).
    """
    if ttl is None:
        _sendto(sock, data, addr, retry)
        return
    level, opt = (
        (socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS)
        if sock.family == socket.AF_INET6
        else (socket.IPPROTO_IP, socket.IP_TTL)
    )
    before = sock.getsockopt(level, opt)
    sock.setsockopt(level, opt, ttl)
    try:
        _sendto(sock, data, addr, retry)
    finally:
        sock.setsockopt(level, opt, before)


def _sendto(sock: socket.socket, data: bytes, addr: tuple[str, int], retry: bool) -> None:
    try:
        sock.sendto(data, addr)
    except (BlockingIOError, InterruptedError):
        raise
    except OSError:
        if not retry:
            raise
        sock.sendto(data, addr)  # the error was an earlier datagram's; a real one raises again


def is_public(ip: str) -> bool:
    """An address on the open Internet: not private, shared (CGNAT), loopback or link-local.

    The documentation ranges count as public here: natlab's "Internet" uses them.
    """
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if a in _SHARED or a.is_loopback or a.is_link_local or a.is_multicast or a.is_unspecified:
        return False
    return not a.is_private or any(a in net for net in _DOCUMENTATION)


_SHARED = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598, carrier-grade NAT
_DOCUMENTATION = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
