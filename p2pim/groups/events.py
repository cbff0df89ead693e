"""What groups tell the user (re-exported by :mod:`p2pim.client.events`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupMessage:
    group: str  # its name
    gid: bytes
    sender: str
    text: str
    msg_id: bytes
    sent_at_ms: int
    via: str = "server"  # the road of the copy shown: "server" (the fan-out) or "direct"


@dataclass(frozen=True)
class GroupChange:
    """A membership event: ``kind`` (created, invited, joined, declined, left, removed,
    renamed, role, deleted), who did it (``actor``) to whom (``subject``)."""

    group: str
    gid: bytes
    kind: str
    actor: str
    subject: str
    seq: int
