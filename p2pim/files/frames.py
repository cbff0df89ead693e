"""File frames on the relay: ``FILE_MAGIC | nonce (24) | NaCl box(FileFrame)``.

The relay carries disco packets, envelopes and these, told apart by the first
bytes (:mod:`p2pim.paths.disco`). The server knows who sent a relayed frame;
the box, between the two identity keys, is what makes the bytes the buddy's
and keeps them from the server. (On a direct QUIC path, TLS with the same
keys does both, and frames go unsealed.)
"""

from __future__ import annotations

import os

from nacl.exceptions import CryptoError

from ..identity import BoxCache, Identity

FILE_MAGIC = b"P2Pf"
NONCE_LEN = 24
MAC_LEN = 16


class FrameError(ValueError):
    """Not a file frame we can open (garbage, or not sealed by that peer's key)."""


def is_file_frame(data: bytes) -> bool:
    return data[:4] == FILE_MAGIC


class FrameBoxes:
    def __init__(self, identity: Identity) -> None:
        self._box = BoxCache(identity)

    def seal(self, peer_key: bytes, frame: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return FILE_MAGIC + nonce + self._box(peer_key).encrypt(frame, nonce).ciphertext

    def open(self, peer_key: bytes, data: bytes) -> bytes:
        if not is_file_frame(data) or len(data) < 4 + NONCE_LEN + MAC_LEN:
            raise FrameError("not a file frame")
        try:
            return self._box(peer_key).decrypt(data[4 + NONCE_LEN :], data[4 : 4 + NONCE_LEN])
        except (CryptoError, ValueError) as exc:
            raise FrameError(f"cannot open: {exc}") from None
