"""A user's identity key: one Ed25519 key pair, kept in the profile (mode 0600).

Ed25519 signs the login challenge; the same key, converted to Curve25519,
seals envelopes in a NaCl box. One key means one fingerprint to compare, and a
buddy's key pinned once covers both uses.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

KEY_SIZE = 32
LOGIN_CONTEXT = b"p2pim-login\0"


class IdentityError(Exception):
    """The key file is missing, unreadable or not a key."""


class BadPublicKey(ValueError):
    """Bytes that are not a usable identity public key (see :func:`valid_public_key`)."""


@functools.lru_cache(maxsize=1024)
def valid_public_key(key: bytes) -> bool:
    """True if ``key`` can be an identity: a canonical Ed25519 point of the prime-order subgroup.

    libsodium verifies signatures from keys with a small-order component (it
    only refuses keys of small order), but cannot convert them to Curve25519,
    so such a key could log in and then break every box sealed for it. Every
    key that arrives from outside (register, buddy lists, LAN announcements,
    disco) passes this check before it is pinned or used. Cached (bounded): the
    subgroup check costs a scalar multiplication (~60 µs), and a client checks its
    few buddies' keys on every seal, open and send.
    """
    return len(key) == KEY_SIZE and bool(crypto_core_ed25519_is_valid_point(key))


def login_message(nonce: bytes, username: str) -> bytes:
    """What the identity key signs to log in: bound to this server nonce and this name."""
    return LOGIN_CONTEXT + nonce + username.encode()


def verify_login(public_key: bytes, nonce: bytes, username: str, signature: bytes) -> bool:
    """True if ``signature`` is ``public_key``'s signature of :func:`login_message`."""
    if not valid_public_key(public_key):
        return False
    try:
        VerifyKey(public_key).verify(login_message(nonce, username), signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def fingerprint(public_key: bytes) -> str:
    """Human-comparable digest of a public key: 8 groups of 5 decimal digits (Signal-style)."""
    digest = hashlib.sha512(b"p2pim-fingerprint\0" + public_key).digest()
    groups = [int.from_bytes(digest[i : i + 5], "big") % 100000 for i in range(0, 40, 5)]
    return " ".join(f"{g:05d}" for g in groups)


def box_public_key(public_key: bytes) -> PublicKey:
    """The Curve25519 key a buddy's Ed25519 identity key stands for; :class:`BadPublicKey` if none."""
    if not valid_public_key(public_key):
        raise BadPublicKey("not a valid Ed25519 identity key")
    try:
        return VerifyKey(public_key).to_curve25519_public_key()
    except (CryptoError, ValueError, TypeError):
        raise BadPublicKey("not a valid Ed25519 identity key") from None


class BoxCache:
    """NaCl boxes between one identity and its peers, one per peer key (making one costs a
    Curve25519 multiplication: a busy path must not pay it per packet). Bounded."""

    MAX = 4096

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._boxes: dict[bytes, Box] = {}

    def __call__(self, peer_key: bytes) -> Box:
        box = self._boxes.get(peer_key)
        if box is None:
            if len(self._boxes) >= self.MAX:
                self._boxes.clear()
            box = Box(self.identity.box_private, box_public_key(peer_key))
            self._boxes[peer_key] = box
        return box


class Identity:
    """The private identity key and what is derived from it."""

    def __init__(self, signing_key: SigningKey) -> None:
        self.signing_key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.box_private: PrivateKey = signing_key.to_curve25519_private_key()

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != KEY_SIZE:
            raise ValueError(f"an identity key is {KEY_SIZE} bytes")
        return cls(SigningKey(seed))

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Read the key at ``path``, creating it (mode 0600, atomically) if absent."""
        try:
            seed = path.read_bytes()
        except FileNotFoundError:
            ident = cls.generate()
            ident.save(path)
            return ident
        except OSError as exc:
            raise IdentityError(f"cannot read identity key {path}: {exc.strerror}") from None
        if len(seed) != KEY_SIZE:
            raise IdentityError(f"{path} is not an identity key ({len(seed)} bytes, expected {KEY_SIZE})")
        return cls(SigningKey(seed))

    def save(self, path: Path) -> None:
        """Write the private key to ``path`` (mode 0600), atomically and durably."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, self.seed)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    @property
    def seed(self) -> bytes:
        return bytes(self.signing_key)

    def sign_login(self, nonce: bytes, username: str) -> bytes:
        return self.signing_key.sign(login_message(nonce, username)).signature

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)
