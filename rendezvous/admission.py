"""Which TCP connections the server takes: caps per source address and in all.

Decided the moment a connection is accepted, before any byte is read, so a
flood of idle sockets cannot use up the server's file descriptors and lock
everyone out, and a flood of handshakes from a few addresses cannot take
all of its CPU. No I/O: the shell calls :meth:`Admission.open` from
``connection_made`` and :meth:`Admission.close` from ``connection_lost``.

A connection over a cap is refused politely (an HTTP 503 with the reason,
which the client shows, then the socket is cut half a second later), a few
per address and second and while few are in flight; past that, in a flood,
the socket is dropped at once.
"""

from __future__ import annotations

import resource
from enum import Enum

from p2pim.ratelimit import RateLimiter

FD_RESERVE = 64  # descriptors kept for the database, STUN sockets, logs and accept() itself
REFUSALS_IN_FLIGHT = 64  # polite refusals at a time (each lingers half a second); beyond, dropped
POLITE_RATE, POLITE_BURST = 2.0, 10  # polite refusals per address and second; beyond, dropped


class Verdict(Enum):
    ACCEPT = "accept"
    REFUSE = "refuse"  # answer the handshake with 503 and the reason
    DROP = "drop"  # close the socket now


class Admission:
    """Counts open connections per source IP and in all, and those not logged in yet.

    Three caps: all connections, connections per address, and connections per
    address that have not logged in. The last is small: a connection spends
    milliseconds between accept and login, so even a NAT with many users rarely
    has several at once, while an attacker without an account can hold no more
    than that many sockets per address (each for at most the login deadline).
    """

    def __init__(
        self,
        max_total: int,
        max_per_ip: int,
        max_pending_per_ip: int,
        connect_rate: float = 10.0,
        connect_burst: float = 50,
    ) -> None:
        if min(max_total, max_per_ip, max_pending_per_ip) < 1:
            raise ValueError("connection caps must be at least 1")
        # New connections per address: a handshake costs the server far more than the
        # client, so one address may not open them as fast as it likes.
        self.rate = RateLimiter(connect_rate, connect_burst)
        # Polite refusals per address: an honest client needs one to learn why; a flood
        # gets its sockets closed at once, the cheapest answer there is.
        self.polite = RateLimiter(POLITE_RATE, POLITE_BURST)
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.max_pending_per_ip = max_pending_per_ip
        self.total = 0
        self.per_ip: dict[str, int] = {}
        self.pending: dict[str, int] = {}  # per IP: accepted, not logged in
        self.refusing = 0

    def open(self, ip: str, now: float) -> tuple[Verdict, str]:
        """A connection from ``ip`` was accepted: what to do with it, and the reason if refused."""
        here, waiting = self.per_ip.get(ip, 0), self.pending.get(ip, 0)
        bump(self.per_ip, ip, 1)
        bump(self.pending, ip, 1)
        self.total += 1
        if self.total > self.max_total:
            reason = "the server is full; try again in a minute"
        elif here >= self.max_per_ip:
            reason = f"too many connections from your address (at most {self.max_per_ip})"
        elif not self.rate.allow(ip, now):
            reason = "too many new connections from your address; slow down"
        elif waiting >= self.max_pending_per_ip:
            reason = (
                "too many connections from your address waiting to log in "
                f"(at most {self.max_pending_per_ip})"
            )
        else:
            return Verdict.ACCEPT, ""
        if self.refusing >= REFUSALS_IN_FLIGHT or not self.polite.allow(ip, now):
            return Verdict.DROP, reason
        self.refusing += 1
        return Verdict.REFUSE, reason

    def logged_in(self, ip: str) -> None:
        """A connection from ``ip`` logged in: it no longer counts as waiting."""
        bump(self.pending, ip, -1)

    def close(self, ip: str, verdict: Verdict, logged_in: bool) -> None:
        """That connection is gone (``verdict`` is what :meth:`open` said)."""
        self.total -= 1
        bump(self.per_ip, ip, -1)
        if not logged_in:
            bump(self.pending, ip, -1)
        if verdict is Verdict.REFUSE:
            self.refusing -= 1


def bump(table: dict[str, int], key: str, by: int) -> None:
    """Add ``by`` to ``table[key]``, deleting the key at zero: a table of counts per address
    holds only addresses with something live, so its size is bounded by what is live."""
    value = table.get(key, 0) + by
    if value > 0:
        table[key] = value
    else:
        table.pop(key, None)


def raise_file_limit() -> int:
    """Lift the soft open-file limit to the hard one (a server's right); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def default_max_connections(configured: int) -> int:
    """``configured``, but never more than the descriptors we have (0: as many as we have)."""
    room = max(1, raise_file_limit() - FD_RESERVE)
    return min(configured, room) if configured > 0 else room
