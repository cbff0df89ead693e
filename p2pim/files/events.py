"""What the file transfer core tells the user (and the shell, which answers some)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FileOffered:
    """``peer`` offers a file; nothing is written until it is accepted."""

    peer: str
    file_id: bytes
    name: str  # as the sender named it (sanitized only when accepted)
    size: int
    encrypted: bool = True  # False: an IP Messenger peer's (plain TCP, no hash)


@dataclass(frozen=True)
class FileAnswered:
    """``peer`` accepted, declined, cancelled or failed transfer ``file_id`` (``kind``)."""

    peer: str
    file_id: bytes
    name: str
    kind: str  # accepted|declined|cancelled|failed
    reason: str = ""


@dataclass(frozen=True)
class FileProgress:
    """``done`` of ``size`` bytes have reached the receiver (at most every half second)."""

    peer: str
    file_id: bytes
    name: str
    outgoing: bool
    done: int
    size: int


@dataclass(frozen=True)
class FileDone:
    """The whole file arrived and its hash matched (``path``: where it is on this side)."""

    peer: str
    file_id: bytes
    name: str
    outgoing: bool
    path: str
    size: int
    resent: int = 0  # bytes that went (or came) twice: what resuming cost
    direct: int = 0  # bytes that went (or came) over QUIC on the punched path, this session
    encrypted: bool = True  # False: with an IP Messenger peer (plain TCP; only the size checked)


@dataclass(frozen=True)
class FileFailed:
    """This side cannot go on with the transfer (``reason``); the peer is told."""

    peer: str
    file_id: bytes
    name: str
    outgoing: bool
    reason: str


FileEvent = FileOffered | FileAnswered | FileProgress | FileDone | FileFailed
