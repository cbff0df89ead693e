"""Where a user's identity and local database live.

``$XDG_DATA_HOME/p2pim/profiles/NAME`` (``~/.local/share/...`` when unset), one
directory per ``--profile``, created mode 0700. It holds ``identity.key``
(0600: the account's identity key, the same on each of its devices), on a linked
device ``device.key`` (0600: the key this device logs in with; without it, the
identity key does, as on an account's first device), and ``p2pim.db`` (0600;
contacts with pinned keys, history, outbox, and the server session).
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from .identity import Identity

PROFILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def try_lock(path: Path) -> int | None:
    """An exclusive lock on ``path`` (made 0600 if absent), held while the returned file
    descriptor is open; None when another process holds it. One session of a kind per
    profile: the transfer mover, the app."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class ProfileError(Exception):
    """A bad profile name or an unusable profile directory."""


def data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


class Profile:
    def __init__(self, name: str = "default", root: Path | None = None) -> None:
        if not PROFILE_RE.fullmatch(name):
            raise ProfileError(f"bad profile name {name!r} (letters, digits, '.', '_', '-')")
        self.name = name
        self.path = (root or data_home() / "p2pim" / "profiles") / name
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ProfileError(f"cannot create profile directory {self.path}: {exc.strerror}") from None
        self._identity: Identity | None = None

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            self._identity = Identity.load_or_create(self.path / "identity.key")
        return self._identity

    @property
    def device(self) -> Identity:
        """The key this device logs in with: its own once linked, else the identity key."""
        path = self.path / "device.key"
        return Identity.load_or_create(path) if path.exists() else self.identity

    def device_key_for_link(self) -> Identity:
        """This device's own key (made now if it has none), for linking it to an account."""
        return Identity.load_or_create(self.path / "device.key")

    def adopt(self, identity: Identity) -> None:
        """Linked: the account's identity key is ours now (the one made here is set aside)."""
        old = self.path / "identity.key"
        if old.exists():
            old.replace(self.path / "identity.key.unlinked")
        identity.save(old)
        self._identity = identity

    def reset(self, identity: Identity) -> None:
        """``login --new-key`` worked: ``identity`` is the account's key and this device's."""
        for name in ("identity.key", "device.key"):
            if (self.path / name).exists():
                (self.path / name).replace(self.path / f"{name}.replaced")
        identity.save(self.path / "identity.key")
        self._identity = identity

    @property
    def db_path(self) -> Path:
        return self.path / "p2pim.db"
