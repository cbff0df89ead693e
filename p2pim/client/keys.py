"""Key pinning: whose envelopes we open, to whom we seal, who may reach us directly.

A buddy's identity key is pinned the first time the server shows it (trust on
first use); a different key later is *offered*, never used, until the user
compares fingerprints and trusts it. Only mutual buddies may send to us
directly or probe our UDP socket: the relay enforces the same for relayed
traffic.
"""

from __future__ import annotations

import time

from ..identity import fingerprint, valid_public_key
from ..messaging.core import Keys
from ..messaging.delivery import Via
from ..messaging.store import ClientStore
from .events import KeyChanged


class KeyRing:
    def __init__(self, store: ClientStore) -> None:
        self.store = store
        self.mutual: set[str] = set()  # buddies both ways, as the server last said
        self.me = ""  # our account (logged in), and its identity key
        self.own_key = b""

    def for_envelope(self, name: str, via: Via) -> Keys | None:
        """The keys to open ``name``'s envelope with; on the direct path only a mutual buddy's;
        our own account's (a copy from another of our devices) only from the store."""
        if name == self.me and self.me:
            return Keys(self.own_key, None) if via is Via.STORE else None
        if via is Via.DIRECT and name not in self.mutual:
            return None  # the relay would refuse it; so do we
        contact = self.store.contact(name)
        return None if contact is None else Keys(contact.identity_key, contact.offered_key)

    def direct_key(self, name: str) -> bytes | None:
        """A mutual buddy's pinned key, unless the server offers another one not yet trusted:
        who may send us file frames, and whose QUIC link we take."""
        contact = self.store.contact(name)
        if contact is None or contact.offered_key is not None or name not in self.mutual:
            return None
        return contact.identity_key

    def for_disco(self) -> dict[bytes, str]:
        """Pinned keys of mutual buddies: nobody else may probe us or send to us directly."""
        return {k: u for k, u in self.store.keys().items() if u in self.mutual and valid_public_key(k)}

    def see(self, peer: str, key: bytes) -> KeyChanged | str | None:
        """Pin ``key`` on first sight. A change gives a :class:`KeyChanged` (the old key is
        kept), an unusable key a problem text; None when all is well."""
        if not valid_public_key(key):
            return f"the server offers an unusable key for {peer}: ignored"
        if self.store.see_key(peer, key, int(time.time() * 1000)) != "changed":
            return None
        pinned = self.store.contact(peer)
        assert pinned is not None
        return KeyChanged(peer, fingerprint(pinned.identity_key), fingerprint(key))
