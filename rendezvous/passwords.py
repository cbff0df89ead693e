"""Password hashing: argon2id only (libsodium through pynacl).

Hashing is deliberately slow, so the server runs it in a worker thread (see
``rendezvous.server``). The cost is a server setting: ``interactive`` is the
libsodium recommendation for online logins and the default; ``moderate`` is
stronger; ``min`` exists for tests and benchmarks that log in thousands of
throwaway accounts and must never be used for real users. The parameters are
stored inside each hash, so changing the setting only affects new hashes.
"""

from __future__ import annotations

import hmac

from nacl import pwhash
from nacl.exceptions import InvalidkeyError

COSTS: dict[str, tuple[int, int]] = {
    "interactive": (pwhash.argon2id.OPSLIMIT_INTERACTIVE, pwhash.argon2id.MEMLIMIT_INTERACTIVE),
    "moderate": (pwhash.argon2id.OPSLIMIT_MODERATE, pwhash.argon2id.MEMLIMIT_MODERATE),
    "min": (pwhash.argon2id.OPSLIMIT_MIN, pwhash.argon2id.MEMLIMIT_MIN),
}
PREFIX = b"$argon2id$"
MIN_PASSWORD = 8
MAX_PASSWORD = 1024


class PasswordHasher:
    """argon2id at one cost level, plus a dummy hash so unknown users cost the same time."""

    def __init__(self, cost: str = "interactive") -> None:
        self.opslimit, self.memlimit = COSTS[cost]
        self.cost = cost
        self._dummy = self.hash("not a password, only for timing")

    def hash(self, password: str) -> bytes:
        return pwhash.argon2id.str(password.encode(), opslimit=self.opslimit, memlimit=self.memlimit)

    def verify(self, stored: bytes | None, password: str) -> bool:
        """True when ``password`` matches ``stored``; with ``stored`` None, spends the same time."""
        target = stored if stored is not None else self._dummy
        if not target.startswith(PREFIX):
            return False  # never accept another algorithm, even if libsodium could check it
        try:
            ok = pwhash.argon2id.verify(target, password.encode())
        except InvalidkeyError:
            ok = False
        return ok and stored is not None and hmac.compare_digest(target, stored)
