"""p2pim: a P2P-first instant messenger (client library and CLI).

``p2pim.Client`` is the async client API (see :mod:`p2pim.client`). It is
imported lazily so that ``p2pim nat`` starts without loading crypto.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Client", "ClientError", "Profile", "Unreachable"]

if TYPE_CHECKING:
    from .client import Client, ClientError, Unreachable
    from .profile import Profile


def __getattr__(name: str) -> Any:
    if name in ("Client", "ClientError", "Unreachable"):
        from . import client

        return getattr(client, name)
    if name == "Profile":
        from .profile import Profile

        return Profile
    raise AttributeError(name)
