"""A self-signed X.509 certificate for the identity key, so QUIC's TLS proves it.

QUIC needs a certificate; p2pim's trust is the pinned Ed25519 identity key,
not a CA. So each client makes, in memory, a minimal certificate (RFC 5280,
Ed25519 per RFC 8410) whose key *is* its identity key, signed by itself, and
the peer checks that the certificate's key is the one it pinned (TLS has
checked that the other side holds the private key). The name and validity
are placeholders nobody checks. DER by hand: the structure is fixed, and
this spares a dependency on a full X.509 library.
"""

from __future__ import annotations

from nacl.signing import SigningKey

ED25519_OID = bytes.fromhex("06032b6570")  # 1.3.101.112 (RFC 8410)
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # SubjectPublicKeyInfo up to the key
PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")  # OneAsymmetricKey up to the seed


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


def _seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


def _name(cn: str) -> bytes:
    attr = _seq(bytes.fromhex("0603550403"), _der(0x0C, cn.encode()))  # commonName, UTF8String
    return _seq(_der(0x31, attr))


def certificate(key: SigningKey) -> bytes:
    """A DER certificate for ``key``'s public key, signed by ``key``."""
    alg = _seq(ED25519_OID)
    spki = SPKI_PREFIX + bytes(key.verify_key)
    validity = _seq(_der(0x17, b"250101000000Z"), _der(0x18, b"99991231235959Z"))
    tbs = _seq(
        _der(0xA0, _der(0x02, b"\x02")),  # version v3
        _der(0x02, b"\x01"),  # serial number
        alg,
        _name("p2pim"),
        validity,
        _name("p2pim"),
        spki,
    )
    signature = key.sign(tbs).signature
    return _seq(tbs, alg, _der(0x03, b"\x00" + signature))


def private_key_pkcs8(key: SigningKey) -> bytes:
    return PKCS8_PREFIX + bytes(key)


def public_key_of(spki_or_raw: bytes) -> bytes:
    """The raw 32-byte Ed25519 key in a SubjectPublicKeyInfo (or a raw key as is)."""
    if len(spki_or_raw) == 32:
        return spki_or_raw
    if spki_or_raw.startswith(SPKI_PREFIX) and len(spki_or_raw) == len(SPKI_PREFIX) + 32:
        return spki_or_raw[len(SPKI_PREFIX) :]
    return b""
