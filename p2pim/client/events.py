"""What the client tells its user: the messaging core's events plus the server's and the paths'."""

from __future__ import annotations

from dataclasses import dataclass

from ..files.events import FileAnswered, FileDone, FileFailed, FileOffered, FileProgress
from ..groups.events import GroupChange, GroupMessage
from ..messaging.events import Message, Outcome, Problem, Receipt, SentElsewhere


@dataclass(frozen=True)
class PresenceChange:
    peer: str
    status: str  # online, away, offline
    last_seen_ms: int


@dataclass(frozen=True)
class BuddyChange:
    peer: str
    kind: str  # requested, accepted, declined, removed


@dataclass(frozen=True)
class KeyChanged:
    """The server offers a different key for ``peer`` than the one pinned: never used silently."""

    peer: str
    pinned: str  # fingerprints
    offered: str


@dataclass(frozen=True)
class ConnectionState:
    up: bool
    detail: str


@dataclass(frozen=True)
class PathUpdate:
    """Traffic to ``peer`` now goes ``via`` "direct" (to ``addr``) or "relay"."""

    peer: str
    via: str
    addr: str
    rtt_ms: float | None
    reason: str


@dataclass(frozen=True)
class BuddyInfo:
    username: str
    state: str  # buddy, request sent, asks to be your buddy
    presence: str
    last_seen_ms: int
    fingerprint: str
    key_warning: bool  # the server's key differs from the pinned one


@dataclass(frozen=True)
class DeviceChange:
    """A device was linked to our account ("added") or removed from it; ``devices``: how many now."""

    kind: str
    device_id: int
    name: str
    devices: int


Event = (
    Message
    | SentElsewhere
    | DeviceChange
    | Receipt
    | PresenceChange
    | BuddyChange
    | KeyChanged
    | Outcome
    | Problem
    | ConnectionState
    | PathUpdate
    | FileOffered
    | FileAnswered
    | FileProgress
    | FileDone
    | FileFailed
    | GroupMessage
    | GroupChange
)
