"""A set of STUN probes over several labelled sockets, sans-IO.

NAT discovery and binding-lifetime measurement both send requests from some
sockets and watch for what arrives on (possibly other) sockets: a hairpin test
sends from one socket and succeeds when the *request* arrives on another; a
lifetime test sends with RESPONSE-PORT and succeeds when the *response* arrives
on another. :class:`ProbeSet` does that bookkeeping; planners on top decide
which probes to run.

Shell contract: call :meth:`receive` for every datagram, :meth:`socket_error`
for ICMP errors, send what :meth:`datagrams_to_send` returns, and call
:meth:`handle_timer` at :meth:`get_timer`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from p2pim.sansio import Datagram
from p2pim.stun import codec
from p2pim.stun.codec import Addr, Class
from p2pim.stun.transaction import ClientTransaction, TxState


class Outcome(enum.Enum):
    PENDING = "pending"
    ANSWERED = "answered"  # a success response (or the echoed request) arrived
    ERROR = "error"  # an error response arrived
    WRONG_SOURCE = "wrong-source"  # answered, but not from the address asked for
    TIMED_OUT = "timed-out"
    UNREACHABLE = "unreachable"  # ICMP said nobody listens
    CANCELLED = "cancelled"  # the planner no longer needs it


@dataclass
class Probe:
    """One request and where its answer must show up."""

    name: str
    #: Socket label the request leaves from.
    send_on: str
    tx: ClientTransaction
    #: Socket label the answer must arrive on (defaults to ``send_on``).
    receive_on: str = ""
    #: The answer must come from this address (for CHANGE-REQUEST tests).
    expect_from: Addr | None = None
    #: True when success is our own *request* arriving (hairpinning).
    expect_request: bool = False
    #: Treat an ICMP error on ``send_on`` as a final "unreachable".
    fail_on_icmp: bool = False
    outcome: Outcome = Outcome.PENDING

    def __post_init__(self) -> None:
        self.receive_on = self.receive_on or self.send_on

    @property
    def done(self) -> bool:
        return self.outcome is not Outcome.PENDING

    @property
    def mapped(self) -> Addr | None:
        return codec.mapped_address(self.tx.response) if self.tx.response else None

    @property
    def error_code(self) -> int | None:
        return self.tx.response.error_code if self.tx.response else None


@dataclass
class ProbeCounters:
    received: int = 0
    malformed: int = 0
    unmatched: int = 0


class ProbeSet:
    """Probes in flight, matched to incoming datagrams by transaction id."""

    def __init__(self) -> None:
        self._by_tid: dict[bytes, Probe] = {}
        self.counters = ProbeCounters()

    def add(self, probe: Probe) -> Probe:
        self._by_tid[probe.tx.transaction_id] = probe
        return probe

    @property
    def probes(self) -> list[Probe]:
        return list(self._by_tid.values())

    @property
    def all_done(self) -> bool:
        return all(p.done for p in self._by_tid.values())

    def receive(self, sock: str, data: bytes, source: Addr, now: float) -> Probe | None:
        """Match one datagram to a probe; returns the probe it completed, if any."""
        self.counters.received += 1
        try:
            decoded = codec.decode(data)
        except codec.StunDecodeError:
            self.counters.malformed += 1
            return None
        msg = decoded.message
        probe = self._by_tid.get(msg.transaction_id)
        is_request = msg.message_class == Class.REQUEST
        if (
            probe is None
            or probe.done
            or sock != probe.receive_on
            or decoded.classic
            or is_request != probe.expect_request
        ):
            self.counters.unmatched += 1
            return None
        probe.tx.answer(msg, source, now)
        if msg.message_class == Class.ERROR:
            probe.outcome = Outcome.ERROR
        elif probe.expect_from is not None and source != probe.expect_from:
            probe.outcome = Outcome.WRONG_SOURCE
        else:
            probe.outcome = Outcome.ANSWERED
        return probe

    def socket_error(self, sock: str) -> None:
        for probe in self._by_tid.values():
            if probe.fail_on_icmp and probe.send_on == sock and not probe.done:
                probe.tx.unreachable()
                probe.outcome = Outcome.UNREACHABLE

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        out = []
        for probe in self._by_tid.values():
            if probe.done:
                continue
            data = probe.tx.due(now)
            if data is not None:
                out.append(Datagram(probe.send_on, data, probe.tx.destination))
            self._settle(probe)
        return out

    def get_timer(self) -> float | None:
        timers = [t for p in self._by_tid.values() if not p.done and (t := p.tx.next_timer()) is not None]
        return min(timers) if timers else None

    def handle_timer(self, now: float) -> None:
        for probe in self._by_tid.values():
            probe.tx.expire(now)
            self._settle(probe)

    @staticmethod
    def _settle(probe: Probe) -> None:
        if probe.tx.state is TxState.TIMED_OUT and not probe.done:
            probe.outcome = Outcome.TIMED_OUT


class ProbePlanner:
    """A planner that runs its tests as a :class:`ProbeSet`, with the common core verbs
    (:mod:`p2pim.sansio`), so :class:`p2pim.driver.Driver` runs it.

    Subclasses set ``self.probes`` and implement :meth:`_advance`, which looks at
    finished probes and adds new ones; it runs after every input.
    """

    probes: ProbeSet

    @property
    def done(self) -> bool:
        raise NotImplementedError

    def next_event(self) -> None:
        """Planners report at the end (their ``report()``/``result()``), not as events."""
        return None

    def receive_datagram(self, sock: str, data: bytes, source: Addr, now: float) -> None:
        self.probes.receive(sock, data, source, now)
        self._advance(now)

    def socket_error(self, sock: str, now: float) -> None:
        self.probes.socket_error(sock)
        self._advance(now)

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        out = self.probes.datagrams_to_send(now)
        self._advance(now)
        return out

    def get_timer(self) -> float | None:
        return self.probes.get_timer()

    def handle_timer(self, now: float) -> None:
        self.probes.handle_timer(now)
        self._advance(now)

    def _advance(self, now: float) -> None:
        raise NotImplementedError
