"""Message ids: 16 bytes, unique and ordered by creation time.

48 bits of unix milliseconds, then 80 random bits (the ULID layout), so ids
sort by time in SQLite and two devices never collide in practice.
"""

from __future__ import annotations

import os
import time

from ..wire.limits import ID_SIZE

__all__ = ["ID_SIZE", "msg_id_time_ms", "new_msg_id", "short"]


def new_msg_id(now_ms: int | None = None) -> bytes:
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return ms.to_bytes(6, "big") + os.urandom(10)


def msg_id_time_ms(msg_id: bytes) -> int:
    return int.from_bytes(msg_id[:6], "big")


def short(msg_id: bytes) -> str:
    """A short hex form for logs and the CLI."""
    return msg_id.hex()[:16]
