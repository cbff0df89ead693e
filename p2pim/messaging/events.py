"""What the messaging core tells the user: one set of events for the internet and the LAN."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    """A text from ``peer``, shown once (duplicates are dropped before this).

    ``route`` is the road it came by: "direct", "relay", "store" (the server's
    offline store), "lan", or "ipmsg" (an IP Messenger client: not encrypted).
    """

    peer: str
    text: str
    msg_id: bytes
    sent_at_ms: int
    route: str = "relay"
    encrypted: bool = True

    @property
    def offline(self) -> bool:
        """It waited on the server while we were offline."""
        return self.route == "store"


@dataclass(frozen=True)
class SentElsewhere:
    """Another device of our account sent ``text`` to ``peer`` (a buddy, or ``#<group id>``):
    it is in our history too."""

    peer: str
    text: str
    msg_id: bytes
    sent_at_ms: int


@dataclass(frozen=True)
class Receipt:
    """Our messages ``msg_ids`` reached ``peer`` ("delivered") or were shown there ("read")."""

    peer: str
    kind: str
    msg_ids: tuple[bytes, ...]


@dataclass(frozen=True)
class Outcome:
    """An outbox item finished: ``state`` is delivered, stored or failed (``detail`` says why)."""

    peer: str
    msg_id: bytes
    state: str
    detail: str = ""


@dataclass(frozen=True)
class Problem:
    """Something went wrong that the user should know about; the program carries on."""

    message: str


MessagingEvent = Message | SentElsewhere | Receipt | Outcome | Problem
