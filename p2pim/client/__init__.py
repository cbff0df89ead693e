"""The async client library: :class:`Client` and what it says (see :mod:`.facade`)."""

from __future__ import annotations

from .control import KEY_CHANGED, ClientError, Unreachable
from .events import (
    BuddyChange,
    BuddyInfo,
    ConnectionState,
    Event,
    KeyChanged,
    Message,
    Outcome,
    PathUpdate,
    PresenceChange,
    Problem,
    Receipt,
)
from .facade import Client

__all__ = [
    "KEY_CHANGED",
    "BuddyChange",
    "BuddyInfo",
    "Client",
    "ClientError",
    "ConnectionState",
    "Event",
    "KeyChanged",
    "Message",
    "Outcome",
    "PathUpdate",
    "PresenceChange",
    "Problem",
    "Receipt",
    "Unreachable",
]
