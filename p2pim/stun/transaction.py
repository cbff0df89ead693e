"""Sans-IO STUN client transaction (RFC 8489 §6.2.1) with the schedule passed in.

aioice's Transaction owns an asyncio timer and reads its timings from module
globals; NAT discovery needs many transactions at once on a fake clock in tests
and on short, RTT-derived timers in the field, so this one is a plain object:
ask :meth:`due` whether to (re)send now, :meth:`next_timer` when to ask again,
and feed it the answer with :meth:`answer`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from .codec import Addr, Message, encode


class TxState(enum.Enum):
    PENDING = "pending"
    ANSWERED = "answered"
    TIMED_OUT = "timed-out"
    UNREACHABLE = "unreachable"


@dataclass
class ClientTransaction:
    """One request, retransmitted with doubling intervals until answered or ``deadline``."""

    request: Message
    destination: Addr
    #: When the first transmission is due.
    start: float
    #: Interval before the first retransmission; doubles after each (RFC 8489 §6.2.1).
    rto: float
    #: Give up at this time.
    deadline: float
    #: Stop retransmitting after this many transmissions (the deadline still applies).
    max_sends: int = 7
    state: TxState = TxState.PENDING
    sends: int = 0
    first_sent_at: float | None = None
    answered_at: float | None = None
    response: Message | None = None
    #: Where the answer came from (the address the packet was sent from).
    response_from: Addr | None = None
    _next_send: float = field(init=False)
    _data: bytes = field(init=False)

    def __post_init__(self) -> None:
        self._next_send = self.start
        self._data = encode(self.request)

    @property
    def transaction_id(self) -> bytes:
        return self.request.transaction_id

    def due(self, now: float) -> bytes | None:
        """The bytes to send if a (re)transmission is due at ``now``, else None."""
        if self.state is not TxState.PENDING:
            return None
        if now >= self.deadline:
            self.state = TxState.TIMED_OUT
            return None
        if now < self._next_send or self.sends >= self.max_sends:
            return None
        if self.first_sent_at is None:
            self.first_sent_at = now
        self.sends += 1
        self._next_send = now + self.rto * (2 ** (self.sends - 1))
        return self._data

    def next_timer(self) -> float | None:
        """When :meth:`due` must be called next; None once finished."""
        if self.state is not TxState.PENDING:
            return None
        nxt = self._next_send if self.sends < self.max_sends else math.inf
        return min(nxt, self.deadline)

    def expire(self, now: float) -> None:
        if self.state is TxState.PENDING and now >= self.deadline:
            self.state = TxState.TIMED_OUT

    def answer(self, message: Message, source: Addr, now: float) -> None:
        """Record the first answer (response or error); later duplicates are ignored."""
        if self.state is TxState.PENDING:
            self.state = TxState.ANSWERED
            self.response = message
            self.response_from = source
            self.answered_at = now

    def unreachable(self) -> None:
        if self.state is TxState.PENDING:
            self.state = TxState.UNREACHABLE

    @property
    def rtt(self) -> float | None:
        """Round trip of the first transmission; only meaningful if it was not retransmitted."""
        if self.answered_at is None or self.first_sent_at is None:
            return None
        return self.answered_at - self.first_sent_at
