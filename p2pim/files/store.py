"""File transfers in the client's database (the ``transfers`` table of
:mod:`p2pim.messaging.store`, on the same connection, so a received offer and
its history line commit together).

A transfer moves forward only: ``offered`` → ``accepted`` → ``done``, or to
``declined`` / ``cancelled`` / ``failed`` from any state that is not final. A
word that comes late or twice (an envelope retransmitted, a cancel crossing a
done) changes nothing. ``durable`` only grows: it is how much of the file is
safely on the receiver's disk, which is where a resumed transfer starts.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from ..messaging.store import MESSAGE_COLUMNS

FINAL = frozenset({"done", "declined", "cancelled", "failed"})
NEXT = {
    "offered": frozenset({"accepted", "declined", "cancelled", "failed"}),
    "accepted": frozenset({"done", "cancelled", "failed"}),
}
COLUMNS = (
    "file_id, peer, outgoing, name, size, blake2b, chunk_size, state, durable, path, part, "
    "mtime_ns, detail, resent, created_ms, updated_ms"
)
MAX_LISTED = 1000


@dataclass(frozen=True)
class Transfer:
    file_id: bytes
    peer: str
    outgoing: bool
    name: str  # as offered; the receiver's file on disk is ``path`` once done
    size: int
    blake2b: bytes
    chunk_size: int
    state: str
    durable: int = 0
    path: str = ""
    part: str = ""
    mtime_ns: int = 0
    detail: str = ""
    resent: int = 0
    created_ms: int = 0
    updated_ms: int = 0

    @property
    def final(self) -> bool:
        return self.state in FINAL


def _row(r: tuple[object, ...]) -> Transfer:
    return Transfer(
        bytes(r[0]),  # type: ignore[call-overload]
        str(r[1]),
        bool(r[2]),
        str(r[3]),
        int(r[4]),  # type: ignore[call-overload]
        bytes(r[5]),  # type: ignore[call-overload]
        int(r[6]),  # type: ignore[call-overload]
        str(r[7]),
        int(r[8]),  # type: ignore[call-overload]
        str(r[9]),
        str(r[10]),
        int(r[11]),  # type: ignore[call-overload]
        str(r[12]),
        int(r[13]),  # type: ignore[call-overload]
        int(r[14]),  # type: ignore[call-overload]
        int(r[15]),  # type: ignore[call-overload]
    )


class TransferStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def add(self, t: Transfer, history: tuple[bytes, str, int] | None = None) -> bool:
        """Record a new transfer; with ``history`` = (msg_id, line, sent_at_ms), also the
        received offer's history line, in one transaction. False if either was there already
        (a retransmitted offer): nothing changes then."""
        with self.conn:
            self.conn.execute("BEGIN")
            if history is not None:
                msg_id, line, sent_at_ms = history
                cur = self.conn.execute(
                    f"INSERT OR IGNORE INTO messages ({MESSAGE_COLUMNS}) "
                    "VALUES (?, ?, 0, ?, ?, ?, 'received', '')",
                    (msg_id, t.peer, line, sent_at_ms, t.created_ms),
                )
                if cur.rowcount == 0:
                    return False
            cur = self.conn.execute(
                f"INSERT OR IGNORE INTO transfers ({COLUMNS}) VALUES ({', '.join('?' * 16)})",
                (
                    t.file_id,
                    t.peer,
                    int(t.outgoing),
                    t.name,
                    t.size,
                    t.blake2b,
                    t.chunk_size,
                    t.state,
                    t.durable,
                    t.path,
                    t.part,
                    t.mtime_ns,
                    t.detail,
                    t.resent,
                    t.created_ms,
                    t.updated_ms,
                ),
            )
            return cur.rowcount > 0

    def get(self, file_id: bytes) -> Transfer | None:
        r = self.conn.execute(f"SELECT {COLUMNS} FROM transfers WHERE file_id = ?", (file_id,)).fetchone()
        return _row(r) if r else None

    def find(self, prefix: str) -> list[Transfer]:
        """Transfers whose id (hex) starts with ``prefix``: how the CLI names them."""
        prefix = prefix.lower()
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            return []
        return [t for t in self.list() if t.file_id.hex().startswith(prefix)]

    def list(self, *, active: bool = False, limit: int = MAX_LISTED) -> list[Transfer]:
        """Newest last; ``active``: only those not final."""
        where = "WHERE state NOT IN ('done', 'declined', 'cancelled', 'failed')" if active else ""
        rows = self.conn.execute(
            f"SELECT {COLUMNS} FROM (SELECT {COLUMNS}, rowid AS r FROM transfers {where} "
            "ORDER BY created_ms DESC, r DESC LIMIT ?) ORDER BY created_ms, r",
            (limit,),
        ).fetchall()
        return [_row(r) for r in rows]

    def count(self, peer: str, state: str) -> int:
        """How many transfers with ``peer`` are in ``state`` (open offers, for their bound)."""
        row = self.conn.execute("SELECT COUNT(*) FROM transfers WHERE peer = ? AND state = ?", (peer, state))
        return int(row.fetchone()[0])

    def move(self, file_id: bytes, state: str, now_ms: int, detail: str = "", **fields: object) -> bool:
        """Move to ``state`` if that is forward from where it is (True), also setting ``fields``
        (``path``, ``part``); a late or repeated word is ignored (False)."""
        t = self.get(file_id)
        if t is None or state not in NEXT.get(t.state, frozenset()):
            return False
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(
            f"UPDATE transfers SET state = ?, detail = ?, updated_ms = ?{', ' + sets if sets else ''} "
            "WHERE file_id = ?",
            (state, detail, now_ms, *fields.values(), file_id),
        )
        return True

    def set_durable(self, file_id: bytes, durable: int, now_ms: int) -> None:
        """How far the receiver's disk has it; never goes back."""
        self.conn.execute(
            "UPDATE transfers SET durable = ?, updated_ms = ? WHERE file_id = ? AND durable < ?",
            (durable, now_ms, file_id, durable),
        )

    def add_resent(self, file_id: bytes, count: int) -> None:
        if count:
            self.conn.execute("UPDATE transfers SET resent = resent + ? WHERE file_id = ?", (count, file_id))
