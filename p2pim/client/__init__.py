"""The async client library: :class:`Client` and what it says (see :mod:`.facade`).

Imported lazily, name by name, so that what needs only the event types (the LAN
command's rendering) does not load the WebSocket client and the paths.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .control import KEY_CHANGED, ClientError, Unreachable
    from .events import (
        BuddyChange,
        BuddyInfo,
        ConnectionState,
        DeviceChange,
        Event,
        GroupChange,
        GroupMessage,
        KeyChanged,
        Message,
        Outcome,
        PathUpdate,
        PresenceChange,
        Problem,
        Receipt,
        SentElsewhere,
    )
    from .facade import Client

# Where each name lives; the event types (the rest of __all__) are in .events.
_WHERE = {"KEY_CHANGED": "control", "ClientError": "control", "Unreachable": "control", "Client": "facade"}

__all__ = [
    "KEY_CHANGED",
    "BuddyChange",
    "BuddyInfo",
    "Client",
    "ClientError",
    "ConnectionState",
    "DeviceChange",
    "Event",
    "GroupChange",
    "GroupMessage",
    "KeyChanged",
    "Message",
    "Outcome",
    "PathUpdate",
    "PresenceChange",
    "Problem",
    "Receipt",
    "SentElsewhere",
    "Unreachable",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(name)
    return getattr(import_module(f".{_WHERE.get(name, 'events')}", __name__), name)
