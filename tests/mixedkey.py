"""An identity key with a small-order component, and signatures it makes.

Such a key is A + T (A a real public key, T the point of order 2). libsodium
accepts signatures from it, because it only refuses keys *of* small order,
but cannot convert it to a Curve25519 key, so any box sealed to or from it
fails. An attacker can sign with it: a signature (R, S) made with A's secret
scalar verifies under A + T whenever h = H(R || A+T || M) is even (then h*T
is the identity), so half of all nonces work. Tests use this to show such
keys are refused wherever one arrives.
"""

from __future__ import annotations

import hashlib
import os

from nacl.bindings import (
    crypto_core_ed25519_add,
    crypto_core_ed25519_scalar_reduce,
    crypto_scalarmult_ed25519_base_noclamp,
)
from nacl.signing import SigningKey, VerifyKey

ORDER_2_POINT = bytes.fromhex("ec" + "ff" * 30 + "7f")  # (0, -1)
L = 2**252 + 27742317777372353535851937790883648493


class MixedKey:
    def __init__(self) -> None:
        self.signing_key = SigningKey.generate()
        digest = hashlib.sha512(bytes(self.signing_key)).digest()
        a = bytearray(digest[:32])
        a[0] &= 248
        a[31] &= 127
        a[31] |= 64
        self._a = int.from_bytes(a, "little")
        self.public_key = crypto_core_ed25519_add(bytes(self.signing_key.verify_key), ORDER_2_POINT)

    def sign(self, message: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``message`` that verifies under :attr:`public_key`."""
        while True:
            r = crypto_core_ed25519_scalar_reduce(os.urandom(64))
            big_r = crypto_scalarmult_ed25519_base_noclamp(r)
            h = int.from_bytes(hashlib.sha512(big_r + self.public_key + message).digest(), "little") % L
            if h % 2 == 0:
                s = (int.from_bytes(r, "little") + h * self._a) % L
                signature = big_r + s.to_bytes(32, "little")
                VerifyKey(self.public_key).verify(message, signature)  # libsodium takes it
                return signature
